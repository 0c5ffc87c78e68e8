// Kestrel's CPU kernels: the small ops of a decoder layer fused, and decode attention that reads K/V
// through the req-to-token table in place (no gather, no padding).
//
// Built on the machine that runs it (-O3 -march=native), so the compiler vectorizes the inner loops
// for that CPU's widest ISA (AVX2 or AVX-512). Built with -ffp-contract=off: the elementwise kernels round
// exactly as the PyTorch ops they replace; attention asks for its fused multiply-adds explicitly. Every kernel accumulates in float32, whatever the
// storage dtype (float32 or bfloat16), and rounds once on output.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T> inline float to_f(T x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return static_cast<T>(x); }

// exp(x) that the compiler vectorizes (libm's expf is a scalar call): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its degree-7 Taylor polynomial (relative error < 2e-7, about one float ulp), times 2^n.
inline float vexp(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = std::fma(n, -6.93145752e-1f, std::fma(n, -1.42860677e-6f, x));
  float p = 1.f / 5040;
  p = std::fma(p, r, 1.f / 720);
  p = std::fma(p, r, 1.f / 120);
  p = std::fma(p, r, 1.f / 24);
  p = std::fma(p, r, 1.f / 6);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// ---- residual add + RMSNorm ------------------------------------------------------------------------
// hidden += delta (in place, when delta is given), then out = weight * (hidden * rsqrt(mean(hidden^2) + eps)),
// rounding hidden * rsqrt to the dtype before the weight, as the reference (transformers) does.
template <typename T>
void rms_norm_impl(T* hidden, const T* delta, const T* weight, T* out, int64_t rows, int64_t dim, double eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(dim);
    for (int64_t r = begin; r < end; ++r) {
      T* h = hidden + r * dim;
      float ss = 0.f;
      for (int64_t i = 0; i < dim; ++i) {
        float x = to_f(h[i]);
        if (delta) {
          x = to_f(from_f<T>(x + to_f(delta[r * dim + i])));
          h[i] = from_f<T>(x);
        }
        buf[i] = x;
        ss += x * x;
      }
      float inv = 1.f / std::sqrt(ss / dim + static_cast<float>(eps));
      T* o = out + r * dim;
      for (int64_t i = 0; i < dim; ++i) o[i] = from_f<T>(to_f(weight[i]) * to_f(from_f<T>(buf[i] * inv)));
    }
  });
}

at::Tensor add_rms_norm(at::Tensor hidden, c10::optional<at::Tensor> delta, at::Tensor weight, double eps) {
  check_cpu(hidden, "hidden");
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [tokens, dim] tensor");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight and hidden must have one dtype");
  at::Tensor d;
  if (delta) {
    d = delta->contiguous();
    TORCH_CHECK(d.sizes() == hidden.sizes() && d.scalar_type() == hidden.scalar_type(), "delta must match hidden");
  }
  at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(hidden);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, hidden.scalar_type(), "add_rms_norm", [&] {
    rms_norm_impl<scalar_t>(hidden.data_ptr<scalar_t>(), delta ? d.data_ptr<scalar_t>() : nullptr,
                            w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), hidden.size(0), hidden.size(1), eps);
  });
  return out;
}

// ---- SiLU(gate) * up ---------------------------------------------------------------------------------
template <typename T>
void silu_mul_impl(const T* gate_up, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gate_up + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
#pragma omp simd
      for (int64_t i = 0; i < inter; ++i) {
        float x = to_f(g[i]);
        float s = to_f(from_f<T>(x / (1.f + vexp(-x))));
        o[i] = from_f<T>(s * to_f(u[i]));
      }
    }
  });
}

at::Tensor silu_mul(at::Tensor gate_up) {
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be a contiguous [tokens, 2 * intermediate] tensor");
  int64_t inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({gate_up.size(0), inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), gate_up.size(0), inter);
  });
  return out;
}

// ---- RoPE on q and k in place, and K/V into the pool -------------------------------------------------
// qkv: [T, (nh + 2 nkv) * D]; rotate-half RoPE on the first nh + nkv heads with cos/sin rows at each
// token's position (x * cos + rotate_half(x) * sin, each product rounded to the dtype as in the reference);
// then the token's k (rotated) and v heads are copied to its pool slot.
template <typename T>
void rope_store_impl(T* qkv, const int64_t* positions, const T* cos, const T* sin, T* k_cache, T* v_cache,
                     const int64_t* slots, int64_t tokens, int64_t nh, int64_t nkv, int64_t d) {
  const int64_t width = (nh + 2 * nkv) * d, half = d / 2;
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> x(d);
    for (int64_t t = begin; t < end; ++t) {
      T* row = qkv + t * width;
      const T* c = cos + positions[t] * d;
      const T* s = sin + positions[t] * d;
      for (int64_t h = 0; h < nh + nkv; ++h) {
        T* v = row + h * d;
        for (int64_t i = 0; i < d; ++i) x[i] = to_f(v[i]);
        for (int64_t i = 0; i < d; ++i) {
          float rot = i < half ? -x[i + half] : x[i - half];
          float a = to_f(from_f<T>(x[i] * to_f(c[i])));
          float b = to_f(from_f<T>(rot * to_f(s[i])));
          v[i] = from_f<T>(a + b);
        }
      }
      const int64_t slot = slots[t];
      std::copy(row + nh * d, row + (nh + nkv) * d, k_cache + slot * nkv * d);
      std::copy(row + (nh + nkv) * d, row + width, v_cache + slot * nkv * d);
    }
  });
}

void rope_store(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                at::Tensor v_cache, at::Tensor slots, int64_t nh, int64_t nkv) {
  for (auto* t : {&qkv, &cos, &sin, &k_cache, &v_cache}) {
    check_cpu(*t, "tensors");
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == qkv.scalar_type(),
                "qkv, cos, sin and the caches must be contiguous and of one dtype");
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong, "positions and slots: int64");
  int64_t d = k_cache.size(2);
  TORCH_CHECK(qkv.size(1) == (nh + 2 * nkv) * d && k_cache.size(1) == nkv && cos.size(1) == d, "shapes disagree");
  auto pos = positions.contiguous(), sl = slots.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rope_store", [&] {
    rope_store_impl<scalar_t>(qkv.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), cos.data_ptr<scalar_t>(),
                              sin.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
                              sl.data_ptr<int64_t>(), qkv.size(0), nh, nkv, d);
  });
}

// ---- attention through the req-to-token table ----------------------------------------------------------
// Query token t attends positions [0, lens[t]) of table row rows[t]: slot table[rows[t], j] holds position j's
// K/V. Grouped-query heads sharing a KV head are computed together, so each K/V row is read once per group.
// Long contexts are split into partitions (flash-decoding) so a batch of one still uses every thread;
// each partition keeps a running max and sum (online softmax over tiles), and partitions merge exactly.
constexpr int64_t TILE = 32;
constexpr int64_t LANES = 16;

// q . k over d elements. Sixteen independent partial sums, then a tree: a plain `s += q[i] * k[i]` loop is
// reduced in order (no fast-math), one scalar add after another, which made attention 3-4x slower.
// x[0] + ... + x[n-1], n <= 2 * LANES, as independent partial sums (see dot)
inline float total(const float* x, int64_t n) {
  float part[LANES] = {};
  for (int64_t i = 0; i < n; ++i) part[i % LANES] += x[i];
  for (int64_t l = 0; l < 8; ++l) part[l] += part[l + 8];
  for (int64_t l = 0; l < 4; ++l) part[l] += part[l + 4];
  return (part[0] + part[2]) + (part[1] + part[3]);
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  float part[LANES] = {};
  const int64_t body = d - d % LANES;
  for (int64_t i0 = 0; i0 < body; i0 += LANES) {
#pragma omp simd
    for (int64_t l = 0; l < LANES; ++l) part[l] = std::fma(q[i0 + l], to_f(k[i0 + l]), part[l]);
  }
  for (int64_t i = body; i < d; ++i) part[i - body] = std::fma(q[i], to_f(k[i]), part[i - body]);
  for (int64_t l = 0; l < 8; ++l) part[l] += part[l + 8];
  for (int64_t l = 0; l < 4; ++l) part[l] += part[l + 4];
  return (part[0] + part[2]) + (part[1] + part[3]);
}

// D: the head size when known at compile time (fully unrolled inner loops), 0 for any head size.
template <typename T, int64_t D>
void attention_impl(const T* q, int64_t q_stride, T* out, const T* k_cache, const T* v_cache, const int64_t* table,
                    int64_t table_stride, const int64_t* rows, const int64_t* lens, int64_t tokens, int64_t nh,
                    int64_t nkv, int64_t head_dim, float scale) {
  const int64_t d = D > 0 ? D : head_dim;
  const int64_t group = nh / nkv;
  int64_t max_len = 0;
  for (int64_t t = 0; t < tokens; ++t) max_len = std::max(max_len, lens[t]);
  const int64_t threads = at::get_num_threads();
  // partitions: enough work items for the threads, none shorter than 128 positions
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>((4 * threads + tokens * nkv - 1) / (tokens * nkv),
                                                         (max_len + 127) / 128));
  const int64_t items = tokens * nkv * parts;
  std::vector<float> part_max(items * group), part_sum(items * group), part_acc(items * group * d);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * d), scores(group * TILE);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / (nkv * parts), h = (item / parts) % nkv, p = item % parts;
      const int64_t len = lens[t], chunk = (len + parts - 1) / parts;
      const int64_t j0 = std::min(len, p * chunk), j1 = std::min(len, j0 + chunk);
      float* mx = &part_max[item * group];
      float* sum = &part_sum[item * group];
      float* acc = &part_acc[item * group * d];
      for (int64_t g = 0; g < group; ++g) {
        mx[g] = -std::numeric_limits<float>::infinity();
        sum[g] = 0.f;
        const T* qh = q + t * q_stride + (h * group + g) * d;
        for (int64_t i = 0; i < d; ++i) qf[g * d + i] = to_f(qh[i]) * scale;
      }
      std::fill(acc, acc + group * d, 0.f);
      const int64_t* trow = table + rows[t] * table_stride;
      for (int64_t j = j0; j < j1; j += TILE) {
        const int64_t n = std::min(TILE, j1 - j);
        for (int64_t jj = 0; jj < n; ++jj) {
          const T* k = k_cache + (trow[j + jj] * nkv + h) * d;
          for (int64_t g = 0; g < group; ++g) scores[g * TILE + jj] = dot(&qf[g * d], k, d);
        }
        for (int64_t g = 0; g < group; ++g) {
          float* sc = &scores[g * TILE];
          float tile_max = *std::max_element(sc, sc + n);
          float new_max = std::max(mx[g], tile_max);
          float corr = std::exp(mx[g] - new_max);
          mx[g] = new_max;
#pragma omp simd
          for (int64_t jj = 0; jj < n; ++jj) sc[jj] = vexp(sc[jj] - new_max);
          const float tile_sum = total(sc, n);
          sum[g] = sum[g] * corr + tile_sum;
          float* a = acc + g * d;
          for (int64_t i = 0; i < d; ++i) a[i] *= corr;
        }
        for (int64_t jj = 0; jj < n; ++jj) {
          const T* v = v_cache + (trow[j + jj] * nkv + h) * d;
          for (int64_t g = 0; g < group; ++g) {
            const float w = scores[g * TILE + jj];
            float* a = acc + g * d;
#pragma omp simd
            for (int64_t i = 0; i < d; ++i) a[i] = std::fma(w, to_f(v[i]), a[i]);
          }
        }
      }
    }
  });
  // merge the partitions of each (token, kv head, query head in the group)
  at::parallel_for(0, tokens * nkv, 16, [&](int64_t begin, int64_t end) {
    for (int64_t th = begin; th < end; ++th) {
      const int64_t t = th / nkv, h = th % nkv;
      for (int64_t g = 0; g < group; ++g) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < parts; ++p) m = std::max(m, part_max[(th * parts + p) * group + g]);
        float total = 0.f;
        std::vector<float> o(d, 0.f);
        for (int64_t p = 0; p < parts; ++p) {
          const int64_t it = th * parts + p;
          const float s = part_sum[it * group + g];
          if (s == 0.f) continue;
          const float w = std::exp(part_max[it * group + g] - m);
          total += s * w;
          const float* a = &part_acc[(it * group + g) * d];
          for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
        }
        T* dst = out + t * nh * d + (h * group + g) * d;
        const float inv = total > 0.f ? 1.f / total : 0.f;
        for (int64_t i = 0; i < d; ++i) dst[i] = from_f<T>(o[i] * inv);
      }
    }
  });
}

// q: [T, nh, D] (rows may be strided, e.g. a view into the fused qkv); returns [T, nh * D].
at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor table, at::Tensor rows,
                           at::Tensor lens, double scale) {
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [T, heads, D] with dense heads");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == q.scalar_type() &&
                  v_cache.scalar_type() == q.scalar_type(), "caches must be contiguous, in q's dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.stride(1) == 1, "table must be int64 with dense rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "rows and lens must be int64");
  const int64_t tokens = q.size(0), nh = q.size(1), d = q.size(2), nkv = k_cache.size(1);
  TORCH_CHECK(nh % nkv == 0 && k_cache.size(2) == d, "heads disagree with the cache");
  TORCH_CHECK(rows.numel() == tokens && lens.numel() == tokens, "one row and one length per query token");
  auto r = rows.contiguous(), l = lens.contiguous();
  at::Tensor out = at::empty({tokens, nh * d}, q.options());
  if (tokens == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto impl) {
      impl(q.data_ptr<scalar_t>(), q.stride(0), out.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
           v_cache.data_ptr<scalar_t>(), table.data_ptr<int64_t>(), table.stride(0), r.data_ptr<int64_t>(),
           l.data_ptr<int64_t>(), tokens, nh, nkv, d, static_cast<float>(scale));
    };
    if (d == 64) run(attention_impl<scalar_t, 64>);
    else if (d == 128) run(attention_impl<scalar_t, 128>);
    else run(attention_impl<scalar_t, 0>);
  });
  return out;
}

// ---- LoRA: the low-rank updates of a mixed batch (Punica's shrink and expand, per token) -------------------
// The batch's adapters are described by a table of factor addresses, int64 [layers, sites, adapters, targets, 5]:
// (address of A [r, in], address of B^T [r, out], r, out, output offset); r = 0 where an adapter lacks a target.
// The adapters' factors live in the KV pool (kestrel/lora/pool.py) and stay there while their requests run, so
// the addresses are valid for the step. For token t with adapter k = token_adapter[t] (-1: none) and each
// target: y[t, offset : offset + out] += (A x[t]) B^T, the scale folded in. A token reads only its own
// adapter's factors, so one call serves any mix of adapters and ranks.
template <typename T>
void lora_impl(T* y, int64_t y_stride, const T* x, int64_t x_stride, const int64_t* tok, int64_t tokens,
               int64_t in, const int64_t* entries, int64_t targets) {
  at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(in), v, acc;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t k = tok[t];
      if (k < 0) continue;
      for (int64_t c = 0; c < in; ++c) xf[c] = to_f(x[t * x_stride + c]);
      for (int64_t j = 0; j < targets; ++j) {
        const int64_t* e = entries + (k * targets + j) * 5;
        const int64_t r = e[2], out = e[3];
        if (r == 0) continue;
        const T* a = reinterpret_cast<const T*>(e[0]);
        const T* bt = reinterpret_cast<const T*>(e[1]);
        v.assign(r, 0.f);
        for (int64_t q = 0; q < r; ++q) v[q] = dot(xf.data(), a + q * in, in);  // shrink
        acc.assign(out, 0.f);
        float* sum = acc.data();
        for (int64_t q = 0; q < r; ++q) {  // expand, streaming along the output
          const T* row = bt + q * out;
          const float vq = v[q];
#pragma omp simd
          for (int64_t o = 0; o < out; ++o) sum[o] = std::fma(to_f(row[o]), vq, sum[o]);
        }
        T* yt = y + t * y_stride + e[4];
#pragma omp simd
        for (int64_t o = 0; o < out; ++o) yt[o] = from_f<T>(to_f(yt[o]) + sum[o]);
      }
    }
  });
}

void lora_apply(at::Tensor y, at::Tensor x, at::Tensor token_adapter, at::Tensor table, int64_t layer, int64_t site) {
  check_cpu(y, "y");
  TORCH_CHECK(x.is_contiguous() && y.stride(1) == 1 && x.scalar_type() == y.scalar_type(),
              "x must be contiguous and y have dense rows, in one dtype");
  TORCH_CHECK(token_adapter.scalar_type() == at::kLong && token_adapter.is_contiguous() &&
                  token_adapter.numel() == x.size(0) && y.size(0) == x.size(0), "one adapter index per token");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.is_contiguous() && table.dim() == 5 && table.size(4) == 5 &&
                  layer < table.size(0) && site < table.size(1), "table must be int64 [layers, sites, adapters, targets, 5]");
  const int64_t adapters = table.size(2), targets = table.size(3), in = x.size(1);
  const int64_t* entries = table.data_ptr<int64_t>() + (layer * table.size(1) + site) * adapters * targets * 5;
  for (int64_t i = 0; i < adapters * targets; ++i) {
    const int64_t* e = entries + i * 5;
    TORCH_CHECK(e[2] == 0 || (e[3] >= 0 && e[4] >= 0 && e[4] + e[3] <= y.size(1)), "LoRA entry ", i, " does not fit y");
  }
  const int64_t* tok = token_adapter.data_ptr<int64_t>();
  for (int64_t t = 0; t < x.size(0); ++t) TORCH_CHECK(tok[t] < adapters, "adapter index out of range");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "lora_apply", [&] {
    lora_impl<scalar_t>(y.data_ptr<scalar_t>(), y.stride(0), x.data_ptr<scalar_t>(), x.stride(0), tok, x.size(0),
                        in, entries, targets);
  });
}

// ---- the decoder layers in one call ----------------------------------------------------------------------
// A linear as the Python side describes it: kind 0 dense (weight[, bias]), 1 int8 (q, scale[, bias]),
// 2 int4 (packed, scales_zeros[, bias]) with its group size. The quantized kernels take bf16 activations.
struct LinearSpec {
  int64_t kind, group;
  std::vector<at::Tensor> t;
  bool has_bias;
};

at::Tensor apply_linear(const LinearSpec& l, const at::Tensor& x) {
  if (l.kind == 0) return at::linear(x, l.t[0], l.has_bias ? c10::optional<at::Tensor>(l.t[1]) : c10::nullopt);
  at::Tensor xb = x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
  at::Tensor y = l.kind == 1 ? at::_weight_int8pack_mm(xb, l.t[0], l.t[1])
                             : at::_weight_int4pack_mm_for_cpu(xb, l.t[0], l.group, l.t[1]);
  if (l.has_bias) y = y + l.t[2];
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// hidden: the embeddings [T, H], updated in place as the residual stream; returns the final norm's output.
// Per layer: norms [input, post], linears [qkv, o, gate_up, down] (kinds/groups/tensors flattened in that order).
// Attention: every token through the table (decode rows and short causal rows; the caller checks).
at::Tensor decoder_layers(at::Tensor hidden, std::vector<at::Tensor> norms, at::Tensor final_norm,
                          std::vector<int64_t> kinds, std::vector<int64_t> groups,
                          std::vector<std::vector<at::Tensor>> weights, std::vector<at::Tensor> k_caches,
                          std::vector<at::Tensor> v_caches, at::Tensor positions, at::Tensor cos, at::Tensor sin,
                          at::Tensor slots, at::Tensor table, at::Tensor rows, at::Tensor lens, int64_t nh,
                          int64_t nkv, double eps, c10::optional<at::Tensor> lora_tokens,
                          c10::optional<at::Tensor> lora_table) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(norms.size() == 2 * layers && kinds.size() == 4 * layers && groups.size() == 4 * layers &&
                  weights.size() == 4 * layers && v_caches.size() == layers, "per-layer lists disagree in length");
  const int64_t tokens = hidden.size(0), d = k_caches[0].size(2);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  std::vector<LinearSpec> linears;
  linears.reserve(4 * layers);
  for (int64_t i = 0; i < 4 * layers; ++i) {
    const size_t need = kinds[i] == 0 ? 1 : 2;
    TORCH_CHECK(weights[i].size() == need || weights[i].size() == need + 1, "linear ", i, ": wrong tensor count");
    linears.push_back({kinds[i], groups[i], weights[i], weights[i].size() == need + 1});
  }
  const bool lora = lora_tokens.has_value() && lora_table.has_value();
  // y = linear(x), plus the batch's LoRA updates of that layer's site (0 qkv, 1 o, 2 gate_up, 3 down)
  auto linear = [&](int64_t layer, int64_t site, const at::Tensor& x) {
    at::Tensor y = apply_linear(linears[4 * layer + site], x).contiguous();
    if (lora) lora_apply(y, x.contiguous(), *lora_tokens, *lora_table, layer, site);
    return y;
  };
  c10::optional<at::Tensor> delta;
  for (int64_t i = 0; i < layers; ++i) {
    at::Tensor x = add_rms_norm(hidden, delta, norms[2 * i], eps);
    at::Tensor qkv = linear(i, 0, x);
    rope_store(qkv, positions, cos, sin, k_caches[i], v_caches[i], slots, nh, nkv);
    at::Tensor q = qkv.view({tokens, nh + 2 * nkv, d}).narrow(1, 0, nh);
    at::Tensor attn = paged_attention(q, k_caches[i], v_caches[i], table, rows, lens, scale);
    x = add_rms_norm(hidden, linear(i, 1, attn), norms[2 * i + 1], eps);
    at::Tensor act = silu_mul(linear(i, 2, x));
    delta = linear(i, 3, act);
  }
  return add_rms_norm(hidden, delta, final_norm, eps);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "hidden += delta (in place, if given); return RMSNorm(hidden) * weight");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up for a fused [T, 2I] gate_up");
  m.def("rope_store", &rope_store, "RoPE on q and k in place in the fused qkv, and K/V into their pool slots");
  m.def("decoder_layers", &decoder_layers, "all decoder layers for a step whose attention the table serves");
  m.def("lora_apply", &lora_apply, "y += each token's adapter's low-rank update (B A x) at one layer's site, in place");
  m.def("paged_attention", &paged_attention, "attention of each query token over its table row's first lens slots");
}

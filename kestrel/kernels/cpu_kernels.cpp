// Kestrel's CPU kernels: the small ops of a decoder layer fused, and decode attention that reads K/V
// through the req-to-token table in place (no gather, no padding).
//
// Built on the machine that runs it (-O3 -march=native), so the compiler vectorizes the inner loops
// for that CPU's widest ISA (AVX2 or AVX-512). Built with -ffp-contract=off: the elementwise kernels round
// exactly as the PyTorch ops they replace; attention asks for its fused multiply-adds explicitly. Every kernel accumulates in float32, whatever the
// storage dtype (float32 or bfloat16), and rounds once on output.
#include <torch/extension.h>
#include "int4_tiles.h"
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

template <typename T> inline float to_f(T x) { return static_cast<float>(x); }
template <typename T> inline T from_f(float x) { return static_cast<T>(x); }
// x rounded to T (the dtype the computation is in), then stored as O (T, or bf16 for a float32 T)
template <typename T, typename O> inline O narrow(float x) {
  if constexpr (std::is_same<T, O>::value) return from_f<T>(x);
  else return from_f<O>(to_f(from_f<T>(x)));
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// The activations of one decoder_layers() call: a buffer per use, made at the first layer and reused by the others
// (the shapes repeat layer after layer). A new tensor for every op's output was ~250 allocations and frees a batch-1
// decode step, about 3% of it. Each use's buffer is read before the next layer writes it again.
class StepBuffers {
 public:
  enum Use { NORM_IN, NORM_POST, QKV, Q, ATTN, O, GATE_UP, ACT, DOWN, USES };
  at::Tensor get(Use use, at::IntArrayRef sizes, const at::TensorOptions& options) {
    at::Tensor& b = bufs_[use];
    if (!b.defined() || b.scalar_type() != options.dtype() || b.sizes() != sizes) b = at::empty(sizes, options);
    return b;
  }

 private:
  at::Tensor bufs_[USES];
};

// the output of an op: the step's buffer for `use` inside decoder_layers(), a new tensor for a call from Python
at::Tensor new_output(StepBuffers* bufs, StepBuffers::Use use, at::IntArrayRef sizes, const at::TensorOptions& options) {
  return bufs ? bufs->get(use, sizes, options) : at::empty(sizes, options);
}

// ---- vectors of W floats (GCC/Clang vector extensions): one zmm register with AVX-512, one ymm with AVX2 --------
#if defined(__AVX512F__)
#define W 16
#else
#define W 8
#endif
typedef float vec __attribute__((vector_size(4 * W)));
typedef int32_t veci __attribute__((vector_size(4 * W)));
typedef uint32_t vecu __attribute__((vector_size(4 * W)));
typedef uint16_t vech __attribute__((vector_size(2 * W)));
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (veci){__VA_ARGS__})
#endif

inline vec loadv(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vec loadv(const c10::BFloat16* p) {  // bf16 is the upper half of a float
#if W == 16
  // one widening load (vpmovzxwd ymm -> zmm); the vector-extension form compiles to two halves and an insert
  return (vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#else
  vech h;
  std::memcpy(&h, p, sizeof h);
  return (vec)(__builtin_convertvector(h, vecu) << 16);
#endif
}
#if W == 16
inline vec splat(float x) { return (vec){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
#else
inline vec splat(float x) { return (vec){x, x, x, x, x, x, x, x}; }
#endif
// a * b + c rounded once (the file is built with -ffp-contract=off, so `a * b + c` would round twice)
inline vec fmav(vec a, vec b, vec c) {
#if W == 16
  return (vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  for (int l = 0; l < W; ++l) c[l] = std::fma(a[l], b[l], c[l]);
  return c;
#endif
}
// lanes [0, n) on (all bits set), the rest off
inline vec lane_mask(int64_t n) {
  veci m;
  for (int l = 0; l < W; ++l) m[l] = l < n ? -1 : 0;
  return (vec)m;
}
// one bit per lane of a comparison's result (bit l: lane l is all ones)
inline unsigned lanes_set(veci m) {
#if W == 16
  return _mm512_cmpneq_epi32_mask((__m512i)m, _mm512_setzero_si512());
#elif defined(__AVX__)
  return static_cast<unsigned>(_mm256_movemask_ps((__m256)m));
#else
  unsigned bits = 0;
  for (int l = 0; l < W; ++l) bits |= (m[l] != 0) << l;
  return bits;
#endif
}
inline vec selectv(vec mask, vec a, vec b) { return (vec)(((veci)mask & (veci)a) | (~(veci)mask & (veci)b)); }
inline vec addv(vec a, vec b) { return a + b; }
inline vec maxv(vec a, vec b) { return a > b ? a : b; }
// the largest lane, and the sum of the lanes, in registers (a fixed tree: lanes l and l + W/2, then l + W/4, ...);
// row_sums(a), for a as a W x W matrix: lane j = the sum of row a[j]. W sums at once, in log2(W) levels of lane
// shuffles and adds instead of a horizontal sum per vector: vector i of level k+1 holds, side by side, the partial
// sums of the rows in vectors 2i and 2i+1 of level k, each folded to half as many lanes.
#if W == 16
#define FOLD(op, v)                                                                    \
  v = op(v, SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7));      \
  v = op(v, SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11));      \
  v = op(v, SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13));      \
  v = op(v, SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14))
inline vec row_sums(const vec* a) {
  vec b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = SHUFFLE(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUFFLE(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = SHUFFLE(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUFFLE(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return SHUFFLE(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
#define FOLD(op, v)                                     \
  v = op(v, SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3));      \
  v = op(v, SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5));      \
  v = op(v, SHUFFLE(v, v, 1, 0, 3, 2, 5, 4, 7, 6))
inline vec row_sums(const vec* a) {
  vec b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           SHUFFLE(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = SHUFFLE(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           SHUFFLE(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return SHUFFLE(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14) + SHUFFLE(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
#endif
inline float max_lanes(vec v) {
  FOLD(maxv, v);
  return v[0];
}
inline float sum_lanes(vec v) {
  FOLD(addv, v);
  return v[0];
}

// the float lanes rounded to T (round to nearest even, as c10::BFloat16 does), as floats and stored
inline vec roundv(vec v, float*) { return v; }
inline vec roundv(vec v, c10::BFloat16*) {
  vecu u = (vecu)v;
  const vec r = (vec)((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
  return v != v ? v : r;  // NaN stays NaN
}
inline void storev(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
inline void storev(c10::BFloat16* p, vec v) {
  const vec r = roundv(v, p);
  const vech h = __builtin_convertvector((vecu)r >> 16, vech);
  std::memcpy(p, &h, sizeof h);
}
// float64 tensors (dispatched, never used by the engine) are computed in float32, as every kernel here does
inline vec loadv(const double* p) {
  vec v;
  for (int l = 0; l < W; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
inline vec roundv(vec v, double*) { return v; }
inline void storev(double* p, vec v) {
  for (int l = 0; l < W; ++l) p[l] = v[l];
}
// the first n < W elements (a row's tail) through a vector: the rest of the lanes are zeros, and not stored
template <typename T> inline vec loadv_part(const T* p, int64_t n) {
  T buf[W] = {};
  std::copy(p, p + n, buf);
  return loadv(buf);
}
template <typename T> inline void storev_part(T* p, vec v, int64_t n) {
  T buf[W];
  storev(buf, v);
  std::copy(buf, buf + n, p);
}

// ---- residual add + RMSNorm ------------------------------------------------------------------------
// hidden += delta (in place, when delta is given), then out = weight * (hidden * rsqrt(mean(hidden^2) + eps)),
// rounding hidden * rsqrt to the dtype before the weight, as the reference (transformers) does. A bf16 delta or
// output (around a quantized matmul, which works in bf16) is what converting to or from T would give, exactly.
template <typename T, typename D = T, typename O = T>
void rms_norm_impl(T* hidden, const D* delta, const T* weight, O* out, int64_t rows, int64_t dim, double eps) {
  const int64_t body = dim - dim % W;  // W lanes at a time, the rest one by one
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* h = hidden + r * dim;
      const D* dr = delta ? delta + r * dim : nullptr;
      vec ss_v = splat(0.f);
      for (int64_t i = 0; i < body; i += W) {
        vec x = loadv(h + i);
        if (dr) {
          x = roundv(x + loadv(dr + i), h);
          storev(h + i, x);
        }
        ss_v = ss_v + x * x;
      }
      float ss = sum_lanes(ss_v);
      for (int64_t i = body; i < dim; ++i) {
        float x = to_f(h[i]);
        if (dr) {
          x = to_f(from_f<T>(x + to_f(dr[i])));
          h[i] = from_f<T>(x);
        }
        ss += x * x;
      }
      const float inv = 1.f / std::sqrt(ss / dim + static_cast<float>(eps));
      const vec inv_v = splat(inv);
      O* o = out + r * dim;
      for (int64_t i = 0; i < body; i += W) storev(o + i, roundv(loadv(weight + i) * roundv(loadv(h + i) * inv_v, h), h));
      for (int64_t i = body; i < dim; ++i) o[i] = narrow<T, O>(to_f(weight[i]) * to_f(from_f<T>(to_f(h[i]) * inv)));
    }
  });
}

// float32 work with bf16 at its edges: the mixed case the decoder layers meet around quantized matmuls
inline bool bf16_edges(at::ScalarType t, at::ScalarType a, at::ScalarType b) {
  return t == at::kFloat && (a == at::kFloat || a == at::kBFloat16) && (b == at::kFloat || b == at::kBFloat16);
}

// out_dtype: the output's dtype (hidden's, or bf16 for a float32 hidden); delta may be bf16 for a float32 hidden
// weight: hidden.size(1) values in hidden's dtype, checked by the caller (add_rms_norm_to, or the decoder layers'
// stack once: reading a weight tensor's metadata on every call costs a cache miss after the weights streamed by)
at::Tensor add_rms_norm_ptr(const at::Tensor& hidden, const c10::optional<at::Tensor>& delta, const void* weight,
                            double eps, at::ScalarType out_dtype, StepBuffers* bufs, StepBuffers::Use use) {
  RECORD_FUNCTION("kestrel::add_rms_norm", std::vector<c10::IValue>());
  check_cpu(hidden, "hidden");
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden must be a contiguous [tokens, dim] tensor");
  const auto t = hidden.scalar_type();
  at::Tensor d;
  if (delta) {
    d = delta->contiguous();
    TORCH_CHECK(d.sizes() == hidden.sizes(), "delta must match hidden");
  }
  const auto dt = delta ? d.scalar_type() : t;
  TORCH_CHECK((dt == t && out_dtype == t) || bf16_edges(t, dt, out_dtype),
              "delta and the output must be in hidden's dtype (or bf16 with a float32 hidden)");
  at::Tensor out = new_output(bufs, use, hidden.sizes(), hidden.options().dtype(out_dtype));
  const int64_t rows = hidden.size(0), dim = hidden.size(1);
  if (t == at::kFloat && (dt != t || out_dtype != t)) {
    using BF = c10::BFloat16;
    float* h = hidden.data_ptr<float>();
    const float* wp = static_cast<const float*>(weight);
    if (dt == at::kBFloat16 && out_dtype == at::kBFloat16)
      rms_norm_impl<float, BF, BF>(h, delta ? d.data_ptr<BF>() : nullptr, wp, out.data_ptr<BF>(), rows, dim, eps);
    else if (dt == at::kBFloat16)
      rms_norm_impl<float, BF, float>(h, delta ? d.data_ptr<BF>() : nullptr, wp, out.data_ptr<float>(), rows, dim, eps);
    else
      rms_norm_impl<float, float, BF>(h, delta ? d.data_ptr<float>() : nullptr, wp, out.data_ptr<BF>(), rows, dim, eps);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, t, "add_rms_norm", [&] {
    rms_norm_impl<scalar_t>(hidden.data_ptr<scalar_t>(), delta ? d.data_ptr<scalar_t>() : nullptr,
                            static_cast<const scalar_t*>(weight), out.data_ptr<scalar_t>(), rows, dim, eps);
  });
  return out;
}

at::Tensor add_rms_norm_to(const at::Tensor& hidden, const c10::optional<at::Tensor>& delta, const at::Tensor& weight,
                           double eps, at::ScalarType out_dtype, StepBuffers* bufs = nullptr,
                           StepBuffers::Use use = StepBuffers::NORM_IN) {
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight and hidden must have one dtype");
  TORCH_CHECK(hidden.dim() == 2 && weight.numel() == hidden.size(1), "weight must have one value per hidden column");
  at::Tensor w = weight.contiguous();
  return add_rms_norm_ptr(hidden, delta, w.data_ptr(), eps, out_dtype, bufs, use);
}

at::Tensor add_rms_norm(at::Tensor hidden, c10::optional<at::Tensor> delta, at::Tensor weight, double eps) {
  return add_rms_norm_to(hidden, delta, weight, eps, hidden.scalar_type());
}

// ---- SiLU(gate) * up ---------------------------------------------------------------------------------
// exp on W lanes (libm's expf is a scalar call): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 Taylor
// polynomial (relative error < 2e-7, about one float ulp), times 2^n. The clamp keeps a NaN (as std::max and
// std::min would); n is x log2(e) rounded half to even by adding and subtracting 1.5 * 2^23 (exact for |x| < 2^22).
inline vec vexpv(vec x) {
  x = x < splat(-87.3f) ? splat(-87.3f) : x;  // std::max(x, lo): a NaN stays
  x = splat(88.7f) < x ? splat(88.7f) : x;    // std::min(x, hi)
  const vec magic = splat(12582912.f);
  const vec n = (x * splat(1.44269504f) + magic) - magic;
  const vec r = fmav(n, splat(-6.93145752e-1f), fmav(n, splat(-1.42860677e-6f), x));
  vec p = splat(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = fmav(p, r, splat(c));
  return p * (vec)((__builtin_convertvector(n, veci) + 127) << 23);
}

// computed in the model's dtype T (each step rounded to it, as the reference does); gate_up of type I and the
// output of type O may be bf16 around quantized matmuls with a float32 T. W lanes at a time in explicit vectors
// (with bf16 edges the compiler did not vectorize a plain loop: 7.7 us a row of SmolLM2 on AVX2), the tail too.
template <typename T, typename I = T, typename O = T>
void silu_mul_impl(const I* gate_up, O* out, int64_t rows, int64_t inter) {
  const int64_t body = inter - inter % W;
  T* const t = nullptr;  // selects roundv's rounding to T
  auto silu_mul_v = [t](vec g, vec u) { return roundv(roundv(g / (splat(1.f) + vexpv(-g)), t) * u, t); };
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const I* g = gate_up + r * 2 * inter;
      const I* u = g + inter;
      O* o = out + r * inter;
      for (int64_t i = 0; i < body; i += W) storev(o + i, silu_mul_v(loadv(g + i), loadv(u + i)));
      if (body < inter) {
        const int64_t n = inter - body;
        storev_part(o + body, silu_mul_v(loadv_part(g + body, n), loadv_part(u + body, n)), n);
      }
    }
  });
}

at::Tensor silu_mul_to(const at::Tensor& gate_up, at::ScalarType model_dtype, at::ScalarType out_dtype,
                       StepBuffers* bufs = nullptr) {
  RECORD_FUNCTION("kestrel::silu_mul", std::vector<c10::IValue>());
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be a contiguous [tokens, 2 * intermediate] tensor");
  const auto it = gate_up.scalar_type();
  TORCH_CHECK((it == model_dtype && out_dtype == model_dtype) || bf16_edges(model_dtype, it, out_dtype),
              "gate_up and the output must be in the model's dtype (or bf16 with a float32 model)");
  int64_t inter = gate_up.size(1) / 2, rows = gate_up.size(0);
  at::Tensor out = new_output(bufs, StepBuffers::ACT, {rows, inter}, gate_up.options().dtype(out_dtype));
  using BF = c10::BFloat16;
  if (model_dtype == at::kFloat && it == at::kBFloat16 && out_dtype == at::kBFloat16)
    silu_mul_impl<float, BF, BF>(gate_up.data_ptr<BF>(), out.data_ptr<BF>(), rows, inter);
  else if (model_dtype == at::kFloat && it == at::kBFloat16)
    silu_mul_impl<float, BF, float>(gate_up.data_ptr<BF>(), out.data_ptr<float>(), rows, inter);
  else if (model_dtype == at::kFloat && out_dtype == at::kBFloat16)
    silu_mul_impl<float, float, BF>(gate_up.data_ptr<float>(), out.data_ptr<BF>(), rows, inter);
  else
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, it, "silu_mul", [&] {
      silu_mul_impl<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, inter);
    });
  return out;
}

at::Tensor silu_mul(at::Tensor gate_up) { return silu_mul_to(gate_up, gate_up.scalar_type(), gate_up.scalar_type()); }

// ---- RoPE on q and k, and K/V into the pool -----------------------------------------------------------
// qkv: [T, (nh + 2 nkv) * D] in the caches' dtype T, or bf16 (a quantized matmul's output) for float32 caches.
// Rotate-half RoPE on the first nh + nkv heads with cos/sin rows at each token's position (x * cos +
// rotate_half(x) * sin, each product rounded to T as in the reference); the rotated q heads go to q_out (qkv
// itself, in place, when it is in T), the rotated k and the v heads to the token's pool slot. Reading bf16 gives
// exactly what widening qkv first would (widening is exact), without the copy.
constexpr int64_t MAX_ROPE_HEAD = 512;  // a stack buffer for one head

template <typename T, typename I>
void rope_store_impl(const I* qkv, T* q_out, int64_t q_stride, const int64_t* positions, const T* cos, const T* sin,
                     T* k_cache, T* v_cache, const int64_t* slots, int64_t tokens, int64_t nh, int64_t nkv, int64_t d) {
  const int64_t width = (nh + 2 * nkv) * d, half = d / 2;
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    float x[MAX_ROPE_HEAD];
    for (int64_t t = begin; t < end; ++t) {
      const I* row = qkv + t * width;
      const T* c = cos + positions[t] * d;
      const T* s = sin + positions[t] * d;
      T* k_slot = k_cache + slots[t] * nkv * d;
      for (int64_t h = 0; h < nh + nkv; ++h) {
        for (int64_t i = 0; i < d; ++i) x[i] = to_f(row[h * d + i]);
        T* dst = h < nh ? q_out + t * q_stride + h * d : k_slot + (h - nh) * d;
        for (int64_t i = 0; i < d; ++i) {
          float rot = i < half ? -x[i + half] : x[i - half];
          float a = to_f(from_f<T>(x[i] * to_f(c[i])));
          float b = to_f(from_f<T>(rot * to_f(s[i])));
          dst[i] = from_f<T>(a + b);
        }
      }
      T* v_slot = v_cache + slots[t] * nkv * d;
      for (int64_t i = 0; i < nkv * d; ++i) v_slot[i] = from_f<T>(to_f(row[(nh + nkv) * d + i]));
    }
  });
}

// One layer's K and V pool caches, [slots, nkv, d] each, contiguous, in one dtype: checked once (kv_layer), so a
// decode step's ops need not read the cache tensors' metadata (cold after the weights streamed through the caches).
struct KVLayer {
  void* k;
  void* v;
  at::ScalarType dtype;
  int64_t nkv, d;
};

KVLayer kv_layer(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_cpu(k_cache, "k_cache");
  check_cpu(v_cache, "v_cache");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type(),
              "the K and V caches must be contiguous [slots, kv heads, head size] tensors of one dtype and shape");
  return {k_cache.data_ptr(), v_cache.data_ptr(), k_cache.scalar_type(), k_cache.size(1), k_cache.size(2)};
}

// Returns the rotated q heads as [T, nh, D]: a view into qkv (rotated in place) when qkv is in the caches' dtype,
// a new tensor in that dtype when qkv is bf16 and the caches float32. qkv's k and v parts are left as they were.
at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin,
                         const KVLayer& kv, const at::Tensor& slots, int64_t nh, int64_t nkv, StepBuffers* bufs = nullptr) {
  RECORD_FUNCTION("kestrel::rope_store", std::vector<c10::IValue>());
  const auto dtype = kv.dtype;
  for (auto* t : {&qkv, &cos, &sin}) {
    check_cpu(*t, "tensors");
    const bool bf16_qkv = t == &qkv && bf16_edges(dtype, dtype, qkv.scalar_type());  // float32 caches
    TORCH_CHECK(t->is_contiguous() && (t->scalar_type() == dtype || bf16_qkv),
                "qkv, cos, sin and the caches must be contiguous and of one dtype "
                "(qkv may be bf16 for float32 caches)");
  }
  TORCH_CHECK(positions.scalar_type() == at::kLong && slots.scalar_type() == at::kLong, "positions and slots: int64");
  const int64_t d = kv.d, tokens = qkv.size(0);
  TORCH_CHECK(qkv.size(1) == (nh + 2 * nkv) * d && kv.nkv == nkv && cos.size(1) == d, "shapes disagree");
  TORCH_CHECK(d <= MAX_ROPE_HEAD, "head size at most ", MAX_ROPE_HEAD);
  auto pos = positions.contiguous(), sl = slots.contiguous();
  if (qkv.scalar_type() != dtype) {  // bf16 qkv, float32 caches
    at::Tensor q = new_output(bufs, StepBuffers::Q, {tokens, nh, d}, qkv.options().dtype(dtype));
    rope_store_impl<float, c10::BFloat16>(qkv.data_ptr<c10::BFloat16>(), q.data_ptr<float>(), nh * d,
                                          pos.data_ptr<int64_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                          static_cast<float*>(kv.k), static_cast<float*>(kv.v), sl.data_ptr<int64_t>(),
                                          tokens, nh, nkv, d);
    return q;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dtype, "rope_store", [&] {
    rope_store_impl<scalar_t, scalar_t>(qkv.data_ptr<scalar_t>(), qkv.data_ptr<scalar_t>(), qkv.size(1),
                                        pos.data_ptr<int64_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                                        static_cast<scalar_t*>(kv.k), static_cast<scalar_t*>(kv.v),
                                        sl.data_ptr<int64_t>(), tokens, nh, nkv, d);
  });
  return qkv.as_strided({tokens, nh, d}, {qkv.size(1), d, 1});
}

at::Tensor rope_store(at::Tensor qkv, at::Tensor positions, at::Tensor cos, at::Tensor sin, at::Tensor k_cache,
                      at::Tensor v_cache, at::Tensor slots, int64_t nh, int64_t nkv) {
  return rope_store_kv(qkv, positions, cos, sin, kv_layer(k_cache, v_cache), slots, nh, nkv);
}

// ---- attention through the req-to-token table ----------------------------------------------------------
// Query token t attends positions [0, lens[t]) of table row rows[t]: slot table[rows[t], j] holds position j's
// K/V. Grouped-query heads sharing a KV head are computed together, so each K/V row is read (and converted to
// float) once per group. Long contexts are split into partitions (flash-decoding) so a batch of one still uses
// every thread; each partition keeps a running max and sum (online softmax over tiles), and partitions merge
// exactly. A tile's W dot products per head are W-lane partial sums folded together (row_sums).
constexpr int64_t TILE = W;  // positions per tile: one row_sums of their dot products
constexpr int64_t LANES = W;
constexpr int64_t MAX_HEAD = 256;
constexpr int64_t MAX_VECS = MAX_HEAD / W;

// q . k over d elements (LoRA's shrink). Sixteen independent partial sums, then a tree: a plain
// `s += q[i] * k[i]` loop is reduced in order (no fast-math), one scalar add after another, 3-4x slower.
template <typename T>
inline float dot(const float* q, const T* k, int64_t d) {
  constexpr int64_t P = 16;
  float part[P] = {};
  const int64_t body = d - d % P;
  for (int64_t i0 = 0; i0 < body; i0 += P) {
#pragma omp simd
    for (int64_t l = 0; l < P; ++l) part[l] = std::fma(q[i0 + l], to_f(k[i0 + l]), part[l]);
  }
  for (int64_t i = body; i < d; ++i) part[i - body] = std::fma(q[i], to_f(k[i]), part[i - body]);
  for (int64_t l = 0; l < 8; ++l) part[l] += part[l + 8];
  for (int64_t l = 0; l < 4; ++l) part[l] += part[l + 4];
  return (part[0] + part[2]) + (part[1] + part[3]);
}

// NV: W-float vectors per head when known at compile time (registers, unrolled loops), 0 for any head size
// that is a multiple of 16.
template <typename T, int64_t NV, typename O = T>
void attention_impl(const T* q, int64_t q_stride, O* out, const T* k_cache, const T* v_cache, const int64_t* table,
                    int64_t table_stride, const int64_t* rows, const int64_t* lens, int64_t tokens, int64_t nh,
                    int64_t nkv, int64_t head_dim, float scale) {
  const int64_t nv = NV > 0 ? NV : head_dim / LANES, d = nv * LANES;
  const int64_t group = nh / nkv;
  int64_t max_len = 0;
  for (int64_t t = 0; t < tokens; ++t) max_len = std::max(max_len, lens[t]);
  const int64_t threads = at::get_num_threads();
  // An item is one token's positions j0..j1 (a partition of its context) for every KV head: the heads of a slot sit
  // side by side in the pool, so an item reads whole slot rows. Items of one head each (stride nkv * d between the
  // rows they read) were 1.75x slower once the K/V left the caches: batch-1 decode of SmolLM2 at 8000 positions,
  // 30 layers' attention 15.0 -> 8.5 ms (2-core Xeon), where one head's contiguous rows of the same bytes took 8.5.
  // Partitions: enough items for the threads, none shorter than 128 positions.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>((4 * threads + tokens - 1) / tokens,
                                                               (max_len + 127) / 128));
  const int64_t items = tokens * parts, heads = nkv * group;
  const bool direct = parts == 1;  // each item is a whole token: it writes the output itself
  std::vector<float> part_max(direct ? 0 : items * heads), part_sum(direct ? 0 : items * heads),
      part_acc(direct ? 0 : items * heads * d);
  const vec zero = splat(0.f), scale_v = splat(scale);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // per thread: the token's queries and accumulators, a tile of V in float, the tile's dot products
    // (kept per thread across calls: an allocation per call costs more than a short row's attention)
    thread_local std::vector<vec> qv, acc, vt, dots;
    thread_local std::vector<float> mx, sum;
    qv.resize(heads * nv), acc.resize(heads * nv), vt.resize(TILE * nv), dots.resize(group * TILE);
    mx.resize(heads), sum.resize(heads);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / parts, p = item % parts;
      const int64_t len = lens[t], chunk = (len + parts - 1) / parts;
      const int64_t j0 = std::min(len, p * chunk), j1 = std::min(len, j0 + chunk);
      for (int64_t qh = 0; qh < heads; ++qh) {
        mx[qh] = -std::numeric_limits<float>::infinity();
        sum[qh] = 0.f;
        const T* src = q + t * q_stride + qh * d;
        for (int64_t c = 0; c < nv; ++c) qv[qh * nv + c] = loadv(src + c * LANES) * scale_v;
      }
      std::fill(acc.begin(), acc.end(), zero);
      const int64_t* trow = table + rows[t] * table_stride;
      for (int64_t j = j0; j < j1; j += TILE) {
        const int64_t n = std::min(TILE, j1 - j);
        const vec lanes_on = lane_mask(n);
        for (int64_t h = 0; h < nkv; ++h) {
          // q . k for the group's heads, each K row converted once; V rows converted to float for the weighted sum
          for (int64_t jj = 0; jj < n; ++jj) {
            const int64_t at = (trow[j + jj] * nkv + h) * d;
            if (j + jj + TILE < j1) {  // the next tile's rows: their slots are scattered, beyond the prefetcher's reach
              const int64_t next = (trow[j + jj + TILE] * nkv + h) * d;
              for (int64_t c = 0; c < d * (int64_t)sizeof(T); c += 64) {
                __builtin_prefetch(reinterpret_cast<const char*>(k_cache + next) + c);
                __builtin_prefetch(reinterpret_cast<const char*>(v_cache + next) + c);
              }
            }
            vec k[NV > 0 ? NV : MAX_VECS];
            for (int64_t c = 0; c < nv; ++c) {
              k[c] = loadv(k_cache + at + c * LANES);
              vt[jj * nv + c] = loadv(v_cache + at + c * LANES);
            }
            for (int64_t g = 0; g < group; ++g) {
              const vec* qg = &qv[(h * group + g) * nv];
              vec s = qg[0] * k[0];
              for (int64_t c = 1; c < nv; ++c) s = fmav(qg[c], k[c], s);
              dots[g * TILE + jj] = s;
            }
          }
          for (int64_t g = 0; g < group; ++g) {
            const int64_t qh = h * group + g;
            for (int64_t jj = n; jj < TILE; ++jj) dots[g * TILE + jj] = zero;
            const vec scores = row_sums(&dots[g * TILE]);
            const float tile_max = max_lanes(n == TILE ? scores : selectv(lanes_on, scores, splat(-HUGE_VALF)));
            const float new_max = std::max(mx[qh], tile_max);
            const float corr = std::exp(mx[qh] - new_max);
            mx[qh] = new_max;
            float e[TILE];
            storev(e, vexpv(scores - splat(new_max)));
            for (int64_t jj = n; jj < TILE; ++jj) e[jj] = 0.f;  // past the context
            sum[qh] = sum[qh] * corr + sum_lanes(loadv(e));
            vec a[NV > 0 ? NV : MAX_VECS];
            for (int64_t c = 0; c < nv; ++c) a[c] = acc[qh * nv + c];
            if (corr != 1.f) {
              const vec cv = splat(corr);
              for (int64_t c = 0; c < nv; ++c) a[c] = a[c] * cv;
            }
            for (int64_t jj = 0; jj < n; ++jj) {
              const vec w = splat(e[jj]);
              for (int64_t c = 0; c < nv; ++c) a[c] = fmav(w, vt[jj * nv + c], a[c]);
            }
            for (int64_t c = 0; c < nv; ++c) acc[qh * nv + c] = a[c];
          }
        }
      }
      for (int64_t qh = 0; qh < heads; ++qh) {
        const vec* a = &acc[qh * nv];
        if (direct) {
          O* dst = out + t * nh * d + qh * d;
          const float inv = sum[qh] > 0.f ? 1.f / sum[qh] : 0.f;
          for (int64_t c = 0; c < nv; ++c)
            for (int64_t l = 0; l < LANES; ++l) dst[c * LANES + l] = narrow<T, O>(a[c][l] * inv);
        } else {
          part_max[item * heads + qh] = mx[qh];
          part_sum[item * heads + qh] = sum[qh];
          for (int64_t c = 0; c < nv; ++c) std::memcpy(&part_acc[(item * heads + qh) * d + c * LANES], &a[c], sizeof(vec));
        }
      }
    }
  });
  if (direct) return;
  // merge the partitions of each (token, query head)
  at::parallel_for(0, tokens * heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> o(d);
    for (int64_t tq = begin; tq < end; ++tq) {
      const int64_t t = tq / heads, qh = tq % heads;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < parts; ++p) m = std::max(m, part_max[(t * parts + p) * heads + qh]);
      float total = 0.f;
      std::fill(o.begin(), o.end(), 0.f);
      for (int64_t p = 0; p < parts; ++p) {
        const int64_t at = (t * parts + p) * heads + qh;
        const float s = part_sum[at];
        if (s == 0.f) continue;
        const float w = std::exp(part_max[at] - m);
        total += s * w;
        const float* a = &part_acc[at * d];
        for (int64_t i = 0; i < d; ++i) o[i] += w * a[i];
      }
      O* dst = out + t * nh * d + qh * d;
      const float inv = total > 0.f ? 1.f / total : 0.f;
      for (int64_t i = 0; i < d; ++i) dst[i] = narrow<T, O>(o[i] * inv);
    }
  });
}

// q: [T, nh, D] (rows may be strided, e.g. a view into the fused qkv); returns [T, nh * D] in out_dtype (q's, or
// bf16 for a float32 q).
at::Tensor paged_attention_kv(const at::Tensor& q, const KVLayer& kv, const at::Tensor& table, const at::Tensor& rows,
                              const at::Tensor& lens, double scale, at::ScalarType out_dtype,
                              StepBuffers* bufs = nullptr) {
  RECORD_FUNCTION("kestrel::paged_attention", std::vector<c10::IValue>());
  check_cpu(q, "q");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q must be [T, heads, D] with dense heads");
  TORCH_CHECK(kv.dtype == q.scalar_type(), "caches must be in q's dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.stride(1) == 1, "table must be int64 with dense rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong && lens.scalar_type() == at::kLong, "rows and lens must be int64");
  const int64_t tokens = q.size(0), nh = q.size(1), d = q.size(2), nkv = kv.nkv;
  TORCH_CHECK(nh % nkv == 0 && kv.d == d, "heads disagree with the cache");
  TORCH_CHECK(d % 16 == 0 && d <= MAX_HEAD, "head size must be a multiple of 16, at most 256 (got ", d, ")");
  TORCH_CHECK(rows.numel() == tokens && lens.numel() == tokens, "one row and one length per query token");
  auto r = rows.contiguous(), l = lens.contiguous();
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "attention takes float32 or bfloat16");
  TORCH_CHECK(out_dtype == q.scalar_type() || bf16_edges(q.scalar_type(), q.scalar_type(), out_dtype),
              "the output must be in q's dtype (or bf16 for a float32 q)");
  at::Tensor out = new_output(bufs, StepBuffers::ATTN, {tokens, nh * d}, q.options().dtype(out_dtype));
  if (tokens == 0) return out;
  kestrel::KernelTimer timer(kestrel::KernelWork::attention);
  if (out_dtype != q.scalar_type()) {
    using BF = c10::BFloat16;
    auto run = [&](auto impl) {
      impl(q.data_ptr<float>(), q.stride(0), out.data_ptr<BF>(), static_cast<const float*>(kv.k), static_cast<const float*>(kv.v),
           table.data_ptr<int64_t>(), table.stride(0), r.data_ptr<int64_t>(), l.data_ptr<int64_t>(), tokens, nh, nkv,
           d, static_cast<float>(scale));
    };
    if (d == 64) run(attention_impl<float, 64 / W, BF>);
    else if (d == 128) run(attention_impl<float, 128 / W, BF>);
    else run(attention_impl<float, 0, BF>);
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto impl) {
      impl(q.data_ptr<scalar_t>(), q.stride(0), out.data_ptr<scalar_t>(), static_cast<const scalar_t*>(kv.k),
           static_cast<const scalar_t*>(kv.v), table.data_ptr<int64_t>(), table.stride(0), r.data_ptr<int64_t>(),
           l.data_ptr<int64_t>(), tokens, nh, nkv, d, static_cast<float>(scale));
    };
    if (d == 64) run(attention_impl<scalar_t, 64 / W>);
    else if (d == 128) run(attention_impl<scalar_t, 128 / W>);
    else run(attention_impl<scalar_t, 0>);
  });
  return out;
}

at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor table, at::Tensor rows,
                           at::Tensor lens, double scale) {
  return paged_attention_kv(q, kv_layer(k_cache, v_cache), table, rows, lens, scale, q.scalar_type());
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
  RECORD_FUNCTION("kestrel::lora_apply", std::vector<c10::IValue>());
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

// ---- int8 weight-only matmul of a few rows ------------------------------------------------------------------
// y = x q^T * scale for int8 q [N, K] with a scale per output: a quantized model's int8 output head for steps of a
// few rows (batch-1 decode above all), where PyTorch's kernel (aten::_weight_int8pack_mm) reads the head well below
// memory speed (measured against it: INT8_KERNEL_ROWS in kestrel/model/llama.py).
// W outputs at a time: their W x K weights (a few KB, in L1 after the first row) serve every row; W accumulators
// over K, folded into one vector of W sums by row_sums. Each output is its float32 sum times its scale, rounded
// once to bf16, as PyTorch's kernel rounds it (the sums in another order); a row's result does not depend on the
// other rows.
inline vec loadq(const int8_t* p) {  // W int8 widened to float (the vector-extension form scalarizes)
#if W == 16
  return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  vec v;
  for (int l = 0; l < W; ++l) v[l] = p[l];
  return v;
#endif
}

template <int OUTS>  // outputs of the last, partial block (full blocks: int8_rows_block)
inline void int8_block(const float* x, int64_t K, const int8_t* q, float* sums) {
  const int64_t body = K - K % W;
  vec acc[W];
  for (int j = 0; j < W; ++j) acc[j] = splat(0.f);
  for (int64_t k = 0; k < body; k += W) {
    const vec xv = loadv(x + k);
    for (int j = 0; j < OUTS; ++j) acc[j] = fmav(loadq(q + j * K + k), xv, acc[j]);
  }
  const vec s = row_sums(acc);
  for (int j = 0; j < OUTS; ++j) {
    float t = s[j];
    for (int64_t k = body; k < K; ++k) t = std::fma(static_cast<float>(q[j * K + k]), x[k], t);
    sums[j] = t;
  }
}

// R rows (1, 2 or 4) at once over a full block of W outputs, W / R outputs a pass: each weight vector is widened once
// for the R rows, and the pass's W accumulators (R rows x W / R outputs) fold into W sums with one row_sums. Per row
// and output the same multiply-adds in the same order whatever R, and row_sums folds every vector alike: a row's
// sums do not depend on the rows beside it. sums: [R][W]. `ahead`, where given: a block of W x K weights to bring
// into the caches meanwhile, spread evenly over the iterations (W * W / R bytes each).
template <int R>
inline void int8_rows_block(const float* x, int64_t K, const int8_t* q, float* sums, const char* ahead) {
  constexpr int P = W / R;
  const int64_t body = K - K % W;
  int64_t due = 0, fetched = 0;  // bytes of `ahead` to have prefetched by now, and prefetched
  for (int p0 = 0; p0 < W; p0 += P) {
    vec acc[W];
    for (int a = 0; a < W; ++a) acc[a] = splat(0.f);
    for (int64_t k = 0; k < body; k += W) {
      if (ahead)
        for (due += W * W / R; fetched < due; fetched += 64) _mm_prefetch(ahead + fetched, _MM_HINT_T0);
      vec xv[R];
      for (int r = 0; r < R; ++r) xv[r] = loadv(x + r * K + k);
      for (int j = 0; j < P; ++j) {
        const vec w = loadq(q + (p0 + j) * K + k);
        for (int r = 0; r < R; ++r) acc[r * P + j] = fmav(w, xv[r], acc[r * P + j]);
      }
    }
    const vec s = row_sums(acc);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < P; ++j) {
        float t = s[r * P + j];
        for (int64_t k = body; k < K; ++k) t = std::fma(static_cast<float>(q[(p0 + j) * K + k]), x[r * K + k], t);
        sums[r * W + p0 + j] = t;
      }
  }
}

template <typename O>  // bf16, or float32 holding the bf16-rounded value
void int8_rows_impl(const float* x, int64_t M, int64_t K, const int8_t* q, const c10::BFloat16* scale, int64_t N,
                    O* y) {
  at::parallel_for(0, (N + W - 1) / W, 64, [&](int64_t begin, int64_t end) {
    float sums[4 * W];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * W, outs = std::min<int64_t>(W, N - n0);
      // the block after next, into the caches while this one computes, spread over the first row's iterations:
      // the hardware prefetcher follows one row's stream, not the block's W, and a burst of the whole block at once
      // stalled the loads (the head alone, SmolLM2's 49152 x 576 on a 2-core Xeon: 0.84 ms in a burst, 0.74
      // without prefetching, 0.50 spread)
      const char* ahead = b + 2 < end ? reinterpret_cast<const char*>(q + (n0 + 2 * W) * K) : nullptr;
      for (int64_t m = 0; m < M;) {
        // four rows at a time, then two, then one (a partial block: one output at a time)
        const int64_t rows = outs < W ? 1 : M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
        const char* pf = m == 0 ? ahead : nullptr;
        if (rows == 4) {
          int8_rows_block<4>(x + m * K, K, q + n0 * K, sums, pf);
        } else if (rows == 2) {
          int8_rows_block<2>(x + m * K, K, q + n0 * K, sums, pf);
        } else if (outs == W) {
          int8_rows_block<1>(x + m * K, K, q + n0 * K, sums, pf);
        } else {
          for (int64_t j = 0; j < outs; ++j) int8_block<1>(x + m * K, K, q + (n0 + j) * K, sums + j);
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < outs; ++j)
            y[(m + r) * N + n0 + j] =
                static_cast<O>(c10::BFloat16(sums[r * W + j] * static_cast<float>(scale[n0 + j])));
        m += rows;
      }
    }
  });
}

// x [M, K] bf16, q int8 [N, K], scale bf16 [N] -> bf16 [M, N]; with float_out the same values in float32 (logits
// for the sampler, without a pass converting them)
at::Tensor int8_rows_mm(at::Tensor x, at::Tensor q, at::Tensor scale, bool float_out) {
  RECORD_FUNCTION("kestrel::int8_rows_mm", std::vector<c10::IValue>());
  check_cpu(x, "x");
  check_cpu(q, "q");
  check_cpu(scale, "scale");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bf16 [rows, in], got ", x.scalar_type(),
              " ", x.sizes());
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(), "q must be contiguous int8 [out, in]");
  TORCH_CHECK(q.size(1) == x.size(1), "x has ", x.size(1), " inputs, the weights ", q.size(1));
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0) && scale.scalar_type() == at::kBFloat16 &&
                  scale.is_contiguous(),
              "scale must be contiguous bf16 [out]");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, x.options().dtype(float_out ? at::kFloat : at::kBFloat16));
  kestrel::KernelTimer timer(kestrel::KernelWork::matmul);
  auto run = [&](auto* out) {
    int8_rows_impl(xf.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), scale.data_ptr<c10::BFloat16>(), N, out);
  };
  if (M > 0 && N > 0) float_out ? run(y.data_ptr<float>()) : run(y.data_ptr<c10::BFloat16>());
  return y;
}

// ---- the decoder layers in one call ----------------------------------------------------------------------
// A linear as the Python side describes it: kind 0 dense (weight[, bias]), 1 int8 (q, scale[, bias]), 2 int4 (packed,
// scales_zeros[, bias]) with its group size, 3 int4 on AMX tiles (codes, scales_zeros[, bias]), 4 the same on AVX2.
// The quantized kernels take and return bf16 activations; with a float32 model the kernels around them read and write
// bf16 directly, which gives exactly what converting would (widening is exact, narrowing rounds to nearest even
// either way) without a copy per matmul.
struct LinearSpec {
  int64_t kind, group;
  std::vector<at::Tensor> t;
  bool has_bias;
  // Kestrel's int4 kernels (kinds 3, 4): which one, the weights' pointers and shape, checked once when the stack
  // is built
  kestrel::Int4Kernel int4 = kestrel::Int4Kernel::tiles;
  const uint8_t* codes = nullptr;
  const c10::BFloat16* scales_zeros = nullptr;
  int64_t n = 0, k = 0;
};

// y = x W^T (+ bias): in x's dtype for a dense linear, bf16 for a quantized one. Kestrel's int4 kernels write into
// the step's buffer for `use`.
at::Tensor apply_linear(const LinearSpec& l, const at::Tensor& x, StepBuffers& bufs, StepBuffers::Use use) {
  if (l.kind == 0) {
    kestrel::KernelTimer timer(kestrel::KernelWork::matmul);
    return at::linear(x, l.t[0], l.has_bias ? c10::optional<at::Tensor>(l.t[1]) : c10::nullopt);
  }
  at::Tensor xb = x.scalar_type() == at::kBFloat16 ? x : x.to(at::kBFloat16);
  at::Tensor y;
  if (l.kind == 1) {
    kestrel::KernelTimer timer(kestrel::KernelWork::matmul);
    y = at::_weight_int8pack_mm(xb, l.t[0], l.t[1]);
  } else if (l.kind == 2) {
    kestrel::KernelTimer timer(kestrel::KernelWork::matmul);
    y = at::_weight_int4pack_mm_for_cpu(xb, l.t[0], l.group, l.t[1]);
  } else {  // (int4_mm_raw times itself)
    if (!xb.is_contiguous()) xb = xb.contiguous();
    TORCH_CHECK(xb.size(1) == l.k, "x has ", xb.size(1), " inputs, the weights ", l.k);
    y = bufs.get(use, {xb.size(0), l.n}, xb.options());
    kestrel::int4_mm_raw(l.int4, xb.data_ptr<c10::BFloat16>(), xb.size(0), l.k, l.codes, l.scales_zeros, l.n,
                         y.data_ptr<c10::BFloat16>());
  }
  if (l.has_bias) y = y + l.t[2];
  return y;
}

// A model's decoder layers as decoder_layers() runs them, built once: converting ~500 tensors from Python
// lists on every step cost ~50 us. Per layer: norms [input, post], linears [qkv, o, gate_up, down]
// (kinds/groups/tensors flattened in that order), and the layer's K and V pool caches.
struct DecoderStack {
  std::vector<at::Tensor> norms;
  at::Tensor final_norm;
  std::vector<LinearSpec> linears;
  std::vector<at::Tensor> k_caches, v_caches;
  std::vector<const void*> norm_weights;  // norms' data, checked once (add_rms_norm_ptr)
  std::vector<KVLayer> kv;  // each layer's caches, checked once
  at::ScalarType norm_dtype;
  int64_t norm_dim;

  DecoderStack(std::vector<at::Tensor> norms_, at::Tensor final_norm_, std::vector<int64_t> kinds,
               std::vector<int64_t> groups, std::vector<std::vector<at::Tensor>> weights,
               std::vector<at::Tensor> k_caches_, std::vector<at::Tensor> v_caches_)
      : norms(std::move(norms_)), final_norm(std::move(final_norm_)), k_caches(std::move(k_caches_)),
        v_caches(std::move(v_caches_)) {
    const size_t layers = k_caches.size();
    TORCH_CHECK(layers > 0 && norms.size() == 2 * layers && kinds.size() == 4 * layers &&
                    groups.size() == 4 * layers && weights.size() == 4 * layers && v_caches.size() == layers,
                "per-layer lists disagree in length");
    norm_dtype = final_norm.scalar_type();
    norm_dim = final_norm.numel();
    for (const auto& n : norms) {
      TORCH_CHECK(n.is_contiguous() && n.scalar_type() == norm_dtype && n.numel() == norm_dim,
                  "the norms' weights must be contiguous, of one dtype and size");
      norm_weights.push_back(n.data_ptr());
    }
    TORCH_CHECK(final_norm.is_contiguous(), "the final norm's weight must be contiguous");
    for (size_t i = 0; i < layers; ++i) kv.push_back(kv_layer(k_caches[i], v_caches[i]));
    linears.reserve(4 * layers);
    for (size_t i = 0; i < 4 * layers; ++i) {
      const size_t need = kinds[i] == 0 ? 1 : 2;
      TORCH_CHECK(weights[i].size() == need || weights[i].size() == need + 1, "linear ", i, ": wrong tensor count");
      linears.push_back({kinds[i], groups[i], weights[i], weights[i].size() == need + 1});
      LinearSpec& l = linears.back();
      if (l.kind == 3 || l.kind == 4) {
        l.int4 = l.kind == 3 ? kestrel::Int4Kernel::tiles : kestrel::Int4Kernel::vector;
        kestrel::int4_check_weights(l.int4, l.t[0], l.t[1], &l.n, &l.k);
        l.codes = l.t[0].data_ptr<uint8_t>();
        l.scales_zeros = l.t[1].data_ptr<c10::BFloat16>();
      }
    }
  }
};

// hidden: the embeddings [T, H], updated in place as the residual stream; returns the final norm's output.
// Attention: every token through the table (decode rows and short causal rows; the caller checks).
at::Tensor decoder_layers(const DecoderStack& stack, at::Tensor hidden, at::Tensor positions, at::Tensor cos,
                          at::Tensor sin, at::Tensor slots, at::Tensor table, at::Tensor rows, at::Tensor lens,
                          int64_t nh, int64_t nkv, double eps, c10::optional<at::Tensor> lora_tokens,
                          c10::optional<at::Tensor> lora_table) {
  RECORD_FUNCTION("kestrel::decoder_layers", std::vector<c10::IValue>());
  const auto& linears = stack.linears;
  const int64_t layers = static_cast<int64_t>(stack.kv.size());
  const int64_t d = stack.kv[0].d;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const bool lora = lora_tokens.has_value() && lora_table.has_value();
  const auto model = hidden.scalar_type();
  // the dtype a linear wants its input in (the LoRA updates work in the model's dtype, on both sides)
  auto input_dtype = [&](int64_t layer, int64_t site) {
    return lora || linears[4 * layer + site].kind == 0 ? model : at::kBFloat16;
  };
  StepBuffers bufs;
  static constexpr StepBuffers::Use outputs[4] = {StepBuffers::QKV, StepBuffers::O, StepBuffers::GATE_UP,
                                                  StepBuffers::DOWN};
  // y = linear(x), plus the batch's LoRA updates of that layer's site (0 qkv, 1 o, 2 gate_up, 3 down)
  auto linear = [&](int64_t layer, int64_t site, const at::Tensor& x) {
    at::Tensor y = apply_linear(linears[4 * layer + site], x, bufs, outputs[site]).contiguous();
    if (lora) {
      y = y.to(model);
      lora_apply(y, x.contiguous(), *lora_tokens, *lora_table, layer, site);
    }
    return y;
  };
  TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == stack.norm_dtype && hidden.size(1) == stack.norm_dim,
              "hidden must be [tokens, ", stack.norm_dim, "] in the norms' dtype");
  const auto& norm = stack.norm_weights;
  c10::optional<at::Tensor> delta;
  for (int64_t i = 0; i < layers; ++i) {
    at::Tensor x = add_rms_norm_ptr(hidden, delta, norm[2 * i], eps, input_dtype(i, 0), &bufs, StepBuffers::NORM_IN);
    // q rotated in the model's dtype (reading a quantized matmul's bf16 output directly), k and v into the pool
    at::Tensor q = rope_store_kv(linear(i, 0, x), positions, cos, sin, stack.kv[i], slots, nh, nkv, &bufs);
    at::Tensor attn = paged_attention_kv(q, stack.kv[i], table, rows, lens, scale, input_dtype(i, 1), &bufs);
    x = add_rms_norm_ptr(hidden, linear(i, 1, attn), norm[2 * i + 1], eps, input_dtype(i, 2), &bufs,
                         StepBuffers::NORM_POST);
    at::Tensor act = silu_mul_to(linear(i, 2, x), model, input_dtype(i, 3), &bufs);
    delta = linear(i, 3, act);
  }
  return add_rms_norm(hidden, delta, stack.final_norm, eps);
}

// ---- embedding rows ------------------------------------------------------------------------------------
// table[ids] for a step's few tokens: row copies, without the index_select path (whose code runs cold each step,
// after the layers have streamed the weights through the caches: ~30 us for one row).
at::Tensor embed_rows(at::Tensor table, at::Tensor ids) {
  check_cpu(table, "table");
  TORCH_CHECK(table.dim() == 2 && table.is_contiguous(), "table must be a contiguous [vocab, hidden] tensor");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "ids must be int64 [tokens]");
  const int64_t tokens = ids.size(0), vocab = table.size(0), row = table.size(1) * table.element_size();
  at::Tensor out = at::empty({tokens, table.size(1)}, table.options());
  const auto id = ids.contiguous();
  const int64_t* ip = id.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(table.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(ip[t] >= 0 && ip[t] < vocab, "token id ", ip[t], " is outside the vocabulary of ", vocab);
    std::memcpy(dst + t * row, src + ip[t] * row, row);
  }
  return out;
}

// ---- greedy picks --------------------------------------------------------------------------------------
// The first maximum of x[0, n), or its first NaN if it has one (then nan is set): one vectorized pass for the
// maximum, one for its first position.
struct SpanMax {
  int64_t at;
  float best;
  bool nan;
};

SpanMax argmax_span(const float* x, int64_t n) {
  const int64_t body = n - n % W;
  vec m = splat(-HUGE_VALF);
  veci nan = (veci)splat(0.f);
  for (int64_t i = 0; i < body; i += W) {
    const vec v = loadv(x + i);
    m = maxv(m, v);
    nan |= (veci)(v != v);
  }
  float best = max_lanes(m);
  bool any_nan = false;
  for (int l = 0; l < W; ++l) any_nan |= nan[l] != 0;
  for (int64_t i = body; i < n; ++i) {
    any_nan |= x[i] != x[i];
    best = std::max(best, x[i]);
  }
  int64_t at = -1;
  if (!any_nan) {
    const vec b = splat(best);
    for (int64_t i = 0; i < body && at < 0; i += W) {
      const unsigned hits = lanes_set((veci)(loadv(x + i) == b));
      if (hits) at = i + __builtin_ctz(hits);
    }
  }
  for (int64_t i = any_nan ? 0 : body; i < n && at < 0; ++i)
    if (any_nan ? x[i] != x[i] : x[i] == best) at = i;
  return {at, best, any_nan};
}

// The index of each row's largest value, the first one on ties, NaN above everything (as torch.argmax).
at::Tensor argmax_rows(at::Tensor logits) {
  RECORD_FUNCTION("kestrel::argmax_rows", std::vector<c10::IValue>());
  check_cpu(logits, "logits");
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
              "logits must be float32 [rows, vocab] with dense rows");
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  TORCH_CHECK(n > 0, "logits must have a vocabulary");
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  const float* base = logits.data_ptr<float>();
  // fewer rows than threads (a batch-1 step): each row in one span per thread, then the spans' picks combined in
  // order (the first NaN, else the first maximum). The head wrote each thread's columns from its own core, whose
  // cache still holds them: one thread reading them all waited on the other core's cache.
  const int64_t threads = at::get_num_threads();
  const int64_t spans = rows < threads ? std::min<int64_t>(threads, std::max<int64_t>(1, n / (64 * W))) : 1;
  const int64_t span = (n / spans + W - 1) / W * W;
  std::vector<SpanMax> part(rows * spans);
  at::parallel_for(0, rows * spans, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / spans, s0 = (i % spans) * span, len = std::min(n, s0 + span) - s0;
      part[i] = len > 0 ? argmax_span(base + r * stride + s0, len) : SpanMax{-1, -HUGE_VALF, false};
      if (part[i].at >= 0) part[i].at += s0;
    }
  });
  for (int64_t r = 0; r < rows; ++r) {
    const SpanMax* p = &part[r * spans];
    int64_t pick = -1;
    for (int64_t s = 0; s < spans && pick < 0; ++s)
      if (p[s].nan) pick = p[s].at;
    if (pick < 0) {
      float best = -HUGE_VALF;
      for (int64_t s = 0; s < spans; ++s)
        if (p[s].at >= 0 && (pick < 0 || p[s].best > best)) pick = p[s].at, best = p[s].best;
    }
    o[r] = pick;
  }
  return out;
}

// ---- greedy decode steps in one call ----------------------------------------------------------------------
// Up to `steps` decode steps of a batch of one-token rows whose every pick is the argmax of the raw logits (the
// engine's multi-step decoding): each step runs the layers (decoder_layers), the head and the argmax, exactly as a
// step from Python does, then feeds each row's pick back in at the next position, into the slot the caller reserved
// for it (slots[step, row], already written to the row's table columns). It stops early after a step that picks
// any of `stop_ids` (EOS, stop tokens) in any row, so the caller can end that sequence, or once `max_seconds` have
// passed (a bound on what the caller's callers wait, whatever the steps cost). head: {int8 q, bf16 scale}
// (int8_rows_mm, the caller's choice for few rows) or {dense weight} (x W^T in the model's dtype, then float32).
// Returns the picks, int64 [steps run, rows].
at::Tensor decode_burst(const DecoderStack& stack, at::Tensor embed, std::vector<at::Tensor> head, at::Tensor ids,
                        at::Tensor positions, at::Tensor cos, at::Tensor sin, at::Tensor slots, at::Tensor table,
                        at::Tensor rows, at::Tensor lens, int64_t nh, int64_t nkv, double eps, at::Tensor stop_ids,
                        double max_seconds) {
  const auto start = std::chrono::steady_clock::now();
  TORCH_CHECK(head.size() == 1 || head.size() == 2, "head: {weight} or {int8 q, scale}");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "ids must be int64 [rows]");
  const int64_t n = ids.size(0);
  TORCH_CHECK(slots.dim() == 2 && slots.size(1) == n && slots.scalar_type() == at::kLong, "slots must be int64 [steps, rows]");
  TORCH_CHECK(positions.numel() == n && lens.numel() == n && rows.numel() == n, "one position, length and row per row");
  TORCH_CHECK(stop_ids.scalar_type() == at::kLong, "stop_ids must be int64");
  at::Tensor next = ids.contiguous(), all_slots = slots.contiguous(), stops = stop_ids.contiguous();
  // the step's positions and lengths move on by one after each step: own copies, changed in place
  at::Tensor pos = positions.to(at::kLong).clone().contiguous(), len = lens.to(at::kLong).clone().contiguous();
  int64_t* pp = pos.data_ptr<int64_t>();
  int64_t* lp = len.data_ptr<int64_t>();
  const int64_t* sp = stops.data_ptr<int64_t>();
  const int64_t num_stops = stops.numel();
  std::vector<at::Tensor> picks;
  for (int64_t step = 0; step < all_slots.size(0); ++step) {
    at::Tensor h = decoder_layers(stack, embed_rows(embed, next), pos, cos, sin, all_slots[step], table, rows, len, nh,
                                  nkv, eps, c10::nullopt, c10::nullopt);
    at::Tensor logits;
    if (head.size() == 2) {
      logits = int8_rows_mm(h.scalar_type() == at::kBFloat16 ? h : h.to(at::kBFloat16), head[0], head[1], true);
    } else {
      kestrel::KernelTimer timer(kestrel::KernelWork::matmul);
      logits = at::linear(h, head[0]);
    }
    next = argmax_rows(logits.to(at::kFloat));
    picks.push_back(next);
    const int64_t* np = next.data_ptr<int64_t>();
    bool stop = false;
    for (int64_t r = 0; r < n && !stop; ++r)
      for (int64_t i = 0; i < num_stops && !stop; ++i) stop = np[r] == sp[i];
    if (stop || std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >= max_seconds) break;
    for (int64_t r = 0; r < n; ++r) ++pp[r], ++lp[r];
  }
  return at::stack(picks);
}

// Switch the kernel clock (int4_tiles.h) on or off; returns the [matmul, attention] nanoseconds counted since the
// last call, and starts counting from zero.
std::vector<int64_t> kernel_clock(bool on) {
  kestrel::kernel_clock_on.store(on, std::memory_order_relaxed);
  return {kestrel::kernel_clock_ns[0].exchange(0), kestrel::kernel_clock_ns[1].exchange(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "hidden += delta (in place, if given); return RMSNorm(hidden) * weight");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up for a fused [T, 2I] gate_up");
  m.def("rope_store", &rope_store, "RoPE on the fused qkv's q (returned) and k, k and v into their pool slots");
  py::class_<DecoderStack>(m, "DecoderStack", "a model's decoder layers as decoder_layers() runs them")
      .def(py::init<std::vector<at::Tensor>, at::Tensor, std::vector<int64_t>, std::vector<int64_t>,
                    std::vector<std::vector<at::Tensor>>, std::vector<at::Tensor>, std::vector<at::Tensor>>(),
           py::arg("norms"), py::arg("final_norm"), py::arg("kinds"), py::arg("groups"), py::arg("weights"),
           py::arg("k_caches"), py::arg("v_caches"));
  // the decode steps' calls run without the GIL: other threads of the process (a Ray actor's method calls,
  // callers queueing requests, the stream's delivery) go on meanwhile instead of waiting for the step to end
  m.def("decoder_layers", &decoder_layers, "all decoder layers for a step whose attention the table serves",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_burst", &decode_burst, "greedy decode steps in one call: layers, head and argmax, each pick fed back",
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_apply", &lora_apply, "y += each token's adapter's low-rank update (B A x) at one layer's site, in place");
  m.def("int8_rows_mm", &int8_rows_mm, "x q^T * scale for int8 q with a scale per output, for a few rows, bf16 "
        "(float32 holding the bf16 values with float_out)", py::arg("x"), py::arg("q"), py::arg("scale"),
        py::arg("float_out") = false);
  m.def("int4_tiles_available", &kestrel::int4_tiles_available, "whether int4_tiles_mm runs here (AMX-BF16)");
  m.def("int4_tiles_mm", &kestrel::int4_tiles_mm, "x W^T for int4 W in the tile layout (Int4Linear.to_tiles), bf16");
  m.def("int4_vector_available", &kestrel::int4_vector_available, "whether int4_vector_mm runs here (AVX2, FMA)");
  m.def("int4_vector_mm", &kestrel::int4_vector_mm, "int4_tiles_mm's product on AVX2 (CPUs without AMX), bf16");
  m.def("embed_rows", &embed_rows, "table[ids]: the embedding rows of a step's tokens");
  m.def("argmax_rows", &argmax_rows, "each row's argmax (first on ties, NaN first), as torch.argmax(dim=-1)");
  m.def("paged_attention", &paged_attention, "attention of each query token over its table row's first lens slots");
  m.def("kernel_clock", &kernel_clock, "switch the clock of the matmul and attention kernels on or off; returns the "
        "[matmul, attention] nanoseconds counted since the last call", py::arg("on"));
}

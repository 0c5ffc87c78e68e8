// int4 weight-only matmul on AMX tiles, for the steps of a few to a few dozen tokens that batched decoding runs (and,
// below, the same layout on AVX2 for CPUs without AMX).
//
// PyTorch's int4 kernel (aten::_weight_int4pack_mm_for_cpu) dequantizes its weights again for every activation
// row: on a 2-core AMX Xeon its time grows ~1.2 ms a row over SmolLM2-135M's layers, so from 5 rows on the engine
// ran dense bf16 copies instead, which read 4x the bytes (13 ms a step, bound by memory). Here each weight is
// expanded once per call, for every row at once, and multiplied on the AMX unit:
//   for each block of 16 output rows and each group of 32 inputs (one int4 scale group, one tile's depth):
//     B = codes - 8 as bf16 (exact small integers, through a 32-entry lookup: no arithmetic per weight)
//     C = x[:, group] B            on the tiles, float32
//     y += C * scale + sum(x[:, group]) * zero    in float32, per output column
// which is x W^T for W = (code - 8) * scale + zero, the weights dequantize() gives. The products and sums run in
// float32 (the tiles' order), the output is rounded once to bf16: the same rounding as PyTorch's kernel, a
// different summation order (tests/test_quant.py checks both against the float32 reference).
//
// One or two rows skip the tiles (int4_rows_impl). Measured on that Xeon, SmolLM2-135M's 120 layer linears in a row, ms
// (benchmarks/bench_int4_kernels.py): 2.3 / 3.4 / 4.3 / 7.2 at 1 / 2 / 4 / 16 rows (PyTorch's int4: 3.5 / 4.4 / 5.9 /
// 21.5; dense bf16 at 16: 13.8). In the engine a batch-1 step is bound by memory either way (same time); a 16-row
// decode step went from 27 ms on the dense copies to 23 (benchmarks/bench_dense_rows.py).
#include "int4_tiles.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define KESTREL_TILES 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace kestrel {
namespace {

#ifdef KESTREL_TILES
// Linux hands out AMX state on request, once per process (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA)
bool tiles_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}

struct TileConfig {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// tile 0: C (rows x 16 float32), 1: A (rows x 32 bf16), 2: B (16 pairs of inputs x 16 columns x 2 bf16)
void configure(int rows) {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette = 1;
  c.rows[0] = c.rows[1] = static_cast<uint8_t>(rows);
  c.rows[2] = 16;
  c.bytes_per_row[0] = c.bytes_per_row[1] = c.bytes_per_row[2] = 64;
  _tile_loadconfig(&c);
}

inline __m512 widen(const c10::BFloat16* p) {  // 16 bf16 -> 16 float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

inline void store_bf16(c10::BFloat16* p, __m512 v) { _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v)); }

// 64-byte-aligned scratch of n elements
template <typename T> struct Scratch {
  std::vector<T> raw;
  T* p;
  explicit Scratch(size_t n) : raw(n + 64 / sizeof(T)) {
    p = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw.data()) + 63) & ~uintptr_t(63));
  }
};

// bf16 of code - 8 for codes 0..15, twice: vpermw reads 5 bits of each lane, the 5th being the next code's
inline __m512i code_values() {
  return _mm512_set_epi16(0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000, -0x4080, -0x4000, -0x3fc0,
                          -0x3f80, -0x3f60, -0x3f40, -0x3f20, -0x3f00, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000,
                          0x3f80, 0x0000, -0x4080, -0x4000, -0x3fc0, -0x3f80, -0x3f60, -0x3f40, -0x3f20, -0x3f00);
}

// One or two rows, without the tiles: each B row (16 columns x a pair of inputs) multiplies every row's pair of x
// with one vdpbf16ps, in registers (at one row the tiles' stores and loads cost more than they save).
template <int R>
void int4_rows_impl(const c10::BFloat16* x, int64_t K, const uint8_t* codes, const c10::BFloat16* sz, int64_t N,
                    c10::BFloat16* y, const float* xsum) {
  const int64_t blocks = N / 16, groups = K / 32;
  const __m512i lut = code_values();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      __m512 scaled[R], zeros[R];
      for (int m = 0; m < R; ++m) scaled[m] = zeros[m] = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t* cb = codes + (nb * groups + g) * 256;
        __m512 part[R][4];  // four partial sums a row, so the dot products do not wait on each other
        for (int m = 0; m < R; ++m)
          for (int j = 0; j < 4; ++j) part[m][j] = _mm512_setzero_ps();
        // 16 groups ahead: the hardware prefetcher alone fell behind. A batch-1 decode step of SmolLM2 went from
        // 6.3-7.9 to 4.8-5.2 ms (2-core AMX Xeon, alternated runs; 1 KB ahead gave 5.1-5.3, 8 KB 5.3-5.5)
        for (int c = 0; c < 4; ++c) _mm_prefetch((const char*)cb + 4096 + 64 * c, _MM_HINT_T0);
        for (int c = 0; c < 4; ++c) {
          const __m512i v = _mm512_loadu_si512((const void*)(cb + 64 * c));
          for (int j = 0; j < 4; ++j) {
            const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4 * j), lut);
            const int64_t k = g * 32 + 2 * (4 * c + j);
            for (int m = 0; m < R; ++m) {
              int32_t pair;
              std::memcpy(&pair, x + m * K + k, sizeof pair);
              part[m][j] = _mm512_dpbf16_ps(part[m][j], w, (__m512bh)_mm512_set1_epi32(pair));
            }
          }
        }
        const c10::BFloat16* s = sz + (nb * groups + g) * 32;
        const __m512 scale = widen(s), zero = widen(s + 16);
        for (int m = 0; m < R; ++m) {
          const __m512 sum =
              _mm512_add_ps(_mm512_add_ps(part[m][0], part[m][1]), _mm512_add_ps(part[m][2], part[m][3]));
          scaled[m] = _mm512_fmadd_ps(sum, scale, scaled[m]);
          zeros[m] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[m * groups + g]), zero, zeros[m]);
        }
      }
      for (int m = 0; m < R; ++m) store_bf16(y + m * N + nb * 16, _mm512_add_ps(scaled[m], zeros[m]));
    }
  });
}

void int4_tiles_impl(const c10::BFloat16* x, int64_t M, int64_t K, const uint8_t* codes, const c10::BFloat16* sz,
                     int64_t N, c10::BFloat16* y) {
  const int64_t blocks = N / 16, groups = K / 32;
  // each row's sum over each group, for the zeros
  std::vector<float> xsum(M * groups);
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  for (int64_t i = 0; i < M * groups; ++i) {
    const __m512i v = _mm512_loadu_si512((const void*)(x + (i / groups) * K + (i % groups) * 32));
    const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    xsum[i] = _mm512_reduce_add_ps(_mm512_add_ps(even, odd));
  }
  switch (M) {
    case 1: return int4_rows_impl<1>(x, K, codes, sz, N, y, xsum.data());
    case 2: return int4_rows_impl<2>(x, K, codes, sz, N, y, xsum.data());
  }
  const __m512i lut = code_values();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<uint16_t> b(groups * 512);  // the block's B tiles, one per group
    Scratch<float> c(groups * 256), s(groups * 32);  // C tiles of one row tile; scales and zeros in float32
    int configured = 0;
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint8_t* cb = codes + nb * groups * 256;
      for (int64_t i = 0; i < groups * 4; ++i) {
        const __m512i v = _mm512_loadu_si512((const void*)(cb + 64 * i));
        uint16_t* out = b.p + 128 * i;
        _mm512_store_si512((void*)out, _mm512_permutexvar_epi16(v, lut));
        _mm512_store_si512((void*)(out + 32), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut));
        _mm512_store_si512((void*)(out + 64), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), lut));
        _mm512_store_si512((void*)(out + 96), _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), lut));
      }
      for (int64_t i = 0; i < groups * 2; ++i) _mm512_store_ps(s.p + 16 * i, widen(sz + nb * groups * 32 + 16 * i));
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        const int rows = static_cast<int>(std::min<int64_t>(16, M - m0));
        if (rows != configured) configure(configured = rows);
        for (int64_t g = 0; g < groups; ++g) {
          _tile_zero(0);
          _tile_loadd(1, x + m0 * K + g * 32, K * 2);
          _tile_loadd(2, b.p + g * 512, 64);
          _tile_dpbf16ps(0, 1, 2);
          _tile_stored(0, c.p + g * 256, 64);
        }
        // scale and zero per group; four rows at a time, two sums each, so the multiply-adds do not wait on each other
        int r = 0;
        for (; r + 4 <= rows; r += 4) {
          __m512 a[4], z[4];
          for (int j = 0; j < 4; ++j) a[j] = z[j] = _mm512_setzero_ps();
          const float* xs = xsum.data() + (m0 + r) * groups;
          for (int64_t g = 0; g < groups; ++g) {
            const __m512 scale = _mm512_load_ps(s.p + 32 * g), zero = _mm512_load_ps(s.p + 32 * g + 16);
            for (int j = 0; j < 4; ++j) {
              a[j] = _mm512_fmadd_ps(_mm512_load_ps(c.p + g * 256 + 16 * (r + j)), scale, a[j]);
              z[j] = _mm512_fmadd_ps(_mm512_set1_ps(xs[j * groups + g]), zero, z[j]);
            }
          }
          for (int j = 0; j < 4; ++j) store_bf16(y + (m0 + r + j) * N + nb * 16, _mm512_add_ps(a[j], z[j]));
        }
        for (; r < rows; ++r) {
          __m512 a = _mm512_setzero_ps(), z = a;
          const float* xs = xsum.data() + (m0 + r) * groups;
          for (int64_t g = 0; g < groups; ++g) {
            a = _mm512_fmadd_ps(_mm512_load_ps(c.p + g * 256 + 16 * r), _mm512_load_ps(s.p + 32 * g), a);
            z = _mm512_fmadd_ps(_mm512_set1_ps(xs[g]), _mm512_load_ps(s.p + 32 * g + 16), z);
          }
          store_bf16(y + (m0 + r) * N + nb * 16, _mm512_add_ps(a, z));
        }
      }
    }
    if (configured) _tile_release();
  });
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define KESTREL_VECTOR_INT4 1
// The same layout on plain AVX2 (CPUs without AMX, such as AMD EPYC before Zen 4), activations in float32:
//   y = sum over groups of scale * sum_k x_k q_k + (zero - 8 scale) * sum_k x_k,   q_k the 4-bit code
// Each 32-bit lane of a 32-byte load holds 8 codes of one output (4 even inputs low, 4 odd inputs high), so a code
// is read with one AND (the lane's other codes masked off) and one conversion to float; the code then sits
// multiplied by 16^t (t its nibble), which is undone exactly by multiplying x by 16^-t beforehand (a power of two).
// The top nibble is shifted down instead (as a signed int32 its code would read negative). That is 2 ops per 8
// weights before the multiply-adds, which every row of the step shares: PyTorch's AVX2 path looks each weight up
// in a float table (two permutes and a blend) and scales it, per row.
inline __m256 widen8(const c10::BFloat16* p) {  // 8 bf16 -> 8 float32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// 8 float32 -> bf16, rounded to nearest even as PyTorch's conversion; a NaN stays a (quiet) NaN
inline void store8_bf16(c10::BFloat16* p, __m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}

// input k % 8 of a chunk's 8 -> the nibble t holding its code (0-3 even inputs, 4-7 odd ones)
constexpr int nibble_of(int e) { return e % 2 == 0 ? e / 2 : 4 + e / 2; }
// the nibble t of a chunk's lane -> its input k % 8
constexpr int input_of(int t) { return t < 4 ? 2 * t : 2 * (t - 4) + 1; }

// R rows of x (scaled per nibble, xs) times one block of 16 outputs. With one or two rows both halves of each
// 64-byte chunk go together (a pass per half read memory in one and computed in the other); more rows take a pass
// per half, which keeps their sums in the 16 registers. Two partial sums a row and half (even and odd nibbles), so
// that the multiply-adds wait less on each other; the same two for every R, so that a row's result does not depend
// on the rows beside it (lookahead decoding's exactness rests on that). More partial sums for one row were slower.
template <int R>
void int4_vector_block(const float* xs, const float* xsum, int64_t K, const uint8_t* cb, const c10::BFloat16* sb,
                       c10::BFloat16* y, int64_t N) {
  constexpr int H = R <= 2 ? 2 : 1;  // halves per pass
  constexpr int A = 2;  // partial sums a row and half
  const int64_t groups = K / 32;
  for (int h0 = 0; h0 < 2; h0 += H) {
    __m256 out[R][H];
    for (int m = 0; m < R; ++m)
      for (int h = 0; h < H; ++h) out[m][h] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256 part[R][H][A];
      for (int m = 0; m < R; ++m)
        for (int h = 0; h < H; ++h)
          for (int a = 0; a < A; ++a) part[m][h][a] = _mm256_setzero_ps();
      for (int c = 0; c < 4; ++c) {
        const uint8_t* chunk = cb + (g * 4 + c) * 64;
        // 64 chunks on: the prefetcher alone fell behind, and 16 on did less (a batch-1 decode step of SmolLM2 on a
        // 2-core Xeon restricted to AVX2: 6.1-6.5 ms at 4 KB ahead, 6.5-7.0 at 1 KB, alternated runs)
        _mm_prefetch((const char*)chunk + 4096, _MM_HINT_T0);
        __m256i v[H];
        for (int h = 0; h < H; ++h) v[h] = _mm256_loadu_si256((const __m256i*)(chunk + 32 * (h0 + h)));
        const float* xk = xs + g * 32 + 8 * c;
        for (int t = 0; t < 8; ++t) {
          for (int h = 0; h < H; ++h) {
            const __m256 w = _mm256_cvtepi32_ps(t == 7 ? _mm256_srli_epi32(v[h], 28)
                                                       : _mm256_and_si256(v[h], _mm256_set1_epi32(0xf << (4 * t))));
            for (int m = 0; m < R; ++m)
              part[m][h][t % A] =
                  _mm256_fmadd_ps(w, _mm256_broadcast_ss(xk + m * K + input_of(t)), part[m][h][t % A]);
          }
        }
      }
      for (int h = 0; h < H; ++h) {
        const c10::BFloat16* s = sb + g * 32 + 8 * (h0 + h);
        const __m256 scale = widen8(s), offset = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, widen8(s + 16));
        for (int m = 0; m < R; ++m) {  // + scale * sum + (zero - 8 scale) * sum of x
          for (int a = A / 2; a > 0; a /= 2)
            for (int i = 0; i < a; ++i) part[m][h][i] = _mm256_add_ps(part[m][h][i], part[m][h][i + a]);
          out[m][h] = _mm256_fmadd_ps(part[m][h][0], scale, out[m][h]);
          out[m][h] = _mm256_fmadd_ps(_mm256_set1_ps(xsum[m * groups + g]), offset, out[m][h]);
        }
      }
    }
    for (int m = 0; m < R; ++m)
      for (int h = 0; h < H; ++h) store8_bf16(y + m * N + 8 * (h0 + h), out[m][h]);
  }
}

void int4_vector_impl(const c10::BFloat16* x, int64_t M, int64_t K, const uint8_t* codes, const c10::BFloat16* sz,
                      int64_t N, c10::BFloat16* y) {
  const int64_t blocks = N / 16, groups = K / 32;
  // x in float32, each input multiplied by 16^-t for the nibble t its code sits in (exact); each group's plain sum
  std::vector<float> xs(M * K), xsum(M * groups);
  float factor[8];
  for (int e = 0; e < 8; ++e) factor[e] = nibble_of(e) == 7 ? 1.f : std::ldexp(1.f, -4 * nibble_of(e));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float sum = 0.f;
      for (int64_t k = g * 32; k < g * 32 + 32; ++k) {
        const float v = static_cast<float>(x[m * K + k]);
        sum += v;
        xs[m * K + k] = v * factor[k % 8];
      }
      xsum[m * groups + g] = sum;
    }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      const uint8_t* cb = codes + nb * groups * 256;
      const c10::BFloat16* sb = sz + nb * groups * 32;
      int64_t m = 0;  // four rows at a time share each expanded weight; the last one to three together
      for (; m + 4 <= M; m += 4)
        int4_vector_block<4>(&xs[m * K], &xsum[m * groups], K, cb, sb, y + m * N + nb * 16, N);
      const float* xr = xs.data() + m * K;
      const float* sr = xsum.data() + m * groups;
      c10::BFloat16* yr = y + m * N + nb * 16;
      switch (M - m) {
        case 1: int4_vector_block<1>(xr, sr, K, cb, sb, yr, N); break;
        case 2: int4_vector_block<2>(xr, sr, K, cb, sb, yr, N); break;
        case 3: int4_vector_block<3>(xr, sr, K, cb, sb, yr, N); break;
      }
    }
  });
}
#endif

}  // namespace

bool int4_vector_available() {
#ifdef KESTREL_VECTOR_INT4
  return true;
#else
  return false;
#endif
}

bool int4_tiles_available() {
#ifdef KESTREL_TILES
  return tiles_permitted();
#else
  return false;
#endif
}

void int4_check_weights(Int4Kernel kernel, const at::Tensor& codes, const at::Tensor& scales_zeros, int64_t* N,
                        int64_t* K) {
  const bool tiles = kernel == Int4Kernel::tiles;
  const char* name = tiles ? "int4_tiles_mm" : "int4_vector_mm";
  TORCH_CHECK(tiles ? int4_tiles_available() : int4_vector_available(), name,
              tiles ? " needs a CPU with AMX-BF16 (and a build for it)" : " needs a CPU with AVX2 and FMA (and a build for it)");
  TORCH_CHECK(codes.device().is_cpu() && scales_zeros.device().is_cpu(), name, " takes CPU tensors");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 4 && codes.size(2) == 4 && codes.size(3) == 64 &&
                  codes.is_contiguous(),
              "codes must be contiguous uint8 [out / 16, in / 32, 4, 64], got ", codes.sizes());
  TORCH_CHECK(scales_zeros.scalar_type() == at::kBFloat16 && scales_zeros.is_contiguous() &&
                  scales_zeros.sizes() == at::IntArrayRef({codes.size(0), codes.size(1), 2, 16}),
              "scales_zeros must be contiguous bf16 [out / 16, in / 32, 2, 16]");
  *N = codes.size(0) * 16;
  *K = codes.size(1) * 32;
}

void int4_mm_raw(Int4Kernel kernel, const c10::BFloat16* x, int64_t M, int64_t K, const uint8_t* codes,
                 const c10::BFloat16* scales_zeros, int64_t N, c10::BFloat16* y) {
  if (M == 0 || N == 0) return;
  RECORD_FUNCTION(kernel == Int4Kernel::tiles ? "kestrel::int4_tiles_mm" : "kestrel::int4_vector_mm",
                  std::vector<c10::IValue>());
  KernelTimer timer(KernelWork::matmul);
#ifdef KESTREL_TILES
  if (kernel == Int4Kernel::tiles) int4_tiles_impl(x, M, K, codes, scales_zeros, N, y);
#endif
#ifdef KESTREL_VECTOR_INT4
  if (kernel == Int4Kernel::vector) int4_vector_impl(x, M, K, codes, scales_zeros, N, y);
#endif
}

at::Tensor int4_mm(Int4Kernel kernel, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_zeros,
                   at::Tensor* out) {
  int64_t N, K;
  int4_check_weights(kernel, codes, scales_zeros, &N, &K);
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "x must be bf16 [rows, in], got ", x.scalar_type(),
              " ", x.sizes());
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " inputs, the weights ", K);
  const int64_t M = x.size(0);
  at::Tensor xc = x.contiguous();
  at::Tensor y = out ? *out : at::empty({M, N}, x.options());
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && y.is_contiguous() && y.sizes() == at::IntArrayRef({M, N}),
              "out must be contiguous bf16 [", M, ", ", N, "]");
  int4_mm_raw(kernel, xc.data_ptr<c10::BFloat16>(), M, K, codes.data_ptr<uint8_t>(),
              scales_zeros.data_ptr<c10::BFloat16>(), N, y.data_ptr<c10::BFloat16>());
  return y;
}

at::Tensor int4_tiles_mm(at::Tensor x, at::Tensor codes, at::Tensor scales_zeros) {
  return int4_mm(Int4Kernel::tiles, x, codes, scales_zeros);
}

at::Tensor int4_vector_mm(at::Tensor x, at::Tensor codes, at::Tensor scales_zeros) {
  return int4_mm(Int4Kernel::vector, x, codes, scales_zeros);
}

}  // namespace kestrel

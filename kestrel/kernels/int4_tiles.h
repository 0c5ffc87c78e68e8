// int4 weight-only matmul on AMX tiles or AVX2 (int4_tiles.cpp): the layout and the entry points cpu_kernels.cpp uses.
#pragma once
#include <torch/extension.h>

#include <atomic>
#include <chrono>

namespace kestrel {

// Time spent in the kernels that do a step's arithmetic (matmuls, attention), summed while switched on
// (kernel_clock in cpu_kernels.cpp): a benchmark's measure of what a step spends outside them, read in the same
// window as the step's wall time and without a profiler's cost per op. Off, it costs one relaxed load per call.
enum class KernelWork { matmul = 0, attention = 1 };
inline std::atomic<bool> kernel_clock_on{false};
inline std::atomic<int64_t> kernel_clock_ns[2]{};

class KernelTimer {
 public:
  explicit KernelTimer(KernelWork work)
      : work_(static_cast<int>(work)), on_(kernel_clock_on.load(std::memory_order_relaxed)) {
    if (on_) start_ = std::chrono::steady_clock::now();
  }
  ~KernelTimer() {
    if (on_)
      kernel_clock_ns[work_].fetch_add((std::chrono::steady_clock::now() - start_).count(), std::memory_order_relaxed);
  }
  KernelTimer(const KernelTimer&) = delete;
  KernelTimer& operator=(const KernelTimer&) = delete;

 private:
  int work_;
  bool on_;
  std::chrono::steady_clock::time_point start_;
};

// Whether this build has the AMX-BF16 kernel and the OS lets this process use the tiles.
bool int4_tiles_available();

// y[M, N] (bf16) = x[M, K] (bf16) W^T with W int4 in the tile layout (kestrel/model/quant.py: Int4Linear.to_tiles):
// codes uint8 [N/16, K/32, 4, 64]: for each block of 16 output rows by one group of 32 inputs, 4 chunks of 32
// 16-bit lanes; nibble j of lane l of chunk c is the code of tile row p = 4c + j, lane l, which holds
// W[16 * block + l / 2, 32 * group + 2 p + l % 2] (the B tile's pairs layout).
// scales_zeros bf16 [N/16, K/32, 2, 16]: each block's 16 scales, then 16 zeros; w = (code - 8) * scale + zero.
at::Tensor int4_tiles_mm(at::Tensor x, at::Tensor codes, at::Tensor scales_zeros);

// Whether this build has the AVX2 kernel for the same layout (any x86-64 CPU with AVX2 and FMA).
bool int4_vector_available();

// int4_tiles_mm's product on AVX2 and FMA alone, for CPUs without AMX (activations widened to float32).
at::Tensor int4_vector_mm(at::Tensor x, at::Tensor codes, at::Tensor scales_zeros);

enum class Int4Kernel { tiles, vector };

// The product on either kernel, written into `out` (bf16 [M, N], contiguous) when it is given: the decoder layers
// reuse one output buffer per linear across their layers.
at::Tensor int4_mm(Int4Kernel kernel, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales_zeros,
                   at::Tensor* out = nullptr);

// Checks int4_mm's weights once: throws unless the kernel runs here and codes / scales_zeros are in its layout for
// an N x K weight (N and K returned).
void int4_check_weights(Int4Kernel kernel, const at::Tensor& codes, const at::Tensor& scales_zeros, int64_t* N,
                        int64_t* K);

// int4_mm on raw pointers, for a caller that checked the weights once (int4_check_weights) and owns x (bf16 [M, K],
// contiguous) and y (bf16 [M, N]): a decode step's linears skip the checks that read each weight tensor's metadata
// (cold in the caches after the weights stream through them, ~0.3 us a linear).
void int4_mm_raw(Int4Kernel kernel, const c10::BFloat16* x, int64_t M, int64_t K, const uint8_t* codes,
                 const c10::BFloat16* scales_zeros, int64_t N, c10::BFloat16* y);

}  // namespace kestrel

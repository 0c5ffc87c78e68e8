"""Weight-only quantization on PyTorch's own CPU kernels: int8 per output channel, int4 per group of 32.

Weights are stored quantized; activations stay in floating point. The kernels are PyTorch's
(`aten::_weight_int8pack_mm`, `aten::_weight_int4pack_mm_for_cpu`, the ones torchao's CPU paths call):
maintained, vectorized for AVX2 and AVX-512, and fast with bf16 activations (with float32 activations
they take a slow path, 5-10x slower), so a quantized linear computes in bf16 whatever the model's dtype
and hands back its dtype. Measured on 2 cores (AMD Zen 4), batch 1, SmolLM2-135M's layers: int4 2.0x and
int8 1.8x faster than dense bf16; at 256 rows (prefill) they are 1.4-2.5x slower than the best dense path
(benchmarks/bench_quant.py).

On CPUs with AMX-BF16 the int4 linears move to Kestrel's own tile kernel (kestrel/kernels/int4_tiles.cpp,
Int4Linear.to_tiles), which expands each weight once per call for all rows instead of once per row; on CPUs where
PyTorch's kernel runs its AVX2 path, to Kestrel's AVX2 kernel on the same layout (int4_kernel()).

int4 is asymmetric, as GGUF's Q4_1 and PyTorch's kernel: w = (q - 8) * scale + zero with q in 0..15,
so GGUF Q4_0 (zero = 0) and Q4_1 (zero = min + 8 * scale) blocks load straight in. int8 is symmetric
per output channel (w = q * scale), the only layout PyTorch's int8 kernel takes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

INT4_GROUP = 32
COMPUTE = torch.bfloat16  # activation dtype of the quantized kernels


class Int4Kernel(NamedTuple):
    entry: str  # the function in the C++ kernels module
    spec_kind: int  # the linear's kind for decoder_layers() (cpu_kernels.cpp, LinearSpec)
    description: str  # as the engine's describe() says it


# Kestrel's own int4 kernels, both on the tile layout (Int4Linear.to_tiles), by name (int4_kernel())
INT4_KERNELS = {"amx": Int4Kernel("int4_tiles_mm", 3, "int4 on AMX tiles"),
                "avx2": Int4Kernel("int4_vector_mm", 4, "int4 on Kestrel's AVX2 kernel")}


class QuantLinear:
    """y = x @ W.T + b with W quantized; `dequantize()` is the float weight it computes with."""

    kind = "quantized"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is COMPUTE:  # the common case (bf16 models): no conversions, a call fewer per layer
            y = self._mm(x)
            return y if self.bias is None else y + self.bias
        y = self._mm(x.to(COMPUTE))
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the kernel computes with, in `dtype`."""
        raise NotImplementedError

    def streamed(self) -> tuple[str, ...]:
        """The attributes holding what every call reads (tensors, or tuples of them)."""
        raise NotImplementedError


class Int8Linear(QuantLinear):
    kind = "int8"

    def streamed(self) -> tuple[str, ...]:
        return "q", "scale"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None):
        self.q = q.contiguous()  # [N, K] int8
        self.scale = scale.to(COMPUTE).contiguous()  # [N]
        self.bias = None if bias is None else bias.to(COMPUTE)

    @staticmethod
    def from_float(w: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "Int8Linear":
        w = w.float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10).to(COMPUTE).float()  # as the kernel will see it
        q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        return Int8Linear(q, scale, bias)

    def _mm(self, x):
        if self.q.shape[1] % 32:  # PyTorch's kernel reads past the end of such rows (a segfault): the plain matmul
            return ((x.float() @ self.q.float().t()) * self.scale.float()).to(COMPUTE)
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)


class Int4Linear(QuantLinear):
    kind = "int4"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 group: int = INT4_GROUP):
        """q: [N, K] integers in 0..15; scale, zero: [N, K / group]; w = (q - 8) * scale + zero."""
        n, k = q.shape
        if n % 16 or k % group:
            raise ValueError(f"int4 needs rows divisible by 16 and columns by {group}, got {n} x {k}")
        self.group = group
        self.shape = (n, k)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        # the codes as given, two per byte, until freeze is done with them (release_source): reading them back
        # out of PyTorch's packing is a matmul per linear, ~60 ms each without native bf16 (7 of 10 s of a load)
        q8 = q.to(torch.uint8)
        self._source: Optional[torch.Tensor] = (q8[:, 0::2] | q8[:, 1::2] << 4).contiguous()
        # the kernel's layout: [K / group, N, 2] of (scale, zero)
        self.scales_zeros = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(COMPUTE)
        self.bias = None if bias is None else bias.to(COMPUTE)
        self.tiles: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (codes, scales_zeros) in the tile layout
        self.tiles_kernel = ""  # the kernel that computes on them: amx | avx2
        self._tiles_mm = None

    def streamed(self) -> tuple[str, ...]:
        return ("tiles",) if self.tiles is not None else ("packed", "scales_zeros")

    def to_tiles(self, kernels, kernel: str = "amx") -> None:
        """Move the weights to the layout of the AMX tile kernel (kestrel/kernels/int4_tiles.h) and compute on
        `kernel`: 'amx' (`kernels.int4_tiles_available()` must hold; 2-3x faster than PyTorch's kernel from a few
        rows on) or 'avx2' (`kernels.int4_vector_available()`). PyTorch's packing is dropped (one copy of the
        weights)."""
        if self.group != 32:
            raise ValueError(f"the int4 tile kernel takes groups of 32, not {self.group}")
        if kernel not in INT4_KERNELS:
            raise ValueError(f"unknown int4 kernel {kernel!r} ({', '.join(INT4_KERNELS)})")
        self.tiles_kernel, self._tiles_mm = kernel, getattr(kernels, INT4_KERNELS[kernel].entry)
        if self.tiles is not None:
            return
        n, k = self.shape
        nb, kg = n // 16, k // 32
        # tile row p of a block holds, lane l, W[16 * block + l // 2, 32 * group + 2 p + l % 2]; rows 4c..4c+3 share
        # chunk c, one 4-bit code each in every 16-bit lane
        rows = self.codes().view(nb, 16, kg, 16, 2).permute(0, 2, 3, 1, 4).reshape(nb, kg, 4, 4, 32)
        lanes = rows[:, :, :, 0] | rows[:, :, :, 1] << 4 | rows[:, :, :, 2] << 8 | rows[:, :, :, 3] << 12
        codes = lanes.to(torch.uint16).contiguous().view(torch.uint8).view(nb, kg, 4, 64)
        sz = self.scales_zeros.view(kg, nb, 16, 2).permute(1, 0, 3, 2).contiguous()
        self.tiles, self.packed = (codes, sz), None
        self.release_source()

    def release_source(self) -> None:
        """Drop the codes kept from construction; codes() then reads them back from the kernel's layout."""
        self._source = None

    @staticmethod
    def fits(w: torch.Tensor, group: int = INT4_GROUP) -> bool:
        return w.shape[0] % 16 == 0 and w.shape[1] % group == 0

    @staticmethod
    def from_float(w: torch.Tensor, bias: Optional[torch.Tensor] = None, group: int = INT4_GROUP) -> "Int4Linear":
        """Round-to-nearest per group, over each group's own range (as GGUF's Q4_1)."""
        n, k = w.shape
        g = w.float().view(n, k // group, group)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-10).to(COMPUTE).float()
        zero = (lo + 8 * scale).to(COMPUTE).float()
        q = torch.round((g - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp(0, 15)
        return Int4Linear(q.view(n, k), scale, zero, bias, group)

    def _mm(self, x):
        if self.tiles is not None:
            return self._tiles_mm(x, *self.tiles)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes q, int32 [N, K], from whichever layout holds them."""
        n, k = self.shape
        if self._source is not None:
            return torch.stack((self._source & 15, self._source >> 4), dim=-1).view(n, k).int()
        if self.tiles is not None:
            lanes = self.tiles[0].view(torch.int16).view(n // 16, k // 32, 4, 1, 32).int() & 0xFFFF
            rows = (lanes >> torch.tensor([0, 4, 8, 12]).view(4, 1)) & 15  # [nb, kg, 4 chunks, 4, 32 lanes]
            return rows.view(n // 16, k // 32, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(n, k)
        # PyTorch's kernel with unit scales and zero 0 on the identity reads q - 8 back (small integers, exact in
        # bf16, its fast path: ~50x its float32 path)
        unit = torch.zeros_like(self.scales_zeros)
        unit[..., 0] = 1
        eye = torch.eye(k, dtype=COMPUTE)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, unit).t().int() + 8

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # (q - 8) * scale + zero in float32, as the kernels do (bit-identical to PyTorch's float32 path:
        # tests/test_quant.py), then rounded to `dtype`
        scale_zero = self.scales_zeros.float().transpose(0, 1).repeat_interleave(self.group, dim=1)  # [N, K, 2]
        return ((self.codes() - 8).float() * scale_zero[..., 0] + scale_zero[..., 1]).to(dtype).contiguous()

    def kernel_dequantize(self) -> torch.Tensor:
        """float32 weights from PyTorch's kernel's own float32 path (slow): what `dequantize` must equal."""
        if self.packed is None:
            raise ValueError("kernel_dequantize reads PyTorch's packing, which to_tiles() replaced")
        eye = torch.eye(self.shape[1], dtype=torch.float32)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group,
                                                          self.scales_zeros.float()).t().contiguous()


def int4_kernel(kernels) -> str:
    """Which of Kestrel's int4 kernels (both on the tile layout) runs int4 linears here: 'amx' where the CPU has
    AMX-BF16, 'avx2' where PyTorch's own kernel runs its AVX2 path (no AVX-512), '' for PyTorch's. Measured on a
    2-core Xeon, SmolLM2-135M's 120 layer linears (benchmarks/bench_int4_kernels.py): restricted to AVX2, the AVX2
    kernel is 2.0x / 1.7x / 1.4x faster than PyTorch's at 1 / 2 / 4-24 rows; against PyTorch's AVX-512 path it is
    1.2x faster at one row but 0.8x from four, so AVX-512 CPUs without AMX keep PyTorch's."""
    if kernels is None:
        return ""
    if kernels.int4_tiles_available():
        return "amx"
    if kernels.int4_vector_available() and torch.backends.cpu.get_cpu_capability() == "AVX2":
        return "avx2"
    return ""


def quantize(w: torch.Tensor, bias: Optional[torch.Tensor], kind: str):
    """A quantized linear of `kind` (int8 | int4) for a float weight; int4 falls back to int8 for shapes its
    kernel does not take (rows not divisible by 16)."""
    if kind == "int4" and Int4Linear.fits(w):
        return Int4Linear.from_float(w, bias)
    return Int8Linear.from_float(w, bias)

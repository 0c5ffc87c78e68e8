"""The int8 output head alone: Kestrel's kernel (kestrel_cpu_kernels.int8_rows_mm) and PyTorch's
(aten::_weight_int8pack_mm, through Int8Linear) on SmolLM2-135M's 49152 x 576 head with random weights, at a few
row counts, as a quantized engine's steps run it. Reports ms per call, and the rate Kestrel's kernel reads the 28 MB
of weights at (at one row the head is bound by how fast they stream).

    .venv/bin/python benchmarks/bench_int8_head.py [--rows 1,2,4,8,24]

Best of 5 passes of 50 calls per row count. To see the AVX2 build on an AVX-512 CPU, run with
KESTREL_KERNELS_MARCH=haswell KESTREL_KERNELS_CACHE=/tmp/kcache-haswell.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import cpu_name  # noqa: E402
from kestrel import kernels  # noqa: E402
from kestrel.model.quant import Int8Linear  # noqa: E402

VOCAB, HIDDEN = 49152, 576


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,24")
    args = ap.parse_args()
    ops = kernels.load()
    if ops is None:
        sys.exit(f"the C++ kernels did not build: {kernels.error()}")
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (VOCAB, HIDDEN), dtype=torch.int8)
    scale = (torch.rand(VOCAB) * 0.01).bfloat16()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads: the int8 head, {q.numel() / 1e6:.1f} MB")
    print(" rows  Kestrel ms     GB/s  PyTorch ms")
    head = Int8Linear(q, scale)
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, HIDDEN).bfloat16()
        ours = best_ms(lambda: ops.int8_rows_mm(x, q, scale, True))
        theirs = best_ms(lambda: head(x).float())
        print(f"{rows:5d} {ours:11.3f} {q.numel() / ours / 1e6:8.1f} {theirs:11.3f}")


def best_ms(call, reps: int = 50) -> float:
    for _ in range(3):
        call()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            call()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


if __name__ == "__main__":
    main()

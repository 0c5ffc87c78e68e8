"""The decode attention kernel alone (kestrel_cpu_kernels.paged_attention): one query token over contexts of a few
lengths, in each of 30 layers' K/V pools (SmolLM2-135M's shapes: 9 query heads, 3 KV heads of 64, bf16), as a
batch-1 decode step runs it. Reports ms for the 30 layers and the rate the K/V is read at. At 8000 positions the
K/V (184 MB) no longer fits the shared cache of a small machine, so that row shows what memory gives.

    .venv/bin/python benchmarks/bench_attention.py [--lengths 512,2048,8000] [--kv-heads 3]

Best of 5 passes. To see the AVX2 build on an AVX-512 CPU, run with KESTREL_KERNELS_MARCH=haswell
KESTREL_KERNELS_CACHE=/tmp/kcache-haswell.
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

LAYERS, GROUP, HEAD_DIM, SLOTS = 30, 3, 64, 46604


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="512,2048,8000")
    ap.add_argument("--kv-heads", type=int, default=3)
    args = ap.parse_args()
    ops = kernels.load()
    if ops is None:
        sys.exit(f"the C++ kernels did not build: {kernels.error()}")
    lengths = [int(n) for n in args.lengths.split(",")]
    if max(lengths) >= SLOTS:
        sys.exit(f"lengths must stay under {SLOTS} slots")
    nkv = args.kv_heads
    torch.manual_seed(0)
    caches = [(torch.randn(SLOTS, nkv, HEAD_DIM).bfloat16(), torch.randn(SLOTS, nkv, HEAD_DIM).bfloat16())
              for _ in range(LAYERS)]
    q = torch.randn(1, nkv * GROUP, HEAD_DIM).bfloat16()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads: attention of one token, {LAYERS} layers, "
          f"{nkv * GROUP} query heads over {nkv} KV heads of {HEAD_DIM}")
    print(" positions        ms     GB/s")
    for n in lengths:
        table = torch.zeros(1, max(lengths), dtype=torch.int64)
        table[0, :n] = torch.arange(1, n + 1)
        rows, lens = torch.zeros(1, dtype=torch.int64), torch.tensor([n])

        def run():
            for k, v in caches:
                ops.paged_attention(q, k, v, table, rows, lens, HEAD_DIM ** -0.5)
        run()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t)
        kv_bytes = 2 * n * nkv * HEAD_DIM * 2 * LAYERS
        print(f"{n:10d} {best * 1e3:9.2f} {kv_bytes / best / 1e9:8.1f}")


if __name__ == "__main__":
    main()

"""The int4 matmul kernels alone: the time of SmolLM2-135M's 120 layer linears (30 layers of qkv, o, gate_up, down;
random weights), one after another as a decode step runs them, at several row counts: PyTorch's int4 kernel, Kestrel's
AMX tile kernel (where this CPU has AMX-BF16), Kestrel's AVX2 kernel on the same layout (any CPU with AVX2), and dense
bf16 copies packed for oneDNN (where bf16 is native). To see the AVX2 kernel against PyTorch's AVX2 path on an AVX-512
CPU, run with ATEN_CPU_CAPABILITY=avx2 KESTREL_KERNELS_MARCH=haswell KESTREL_KERNELS_CACHE=/tmp/kcache-haswell.

    .venv/bin/python benchmarks/bench_int4_kernels.py [--rows 1,2,4,8,16,32,64]

Best of 9 passes per cell, bf16 activations; the 53 MB of int4 weights are too many for the cores' own caches, so
each pass reads them from the shared cache or memory, as the engine does. Ratios are within one run.
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
from kestrel.engine.hardware import cpu_bf16_units  # noqa: E402
from kestrel.model.linear import Linear, can_prepack  # noqa: E402
from kestrel.model.quant import Int4Linear  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # SmolLM2-135M: qkv, o, gate_up, down (out, in)
LAYERS = 30


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    args = ap.parse_args()
    ops = kernels.load()
    torch.manual_seed(0)
    kinds: dict[str, list] = {"PyTorch int4": []}
    tiled_kinds = {}  # column -> Kestrel's kernel
    if ops is not None and ops.int4_tiles_available():
        tiled_kinds["AMX tiles"] = "amx"
    if ops is not None and ops.int4_vector_available():
        tiled_kinds["AVX2 kernel"] = "avx2"
    kinds.update({name: [] for name in tiled_kinds})
    if cpu_bf16_units() and can_prepack(torch.empty(0, dtype=torch.bfloat16)):
        kinds["dense bf16"] = []
    for _ in range(LAYERS):
        for n, k in SHAPES:
            w = torch.randn(n, k) * 0.02
            kinds["PyTorch int4"].append(Int4Linear.from_float(w))
            for name, kernel in tiled_kinds.items():
                tiled = Int4Linear.from_float(w)
                tiled.to_tiles(ops, kernel)
                kinds[name].append(tiled)
            if "dense bf16" in kinds:
                kinds["dense bf16"].append(Linear(kinds["PyTorch int4"][-1].dequantize(torch.bfloat16), None, True))
    print(f"{cpu_name()}, {torch.get_num_threads()} threads: ms for the {len(SHAPES) * LAYERS} linears")
    print(f"{'rows':>5} " + " ".join(f"{name:>13}" for name in kinds))
    for rows in (int(r) for r in args.rows.split(",")):
        x = {k: torch.randn(rows, k, dtype=torch.bfloat16) for k in {k for _, k in SHAPES}}
        cells = []
        for linears in kinds.values():
            best = float("inf")
            for _ in range(9):
                start = time.perf_counter()
                for lin, (_, k) in zip(linears, SHAPES * LAYERS):
                    lin(x[k])
                best = min(best, time.perf_counter() - start)
            cells.append(best * 1e3)
        print(f"{rows:>5} " + " ".join(f"{c:>13.2f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()

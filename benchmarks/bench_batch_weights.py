"""Quantized weights at every batch size vs dense bf16 copies for steps of many tokens (batch_weights), in one run.

    .venv/bin/python benchmarks/bench_batch_weights.py [--rounds 2]

Two engines on the embedded model (int4), alternating: batch-1 decode and a 512-token prefill (benchmarks.common
.batch1_speed), then serving throughput on 96 Poisson-arriving requests (~96 -> 32 tokens, 8/s: saturated).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_lora import run_engine, workload  # noqa: E402
from benchmarks.common import RESULTS, batch1_speed, cpu_name, save_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from kestrel import Engine
    from kestrel.model.loader import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir(None))
    prompt = tok(" ".join(["the river and the mountain"] * 200)).input_ids
    reqs = workload(tok, 96, 1, 8.0, 96)
    engines = {"dense batches (auto)": Engine(batch_weights="auto"), "quantized": Engine(batch_weights="quantized")}
    results = {"cpu": cpu_name(), "describe": {k: e.describe() for k, e in engines.items()}, "runs": {}}
    for _ in range(args.rounds):
        for name, e in engines.items():
            decode, prefill = batch1_speed(e, prompt, 128, 512)
            serving = run_engine(e, reqs, [None], 32)["throughput"]
            results["runs"].setdefault(name, []).append(dict(decode=decode, prefill=prefill, serving=serving))
            print(f"{name:22s} decode {decode:6.1f} tok/s  prefill {prefill:6.0f} tok/s  serving {serving:6.1f} tok/s",
                  flush=True)
    save_results(results, os.path.join(RESULTS, "batch_weights.json"))


if __name__ == "__main__":
    main()

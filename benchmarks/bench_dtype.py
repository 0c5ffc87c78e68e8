"""dtype="auto" against float32 and bfloat16 on this CPU, and on this CPU with oneDNN capped to AVX2 (what a
CPU without native bf16 runs). Embedded model, 16 prompts of ~200 tokens -> 64 tokens, greedy, ignore_eos.

    .venv/bin/python benchmarks/bench_dtype.py            # prints a table, writes benchmarks/results/dtype.json

Each row runs in its own process (the ISA cap must be set before oneDNN starts); ratios are within one run.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RESULTS, cpu_name, run_for_result, save_results  # noqa: E402
ONE = """
import json, sys, time
sys.path.insert(0, {root!r})
from benchmarks.workloads import random_batch
from kestrel import Engine, SamplingParams
e = Engine(dtype={dtype!r})
prompts = random_batch(e.tokenizer, {num}, {prompt_len}, seed=0)
e.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))
e.cache.evict(e.cache.evictable_size)
t = time.perf_counter()
outs = e.generate(prompts, SamplingParams(max_tokens={max_tokens}, temperature=0.0, ignore_eos=True))
wall = time.perf_counter() - t
n = sum(o.output_tokens for o in outs)
print("RESULT" + json.dumps(dict(resolved=str(e.dtype).replace("torch.", ""), reason=e.placement.dtype_reason,
                                 output_tok_s=n / wall, wall_s=wall)))
"""


def run(dtype: str, isa: str | None, args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("ONEDNN_MAX_CPU_ISA", None)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    code = ONE.format(root=ROOT, dtype=dtype, num=args.num, prompt_len=args.prompt_len, max_tokens=args.max_tokens)
    result = run_for_result(sys.executable, code, env)
    if result is None:
        raise SystemExit(f"the dtype={dtype} run failed")
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--output", default=os.path.join(RESULTS, "dtype.json"))
    args = ap.parse_args()
    cpu = cpu_name()
    results = {"cpu": cpu, "workload": f"{args.num} x {args.prompt_len} -> {args.max_tokens}", "rows": []}
    print(f"CPU: {cpu}; workload {results['workload']} tokens, embedded model")
    for isa, label in ((None, "this CPU"), ("AVX2", "oneDNN capped to AVX2")):
        rows = {d: run(d, isa, args) for d in ("float32", "bfloat16", "auto")}
        best = max(r["output_tok_s"] for r in rows.values())
        for d, r in rows.items():
            results["rows"].append(dict(isa=label, dtype=d, **r))
            print(f"  {label:22s} dtype={d:9s} -> {r['resolved']:9s} {r['output_tok_s']:7.1f} tok/s "
                  f"({r['output_tok_s'] / best:.2f} of the best)" + (f"  [{r['reason']}]" if d == "auto" else ""))
    save_results(results, args.output)


if __name__ == "__main__":
    main()

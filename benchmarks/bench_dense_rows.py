"""Where a quantized model's dense copies start to pay: decode step time at N rows on the quantized weights
against the dense copies at every row count, in the dtype the engine picks on this CPU (llama.py's
QUANTIZED_MAX_ROWS and QUANTIZED_MAX_ROWS_F32 come from here).

    .venv/bin/python benchmarks/bench_dense_rows.py [--rows 1,2,4,8,16,24,32,64] [--dtype auto]

Each request has a 300-token prompt; after the prefill, the median of 15 decode steps of N rows (every row's
logits included). Writes benchmarks/results/dense_rows.json. Ratios are within one run.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RESULTS, cpu_name, run_for_result, save_results  # noqa: E402

ONE = """
import json, statistics, sys, time
sys.path.insert(0, {root!r})
from kestrel import Engine, SamplingParams
e = Engine(dtype={dtype!r}, quantization="int4", batch_weights={weights!r})
if {weights!r} == "dense":  # the dense copies at every row count, to see where they start to pay
    e.model.dense_step = lambda num_tokens: True
times = {{}}
for n in {rows!r}:
    e.cache.evict(e.cache.evictable_size)
    for r in range(n):
        e.add_request([100 + (r * 7919 + i * 37) % 40000 for i in range(300)],
                      SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    while any(len(s.output_ids) == 0 for s in e.scheduler.running) or e.scheduler.waiting:
        e.step()
    steps = []
    for _ in range(15):
        t = time.perf_counter(); e.step(); steps.append(time.perf_counter() - t)
    times[n] = statistics.median(steps) * 1e3
    while e.has_unfinished():
        e.step()
print("RESULT" + json.dumps(dict(describe=e.describe(), step_ms=times)))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,24,32,64")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--output", default=os.path.join(RESULTS, "dense_rows.json"))
    args = ap.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    results = {}
    for weights in ("quantized", "dense"):
        code = ONE.format(root=ROOT, dtype=args.dtype, weights=weights, rows=rows)
        results[weights] = run_for_result(sys.executable, code, dict(os.environ, HF_HUB_OFFLINE="1"))
        print(f"== {weights}: {results[weights]['describe']}", flush=True)
    q, d = results["quantized"]["step_ms"], results["dense"]["step_ms"]
    print(f"{'rows':>5} {'quantized ms':>13} {'dense ms':>9} {'dense speed-up':>15}")
    for n in rows:
        print(f"{n:>5} {q[str(n)]:>13.2f} {d[str(n)]:>9.2f} {q[str(n)] / d[str(n)]:>15.2f}")
    save_results(dict(cpu=cpu_name(), rows=rows, results=results), args.output)


if __name__ == "__main__":
    main()

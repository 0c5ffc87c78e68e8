"""The frontend language on the embedded model; each figure is a ratio measured within this one run.

    .venv/bin/python benchmarks/bench_lang.py                 # both sections
    .venv/bin/python benchmarks/bench_lang.py --only fork     # fork | jump

Sections:
  fork  64 runs of a fork-heavy program (a ~230-token few-shot prefix, 3 forks, a select), through
        run_batch on the in-process engine: radix cache on vs off, end to end
  jump  JSON extraction with a schema, 32 requests: jump-forward on vs off; forward steps and wall clock
Writes benchmarks/results/lang.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kestrel as kl  # noqa: E402
from benchmarks.common import RESULTS, save_results  # noqa: E402
from benchmarks.programs import fork_heavy  # noqa: E402
from kestrel import Engine, SamplingParams  # noqa: E402

REVIEWS = ["Cheap and cheerful, does the job.", "Broke on day one, avoid.", "It is fine. Nothing more to say.",
           "My kids love it and so do I!", "Smells of plastic and the lid leaks.", "Fast shipping, works as described.",
           "Not worth half the price.", "Exceeded every expectation I had."]


def fork_section(runs: int) -> dict:
    out = {}
    for label, radix in (("radix on", True), ("radix off", False)):
        engine = Engine(disable_radix_cache=not radix)
        backend = kl.EngineBackend(engine)
        fork_heavy.run(text="warm-up", backend=backend)
        engine.cache.evict(engine.cache.evictable_size)
        t = time.perf_counter()
        states = fork_heavy.run_batch([{"text": REVIEWS[i % len(REVIEWS)] + f" (#{i})"} for i in range(runs)],
                                      backend=backend, progress_bar=True)
        wall = time.perf_counter() - t
        calls = [c for s in states for c in s.calls]
        prompt = sum(c["prompt_tokens"] for c in calls)
        cached = sum(c["cached_tokens"] for c in calls)
        out[label] = dict(wall_s=wall, runs_per_s=runs / wall, prompt_tokens=prompt, cached_tokens=cached,
                          hit_rate=cached / prompt)
        print(f"fork-heavy x{runs}, {label:9s}: {wall:6.1f} s  ({runs / wall:.2f} runs/s, prefix hit {cached / prompt:.0%})")
        backend.shutdown()
    out["speedup"] = out["radix off"]["wall_s"] / out["radix on"]["wall_s"]
    print(f"radix on is {out['speedup']:.2f}x faster end to end")
    return out


def jump_section(n: int) -> dict:
    engine = Engine()
    people = [("Alice", 30, "Paris"), ("Bob", 41, "Oslo"), ("Carla", 25, "Rome"), ("Dev", 35, "Pune")]
    convs = [[{"role": "user", "content": f"{p} is {a} and lives in {c}. Give name, age and city as JSON, "
                                          f"with product set to 'bike' and rating {i % 5 + 1}."}]
             for i, (p, a, c) in enumerate(people * (n // len(people)))]
    engine.chat(convs[:2], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
    out = {}
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "city": {"type": "string"}, "product": {"type": "string"},
                                               "rating": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["name", "age", "city", "product", "rating"]}
    texts = {}
    for label, jf in (("jump-forward off", False), ("jump-forward on", True)):
        steps0, forced0 = engine.stats.steps, engine.stats.forced_tokens
        t = time.perf_counter()
        outs = engine.chat(convs, SamplingParams(max_tokens=96, temperature=0.0, json_schema=schema, jump_forward=jf))
        wall = time.perf_counter() - t
        texts[jf] = [o.text for o in outs]
        valid = sum(1 for o in outs if _valid(o.text))
        out[label] = dict(wall_s=wall, steps=engine.stats.steps - steps0, output_tokens=sum(o.output_tokens for o in outs),
                          forced_tokens=engine.stats.forced_tokens - forced0, valid=valid)
        print(f"JSON extraction x{len(convs)}, {label:16s}: {wall:5.2f} s, {out[label]['steps']} forward steps, "
              f"{out[label]['forced_tokens']} of {out[label]['output_tokens']} tokens forced, {valid} valid")
    off, on = out["jump-forward off"], out["jump-forward on"]
    out["step_ratio"] = off["steps"] / on["steps"]
    out["wall_ratio"] = off["wall_s"] / on["wall_s"]
    out["same_text"] = sum(a == b for a, b in zip(texts[False], texts[True]))
    print(f"jump-forward: {out['step_ratio']:.2f}x fewer forward steps, {out['wall_ratio']:.2f}x faster, "
          f"{out['same_text']}/{len(convs)} outputs identical to the plain constrained run")
    return out


def _valid(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["fork", "jump"])
    ap.add_argument("--runs", type=int, default=64)
    args = ap.parse_args()
    results = {}
    if args.only in (None, "fork"):
        results["fork_heavy"] = fork_section(args.runs)
    if args.only in (None, "jump"):
        results["jump_forward"] = jump_section(32)
    save_results(results, os.path.join(RESULTS, "lang.json"))


if __name__ == "__main__":
    main()

"""Concurrency on a chat workload without max_tokens: the admission estimate clipped (SGLang's 4096, the
default) against unclipped (each request plans for the whole rest of the context).

    .venv/bin/python benchmarks/bench_admission.py      # prints a table, writes benchmarks/results/admission.json

A chat request without max_tokens may run to the context length (8192 for the embedded model), as the
server allows; admission reserves prompt + ratio * (what it may still generate) per request. A closed loop
keeps the same number of requests in the engine for a fixed time in both runs; request i samples the same
tokens in both (seeded), so concurrency and throughput compare how well the batch is filled.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, save_results  # noqa: E402
from kestrel import Engine, SamplingParams  # noqa: E402

TOPICS = ["kestrels", "bridges", "the ocean", "winter", "libraries", "gardens", "music theory", "rivers",
          "mountains", "cities", "the history of paper", "networks", "markets", "morning light", "falcons", "cache"]


def run(clip: int, outstanding: int, duration: float) -> dict:
    """Closed loop: keep `outstanding` chat requests in the engine for `duration` seconds."""
    engine = Engine(clip_max_new_tokens=clip)
    issued = 0

    def submit() -> None:
        nonlocal issued
        convo = [{"role": "user", "content": f"Tell me about {TOPICS[issued % len(TOPICS)]} in {2 + issued % 4} "
                                             f"sentences."}]
        prompt = engine.apply_chat_template(convo)
        # no max_tokens (the rest of the context, as the server does), the server's default temperature;
        # seeded, so request i generates the same tokens in both runs whatever else is in the batch
        engine.add_request(prompt, SamplingParams(max_tokens=engine.context_length - len(prompt), temperature=1.0,
                                                  seed=issued), request_id=f"chat-{issued}")
        issued += 1

    for _ in range(outstanding):
        submit()
    running, tokens, finished = [], 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < duration:
        touched = engine.step()
        running.append(len(engine.scheduler.running))
        for rid in touched:
            if engine.is_finished(rid):
                out = engine.get_output(rid, pop=True)
                tokens += out.output_tokens
                finished += 1
                submit()
    wall = time.perf_counter() - start
    tokens += sum(len(s.output_ids) for seqs in engine._requests.values() for s in seqs)  # partial ones too
    return dict(clip=clip, kv_pool_tokens=engine.pool.size, dtype=str(engine.dtype).replace("torch.", ""),
                context_length=engine.context_length, mean_running=sum(running) / len(running),
                max_running=max(running), steps=len(running), finished=finished, output_tokens=tokens, wall_s=wall,
                output_tok_s=tokens / wall, retractions=engine.scheduler.num_retractions)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--outstanding", type=int, default=64, help="chat requests kept in the engine")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds per run")
    ap.add_argument("--output", default=os.path.join(RESULTS, "admission.json"))
    args = ap.parse_args()
    unclipped, clipped = run(10**9, args.outstanding, args.duration), run(4096, args.outstanding, args.duration)
    print(f"{args.outstanding} chat requests without max_tokens kept in the engine for {args.duration:.0f} s; "
          f"KV pool {clipped['kv_pool_tokens']} tokens ({clipped['dtype']}), context {clipped['context_length']}")
    for r in (unclipped, clipped):
        label = "unclipped (before)" if r["clip"] == 10**9 else f"clipped at {r['clip']} (after)"
        print(f"  {label:24s} mean running {r['mean_running']:5.1f}  max {r['max_running']:3d}  "
              f"{r['output_tok_s']:6.1f} tok/s  {r['finished']:4d} finished  retractions {r['retractions']}")
    print(f"  ratio: {clipped['mean_running'] / unclipped['mean_running']:.2f}x mean concurrency, "
          f"{clipped['output_tok_s'] / unclipped['output_tok_s']:.2f}x throughput")
    save_results(dict(before=unclipped, after=clipped), args.output)


if __name__ == "__main__":
    main()

"""Agents under memory pressure: which pause policy serves tool-calling conversations best (APIServe / InferCept).

    .venv/bin/python benchmarks/agent_pauses.py --quick     # 8 conversations at a time, 60 s per policy (~5 min)
    .venv/bin/python benchmarks/agent_pauses.py             # 24 at a time, 150 s per policy (~11 min)

Each policy gets a fresh `kestrel serve` on the embedded model with a KV pool too small for every conversation's
context (--pool-share of what the concurrent conversations hold). A closed loop keeps --concurrency conversations
going: each opens with its own document (real English text from Python's pydoc_data) and a task, then makes
--turns tool calls through the OpenAI API (tool_choice names the tool), waits the tool's duration, and appends the
result, and ends with a short answer. Tools, as in the paper's augmented workloads:
  calculator ~10 ms, search ~1 s, ask_human ~10 s (each +-20%), drawn with probabilities 0.5 / 0.35 / 0.15.
Reports per policy: completed conversations (and turns) per minute, p50/p90 turn latency (request sent to reply received),
the share of prompt tokens served from the cache, and the engine's pause events; ratios against the best fixed
policy and against discard. Writes benchmarks/results/agent_pauses.json.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, cpu_name, save_results, serve_process, stop_process  # noqa: E402

TOOLS = {  # name: (seconds, probability, argument)
    "calculator": (0.01, 0.5, "expression"),
    "search": (1.0, 0.35, "query"),
    "ask_human": (10.0, 0.15, "question"),
}
TOOL_SPECS = [{"type": "function", "function": {
    "name": name, "description": f"{name.replace('_', ' ')} tool",
    "parameters": {"type": "object", "properties": {arg: {"type": "string", "maxLength": 24}}, "required": [arg]}}}
    for name, (_, _, arg) in TOOLS.items()]


def documents(tokens: int, count: int) -> list[str]:
    """`count` distinct passages of about `tokens` tokens from pydoc_data's topics (ships with every Python)."""
    from pydoc_data.topics import topics
    words = " ".join(topics[k] for k in sorted(topics)).split()
    size = int(tokens * 0.75)  # ~1.33 tokens per word in this text
    return [" ".join(words[i * size:(i + 1) * size]) for i in range(count)]


def draw_tool(rng: random.Random) -> str:
    names = list(TOOLS)
    return rng.choices(names, weights=[TOOLS[n][1] for n in names])[0]


async def conversation(client, doc: str, rng: random.Random, turns: int, stats: dict) -> None:
    messages = [{"role": "user", "content": f"Read this document, then use the tools to check it.\n\n{doc}"}]
    for turn in range(turns + 1):
        tool = draw_tool(rng) if turn < turns else None
        choice = {"type": "function", "function": {"name": tool}} if tool else "none"  # the answer: text
        kwargs = dict(tools=TOOL_SPECS, tool_choice=choice, max_tokens=40 if tool else 16)
        start = time.perf_counter()
        r = await client.chat.completions.create(model="default", messages=messages, temperature=0, **kwargs)
        stats["latency"].append(time.perf_counter() - start)
        stats["prompt"] += r.usage.prompt_tokens
        stats["cached"] += r.usage.prompt_tokens_details.cached_tokens if r.usage.prompt_tokens_details else 0
        if tool is None:
            return
        message = r.choices[0].message
        seconds = TOOLS[tool][0] * rng.uniform(0.8, 1.2)
        await asyncio.sleep(seconds)
        messages += [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": f"{tool}: done, no issue"}]


async def closed_loop(url: str, docs: list[str], concurrency: int, duration: float, turns: int, seed: int) -> dict:
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", timeout=600, max_retries=0)
    stats = {"latency": [], "prompt": 0, "cached": 0, "completed": 0}
    deadline = time.perf_counter() + duration
    counter = iter(range(10**9))

    async def slot(i: int) -> None:
        await asyncio.sleep(0.5 * i)  # staggered: not every document's prefill at the same instant
        while time.perf_counter() < deadline:
            n = next(counter)
            rng = random.Random(seed * 100003 + n)
            await conversation(client, docs[n % len(docs)], rng, turns, stats)
            if time.perf_counter() <= deadline:
                stats["completed"] += 1

    tasks = [asyncio.create_task(slot(i)) for i in range(concurrency)]
    await asyncio.sleep(duration)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    return stats


def pause_events(url: str) -> dict:
    import httpx
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("kestrel:pause_events_total{"):
            event = line.split('event="', 1)[1].split('"', 1)[0]
            out[event] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("kestrel:num_preemptions_total "):
            out["preemptions"] = float(line.rsplit(" ", 1)[1])
    return out


def run_policy(policy: str, args, docs: list[str], pool: int, port: int) -> dict:
    cmd = [sys.executable, "-m", "kestrel.cli", "serve", "--port", str(port), "--pause-policy", policy,
           "--max-total-tokens", str(pool)] + args.serve_args
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = serve_process(cmd, port, env)
    url = f"http://127.0.0.1:{port}"
    try:
        stats = asyncio.run(closed_loop(url, docs, args.concurrency, args.duration, args.turns, args.seed))
        events = pause_events(url)
    finally:
        stop_process(proc)
    lat = sorted(stats["latency"])
    return {"policy": policy, "conversations_per_min": stats["completed"] * 60 / args.duration,
            "completed": stats["completed"], "turns": len(lat), "turns_per_min": len(lat) * 60 / args.duration,
            "turn_latency_p50_s": statistics.median(lat) if lat else None,
            "turn_latency_p90_s": lat[int(0.9 * (len(lat) - 1))] if lat else None,
            "cached_prompt_share": stats["cached"] / max(1, stats["prompt"]), "events": events}


def recompute_vs_swap(tokens: int = 800) -> dict:
    """What a released conversation costs to bring back, on this machine: recomputing `tokens` of context on the
    embedded model (the engine serve uses) against saving and restoring their K/V through the swap tier."""
    import torch

    from kestrel import Engine, SamplingParams
    from kestrel.cache.swap import SwapStore

    engine = Engine()
    ids = list(range(1000, 1000 + tokens))
    engine.generate([ids[:64]], SamplingParams(max_tokens=1))  # warm-up
    engine.cache.evict(engine.cache.evictable_size)
    start = time.perf_counter()
    engine.generate([ids], SamplingParams(max_tokens=1))
    recompute = time.perf_counter() - start
    store = SwapStore(engine.pool, 1 << 30)
    slots = torch.tensor(engine.pool.alloc(tokens))
    store.drop(store.save(slots))  # warm-up
    start = time.perf_counter()
    backup = store.save(slots)
    store.load(backup, 0, slots)
    swap = time.perf_counter() - start
    store.drop(backup)
    return {"tokens": tokens, "recompute_ms": recompute * 1e3, "swap_out_and_in_ms": swap * 1e3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default="discard,keep,swap,auto")
    p.add_argument("--concurrency", type=int, default=24)
    p.add_argument("--duration", type=float, default=150.0, help="seconds per policy")
    p.add_argument("--turns", type=int, default=4, help="tool calls per conversation (then a final answer)")
    p.add_argument("--context-tokens", type=int, default=600, help="each conversation's document")
    p.add_argument("--pool-share", type=float, default=0.2,
                   help="KV pool size as a share of the tokens the concurrent conversations hold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=30187)
    p.add_argument("--quick", action="store_true", help="8 conversations at a time, 60 s per policy")
    p.add_argument("serve_args", nargs="*", help="more `kestrel serve` flags (after --)")
    args = p.parse_args()
    if args.quick:
        args.concurrency, args.duration = 8, 60.0
    held = args.context_tokens + 60 * (args.turns + 1) + 100  # document + calls and results + template
    pool = max(held + 200, int(args.pool_share * args.concurrency * held))
    docs = documents(args.context_tokens, 64)
    print(f"{cpu_name()}; {args.concurrency} conversations at a time, ~{held} tokens each, KV pool {pool} tokens")
    rows = []
    for policy in args.policies.split(","):
        row = run_policy(policy, args, docs, pool, args.port)
        rows.append(row)
        print(f"{policy:8s} {row['conversations_per_min']:6.1f} conversations/min  {row['turns_per_min']:6.1f} turns/min  p50 {row['turn_latency_p50_s']:.2f} s"
              f"  p90 {row['turn_latency_p90_s']:.2f} s  cached {row['cached_prompt_share']:.0%}  {row['events']}",
              flush=True)
    ratios = {}
    for measure in ("conversations_per_min", "turns_per_min"):
        by = {r["policy"]: r[measure] for r in rows}
        fixed = [by[k] for k in ("discard", "keep", "swap") if k in by]
        if "auto" in by and fixed:
            ratios[f"auto_vs_best_fixed ({measure})"] = by["auto"] / max(max(fixed), 1e-9)
        if "auto" in by and "discard" in by:
            ratios[f"auto_vs_discard ({measure})"] = by["auto"] / max(by["discard"], 1e-9)
    print("ratios:", {k: round(v, 2) for k, v in ratios.items()})
    costs = recompute_vs_swap()
    print(f"bringing back {costs['tokens']} tokens of context: recompute {costs['recompute_ms']:.0f} ms, "
          f"swap out and in {costs['swap_out_and_in_ms']:.0f} ms")
    save_results({"cpu": cpu_name(), "args": vars(args), "pool_tokens": pool, "rows": rows, "ratios": ratios,
                  "bring_back_costs": costs},
                 os.path.join(RESULTS, "agent_pauses.json"))


if __name__ == "__main__":
    main()

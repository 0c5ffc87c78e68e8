"""`kestrel bench`: load an OpenAI-compatible server and report latency and throughput.

Requests arrive as a Poisson process at --request-rate (or all at once with `inf`), at most
--max-concurrency in flight; each is a streamed chat completion so time to first token (TTFT),
inter-token latency (ITL) and time per output token (TPOT) are measured as the client sees them.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import httpx
import numpy as np

from kestrel.bench.workloads import (BenchRequest, assign_models, interarrival, multi_turn_workload, random_workload,
                                     shared_prefix_workload)


@dataclass
class RequestResult:
    ok: bool
    start: float
    ttft: Optional[float] = None
    latency: Optional[float] = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: Optional[str] = None

    @property
    def tpot(self) -> Optional[float]:
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def send(http: httpx.AsyncClient, url: str, model: str, req: BenchRequest, headers: dict,
               t0: float) -> tuple[RequestResult, str]:
    body = {"model": req.model or model, "messages": req.messages, "max_tokens": req.max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    res = RequestResult(ok=False, start=start - t0)
    text, last, chunks = [], None, 0
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return res, ""
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                msg = json.loads(line[5:])
                now = time.perf_counter()
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"]["prompt_tokens"]
                    res.output_tokens = msg["usage"]["completion_tokens"]
                for ch in msg.get("choices") or []:
                    piece = (ch.get("delta") or {}).get("content") or ""
                    if piece:
                        chunks += 1
                        text.append(piece)
                        if res.ttft is None:
                            res.ttft = now - start
                        elif last is not None:
                            res.itl.append(now - last)
                        last = now
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = True
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res, "".join(text)


async def run_load(url: str, model: str, requests: list[BenchRequest], rate: float, max_concurrency: Optional[int],
                   api_key: Optional[str], seed: int = 0, progress: bool = True, burstiness: float = 1.0
                   ) -> tuple[list[RequestResult], float]:
    from tqdm import tqdm

    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(max_concurrency or 10**9)
    total = sum(1 + len(r.followups) for r in requests)
    bar = tqdm(total=total, desc="bench", unit="req", disable=not progress)
    results: list[RequestResult] = []
    t0 = time.perf_counter()

    async def one(http, req: BenchRequest):
        messages = list(req.messages)
        for turn in range(1 + len(req.followups)):
            async with limit:
                res, reply = await send(http, url, model, BenchRequest(messages, req.max_tokens, model=req.model),
                                        headers, t0)
            results.append(res)
            bar.update(1)
            if not res.ok or turn == len(req.followups):
                break
            messages = messages + [{"role": "assistant", "content": reply},
                                   {"role": "user", "content": req.followups[turn]}]

    timeout = httpx.Timeout(600.0, connect=30.0)
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None)) as http:
        tasks = []
        for req in requests:
            tasks.append(asyncio.create_task(one(http, req)))
            if rate != float("inf"):
                await asyncio.sleep(interarrival(rng, rate, burstiness))
        await asyncio.gather(*tasks)
    bar.close()
    return results, time.perf_counter() - t0


def summarize(results: list[RequestResult], duration: float, slo_ttft: Optional[float],
              slo_tpot: Optional[float]) -> dict:
    ok = [r for r in results if r.ok]

    def stats(values: list[float]) -> dict:
        if not values:
            return {}
        a = np.asarray(values) * 1000.0
        return {"mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
                "p90_ms": float(np.percentile(a, 90)), "p99_ms": float(np.percentile(a, 99))}

    def meets(r: RequestResult) -> bool:
        return ((slo_ttft is None or (r.ttft is not None and r.ttft <= slo_ttft)) and
                (slo_tpot is None or r.tpot is None or r.tpot <= slo_tpot))

    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + sum(r.prompt_tokens for r in ok)) / duration,
        "goodput": sum(meets(r) for r in ok) / duration,
        "ttft": stats([r.ttft for r in ok if r.ttft is not None]),
        "tpot": stats([r.tpot for r in ok if r.tpot is not None]),
        "itl": stats([x for r in ok for x in r.itl]),
        "e2e_latency": stats([r.latency for r in ok]),
    }


def plot(results: list[RequestResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, name, values in ((axes[0], "TTFT (s)", [r.ttft for r in ok if r.ttft is not None]),
                             (axes[1], "end-to-end latency (s)", [r.latency for r in ok])):
        ax.hist(values, bins=30)
        ax.set_xlabel(name)
        ax.set_ylabel("requests")
    ends = sorted((r.start + r.latency, r.output_tokens) for r in ok)
    if ends:
        t = np.array([e for e, _ in ends])
        axes[2].plot(t, np.cumsum([n for _, n in ends]))
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("output tokens completed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def build_workload(args) -> list[BenchRequest]:
    if args.workload == "random":
        requests = random_workload(args.num_requests, args.input_len, args.output_len, args.seed)
    elif args.workload == "shared-prefix":
        per_group = max(1, args.num_requests // args.num_groups)
        requests = shared_prefix_workload(args.num_groups, per_group, args.system_prompt_len, args.question_len,
                                          args.output_len, args.seed)
    else:
        requests = multi_turn_workload(max(1, args.num_requests // args.turns), args.turns, args.input_len,
                                       args.output_len, args.seed)
    if getattr(args, "lora_models", None):
        assign_models(requests, args.lora_models, args.lora_alpha, args.seed)
    return requests


def add_bench_args(p) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--model", default="default")
    p.add_argument("--api-key", default=None)
    p.add_argument("--workload", choices=["random", "shared-prefix", "multi-turn"], default="random")
    p.add_argument("--num-requests", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson, or see --burstiness), or inf")
    p.add_argument("--burstiness", type=float, default=1.0,
                   help="arrivals' gamma shape at --request-rate: 1 Poisson, below 1 burstier, above 1 steadier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128, help="random/multi-turn: tokens per prompt or turn")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--num-groups", type=int, default=4, help="shared-prefix: groups")
    p.add_argument("--system-prompt-len", type=int, default=512, help="shared-prefix: shared system prompt tokens")
    p.add_argument("--question-len", type=int, default=32, help="shared-prefix: per-request question tokens")
    p.add_argument("--turns", type=int, default=3, help="multi-turn: turns per conversation")
    p.add_argument("--slo-ttft", type=float, default=None, help="goodput: TTFT limit in seconds")
    p.add_argument("--slo-tpot", type=float, default=None, help="goodput: TPOT limit in seconds")
    p.add_argument("--lora-models", nargs="+", default=None,
                   help="model names (LoRA adapters) to spread the requests over, drawn from a power law")
    p.add_argument("--lora-alpha", type=float, default=1.0, help="--lora-models: the power law's exponent "
                                                                  "(0: uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the full results as JSON")
    p.add_argument("--plot", default=None, help="write latency distributions and throughput over time (PNG)")


def run_bench(args) -> dict:
    requests = build_workload(args)
    url = args.base_url.rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    for path in (args.output, args.plot):  # before the run: a path that cannot be written fails now, not after it
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    results, duration = asyncio.run(run_load(url, args.model, requests, args.request_rate, args.max_concurrency,
                                             args.api_key, args.seed, burstiness=args.burstiness))
    summary = summarize(results, duration, args.slo_ttft, args.slo_tpot)
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("func", "api_key")}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(summary, requests_detail=[asdict(r) for r in results]), f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return summary


def print_summary(s: dict) -> None:
    print(f"requests {s['completed']}/{s['requests']} ok in {s['duration_s']:.1f}s | "
          f"{s['request_throughput']:.2f} req/s | {s['output_token_throughput']:.1f} output tok/s | "
          f"goodput {s['goodput']:.2f} req/s")
    for name in ("ttft", "tpot", "itl", "e2e_latency"):
        st = s[name]
        if st:
            print(f"  {name:12s} mean {st['mean_ms']:9.1f} ms  p50 {st['p50_ms']:9.1f}  p90 {st['p90_ms']:9.1f}  "
                  f"p99 {st['p99_ms']:9.1f}")
    for e in s["errors"]:
        print("  error:", e)

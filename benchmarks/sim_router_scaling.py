"""How the P99 TTFT gap between round-robin and least-load dispatch grows with the number of instances, at the same
load per instance: bench_cluster's Llumnix workload (one request in five long, bursty gamma arrivals) replayed in
kestrel plan's simulator, under a cost model of this machine's engine (one thread, bench_cluster's KV pool and
prefill chunk). No servers run, so it reaches deployments larger than this machine holds; it does not migrate,
so least-load stands for what dispatch alone does.

    .venv/bin/python benchmarks/sim_router_scaling.py [--long 300,800] [--instances 2,4,8,16]
        [--per-instance-rates 0.15,0.2,0.25] [--profile cost.json]    # writes results/router_scaling.json

Each cell is the P99 over `--draws` draws of `--requests-per-instance` requests per instance.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_cluster import BURSTINESS, CHUNK, LONG_SHAPE, POOL_TOKENS, bursty, prompt_tokens  # noqa: E402
from benchmarks.common import RESULTS, cpu_name, save_results  # noqa: E402
from kestrel.cluster.plan import CostModel, Workload, colocated, measure  # noqa: E402
from kestrel.config import EngineConfig  # noqa: E402

ROUTERS = ("round-robin", "least-load")


def draw(num: int, rate: float, seed: int, long_shape: tuple[int, int]) -> list[tuple[float, int, int]]:
    """(arrival, prompt tokens, output tokens) of one draw: bench_cluster's requests and gamma arrivals."""
    lengths = [(prompt_tokens(r), r.max_tokens) for r in bursty(num, seed=seed, long_shape=long_shape)]
    return Workload(lengths).arrivals(rate, seed, BURSTINESS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", default="300,800", metavar="PROMPT,OUTPUT",
                    help=f"the long requests' tokens in and out (bench_cluster's default: {LONG_SHAPE})")
    ap.add_argument("--instances", default="2,4,8,16")
    ap.add_argument("--per-instance-rates", default="0.15,0.2,0.25", help="requests/s per instance")
    ap.add_argument("--draws", type=int, default=6)
    ap.add_argument("--requests-per-instance", type=int, default=60)
    ap.add_argument("--profile", help="a cost model saved by kestrel plan disaggregation --save-profile "
                                      "(default: measure this machine's engine now)")
    ap.add_argument("--output", default=os.path.join(RESULTS, "router_scaling.json"))
    args = ap.parse_args()
    long_shape = tuple(int(x) for x in args.long.split(","))
    config = EngineConfig(num_threads=1, chunked_prefill_size=CHUNK, max_total_tokens=POOL_TOKENS)
    cost = CostModel.load(args.profile) if args.profile else measure(config)
    print(cost.describe(), flush=True)
    results = {"cpu": cpu_name(), "args": vars(args), "cost_model": cost.describe(), "cells": []}
    for per_instance in (float(r) for r in args.per_instance_rates.split(",")):
        for n in (int(k) for k in args.instances.split(",")):
            ttfts: dict[str, list[float]] = {router: [] for router in ROUTERS}
            for d in range(args.draws):
                requests = draw(args.requests_per_instance * n, per_instance * n, 10 + 100 * d, long_shape)
                for router in ROUTERS:
                    ttfts[router] += [ttft for ttft, _ in colocated(cost, config, requests, n, router)]
            p99 = {router: float(np.percentile(v, 99)) for router, v in ttfts.items()}
            ratio = p99["round-robin"] / p99["least-load"]
            results["cells"].append(dict(instances=n, rate_per_instance=per_instance, p99_ttft_s=p99, ratio=ratio))
            print(f"{per_instance} req/s per instance, {n:2d} instances: P99 TTFT round-robin "
                  f"{p99['round-robin']:.2f} s, least-load {p99['least-load']:.2f} s: {ratio:.2f}x", flush=True)
    save_results(results, args.output)


if __name__ == "__main__":
    main()

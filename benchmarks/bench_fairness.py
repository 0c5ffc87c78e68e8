"""Fair serving: fcfs vs vtc on the embedded model, with clients arriving and leaving.

    .venv/bin/python benchmarks/bench_fairness.py                       # both scenarios, both policies
    .venv/bin/python benchmarks/bench_fairness.py --scenario two --duration 30

Scenarios (request rates are multiples of the engine's capacity, measured first):
  two   a heavy client at 4x a light one's rate, both over their fair share for the whole run
  five  five clients arriving and leaving (after the paper's figures): a steady one, two that join
        and leave, a short burst, and a light interactive one that is never backlogged
Per scenario and policy it writes benchmarks/results/fairness_<scenario>_<policy>.png (cumulative weighted
service per client over time, and each client's response times) and prints the maximum service gap
between backlogged clients and the throughput of both policies. Results go to fairness.json.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, save_results  # noqa: E402
from kestrel import Engine, SamplingParams  # noqa: E402

PROMPT_LEN, OUTPUT_LEN = 64, 32


def scenario(name: str, duration: float) -> dict[str, list[tuple[float, float, float]]]:
    """client -> [(start s, end s, rate as a multiple of capacity)]."""
    d = duration
    if name == "two":
        return {"heavy": [(0, d, 2.4)], "light": [(0, d, 0.6)]}
    return {"steady": [(0, d, 0.8)], "joins": [(0.2 * d, 0.7 * d, 0.8)], "late": [(0.45 * d, d, 0.8)],
            "burst": [(0.55 * d, 0.65 * d, 3.0)], "interactive": [(0, d, 0.08)]}


def capacity(engine: Engine) -> float:
    """Requests per second the engine completes when saturated with this workload."""
    rng = random.Random(1)
    prompts = [[rng.randrange(10, engine.vocab_size) for _ in range(PROMPT_LEN)] for _ in range(24)]
    t = time.perf_counter()
    engine.generate(prompts, SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True))
    return len(prompts) / (time.perf_counter() - t)


def run(engine: Engine, windows: dict, cap: float, duration: float, seed: int = 0) -> dict:
    """Drive the engine in real time; returns the service trace and response times per client."""
    rng = random.Random(seed)
    arrivals = sorted((start + k / (rate * cap), client)
                      for client, spans in windows.items() for start, end, rate in spans
                      for k in range(int((end - start) * rate * cap)))
    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    engine.cache.evict(engine.cache.evictable_size)
    base = {c: u[0] for c, u in engine.client_usage().items()}
    start = time.perf_counter()
    sent: dict[str, tuple[str, float]] = {}
    latencies: dict[str, list[float]] = {c: [] for c in windows}
    trace, i = [], 0
    while True:
        now = time.perf_counter() - start
        if now >= duration:
            break
        while i < len(arrivals) and arrivals[i][0] <= now:
            prompt = [rng.randrange(10, engine.vocab_size) for _ in range(PROMPT_LEN)]
            rid = engine.add_request(prompt, params, client=arrivals[i][1])
            sent[rid] = (arrivals[i][1], now)
            i += 1
        if not engine.has_unfinished():
            time.sleep(0.005)
            continue
        for rid in engine.step():
            out = engine.get_output(rid)
            if out.finished:
                client, t0 = sent.pop(rid)
                latencies[client].append(time.perf_counter() - start - t0)
                engine.get_output(rid, pop=True)
        usage = engine.client_usage()
        trace.append((time.perf_counter() - start,
                      {c: usage[c][0] - base.get(c, 0.0) for c in windows if c in usage},
                      {c: usage[c][3] for c in windows if c in usage}))
    for rid in list(sent):  # what is still queued at the end is not part of the measurement
        engine.abort(rid)
        engine.get_output(rid, pop=True)
    while engine.has_unfinished():
        engine.step()
    total = sum(trace[-1][1].values()) if trace else 0.0
    return dict(trace=trace, latencies=latencies, throughput=total / duration, sent=i)


def max_gap(trace, clients) -> float:
    """Max over intervals during which every pair of these clients is backlogged of their service gap."""
    worst = 0.0
    for a in clients:
        for b in clients:
            if a >= b:
                continue
            run_min = run_max = None
            for _, w, q in trace:
                if q.get(a, 0) > 0 and q.get(b, 0) > 0:
                    d = w.get(a, 0.0) - w.get(b, 0.0)
                    run_min = d if run_min is None else min(run_min, d)
                    run_max = d if run_max is None else max(run_max, d)
                    worst = max(worst, run_max - run_min)
                else:
                    run_min = run_max = None
    return worst


def plot(result: dict, title: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    clients = list(result["latencies"])
    times = [t for t, _, _ in result["trace"]]
    for c in clients:
        ax1.plot(times, [w.get(c, 0.0) for _, w, _ in result["trace"]], label=c)
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("cumulative weighted service (tokens)")
    ax1.legend()
    ax1.set_title(f"{title}: service received")
    data = [result["latencies"][c] or [0.0] for c in clients]
    ax2.boxplot(data, showfliers=True)
    ax2.set_xticks(range(1, len(clients) + 1), clients)
    ax2.set_ylabel("response time (s)")
    ax2.set_title(f"{title}: response times")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["two", "five", "all"], default="all")
    ap.add_argument("--duration", type=float, default=40.0, help="seconds per scenario and policy")
    ap.add_argument("--max-running-requests", type=int, default=8)
    args = ap.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    engines = {p: Engine(policy=p, max_running_requests=args.max_running_requests) for p in ("fcfs", "vtc")}
    for engine in engines.values():  # warm-up: the first steps of each shape pay oneDNN's primitive creation
        capacity(engine)
    cap = capacity(engines["fcfs"])
    # the paper's bound on the gap of two backlogged clients: 2U, U = w_in * L_input + w_out * M (M: tokens
    # the batch can hold, here max_running_requests whole requests)
    bound = 2 * (PROMPT_LEN + 2 * args.max_running_requests * (PROMPT_LEN + OUTPUT_LEN))
    print(f"capacity: {cap:.2f} req/s ({PROMPT_LEN} prompt + {OUTPUT_LEN} output tokens, "
          f"max_running_requests={args.max_running_requests}); VTC bound on the backlogged gap: {bound}")
    summary = {"capacity_req_s": cap, "vtc_bound": bound}
    for name in (["two", "five"] if args.scenario == "all" else [args.scenario]):
        windows = scenario(name, args.duration)
        for policy, engine in engines.items():
            r = run(engine, windows, cap, args.duration)
            backlogged = [c for c in windows if c != "interactive"]
            gap = max_gap(r["trace"], backlogged)
            p50 = {c: sorted(v)[len(v) // 2] if v else None for c, v in r["latencies"].items()}
            summary[f"{name}/{policy}"] = dict(throughput_service_per_s=r["throughput"], max_gap=gap,
                                               p50_response_s=p50, finished={c: len(v) for c, v in r["latencies"].items()})
            plot(r, f"{name} clients, {policy}", os.path.join(RESULTS, f"fairness_{name}_{policy}.png"))
            print(f"{name:5s} {policy:5s} throughput {r['throughput']:8.1f} weighted tok/s   max backlogged gap "
                  f"{gap:8.0f}   p50 response " + " ".join(f"{c}={v:.1f}s" for c, v in p50.items() if v is not None))
        ratio = summary[f"{name}/vtc"]["throughput_service_per_s"] / summary[f"{name}/fcfs"]["throughput_service_per_s"]
        summary[f"{name}/throughput_ratio_vtc_over_fcfs"] = ratio
        print(f"{name:5s} throughput vtc / fcfs = {ratio:.3f}")
    save_results(summary, os.path.join(RESULTS, "fairness.json"))


if __name__ == "__main__":
    main()

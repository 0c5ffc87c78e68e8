"""Two instances of the embedded model, one core each, on a local Ray: dispatch policies, live migration, and
prefill/decode disaggregation, each against its baseline in one run.

    .venv/bin/python benchmarks/bench_cluster.py [--quick] [--part llumnix,pause,cache,distserve]

- llumnix: long and short requests arriving in bursts (gamma arrivals, CV 2), over a sweep of rates up to
  capacity; round-robin vs least-load vs llumnix (least-load + migration): P50/P99 TTFT (all requests, and the
  short ones alone), P50/P99 TPOT, mean e2e, preemptions, migrations and their downtime (in ms, and in the moved
  request's own decode steps), queued requests moved; beside them a long prompt's TTFT alone and the simulator's
  P99 TTFT for the same arrivals (dispatch only).
- pause: a migration's downtime, in the moved request's own decode steps, at contexts of 256 to 4096 tokens.
- cache: the shared-prefix workload; round-robin vs cache-aware: prefix hit rate and throughput.
- distserve: goodput (requests/s meeting both SLOs) colocated vs disaggregated at the split `kestrel plan
  disaggregation` picks, each at 0.8, 1 and 1.2 times the goodput predicted for it (all on one draw of the
  workload), with the simulator's attainment for the very requests sent beside each measurement: under cost models
  fitted to the deployment's own steps under a calibration load (--profile-from; per role for the split), and to
  an idle engine's (the default).
Writes benchmarks/results/cluster.json and cluster.png (latency percentiles against rate per policy).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import os
import random
import sys
import tempfile
from typing import Callable, Optional

import httpx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import cpu_name, save_results, serve_process, stop_process  # noqa: E402
from kestrel.bench.client import run_load, summarize  # noqa: E402
from kestrel.bench.workloads import BenchRequest, _words, shared_prefix_workload  # noqa: E402
from kestrel.cluster.plan import fetch_step_profile  # noqa: E402

PORT = 30321
# Llumnix part: each instance's KV pool and prefill chunk. A long request (its prompt ~1000 tokens with the chat
# template, 200 out) takes over half the pool, so two cannot share an instance: memory, not compute, decides who
# waits (Llumnix's setting). With 3500, two longs and their shorts fit, compute binds, and every policy's P99 sits
# near a long prompt's own prefill (round-robin's / llumnix's: 1.03x and 1.41x at Poisson 1.5 and 1.75 req/s).
POOL_TOKENS, CHUNK = 2200, 256
LONG_SHAPE, SHORT_OUTPUT = (1000, 200), 40  # a long request's prompt and output tokens; a short one's output
# (--llumnix-long 300,800: long requests that grow their K/V while they decode, Llumnix's own regime, where memory
# fills during decoding and admission's reserve for outputs runs out: preemptions, and room to make by migration)
SLO_TTFT, SLO_TPOT = 2.0, 0.15  # Llumnix part (reported as goodput beside its latencies)
BURSTINESS = 0.25  # Llumnix part: gamma arrivals with a coefficient of variation of 2 (Poisson's is 1: burstiness 1)
TARGET = 0.9  # DistServe part: the share of requests that must meet both SLOs (predicted and measured)
DIS_TTFT, DIS_TPOT = 5.0, 0.1  # DistServe part's default SLOs: a long prompt alone takes ~2-3 s to prefill on one
# core of a Xeon with AMX; a slower CPU needs looser ones (--dis-slo-ttft / --dis-slo-tpot)


SERVER_LOGS: Optional[str] = None  # --server-logs DIR: each server logs at debug level to DIR/<name>.log


def serve(flags: list[str], name: str):
    """A deployment behind one endpoint; with --server-logs its router logs every dispatch (with the loads it saw)
    and every migration to DIR/`name`.log, to tell why a policy lost a draw."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "kestrel.cli", "serve", "--port", str(PORT), "--cpus-per-instance", "1", *flags]
    if SERVER_LOGS:
        os.makedirs(SERVER_LOGS, exist_ok=True)
        cmd += ["--log-level", "debug"]
    return serve_process(cmd, PORT, env, log=os.path.join(SERVER_LOGS, f"{name}.log") if SERVER_LOGS else None)


def metrics() -> dict[str, float]:
    out = {}
    for line in httpx.get(f"http://127.0.0.1:{PORT}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def mixed_request(rng: random.Random, long: bool, long_shape: tuple[int, int] = LONG_SHAPE) -> BenchRequest:
    """A long (`long_shape`: a prompt of about that many tokens with the embedded model's tokenizer and chat
    template, 1.2 times as many tokens' worth of words, and that many tokens out) or a short (100 tokens' worth of
    words -> SHORT_OUTPUT tokens) request of the Llumnix part."""
    words = long_shape[0] * 1.2 if long else 100
    return BenchRequest([{"role": "user", "content": _words(rng, int(words / 1.3))}],
                        long_shape[1] if long else SHORT_OUTPUT)


def bursty(num: int, seed: int = 0, text_seed: Optional[int] = None,
           long_shape: tuple[int, int] = LONG_SHAPE) -> list[BenchRequest]:
    """One request in five long, at random places; the rest short. (Every fifth one long, as before, hands
    round-robin over two instances a perfect balance.) The bursts are in the arrivals (run's `burstiness`). With a
    `text_seed`, the long ones sit where `seed` puts them and only the words change (a new draw of text for the
    same lengths, which the prefix cache cannot serve from an earlier run)."""
    rng = random.Random(seed)
    longs = set(rng.sample(range(num), num // 5))
    words = rng if text_seed is None else random.Random(text_seed)
    return [mixed_request(words, i in longs, long_shape) for i in range(num)]


def simulated_p99_ttft_ms(profile: dict, runs: list[list], router: str) -> float:
    """The P99 TTFT that kestrel plan's simulator, with a cost model fitted to this deployment's own steps (its
    /step_profile), gives the very arrivals and lengths each of `runs` sent, dispatched by `router` (it does not
    migrate): what dispatch alone can do here, and a check of the measurement."""
    from kestrel.cluster.plan import CostModel, colocated
    from kestrel.config import EngineConfig

    cost = CostModel.from_profile(profile)  # (its KV pool is the deployment's)
    config = EngineConfig(num_threads=1, chunked_prefill_size=CHUNK)
    ttfts = []
    for results in runs:
        requests = sorted((r.start, r.prompt_tokens, r.output_tokens) for r in results if r.ok)
        ttfts += [ttft for ttft, _ in colocated(cost, config, requests, 2, router)]
    return 1000 * float(np.percentile(ttfts, 99))


def pause_in_steps(delta: dict) -> dict:
    """Live migrations' pauses in the moved request's own decode steps (each move's downtime over that request's
    time per token before it, from /metrics): their mean, and the share under two steps (the goal)."""
    n = delta.get("kestrel:migration_downtime_steps_count", 0)
    if not n:
        return dict(mean_downtime_steps=None, moves_under_2_steps=None)
    return dict(mean_downtime_steps=delta["kestrel:migration_downtime_steps_sum"] / n,
                moves_under_2_steps=delta.get('kestrel:migration_downtime_steps_bucket{le="2.0"}', 0) / n)


def run(requests, rate: float, slo=(SLO_TTFT, SLO_TPOT), burstiness: float = 1.0) -> tuple[dict, dict, list]:
    """The load's summary, the change in the servers' migration/preemption/prefix-cache counters, and the
    per-request results."""
    before = metrics()
    results, duration = asyncio.run(run_load(f"http://127.0.0.1:{PORT}", "default", requests, rate, None, None,
                                             burstiness=burstiness))
    after = metrics()
    summary = summarize(results, duration, *slo)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if "migration" in k or "preemptions" in k
             or "prefix_cache" in k}
    return summary, delta, results


POLICIES = [("round-robin", ["--router", "round-robin"]), ("least-load", ["--router", "least-load"]),
            ("llumnix", ["--router", "llumnix"])]


def part_llumnix(quick: bool, requests: int = 0, rates: str = "", workloads: int = 1,
                 burstiness: float = BURSTINESS, pool_tokens: int = POOL_TOKENS,
                 long_shape: tuple[int, int] = LONG_SHAPE) -> dict:
    """Per policy and rate: latency percentiles (all requests, and the short ones alone: a long prompt's P99
    TTFT is mostly its own prefill, which no dispatch changes, while a short one's is mostly waiting behind
    others), preemptions, migrations and their downtime. With several `workloads` (different draws of the same
    lengths and bursts), the percentiles are over all their requests, and each workload's P99 TTFT is kept
    too: one burst moves a P99 by seconds, so their spread shows how firm a ratio is.

    Two figures say how far any dispatch could go: a long prompt's TTFT on the idle deployment (no P99 over a
    mix with long prompts falls below it), and each row's simulated P99 TTFT (simulated_p99_ttft_ms)."""
    n, sweep = (30, [1.0, 1.25]) if quick else (80, [0.75, 1.0, 1.25, 1.5])
    # P99 over 80 requests is about the worst one: --llumnix-requests several hundred for a firmer figure
    n, sweep = requests or n, [float(r) for r in rates.split(",")] if rates else sweep
    # steps bounded by chunked prefill, so a migration's destination reaches a step boundary soon
    pool = ["--max-total-tokens", str(pool_tokens), "--chunked-prefill-size", str(CHUNK)]
    out = {}
    for label, flags in POLICIES:
        proc = serve(["--instances", "2", *pool, *flags], f"llumnix-{label}")
        try:
            if "long_prompt_alone_ttft_ms" not in out:  # the floor under any policy's P99 TTFT (see the docstring)
                alone = [run([mixed_request(random.Random(k), True, long_shape)], 1.0)[0]["ttft"]["p50_ms"]
                         for k in range(3)]
                out["long_prompt_alone_ttft_ms"] = float(np.median(alone))
                print("a long prompt's TTFT on an idle deployment:", round(out["long_prompt_alone_ttft_ms"]),
                      "ms", flush=True)
            for i, rate in enumerate(sweep):
                results, delta, duration, per_workload, runs = [], {}, 0.0, [], []
                for w in range(workloads):
                    # new prompts (same lengths) at each rate: a replay would hit the prefix cache
                    summary, d, res = run(bursty(n, seed=10 + i + 100 * w, long_shape=long_shape), rate,
                                          burstiness=burstiness)
                    results += res
                    runs.append(res)
                    if SERVER_LOGS:  # in the order sent, as the server's log lists where each went
                        with open(os.path.join(SERVER_LOGS, f"llumnix-{label}-{rate}-{w}.json"), "w") as f:
                            json.dump([dataclasses.asdict(r) for r in sorted(res, key=lambda r: r.start)], f)
                    duration += summary["duration_s"]
                    per_workload.append(summary["ttft"].get("p99_ms"))
                    for k, v in d.items():
                        delta[k] = delta.get(k, 0) + v
                summary = summarize(results, duration, SLO_TTFT, SLO_TPOT)
                short = [r.ttft for r in results
                         if r.ok and r.ttft is not None and r.output_tokens == SHORT_OUTPUT]
                done = delta.get("kestrel:migrations_total{outcome=\"done\"}", 0)
                row = dict(p50_ttft_ms=summary["ttft"].get("p50_ms"), p99_ttft_ms=summary["ttft"].get("p99_ms"),
                           short_p99_ttft_ms=1000 * float(np.percentile(short, 99)) if short else None,
                           p99_ttft_ms_per_workload=per_workload,
                           p50_tpot_ms=summary["tpot"].get("p50_ms"), p99_tpot_ms=summary["tpot"].get("p99_ms"),
                           mean_e2e_ms=summary["e2e_latency"].get("mean_ms"),
                           preemptions=delta.get("kestrel:num_preemptions_total", 0), migrations=done,
                           queued_moves=delta.get("kestrel:queued_migrations_total{outcome=\"done\"}", 0),
                           mean_downtime_ms=1000 * delta.get("kestrel:migration_downtime_seconds_sum", 0) / done
                           if done else None, **pause_in_steps(delta), failed=summary["failed"],
                           simulated_p99_ttft_ms=simulated_p99_ttft_ms(
                               fetch_step_profile(f"http://127.0.0.1:{PORT}"), runs,
                               "round-robin" if label == "round-robin" else "least-load"))
                out.setdefault(label, {})[rate] = row
                print(label, rate, json.dumps(row), flush=True)
        finally:
            stop_process(proc)
    baseline = out.get("round-robin", {})
    out["ratios"] = {f"{label} at {rate}: round-robin's / its {key}": baseline[rate][key] / row[key]
                     for label in ("least-load", "llumnix") for rate, row in out.get(label, {}).items()
                     for key in ("p99_ttft_ms", "short_p99_ttft_ms", "simulated_p99_ttft_ms")
                     if row.get(key) and baseline[rate].get(key)}
    if workloads > 1:  # the same ratio workload by workload
        for label in ("least-load", "llumnix"):
            for rate, row in out.get(label, {}).items():
                pairs = zip(baseline.get(rate, {}).get("p99_ttft_ms_per_workload", []),
                            row["p99_ttft_ms_per_workload"])
                out["ratios"][f"{label} at {rate}: round-robin's / its p99_ttft_ms, by workload"] = [
                    b / x for b, x in pairs if b and x]
    for name, value in out["ratios"].items():
        shown = ", ".join(f"{v:.2f}" for v in value) if isinstance(value, list) else f"{value:.2f}"
        print(f"  {name}: {shown}x", flush=True)
    return out


def part_cache(quick: bool) -> dict:
    work = shared_prefix_workload(4, 6 if quick else 12, 512, 32, 64)
    out = {}
    for label in ("round-robin", "cache-aware"):
        proc = serve(["--instances", "2", "--router", label], f"cache-{label}")
        try:
            summary, delta, _ = run(work, float("inf"))
        finally:
            stop_process(proc)
        queries = delta.get("kestrel:prefix_cache_queries_total", 0)
        out[label] = dict(hit_rate=delta.get("kestrel:prefix_cache_hits_total", 0) / queries if queries else None,
                          output_tok_s=summary["output_token_throughput"], failed=summary["failed"])
        print(label, json.dumps(out[label]), flush=True)
    return out


PAUSE_CONTEXTS = (256, 1024, 4096)


def part_pause(quick: bool) -> dict:
    """A migration's pause against the moved request's context length: the request moves back and forth between
    two instances of the embedded model (one core each), each decoding two other requests meanwhile. Each move's
    downtime (out of any batch: from leaving the source's to joining the destination's) beside the request's own
    time per output token before it (Migration.time_per_token), so the pause reads in decode steps."""
    from kestrel.cluster.client import ClusterClient, ClusterConfig
    from kestrel.config import EngineConfig
    from kestrel.engine.sampling_params import SamplingParams

    moves = 3 if quick else 8
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(100, 40000) for _ in range(n)]  # noqa: E731

    async def drain(q) -> None:
        while not isinstance(item := await q.get(), Exception) and not item.finished:
            pass

    async def moved(c: ClusterClient, context: int) -> list:
        """The completed moves (Migration) of a request with `context` tokens."""
        rid = f"moved-{context}"
        q = c.submit(rid, tokens(context), SamplingParams(max_tokens=60 * (moves + 1), temperature=0,
                                                          ignore_eos=True))
        n, out = 0, []
        try:
            while not isinstance(item := await q.get(), Exception) and not item.finished:
                n += len(item.token_ids)
                if len(out) < moves and n >= 60 * (len(out) + 1):
                    src = c._where[rid]
                    dst = next(h for h in c.handles if h is not src)
                    out.append(await asyncio.to_thread(c.migrate, rid, src, dst))
            if isinstance(item, Exception):
                raise item
        finally:
            c.release(rid, abort=False)
        return [m for m in out if m.outcome == "done" and m.downtime_steps is not None]

    async def main(c: ClusterClient) -> dict:
        background = SamplingParams(max_tokens=100000, temperature=0, ignore_eos=True)
        readers = [asyncio.ensure_future(drain(c.submit(f"background-{i}", tokens(64), background)))
                   for i in range(4)]  # round-robin: two on each instance
        out = {}
        for context in PAUSE_CONTEXTS:
            done = await moved(c, context)
            steps = [m.downtime_steps for m in done]
            out[context] = dict(moves=len(done), mean_downtime_ms=1e3 * float(np.mean([m.downtime for m in done])),
                                max_downtime_ms=1e3 * max(m.downtime for m in done),
                                mean_tpot_ms=1e3 * float(np.mean([m.time_per_token for m in done])),
                                mean_steps=float(np.mean(steps)), max_steps=max(steps))
            print("pause", context, json.dumps(out[context]), flush=True)
        for r in readers:
            r.cancel()
        return out

    c = ClusterClient(EngineConfig(max_total_tokens=16000, num_threads=1),
                      ClusterConfig(instances=2, router="round-robin", cpus_per_instance=1))
    try:
        return asyncio.run(main(c))
    finally:
        c.shutdown()


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from kestrel.model.loader import load_tokenizer, resolve_model_dir
    return load_tokenizer(resolve_model_dir(None))


def prompt_tokens(request: BenchRequest) -> int:
    """The prompt's length as the server will see it (the embedded model's chat template applied)."""
    from kestrel.model.loader import chat_template_ids
    return len(chat_template_ids(_tokenizer(), request.messages))


def check_goodput(used: list, cost, config, work, slo: tuple[float, float]) -> None:
    """Stop with what to change when the plan predicts no goodput for a deployment the part sends load to (there
    is no rate to measure it at), with what one long request alone gets on this machine for scale."""
    from kestrel.cluster.plan import colocated
    zero = [option.label for option in used if option.goodput <= 0]
    if not zero:
        return
    prompt, output = max(work.lengths)
    ttft, tpot = colocated(cost, config, [(0.0, prompt, output)], 1)[0]
    raise SystemExit(f"the plan predicts no goodput for {', '.join(zero)} under TTFT <= {slo[0]} s and TPOT <= "
                     f"{slo[1]} s: on this machine a {prompt}-token prompt alone takes {ttft:.2f} s to its first "
                     f"token and {tpot:.3f} s per output token ({cost.describe()}); pass looser --dis-slo-ttft / "
                     "--dis-slo-tpot")


def slo_summary(latencies: list[tuple[float, float]], slo: tuple[float, float]) -> dict:
    """Attainment of (TTFT, TPOT) pairs, which SLO the misses missed, and the TTFT and TPOT percentiles."""
    from kestrel.cluster.plan import attainment
    ttft, tpot = np.array(latencies, dtype=float).T
    return dict(attainment=attainment(latencies, *slo), ttft_misses=int((ttft > slo[0]).sum()),
                tpot_misses=int((tpot > slo[1]).sum()), p50_ttft_s=float(np.percentile(ttft, 50)),
                p90_ttft_s=float(np.percentile(ttft, 90)), p99_tpot_s=float(np.percentile(tpot, 99)))


def attainment_sweep(label: str, predicted: float, shares: list[float], num: int, slo: tuple[float, float],
                     predictions: dict[str, Callable[[list], list]]) -> dict:
    """The running deployment at `shares` of its `predicted` goodput, every rate on the same draw (the same
    lengths in the same places, arriving at the same scaled gaps; new words each time), so its attainment can only
    fall with the rate as the simulator's does; beside each, what each of `predictions` (the simulator under a
    cost model) gives the very arrivals and lengths that were sent. The measured goodput lies between the highest
    rate that met the target and the next."""
    rows = {}
    for i, share in enumerate(shares):
        rate = share * predicted
        summary, _, results = run(bursty(num, seed=1, text_seed=100 + i), rate, slo)
        sent = sorted((r.start, r.prompt_tokens, r.output_tokens) for r in results if r.ok)
        failed = [(float("inf"), float("inf"))] * (len(results) - len(sent))  # they miss both
        measured = [(r.ttft, r.tpot or 0.0) for r in results if r.ok] + failed
        row = dict(share_of_predicted_goodput=share, goodput=summary["goodput"], measured=slo_summary(measured, slo),
                   **{f"predicted_{name}": slo_summary(sim(sent) + failed, slo) for name, sim in predictions.items()})
        rows[rate] = row
        print(label, round(rate, 3), json.dumps(row), flush=True)
    met = [row["share_of_predicted_goodput"] for row in rows.values() if row["measured"]["attainment"] >= TARGET]
    above = [share for share in shares if share > max(met, default=0)]
    return dict(predicted_goodput=predicted, rates=rows,
                measured_goodput_share=[max(met, default=None), min(above, default=None)])


def part_distserve(quick: bool, slo: tuple[float, float] = (DIS_TTFT, DIS_TPOT)) -> dict:
    """Goodput colocated vs disaggregated at the split `kestrel plan` picks, each at shares of the goodput
    predicted for it. The plan's cost model is fitted to an idle engine's steps measured here (`measure`), then to
    the steps the colocated deployment took under a calibration load (its /step_profile, as `kestrel plan
    --profile-from`), which prices in what the deployment does between steps and the CPU its API process and
    clients take. That profile picks the split; the split's own deployment then takes a calibration load too, and
    its prefill and decode instances get a cost model each (as DistServe profiles each phase), which predicts the
    goodput it is measured against."""
    from kestrel.cluster.plan import (CostModel, Workload, colocated, disaggregated, goodput, measure, plan,
                                      role_costs)
    from kestrel.config import EngineConfig

    num = 24 if quick else 60
    requests = bursty(num, seed=1)
    work = Workload([(prompt_tokens(r), r.max_tokens) for r in requests])
    config = EngineConfig(num_threads=1)
    idle = measure(config)
    idle_options = plan(idle, config, work, *slo, max_instances=2, target=TARGET)
    print("plan (idle engine's profile):", [(o.label, round(o.goodput, 3)) for o in idle_options], flush=True)
    # calibration: the workload at the rate the idle profile says two colocated instances sustain
    calibration = next(o for o in idle_options if o.prefill == 0 and o.instances == 2)
    check_goodput([calibration], idle, config, work, slo)
    out = {"plan_idle_profile": [dict(label=o.label, goodput=o.goodput) for o in idle_options]}
    # attainment should fall through the target between 0.8x and 1.2x when the prediction is within 20%
    shares = [0.8, 1.0, 1.2] if not quick else [0.8, 1.2]
    proc = serve(["--instances", "2"], "distserve-colocated")
    try:
        run(bursty(num, seed=1, text_seed=50), calibration.goodput, slo)
        live = CostModel.from_profile(fetch_step_profile(f"http://127.0.0.1:{PORT}"), idle.transfer_per_token)
        options = plan(live, config, work, *slo, max_instances=2, target=TARGET)
        print("cost model, idle engine:", idle.describe(), "\ncost model, deployment:", live.describe(), flush=True)
        print("plan (deployment's profile):", [(o.label, round(o.goodput, 3)) for o in options], flush=True)
        out["plan"] = [dict(label=o.label, goodput=o.goodput) for o in options]
        out["cost_models"] = {"idle": dataclasses.asdict(idle), "deployment": dataclasses.asdict(live)}
        split = next(o for o in options if o.prefill > 0)
        pair = next(o for o in options if o.prefill == 0 and o.instances == 2)
        check_goodput([pair, split], live, config, work, slo)
        out["colocated"] = attainment_sweep("colocated", pair.goodput, shares, num, slo, {
            "deployment_profile": lambda sent: colocated(live, config, sent, 2),
            "idle_profile": lambda sent: colocated(idle, config, sent, 2)})

        stop_process(proc)
        proc = serve(["--prefill-instances", str(split.prefill), "--decode-instances", str(split.decode)],
                     f"distserve-{split.prefill}p{split.decode}d")
        run(bursty(num, seed=1, text_seed=51), split.goodput, slo)
        prefill_cost, decode_cost = role_costs(fetch_step_profile(f"http://127.0.0.1:{PORT}"),
                                               idle.transfer_per_token)
        print("cost model, prefill instances:", prefill_cost.describe(), "\ncost model, decode instances:",
              decode_cost.describe(), flush=True)
        out["cost_models"].update(prefill=dataclasses.asdict(prefill_cost), decode=dataclasses.asdict(decode_cost))

        def split_run(cost: CostModel, d_cost: CostModel, sent: list) -> list:
            return disaggregated(cost, config, sent, split.prefill, split.decode, decode_cost=d_cost)

        per_role = goodput(lambda rate: split_run(prefill_cost, decode_cost, work.arrivals(rate)), *slo, TARGET)
        print(f"{split.label}: predicted goodput {per_role:.3f} req/s with its own per-role profile "
              f"({split.goodput:.3f} with the colocated deployment's)", flush=True)
        out[split.label] = attainment_sweep(split.label, per_role, shares, num, slo, {
            "per_role_profile": lambda sent: split_run(prefill_cost, decode_cost, sent),
            "deployment_profile": lambda sent: split_run(live, live, sent),
            "idle_profile": lambda sent: split_run(idle, idle, sent)})
        out[split.label]["predicted_goodput_deployment_profile"] = split.goodput
    finally:
        stop_process(proc)
    live.save(os.path.join(tempfile.gettempdir(), "kestrel-cost.json"))
    return out


def plot(results: dict, path: str) -> None:
    """Latency percentiles against rate for each dispatch policy, and SLO attainment against rate (measured and
    predicted) for each deployment."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    panels = [("p50_ttft_ms", "P50 TTFT (ms)"), ("p99_ttft_ms", "P99 TTFT (ms)"), ("p99_tpot_ms", "P99 TPOT (ms)")]
    for ax, (key, name) in zip(axes, panels if "llumnix" in results else []):  # else empty panels, no legend
        for label, by_rate in results["llumnix"].items():
            if label not in dict(POLICIES):  # (the ratios, the floor)
                continue
            rates = sorted(by_rate)
            ax.plot(rates, [by_rate[r][key] or 0 for r in rates], "o-", label=label)
        ax.set_xlabel("requests/s")
        ax.set_ylabel(name)
        ax.set_title(f"{name} by dispatch policy")
        ax.legend(fontsize=7)
    if "distserve" in results:
        for label, deployment in results["distserve"].items():
            if not isinstance(deployment, dict) or "rates" not in deployment:  # (the plans, the cost models)
                continue
            by_rate = deployment["rates"]
            rates = sorted(by_rate)
            axes[3].plot(rates, [by_rate[r]["measured"]["attainment"] for r in rates], "o-",
                         label=f"{label} measured")
            first = by_rate[rates[0]]
            profile = next(k for k in ("predicted_per_role_profile", "predicted_deployment_profile") if k in first)
            axes[3].plot(rates, [by_rate[r][profile]["attainment"] for r in rates], "x--", label=f"{label} predicted")
        axes[3].set_xlabel("requests/s")
        axes[3].set_ylabel("SLO attainment")
        axes[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", default="llumnix,pause,cache,distserve")
    ap.add_argument("--llumnix-requests", type=int, default=0, help="requests per rate (default 80; --quick 30)")
    ap.add_argument("--llumnix-rates", default="", help="comma-separated rates (default 0.75,1,1.25,1.5)")
    ap.add_argument("--llumnix-workloads", type=int, default=1,
                    help="workloads per rate (different draws of the same lengths and bursts)")
    ap.add_argument("--llumnix-burstiness", type=float, default=BURSTINESS,
                    help="gamma shape of the arrivals: 1 is Poisson, lower is burstier (CV = 1/sqrt(shape))")
    ap.add_argument("--llumnix-pool", type=int, default=POOL_TOKENS, help="KV pool of each instance, in tokens")
    ap.add_argument("--llumnix-long", default=",".join(map(str, LONG_SHAPE)), metavar="PROMPT,OUTPUT",
                    help="tokens in and out of the long requests (one in five); the short ones: ~110 -> 40")
    ap.add_argument("--dis-slo-ttft", type=float, default=DIS_TTFT, help="DistServe part: the TTFT SLO, seconds")
    ap.add_argument("--dis-slo-tpot", type=float, default=DIS_TPOT, help="DistServe part: the TPOT SLO, seconds")
    ap.add_argument("--server-logs", metavar="DIR",
                    help="each server logs at debug level (every dispatch with the loads it saw, every migration) "
                         "to DIR/<part>-<deployment>.log; the Llumnix part's requests (start, TTFT, lengths) go "
                         "beside them, a JSON file per policy, rate and draw")
    args = ap.parse_args()
    global SERVER_LOGS
    SERVER_LOGS = args.server_logs
    results = {"cpu": cpu_name(), "args": vars(args)}
    parts = {"llumnix": functools.partial(part_llumnix, requests=args.llumnix_requests, rates=args.llumnix_rates,
                                          workloads=args.llumnix_workloads, burstiness=args.llumnix_burstiness,
                                          pool_tokens=args.llumnix_pool,
                                          long_shape=tuple(int(x) for x in args.llumnix_long.split(","))),
             "cache": part_cache, "pause": part_pause,
             "distserve": functools.partial(part_distserve, slo=(args.dis_slo_ttft, args.dis_slo_tpot))}
    for part in args.part.split(","):
        results[part] = parts[part](args.quick)
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    save_results(results, os.path.join(here, "cluster.json"))
    plot(results, os.path.join(here, "cluster.png"))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

"""`kestrel plan disaggregation`: choose the prefill:decode split by simulation (DistServe's placement search).

A cost model of one instance's step time, `step + per_token * tokens + per_row * logits rows + per_pair *
attention pairs` (fitted separately for the steps above the size where the engine switches to dense weight
copies), is fitted by non-negative least squares to step times measured on the real engine (or read from a saved
profile). The model-free simulator (kestrel/engine/simulator.py: the real scheduler, pool and radix cache) then
replays the workload's request lengths at Poisson arrival rates on each deployment: n colocated instances, or p
prefill instances handing each request after its first token to d decode instances, with new requests dispatched
as the deployment's router (kestrel.cluster.dispatch) would, on the load each simulated instance reports. Goodput
is the highest rate at which at least `attainment` of the requests meet both SLOs (TTFT, and TPOT over the rest of
the output); the split with the most goodput per instance wins. A disaggregated deployment's profile gives one
cost model per role (role_costs): its prefill instances' steps and its decode instances' steps are priced apart.
"""
from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from kestrel.bench.workloads import interarrival
from kestrel.cluster.dispatch import Dispatcher, Load
from kestrel.cluster.instance import instance_load
from kestrel.config import EngineConfig
from kestrel.engine.simulator import Simulator
from kestrel.engine.step_log import step_shape

RATE_STEPS = 12  # bisection steps of the goodput search


FEATURES = 4  # a step's cost: fixed + per token + per row that needs logits + per attention pair


def _nonnegative_fit(samples: list[tuple[int, int, int, float]]) -> list[float]:
    """[step, per token, per logits row, per attention pair] over (tokens, rows, pairs, seconds), by non-negative
    least squares on relative errors (a 20 ms decode step counts as much as a 2 s prefill)."""
    from scipy.optimize import nnls

    a = np.array([[1.0, t, r, p] for t, r, p, _ in samples])
    y = np.array([s for *_, s in samples])
    scale = a.max(axis=0)  # columns of 1 .. 1e6: comparable for the solver
    coef, _ = nnls(a / scale / y[:, None], np.ones(len(y)))
    return [float(x) for x in coef / scale]


@dataclass
class CostModel:
    """Seconds one step of an instance takes: `step + per_token * tokens + per_row * rows needing logits +
    per_pair * attention pairs` (the lm head and sampling run per logits row, and a prefill chunk's attention
    grows with its square), with its own coefficients (`large`) for steps of more than `split` tokens where the
    engine switches kernels there (a quantized model runs larger steps on dense copies: a different cost per
    token, not one line through both)."""

    step: float
    per_token: float
    per_row: float
    per_pair: float
    kv_tokens: int  # the instance's KV pool
    transfer_per_token: float = 0.0  # seconds to move one token's K/V from a prefill to a decode instance
    split: int = 0  # 0: one set of coefficients for every step
    large: Optional[list[float]] = None  # [step, per_token, per_row, per_pair] of steps of more than `split` tokens

    @classmethod
    def fit(cls, samples: list[tuple[int, int, int, float]], kv_tokens: int, transfer_per_token: float = 0.0,
            split: int = 0):
        """Fit over (tokens, rows, pairs, seconds) samples; with a split, one fit on each side of it (when each
        side has at least three step shapes, else one fit for all)."""
        small = [x for x in samples if x[0] <= split]
        large = [x for x in samples if x[0] > split]
        if split and len({x[:2] for x in small}) >= 3 and len({x[:2] for x in large}) >= 3:
            return cls(*_nonnegative_fit(small), kv_tokens, transfer_per_token, split, _nonnegative_fit(large))
        return cls(*_nonnegative_fit(samples), kv_tokens, transfer_per_token)

    @classmethod
    def from_profile(cls, profile: dict, transfer_per_token: float = 0.0, role: Optional[str] = None
                     ) -> "CostModel":
        """Fit to a running server's steps (its `GET /step_profile`: each instance's recent steps, timed start to
        start, so what the deployment does between steps and the machine's other load are priced in); with a
        role ("prefill", "decode"), to the steps of that role's instances alone."""
        instances = [i for i in profile.get("instances") or [] if role is None or i.get("role", "both") == role]
        samples = [tuple(x) for i in instances for x in i["samples"]]
        if len({tuple(x[:2]) for x in samples}) < FEATURES:
            whose = f"{role} instances'" if role else "server's"
            raise ValueError(f"the {whose} step profile holds {len(samples)} steps of too few shapes to fit a cost "
                             "model; send it some load first (kestrel bench)")
        return cls.fit(samples, min(i["kv_tokens"] for i in instances), transfer_per_token,
                       instances[0].get("dense_split", 0))

    def seconds(self, tokens: int, rows: int, pairs: int) -> float:
        step, per_token, per_row, per_pair = (self.large if self.large is not None and tokens > self.split
                                              else (self.step, self.per_token, self.per_row, self.per_pair))
        return step + per_token * tokens + per_row * rows + per_pair * pairs

    def describe(self) -> str:
        def line(step: float, per_token: float, per_row: float, per_pair: float) -> str:
            return (f"{step * 1e3:.2f} ms + {per_token * 1e3:.3f} ms/token + {per_row * 1e3:.3f} ms/logits row + "
                    f"{per_pair * 1e9:.1f} ns/attention pair")

        text = line(self.step, self.per_token, self.per_row, self.per_pair)
        if self.large is not None:
            text = f"steps of up to {self.split} tokens {text}; larger steps {line(*self.large)}"
        return f"{text}; KV pool {self.kv_tokens} tokens"

    def save(self, path: str, roles: Optional[tuple["CostModel", "CostModel"]] = None) -> None:
        """Write it as JSON, with a disaggregated deployment's (prefill, decode) models (role_costs) beside it."""
        data = dataclasses.asdict(self)
        if roles is not None:
            data["roles"] = {"prefill": dataclasses.asdict(roles[0]), "decode": dataclasses.asdict(roles[1])}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    @classmethod
    def load(cls, path: str) -> "CostModel":
        return cls.load_with_roles(path)[0]

    @classmethod
    def load_with_roles(cls, path: str) -> tuple["CostModel", Optional[tuple["CostModel", "CostModel"]]]:
        """What save wrote: the model, and the (prefill, decode) models where it saved them (else None)."""
        with open(path) as f:
            data = json.load(f)
        if "per_pair" not in data:
            raise ValueError(f"{path}: a profile from an older Kestrel (its cost model has no per-row and "
                             "per-attention-pair terms); measure again with --save-profile")
        roles = data.pop("roles", None)
        return cls(**data), None if roles is None else (cls(**roles["prefill"]), cls(**roles["decode"]))


def measure(config: EngineConfig, progress: bool = True) -> CostModel:
    """Time the real engine's steps: prefills of 16..1024 tokens and decode steps of 1..32 rows at contexts of
    64..1024 tokens, and fit the cost model to them."""
    import torch
    from tqdm import tqdm

    from kestrel.engine.engine import Engine
    from kestrel.engine.sampling_params import SamplingParams

    engine = Engine(config=dataclasses.replace(config, disable_radix_cache=True))
    rng = random.Random(0)
    prompt = lambda n: [rng.randrange(100, engine.vocab_size - 100) for _ in range(n)]  # noqa: E731
    limit = min(1024, engine.config.chunked_prefill_size, engine.pool.size // 4)
    prefills = [t for t in (4, 16, 64, 128, 256, 512, 1024) if t <= limit]
    decodes = [(b, c) for b in (1, 4, 16, 32, 48) for c in (64, 256, 1024)
               if b * c <= 8192 and b * (c + 8) < engine.pool.size and c + 8 < engine.context_length]
    samples: list[tuple[int, int, int, float]] = []
    bar = tqdm(total=len(prefills) + len(decodes), desc="profiling steps", unit="shape", disable=not progress)
    for t in prefills:
        for _ in range(3):
            rid = engine.add_request(prompt(t), SamplingParams(max_tokens=1))
            start = time.perf_counter()
            engine.step()
            samples.append((*step_shape(t, [], [(0, t, True)]), time.perf_counter() - start))
            engine.abort(rid)
            engine.get_output(rid, pop=True)
        bar.update()
    for b, c in decodes:
        rids = [engine.add_request(prompt(c), SamplingParams(max_tokens=8, ignore_eos=True)) for _ in range(b)]
        while any(len(engine._requests[r][0].output_ids) == 0 for r in rids):
            engine.step()
        for _ in range(4):
            start = time.perf_counter()
            engine.step()
            samples.append((*step_shape(b, [c + 2] * b, []), time.perf_counter() - start))
        for r in rids:
            engine.abort(r)
            engine.get_output(r, pop=True)
        bar.update()
    bar.close()
    # moving K/V between instances: the handoff's copy out and in, per token
    kv = engine.pool.caches
    slots = list(range(1, min(1024, engine.pool.size)))
    idx = torch.tensor(slots)
    start = time.perf_counter()
    for _ in range(3):
        for k, v in kv:
            k.index_copy_(0, idx, k.index_select(0, idx))
            v.index_copy_(0, idx, v.index_select(0, idx))
    per_token = (time.perf_counter() - start) / 3 / len(slots)
    # a quantized model with dense copies switches kernels above dense_split tokens: one fit a side
    return CostModel.fit(samples, engine.pool.size, per_token, engine.model.dense_split)


def role_costs(profile: dict, transfer_per_token: float = 0.0) -> Optional[tuple[CostModel, CostModel]]:
    """(prefill, decode) cost models, each fitted to its own role's steps, when the profile is a disaggregated
    deployment's (DistServe profiles each phase apart: a decode instance's steps hold no prefill chunks, so a
    colocated fit, where chunks and decodes share steps, misprices them); None for a colocated one."""
    roles = {i.get("role", "both") for i in profile.get("instances") or []}
    if not {"prefill", "decode"} <= roles:
        return None
    return (CostModel.from_profile(profile, transfer_per_token, "prefill"),
            CostModel.from_profile(profile, transfer_per_token, "decode"))


def fetch_step_profile(url: str, api_key: Optional[str] = None) -> dict:
    """A running server's GET /step_profile."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(url.rstrip("/").removesuffix("/v1") + "/step_profile", headers=headers, timeout=60)
    r.raise_for_status()
    return r.json()


@dataclass
class Workload:
    """Request lengths (prompt tokens, output tokens) and the rate they were recorded at."""

    lengths: list[tuple[int, int]]
    rate: Optional[float] = None  # requests per second in the trace, when it has arrival times

    @classmethod
    def load(cls, path: str) -> "Workload":
        """A JSON list (or {"requests": [...]}) of objects with prompt_tokens / input_len and output_tokens /
        output_len, and optionally arrival (seconds)."""
        with open(path) as f:
            data = json.load(f)
        rows = data["requests"] if isinstance(data, dict) else data
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{path}: expected a non-empty list of requests")
        lengths, arrivals = [], []
        for i, r in enumerate(rows):
            p = r.get("prompt_tokens", r.get("input_len", r.get("prompt_len")))
            o = r.get("output_tokens", r.get("output_len", r.get("max_tokens")))
            if not isinstance(p, int) or not isinstance(o, int) or p < 1 or o < 1:
                raise ValueError(f"{path}: request {i} needs prompt_tokens >= 1 and output_tokens >= 1, got {r}")
            lengths.append((p, o))
            if "arrival" in r:
                arrivals.append(float(r["arrival"]))
        span = max(arrivals) - min(arrivals) if len(arrivals) == len(rows) and len(rows) > 1 else 0.0
        return cls(lengths, (len(rows) - 1) / span if span > 0 else None)

    def arrivals(self, rate: float, seed: int = 0, burstiness: float = 1.0) -> list[tuple[float, int, int]]:
        """The requests at `rate` per second (Poisson arrivals, or gamma gaps of shape `burstiness` as in
        `kestrel bench --burstiness`): (time, prompt tokens, output tokens)."""
        rng = random.Random(seed)
        t, out = 0.0, []
        for p, o in self.lengths:  # the first at 0, then the gaps: as kestrel bench sends them from the same seed
            out.append((t, p, o))
            t += interarrival(rng, rate, burstiness)
        return out


def _prompt(i: int, n: int) -> list[int]:
    return [(i * 7919 + j) % 30000 + 1 for j in range(n)]  # distinct per request: no accidental prefix hits


def _simulator(cost: CostModel, config: EngineConfig, context: int, name: str, hand_off: bool = False) -> Simulator:
    cfg = dataclasses.replace(config, max_total_tokens=cost.kv_tokens)
    return Simulator(cfg, context, cost.step, cost.per_token, hand_off=hand_off, cost=cost.seconds, name=name)


def _dispatched(sims: list[Simulator], requests: list, router: str) -> None:
    """Replay the requests on the instances in simulated time, each sent on arrival where the router's policy
    (kestrel.cluster.dispatch, on the load each instance would report then) sends it, then run all to the end."""
    dispatcher = Dispatcher(router)
    for i, (t, p, o) in enumerate(requests):
        # every step that starts before the arrival runs first (the instance furthest behind first), as the
        # instances run side by side; the request then waits for the step its instance is in to end
        while True:
            busy = [s for s in sims if s.has_work() and s.now < t]
            if not busy:
                break
            min(busy, key=lambda s: s.now).step()
        ids = _prompt(i, p)
        sim = dispatcher.choose(sims, {s.name: Load(report=instance_load(s)) for s in sims}, ids)
        if not sim.has_work():
            sim.now = max(sim.now, t)
        sim.add(ids, o).arrival = t
    for sim in sims:
        while sim.has_work():
            sim.step()


def colocated(cost: CostModel, config: EngineConfig, requests: list, instances: int,
              router: str = "least-load") -> list[tuple[float, float]]:
    """(TTFT, TPOT) of each request on `instances` colocated instances behind `router`."""
    context = max(p + o for _, p, o in requests) + 1
    sims = [_simulator(cost, config, context, f"instance-{k}") for k in range(instances)]
    _dispatched(sims, requests, router)
    return [_latencies(req.arrival, req.first_token, req.finish, req.seq.params.max_tokens)
            for sim in sims for req in sim.requests]


def disaggregated(cost: CostModel, config: EngineConfig, requests: list, prefill: int, decode: int,
                  router: str = "least-load", decode_cost: Optional[CostModel] = None) -> list[tuple[float, float]]:
    """(TTFT, TPOT) of each request on `prefill` prefill instances behind `router`, handing over to `decode`
    decode instances; `cost` prices the prefill instances' steps, `decode_cost` (default: the same) the decode
    instances'."""
    decode_cost = decode_cost or cost
    context = max(p + o for _, p, o in requests) + 1
    sims = [_simulator(cost, config, context, f"prefill-{k}", hand_off=True) for k in range(prefill)]
    _dispatched(sims, requests, router)
    out = []
    handed: list = []
    for sim in sims:
        for req in sim.requests:
            if req.finish is not None:  # one output token: done at the prefill instance
                out.append(_latencies(req.arrival, req.first_token, req.finish, 1))
        handed += sim.handed_off
    handed.sort(key=lambda r: r.first_token)
    for k in range(decode):
        sim = _simulator(decode_cost, config, context, f"decode-{k}")
        mine = [r for i, r in enumerate(handed) if i % decode == k]
        events = [(r.first_token + cost.transfer_per_token * len(r.seq.prompt_ids), r) for r in mine]
        adopted, i = [], 0
        while i < len(events) or sim.has_work():
            while i < len(events) and events[i][0] <= sim.now:
                r = events[i][1]
                try:
                    adopted.append((r, sim.adopt(r.seq.prompt_ids, 1, r.seq.params.max_tokens, r.arrival)))
                except MemoryError:  # no room yet: it waits for the next step's frees
                    if sim.has_work():
                        break
                    out.append((float("inf"), float("inf")))  # it can never fit: it misses its SLOs
                i += 1
            if sim.has_work():
                sim.step()
            elif i < len(events):
                sim.now = max(sim.now, events[i][0])
        for first, req in adopted:
            out.append(_latencies(first.arrival, first.first_token, req.finish, req.seq.params.max_tokens))
    return out


def _latencies(arrival: float, first: float, finish: float, outputs: int) -> tuple[float, float]:
    return first - arrival, (finish - first) / (outputs - 1) if outputs > 1 else 0.0


def attainment(latencies: list[tuple[float, float]], slo_ttft: float, slo_tpot: float) -> float:
    return sum(t <= slo_ttft and p <= slo_tpot for t, p in latencies) / max(1, len(latencies))


def goodput(run: Callable[[float], list], slo_ttft: float, slo_tpot: float, target: float = 0.9) -> float:
    """The highest arrival rate (requests/s) at which `target` of the requests meet both SLOs."""
    ok = lambda rate: attainment(run(rate), slo_ttft, slo_tpot) >= target  # noqa: E731
    lo, hi = 0.0, 0.5
    while ok(hi):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return hi
    for _ in range(RATE_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@dataclass
class Option:
    prefill: int  # 0: colocated
    decode: int
    instances: int
    goodput: float  # requests/s of the whole deployment

    @property
    def per_instance(self) -> float:
        return self.goodput / self.instances

    @property
    def label(self) -> str:
        return f"{self.instances} colocated" if self.prefill == 0 else f"{self.prefill} prefill + {self.decode} decode"


def plan(cost: CostModel, config: EngineConfig, workload: Workload, slo_ttft: float, slo_tpot: float,
         max_instances: int = 4, target: float = 0.9, progress: bool = True, router: str = "least-load",
         split_costs: Optional[tuple[CostModel, CostModel]] = None) -> list[Option]:
    """Goodput of every deployment of up to `max_instances` (colocated, and each prefill:decode split) with
    `router` dispatching new requests; best first. `split_costs`: (prefill, decode) cost models for the splits'
    instances (role_costs), where `cost` then prices colocated instances only."""
    from tqdm import tqdm

    prefill_cost, decode_cost = split_costs or (cost, cost)

    shapes = [(0, n) for n in range(1, max_instances + 1)]
    shapes += [(p, n - p) for n in range(2, max_instances + 1) for p in range(1, n)]
    options = []
    for p, d in tqdm(shapes, desc="simulating deployments", disable=not progress):
        if p == 0:
            run = lambda rate, d=d: colocated(cost, config, workload.arrivals(rate), d, router)  # noqa: E731
            options.append(Option(0, d, d, goodput(run, slo_ttft, slo_tpot, target)))
        else:
            run = lambda rate, p=p, d=d: disaggregated(prefill_cost, config, workload.arrivals(rate),  # noqa: E731
                                                       p, d, router, decode_cost)
            options.append(Option(p, d, p + d, goodput(run, slo_ttft, slo_tpot, target)))
    return sorted(options, key=lambda o: (-o.per_instance, o.instances))

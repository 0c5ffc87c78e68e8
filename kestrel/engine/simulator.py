"""The real scheduler, KV pool, radix cache and policy driven by a model-free runner.

Each step costs `step_cost + token_cost * tokens + context_cost * (attention pairs of the step, step_shape)`
simulated seconds (or what a given cost function says of the step's shape) and every sequence that reaches the end of its pending tokens "samples" a fixed token.
Scheduling decisions are exactly the engine's, so policies can be studied and tested deterministically without
weights (and fast).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from kestrel.cache.kv_pool import KVPool, ReqToTokenTable
from kestrel.cache.radix_cache import RadixCache
from kestrel.config import EngineConfig
from kestrel.engine.clients import ANONYMOUS
from kestrel.engine.policy import make_policy
from kestrel.engine.request import Sequence
from kestrel.engine.sampling_params import SamplingParams
from kestrel.engine.scheduler import ScheduledBatch, Scheduler
from kestrel.engine.step_log import batch_shape


@dataclass
class SimulatedRequest:
    seq: Sequence
    arrival: float  # simulated seconds
    first_token: Optional[float] = None
    finish: Optional[float] = None


@dataclass
class Simulator:
    config: EngineConfig = field(default_factory=lambda: EngineConfig(max_total_tokens=4096))
    context_length: int = 4096
    step_cost: float = 0.01  # seconds per step
    token_cost: float = 0.0005  # seconds per token in the step
    output_token: int = 7  # what every "sample" produces
    context_cost: float = 0.0  # seconds per attention pair (a decode row attends to its whole context)
    hand_off: bool = False  # a prefill instance: a request leaves once it has its first token (`handed_off`)
    # seconds of a step of step_shape's (tokens, logits rows, attention pairs) when the three costs above are not
    # the whole story (kestrel.cluster.plan.CostModel.seconds); step_cost still prices an idle step
    cost: Optional[Callable[[int, int, int], float]] = None
    name: str = "simulated"  # the instance it stands for, when several run side by side (kestrel.cluster.plan)

    def __post_init__(self) -> None:
        cfg = self.config
        cpu = torch.device("cpu")
        self.pool = KVPool(cfg.max_total_tokens or 4096, 1, 1, 1, torch.float32, cpu)
        self.table = ReqToTokenTable(cfg.max_running_requests, self.context_length + 1, cpu)
        self.cache = RadixCache(self.pool, enabled=not cfg.disable_radix_cache)
        self.scheduler = Scheduler(cfg, self.pool, self.table, self.cache, make_policy(cfg))
        self.now = 0.0
        self.scheduler.clock = lambda: self.now
        self.requests: list[SimulatedRequest] = []
        self._active: dict[int, SimulatedRequest] = {}  # id(seq) -> request, until it finishes
        self._ids = itertools.count()
        self.handed_off: list[SimulatedRequest] = []  # with hand_off: in the order their first token came

    def add(self, prompt_ids: list[int], max_tokens: int, client: str = ANONYMOUS, priority: int = 0) -> SimulatedRequest:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        seq = Sequence(f"sim-{next(self._ids)}", 0, list(prompt_ids), params, arrival_time=self.now,
                       client=client, priority=priority)
        req = SimulatedRequest(seq, self.now)
        self.requests.append(req)
        self._active[id(seq)] = req
        self.scheduler.add(seq)
        return req

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def adopt(self, prompt_ids: list[int], output: int, max_tokens: int, arrival: float) -> SimulatedRequest:
        """A request handed over with its K/V (prompt and `output` tokens generated elsewhere): it joins the
        running batch at once, its slots taken as a migration's reservation takes them."""
        s = self.scheduler
        req = self.add(prompt_ids, max_tokens)
        seq = req.seq
        s.waiting.remove(seq)
        s.clients.queued(seq.client, -1)
        seq.output_ids = [self.output_token] * output
        n = seq.total_len - 1
        if not s._ensure_free(n) or not s._room_for_another():
            raise MemoryError("no room for a handed-over request")
        s.adopt(seq, self.pool.alloc(n))
        seq.admitted_once = True
        req.arrival = arrival
        return req

    def step(self) -> ScheduledBatch:
        """One scheduling step; advances the simulated clock by its cost (or by step_cost when idle)."""
        batch = self.scheduler.schedule()
        tokens, rows, pairs = batch_shape(batch)
        if self.cost is not None and not batch.empty:
            self.now += self.cost(tokens, rows, pairs)
        else:
            self.now += self.step_cost + self.token_cost * tokens + self.context_cost * pairs
        if batch.empty:
            return batch
        sampling = self.scheduler.advance(batch)
        self.scheduler.cache_prefilled(batch)
        for seq in sampling:
            seq.output_ids.append(self.output_token)
            req = self._active[id(seq)]
            if req.first_token is None:
                req.first_token = self.now
            if len(seq.output_ids) >= seq.params.max_tokens:
                seq.finish_reason = "length"
                req.finish = self.now
                self.scheduler.finish(seq)
                del self._active[id(seq)]
            elif self.hand_off:  # its K/V goes to a decode instance; the prompt stays cached here
                self.scheduler.finish(seq)
                del self._active[id(seq)]
                self.handed_off.append(req)
        return batch

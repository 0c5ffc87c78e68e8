"""The real scheduler, KV pool, radix cache and policy driven by a model-free runner.

Each step costs `step_cost + token_cost * tokens` simulated seconds and every sequence that reaches the
end of its pending tokens "samples" a fixed token. Scheduling decisions are exactly the engine's, so
policies can be studied and tested deterministically without weights (and fast).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional

import torch

from kestrel.cache.kv_pool import KVPool, ReqToTokenTable
from kestrel.cache.radix_cache import RadixCache
from kestrel.config import EngineConfig
from kestrel.engine.clients import ANONYMOUS
from kestrel.engine.policy import make_policy
from kestrel.engine.request import Sequence
from kestrel.engine.sampling_params import SamplingParams
from kestrel.engine.scheduler import ScheduledBatch, Scheduler


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

    def step(self) -> ScheduledBatch:
        """One scheduling step; advances the simulated clock by its cost (or by step_cost when idle)."""
        batch = self.scheduler.schedule()
        self.now += self.step_cost + self.token_cost * batch.num_tokens
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
        return batch

"""Where a new request goes: round-robin, least load (Llumnix's freeness) or the longest cached prefix (SGLang's
router), and the load measure Llumnix's migration policy balances (virtual usage: least-load ranks by it too).

Each instance reports its load after every step (kestrel.server.engine_process.engine_load); between reports the
router counts what it has dispatched there itself, so a burst does not all land on the instance that looked
idle a moment ago.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

ROUTERS = ("round-robin", "least-load", "cache-aware", "llumnix")  # llumnix: least-load + migration


def check_router(policy: str) -> None:
    if policy not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {policy!r}")
PRIORITY_HEADROOM = 0.25  # share of an instance's KV a high-priority request (priority < 0) keeps free around it
BLOCK = 16  # tokens per block of the cache-aware router's prefix index
INDEX_BLOCKS = 1 << 16  # blocks remembered per instance (least recently routed forgotten first)
CACHE_THRESHOLD = 0.5  # SGLang's cache_threshold: follow the cache when it holds at least this share of the prompt
BALANCE_ABS = 32  # ... unless that instance has this many more requests than the least loaded one


@dataclass
class Load:
    """What the router knows of one instance's load: its last report, plus what was sent that it had not
    received when it reported (the report counts what it received), plus moves not yet reported."""

    report: dict = field(default_factory=dict)
    sent_requests_total: int = 0
    sent_tokens_total: int = 0
    moved_tokens: int = 0  # K/V tokens migrated in (+) or out (-) since the last report

    def update(self, report: dict) -> None:
        self.report = report
        self.moved_tokens = 0

    def sent(self, tokens: int) -> None:
        self.sent_requests_total += 1
        self.sent_tokens_total += tokens

    @property
    def sent_requests(self) -> int:
        return self.sent_requests_total - self.report.get("received", 0)

    @property
    def sent_tokens(self) -> int:
        return self.sent_tokens_total - self.report.get("received_tokens", 0) + self.moved_tokens

    @property
    def size(self) -> int:
        return max(1, self.report.get("kv_size", 1))

    @property
    def requests(self) -> int:
        r = self.report
        return r.get("running", 0) + r.get("waiting", 0) + self.sent_requests

    @property
    def virtual_usage(self) -> float:
        """Llumnix's virtual usage: KV held, plus the demand of queued requests and of prompts still in their
        chunked prefill, plus headroom kept free for high-priority requests, so balancing it also makes room where
        important work runs."""
        r = self.report
        return (r.get("kv_used", 0) + r.get("waiting_tokens", 0) + r.get("prefill_tokens", 0) + self.sent_tokens
                + PRIORITY_HEADROOM * self.size * r.get("high_priority", 0))

    @property
    def usage(self) -> float:
        """Virtual usage as a share of the pool (above 1 when queued demand exceeds memory)."""
        return self.virtual_usage / self.size


class PrefixIndex:
    """The prompts routed to one instance, as hashes of their block-aligned prefixes (LRU-bounded): an
    approximation of its radix cache that needs no round trip."""

    def __init__(self, capacity: int = INDEX_BLOCKS):
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    @staticmethod
    def _keys(ids: list[int], namespace) -> list[int]:
        keys, h = [], hash(("ns", namespace))
        for i in range(BLOCK, len(ids) + 1, BLOCK):
            h = hash((h, tuple(ids[i - BLOCK:i])))
            keys.append(h)
        return keys

    def match(self, ids: list[int], namespace=None) -> int:
        n = 0
        for k in self._keys(ids, namespace):
            if k not in self.blocks:
                break
            n += BLOCK
        return n

    def insert(self, ids: list[int], namespace=None) -> None:
        for k in self._keys(ids, namespace):
            self.blocks[k] = None
            self.blocks.move_to_end(k)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


class Dispatcher:
    """Picks an instance for each new request under one of ROUTERS (llumnix dispatches by least load)."""

    def __init__(self, policy: str):
        check_router(policy)
        self.policy = policy
        self._turn = itertools.count()
        self.indexes: dict[str, PrefixIndex] = {}

    def choose(self, candidates: list, loads: dict[str, Load], ids: list[int], namespace=None):
        """`candidates`: objects with a `.name`, all alive; returns one of them."""
        if self.policy == "round-robin":
            return candidates[next(self._turn) % len(candidates)]
        if self.policy == "cache-aware":
            chosen = self._by_cache(candidates, loads, ids, namespace)
            self.indexes.setdefault(chosen.name, PrefixIndex()).insert(ids, namespace)
            return chosen
        return least_loaded(candidates, loads)

    def _by_cache(self, candidates, loads, ids, namespace):
        fewest = min(loads[c.name].requests for c in candidates)
        best, matched = None, 0
        for c in candidates:
            m = self.indexes.get(c.name, PrefixIndex()).match(ids, namespace)
            if m > matched and loads[c.name].requests - fewest < BALANCE_ABS:
                best, matched = c, m
        if best is not None and matched >= CACHE_THRESHOLD * len(ids):
            return best
        return least_loaded(candidates, loads)

    def forget(self, name: str) -> None:
        """An instance restarted empty: its cache is gone."""
        self.indexes.pop(name, None)


def least_loaded(candidates: list, loads: dict[str, Load]):
    """The candidate with the lowest virtual usage (ties: the fewest requests, then the first).

    Llumnix ranks by freeness, free memory per request in the batch. Measured on CPU (benchmarks/bench_cluster.py,
    long and short requests), that sends short requests to the instance already busy with a long one (its one
    request leaves much memory "per request"), whose compute they then wait for: P99 TTFT 3x worse than
    round-robin. Usage, which counts tokens held and queued, spreads both memory and compute."""
    return min(candidates, key=lambda c: (loads[c.name].usage, loads[c.name].requests))


def migration_pair(candidates: list, loads: dict[str, Load], gap: float) -> Optional[tuple]:
    """(source, destination) when the most and least used instances differ by more than `gap` (a share of the
    pool) and moving a request can help: the source has queued work or more than one running request."""
    if len(candidates) < 2:
        return None
    src = max(candidates, key=lambda c: loads[c.name].usage)
    dst = min(candidates, key=lambda c: loads[c.name].usage)
    r = loads[src.name].report
    if loads[src.name].usage - loads[dst.name].usage <= gap:
        return None
    if r.get("running", 0) < 1 or (r.get("waiting", 0) == 0 and r.get("running", 0) < 2):
        return None
    return src, dst


def pick_move(options: list[tuple], gap_tokens: float, headroom: float = 0.0,
              room: float = float("inf")) -> Optional[tuple]:
    """The request the migration policy moves from the source's candidates (Handoffs.candidates(queued=True):
    (id, tokens, priority, queued)), or None, with the load the move shifts: its tokens, plus `headroom` (the
    tokens Load.virtual_usage keeps around it) for a high-priority one. A move must shrink the imbalance: moving
    load t changes the gap g to g - 2t, so t < g, and the same request never moves straight back. And its tokens
    must fit in the destination's `room` (its pool less its virtual usage, which counts its own queue): a queued
    request that would wait there too only moves its wait, and the queue behind it with it; a running one joins
    the destination's batch at once, ahead of its queue, which would then wait for memory as the source's did
    (seen in a debug log: a long request moved onto an instance where a long prompt waited; that prompt started
    5.4 s later, and on the other instance). A queued request goes first, the first come: it moves with nothing
    to copy and no pause, and starts there now. Otherwise a running one, which makes room where the queue waits
    (Llumnix's de-fragmentation): low priority first (high-priority requests keep their place), then the
    cheapest to copy."""
    shifted = [(o, o[1] + (headroom if o[2] < 0 else 0.0)) for o in options]
    fits = [(o, load) for o, load in shifted if load < gap_tokens and o[1] <= room]
    queued = [(o, load) for o, load in fits if o[3]]
    if queued:
        return queued[0]
    running = [(o, load) for o, load in fits if not o[3]]
    return min(running, key=lambda f: (f[0][2] < 0, f[0][1])) if running else None

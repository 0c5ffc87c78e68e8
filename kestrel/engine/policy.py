"""Scheduling policies: the order in which waiting sequences are considered for admission.

A policy sees the waiting queue and the radix cache and returns an order; it is also told how many
tokens each sequence had processed in a step (`account`), the hook a fair-share policy needs.
"""
from __future__ import annotations

from kestrel.cache.radix_cache import RadixCache
from kestrel.engine.request import Sequence


class SchedulePolicy:
    name = "base"

    def order(self, waiting: list[Sequence], cache: RadixCache) -> list[Sequence]:
        raise NotImplementedError

    def account(self, seq: Sequence, prefill_tokens: int, decode_tokens: int) -> None:
        """Called after every step for every sequence that processed tokens in it."""


class FCFSPolicy(SchedulePolicy):
    """First come, first served (by arrival time; preempted sequences keep their place)."""

    name = "fcfs"

    def order(self, waiting, cache):
        return sorted(waiting, key=lambda s: (s.arrival_time, s.request_id, s.index))


class LPMPolicy(SchedulePolicy):
    """Longest prefix match first: requests that reuse the most cached tokens go first, so the
    shared prefix is used while it is still in the cache (SGLang's cache-aware scheduling)."""

    name = "lpm"
    max_queue_for_matching = 128  # beyond this, matching every waiting request costs more than it saves

    def order(self, waiting, cache):
        if len(waiting) > self.max_queue_for_matching or not cache.enabled:
            return FCFSPolicy.order(self, waiting, cache)

        def matched(s: Sequence) -> int:
            slots, _ = cache.match_prefix(s.all_ids[:-1])
            return len(slots)

        scored = [(-matched(s), s.arrival_time, s.request_id, s.index, s) for s in waiting]
        scored.sort(key=lambda t: t[:4])
        return [t[-1] for t in scored]


def make_policy(name: str) -> SchedulePolicy:
    policies = {"fcfs": FCFSPolicy, "lpm": LPMPolicy}
    if name not in policies:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(policies)}")
    return policies[name]()

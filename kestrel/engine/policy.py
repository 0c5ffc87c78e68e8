"""Scheduling policies: the order in which waiting sequences are considered for admission.

A policy sees the waiting queue and the radix cache and returns an order. The scheduler also tells it
when a sequence is queued (`on_enqueue`) and admitted (`on_admit`), how many tokens each sequence
processed in a step (`account`), and asks it which running sequence to preempt (`victim`): the hooks a
fair-share policy needs.
"""
from __future__ import annotations

import heapq
from typing import Optional

from kestrel.cache.radix_cache import RadixCache
from kestrel.config import EngineConfig
from kestrel.engine.clients import ServiceCost
from kestrel.engine.request import Sequence


def arrival_key(s: Sequence):
    return (s.arrival_time, s.request_id, s.index)


def priority_key(s: Sequence):
    """vLLM's convention: a lower priority value is served first; ties by arrival."""
    return (s.priority, s.arrival_time, s.request_id, s.index)


class SchedulePolicy:
    name = "base"

    def order(self, waiting: list[Sequence], cache: RadixCache) -> list[Sequence]:
        raise NotImplementedError

    def on_enqueue(self, seq: Sequence, waiting: list[Sequence]) -> None:
        """A new sequence arrives; `waiting` is the queue before it joins (retracted ones don't come here)."""

    def on_admit(self, seq: Sequence) -> None:
        """seq left the waiting queue for the running batch."""

    def account(self, seq: Sequence, input_tokens: int, output_tokens: int) -> None:
        """After every step, for every sequence that processed tokens in it."""

    def victim(self, running: list[Sequence]) -> Sequence:
        """The running sequence to preempt when memory runs out (running is in admission order)."""
        return running[-1]

    def forget(self, client: str) -> None:
        """The client has been idle long enough to drop whatever the policy keeps about it."""

    def credit(self, client: str, service: float) -> None:
        """The client received `service` on another instance of the same deployment (kestrel.cluster)."""

    def preempt_for(self, waiting: list[Sequence], running: list[Sequence], fits) -> Optional[Sequence]:
        """A running sequence to give way to a waiting one that cannot be admitted (`fits(seq)` is
        False), or None. Only the priority policy preempts for waiting work."""
        return None


class FCFSPolicy(SchedulePolicy):
    """First come, first served (by arrival time; preempted sequences keep their place)."""

    name = "fcfs"

    def order(self, waiting, cache):
        return sorted(waiting, key=arrival_key)


class LPMPolicy(SchedulePolicy):
    """Longest prefix match first: requests that reuse the most cached tokens go first, so the
    shared prefix is used while it is still in the cache (SGLang's cache-aware scheduling)."""

    name = "lpm"
    max_queue_for_matching = 128  # beyond this, matching every waiting request costs more than it saves

    def order(self, waiting, cache):
        if len(waiting) > self.max_queue_for_matching or not cache.enabled:
            return sorted(waiting, key=arrival_key)

        def matched(s: Sequence) -> int:
            slots, _ = cache.match_prefix(s.all_ids[:-1], namespace=s.namespace)
            return len(slots)

        scored = [(-matched(s), arrival_key(s), s) for s in waiting]
        scored.sort(key=lambda t: t[:2])
        return [t[-1] for t in scored]


class PriorityPolicy(SchedulePolicy):
    """Lowest `priority` value first (ties first come, first served); under memory pressure the
    least important, most recently admitted sequence is preempted first."""

    name = "priority"

    def order(self, waiting, cache):
        return sorted(waiting, key=priority_key)

    def victim(self, running):
        return max(enumerate(running), key=lambda t: (t[1].priority, t[0]))[1]

    def preempt_for(self, waiting, running, fits):
        """As vLLM's priority scheduling: a waiting request that does not fit displaces the least
        important running one, if that one is strictly less important."""
        ready = [s for s in waiting if not s.waits_for_leader]
        if not ready or not running:
            return None
        best = min(ready, key=priority_key)
        worst = self.victim(running)
        if worst.priority > best.priority and not fits(best):
            return worst
        return None


class VTCPolicy(SchedulePolicy):
    """The Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024,
    arXiv 2401.00588, Algorithm 2), on top of this engine's admission and chunked-prefill rules.

    - Each client u has a counter c_u of the service it received: `ServiceCost` of the prompt tokens
      processed and output tokens generated, charged step by step as the work is done (`account`).
    - Arrival of a request of u while u has nothing in the waiting queue Q ("counter lift"):
      if Q holds other clients, c_u <- max(c_u, min{c_v : v in Q}); if Q is empty,
      c_u <- max(c_u, c_l) with l the client whose request last left Q. So idle time is never banked.
    - Whenever the batch has room, the waiting request of the client with the smallest counter is
      admitted (ties first come, first served; within a client, by `priority`, then arrival).
    The paper's fairness theorem bounds the service difference of two backlogged clients by 2U, with
    U = w_in * (longest prompt) + w_out * (tokens the batch can hold).
    """

    name = "vtc"

    def __init__(self, cost: ServiceCost):
        self.cost = cost
        self.counters: dict[str, float] = {}
        self.last_admitted: Optional[str] = None

    def counter(self, client: str) -> float:
        return self.counters.get(client, 0.0)

    def on_enqueue(self, seq, waiting):
        u = seq.client
        queued = {s.client for s in waiting}
        if u in queued:
            return
        if queued:
            floor = min(self.counter(v) for v in queued)
        elif self.last_admitted is not None:
            floor = self.counter(self.last_admitted)
        else:
            floor = 0.0
        self.counters[u] = max(self.counter(u), floor)

    def on_admit(self, seq):
        self.last_admitted = seq.client

    def forget(self, client):
        # Forgetting an idle client is safe because of the counter lift: when it sends again, its counter
        # becomes max(c_u, floor), where the floor (the smallest counter in the queue, or the last admitted
        # client's) only rises while others are served. A forgotten client returns exactly as a new
        # client does, at the floor: if its old counter was below the floor (the usual case after an
        # idle spell, as the backlogged clients' counters grew past it) nothing changes at all; if it
        # was above, the client is forgiven a lead that the paper's analysis bounds by U. Fairness among
        # backlogged clients is untouched: only clients with no queued or running work are forgotten.
        self.counters.pop(client, None)

    def account(self, seq, input_tokens, output_tokens):
        self.counters[seq.client] = self.counter(seq.client) + self.cost(input_tokens, output_tokens)

    def credit(self, client, service):
        # Behind one router the counter is the deployment's: service on other instances counts here too, so a
        # client spread over several instances is not served once per instance. The lift still applies at
        # arrival (max with the local floor), and the client is forgotten when idle here as any other.
        self.counters[client] = self.counter(client) + service

    def order(self, waiting, cache):
        queues: dict[str, list[Sequence]] = {}
        for s in sorted(waiting, key=priority_key):
            queues.setdefault(s.client, []).append(s)
        # Within one admission pass, charge each picked request's prompt provisionally, so one step
        # does not hand every free slot to the same client (the paper charges prompts at admission).
        heap = [(self.counter(c), arrival_key(q[0]), c, 0) for c, q in queues.items()]
        heapq.heapify(heap)
        out = []
        while heap:
            count, _, c, i = heapq.heappop(heap)
            s = queues[c][i]
            out.append(s)
            if i + 1 < len(queues[c]):
                nxt = queues[c][i + 1]
                heapq.heappush(heap, (count + self.cost(s.total_len, 0), arrival_key(nxt), c, i + 1))
        return out

    def victim(self, running):
        # preempt from the client that has received the most service; within it, the least important
        return max(enumerate(running), key=lambda t: (self.counter(t[1].client), t[1].priority, t[0]))[1]


def make_policy(config: EngineConfig) -> SchedulePolicy:
    simple = {"fcfs": FCFSPolicy, "lpm": LPMPolicy, "priority": PriorityPolicy}
    if config.policy in simple:
        return simple[config.policy]()
    if config.policy == "vtc":
        return VTCPolicy(ServiceCost.from_config(config))
    raise ValueError(f"unknown policy {config.policy!r}; choose one of {sorted([*simple, 'vtc'])}")

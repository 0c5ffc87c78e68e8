"""Paused conversations (APIServe / InferCept): what happens to the K/V of a request that ended with tool calls
while the tools run, until the conversation comes back with their results.

A completion that stops on its own and calls tools (its request's `pause` hook names them) leaves its computed
tokens in the radix cache like any finished request, and a pause record. The conversation's next request is
recognised by its prompt, which starts with the paused prompt (`claim`); the K/V found in the tree, or restored
from the swap tier, is reused and only the new tokens are computed. Policies (`--pause-policy`):

- discard: nothing more; the tokens are ordinary cache, evicted least recently used first (what vLLM and SGLang do).
- keep: pin the tokens until the conversation returns; under memory pressure the oldest pause is released first.
- swap: copy the K/V to the slower tier at once (kestrel/cache/swap.py); the tokens stay as ordinary cache, and
  whatever of them is evicted before the return is restored from the copy instead of recomputed.
- auto: InferCept's cost model, with each tool's duration learned from the gaps observed between its calls and
  their results. At pause, with requests waiting for memory, it picks what wastes least: keeping (memory held x
  the tools' expected duration), swapping (the running batch's memory x the time to save and restore) or
  discarding (the running batch's and its own memory x the time to recompute); with nobody waiting it keeps
  (holding free memory costs nothing). When the scheduler needs memory later, the kept conversation that wastes
  most (memory x the time until it is expected back) is released first, swapped if that costs less than
  recomputing it, else discarded.

Bounds: a pause that does not return within `pause_timeout` seconds is released; pinned memory counts as
available to the scheduler, which releases pauses (via `release_one`) before it would preempt a running request
or turn one away.
"""
from __future__ import annotations

import statistics
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kestrel.cache.radix_cache import RadixCache
from kestrel.cache.swap import Backup, SwapStore
from kestrel.config import PAUSE_POLICIES as POLICIES

PRIOR_TOOL_SECONDS = 1.0  # a tool's expected duration before any of its calls has returned
TOOL_WINDOW = 16  # recent durations per tool whose median is its estimate
MAX_TOOLS = 1024  # tools remembered (least recently seen forgotten first)
MAX_PAUSED = 1024  # pause records kept; the oldest is released beyond it


class ToolTimes:
    """How long each tool takes: the median of its recent calls' durations."""

    def __init__(self):
        self.seen: OrderedDict[str, deque] = OrderedDict()

    def observe(self, names, seconds: float) -> None:
        for name in names:
            times = self.seen.pop(name, None) or deque(maxlen=TOOL_WINDOW)
            times.append(seconds)
            self.seen[name] = times
            if len(self.seen) > MAX_TOOLS:
                self.seen.popitem(last=False)

    def estimate(self, names) -> float:
        """Seconds until a pause calling `names` returns: its slowest tool's estimate (calls run side by side);
        a tool never seen gets the median over all tools, or PRIOR_TOOL_SECONDS."""
        known = [statistics.median(self.seen[n]) for n in names if n in self.seen]
        if len(known) < len(set(names)):
            everything = [t for times in self.seen.values() for t in times]
            known.append(statistics.median(everything) if everything else PRIOR_TOOL_SECONDS)
        return max(known)


@dataclass(eq=False)
class Paused:
    """One conversation waiting on its tools."""

    key: list[int]  # its tokens that have K/V (prompt and reply)
    prompt_len: int
    namespace: int  # radix namespace (the LoRA adapter's)
    tools: tuple[str, ...]
    since: float
    expected: float  # seconds its tools were expected to take
    pinned: object = None  # the radix node it pins, while kept
    backup: Optional[Backup] = None  # its K/V in the swap tier
    claimed: bool = False  # its conversation came back; released when that request is admitted

    def remaining(self, now: float) -> float:
        """Seconds until it is expected back; once overdue, how long it has been overdue (the longer a call
        has run past its estimate, the longer it is likely to run on)."""
        if self.claimed:
            return 0.0
        left = self.since + self.expected - now
        return left if left > 0 else -left


@dataclass
class PauseStats:
    paused: int = 0
    resumed: int = 0
    released: int = 0  # pins released for memory
    swapped_out: int = 0  # backups written
    restored_tokens: int = 0  # tokens read back from backups instead of recomputed
    expired: int = 0

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


class PauseManager:
    def __init__(self, policy: str, timeout: float, cache: RadixCache, swap: Optional[SwapStore],
                 clock: Callable[[], float] = time.monotonic, load: Callable[[], tuple[int, int]] = lambda: (0, 0)):
        if policy not in POLICIES:
            raise ValueError(f"pause policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.timeout = timeout
        self.cache = cache
        self.swap = swap
        self.clock = clock
        self.load = load  # () -> (requests waiting for admission, KV tokens the running batch holds)
        self.tools = ToolTimes()
        self.paused: list[Paused] = []  # in pause order
        self.stats = PauseStats()
        self.prefill_seconds_per_token = 1e-3  # learned from the engine's steps (observe_forward)

    @property
    def enabled(self) -> bool:
        return self.cache.enabled

    # ---- a conversation pauses --------------------------------------------------------------
    def pause(self, key: list[int], prompt_len: int, namespace: int, node, tools) -> Paused:
        """Record a conversation whose tokens `key` end at radix `node` (in the tree, still locked by the
        finishing request) and that waits on `tools`."""
        tools = tuple(tools)
        rec = Paused(list(key), prompt_len, namespace, tools, self.clock(), self.tools.estimate(tools))
        action = self.policy if self.policy != "auto" else self._choose(rec)
        if action == "keep":
            self.cache.lock(node, pin=True)
            rec.pinned = node
        elif action == "swap":
            self._swap_out(rec)
        self.paused.append(rec)
        self.stats.paused += 1
        while len(self.paused) > MAX_PAUSED:
            self._drop(self.paused[0])
        return rec

    # ---- and comes back -------------------------------------------------------------------
    def claim(self, prompt_ids: list[int], namespace: int) -> Optional[Paused]:
        """The pause whose conversation this prompt continues (it repeats the paused prompt and goes on), the one
        sharing the longest prefix; learns its tools' duration. None if it continues none."""
        best, best_len = None, -1
        for rec in self.paused:
            n = rec.prompt_len
            if (rec.claimed or rec.namespace != namespace or len(prompt_ids) <= n
                    or any(prompt_ids[i] != rec.key[i] for i in (n - 1, n // 2, n // 4))  # cheap, rules most out
                    or prompt_ids[:n] != rec.key[:n]):
                continue
            while n < len(rec.key) and rec.key[n] == prompt_ids[n]:
                n += 1
            if n > best_len:
                best, best_len = rec, n
        if best is not None:
            best.claimed = True
            self.tools.observe(best.tools, self.clock() - best.since)
        return best

    def restore(self, rec: Paused, ensure_free: Callable[[int], bool]) -> int:
        """Before its request is admitted: write back from the swap tier the part of the conversation's K/V the
        tree no longer holds. Returns the tokens restored."""
        if rec.backup is None:
            return 0
        n = rec.backup.num_tokens
        cached, node = self.cache.match_prefix(rec.key[:n], shared=True, namespace=rec.namespace)
        missing = n - len(cached)
        if missing <= 0:
            return 0
        self.cache.lock(node)  # what is cached must survive the eviction that makes room for the rest
        try:
            if not ensure_free(missing):
                return 0
            slots = torch.tensor(self.cache.pool.alloc(missing), dtype=torch.int64)
            self.swap.load(rec.backup, len(cached), slots)
            self.cache.insert(rec.key[:n], torch.cat([cached, slots]), rec.namespace)
        finally:
            self.cache.unlock(node)
        self.stats.restored_tokens += missing
        return missing

    def resumed(self, rec: Paused) -> None:
        """Its request was admitted (holding what it reuses) or went away: the pause ends."""
        self._drop(rec)
        self.stats.resumed += 1

    # ---- bounds -------------------------------------------------------------------------------
    def release_one(self) -> bool:
        """Release one pinned conversation for memory (swapped first if the policy says so); False if none is."""
        pinned = [r for r in self.paused if r.pinned is not None]
        if not pinned:
            return False
        now = self.clock()
        if self.policy == "auto":  # the most memory x expected time still to wait; returning ones last
            victim = max(pinned, key=lambda r: (not r.claimed, r.remaining(now) * len(r.key), -r.since))
            if self._worth_swapping(victim, now):
                self._swap_out(victim)
        else:  # keep: the oldest pause first (it knows nothing of durations)
            victim = min(pinned, key=lambda r: (r.claimed, r.since))
        self._unpin(victim)
        self.stats.released += 1
        return True

    def expire(self) -> int:
        """Release the pauses older than the timeout whose conversation has not come back; returns how many."""
        if not self.paused:
            return 0
        cutoff = self.clock() - self.timeout
        old = [r for r in self.paused if r.since <= cutoff and not r.claimed]
        for rec in old:
            self._drop(rec)
        self.stats.expired += len(old)
        return len(old)

    def release_all(self) -> None:
        for rec in list(self.paused):
            self._drop(rec)

    # ---- measurements -------------------------------------------------------------------------
    def observe_forward(self, num_tokens: int, seconds: float) -> None:
        """A prefill-sized step's time: what recomputing a discarded conversation costs per token."""
        self.prefill_seconds_per_token = 0.8 * self.prefill_seconds_per_token + 0.2 * seconds / num_tokens

    @property
    def swapped_bytes(self) -> int:
        return self.swap.used if self.swap is not None else 0

    # ---- internals ----------------------------------------------------------------------------
    def _choose(self, rec: Paused) -> str:
        """auto's choice at pause: the least waste in token-seconds of memory (InferCept, section 4)."""
        waiting, running = self.load()
        if not waiting:
            return "keep"
        c = len(rec.key)
        waste = {"keep": rec.expected * c, "discard": self._recompute_seconds(rec) * (running + c)}
        if self._can_swap(rec):
            waste["swap"] = self.swap.seconds(c) * running
        return min(waste, key=waste.get)

    def _worth_swapping(self, rec: Paused, now: float) -> bool:
        return (self._can_swap(rec) and rec.remaining(now) < self.timeout
                and self.swap.seconds(len(rec.key)) < self._recompute_seconds(rec))

    def _can_swap(self, rec: Paused) -> bool:
        return self.swap is not None and rec.backup is None and self.swap.fits(len(rec.key))

    def _recompute_seconds(self, rec: Paused) -> float:
        return len(rec.key) * self.prefill_seconds_per_token

    def _swap_out(self, rec: Paused) -> None:
        if self.swap is None or rec.backup is not None:
            return
        slots, _ = self.cache.match_prefix(rec.key, shared=True, namespace=rec.namespace)
        if len(slots) < len(rec.key):
            return  # already partly evicted (a swap-policy pause saves at once, so this is rare)
        rec.backup = self.swap.save(slots)
        if rec.backup is not None:
            self.stats.swapped_out += 1

    def _unpin(self, rec: Paused) -> None:
        if rec.pinned is not None:
            self.cache.unlock(rec.pinned, pin=True)
            rec.pinned = None

    def _drop(self, rec: Paused) -> None:
        self._unpin(rec)
        if self.swap is not None:
            self.swap.drop(rec.backup)
        rec.backup = None
        if rec in self.paused:
            self.paused.remove(rec)

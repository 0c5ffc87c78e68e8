"""Continuous batching: which sequences run in the next step, and the KV slots they use.

Each step batches every running sequence's next decode token together with prefill chunks under a
token budget (`chunked_prefill_size`). Waiting sequences are admitted in policy order while memory
allows; when a decode step cannot get slots even after evicting cached prefixes, the most recently
admitted sequence is retracted and later recomputed (its computed tokens stay in the radix cache).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from kestrel.cache.kv_pool import KVPool, ReqToTokenTable
from kestrel.cache.radix_cache import RadixCache
from kestrel.config import EngineConfig
from kestrel.engine.clients import ClientLedger, ServiceCost
from kestrel.engine.forward_batch import StepPlan, build
from kestrel.engine.lookahead import PLANS, StepCost, choose_plan, could_pay
from kestrel.engine.pauses import PauseManager
from kestrel.engine.policy import SchedulePolicy
from kestrel.engine.request import Sequence, Status

log = logging.getLogger("kestrel.scheduler")
BASE_NEW_TOKEN_RATIO = 0.3  # share of a running sequence's remaining max_tokens reserved at admission
NEW_TOKEN_RATIO_DECAY = 0.002  # per step, back towards the base after a retraction raised it to 1


@dataclass
class ScheduledBatch:
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, chunk length)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    @property
    def sequences(self) -> list[Sequence]:
        return self.decode + [s for s, _ in self.prefill]

    def unfinished(self) -> "ScheduledBatch":
        if all(not s.finished for s in self.sequences):
            return self
        return ScheduledBatch([s for s in self.decode if not s.finished],
                              [(s, n) for s, n in self.prefill if not s.finished])

    def halves(self) -> tuple["ScheduledBatch", "ScheduledBatch"]:
        """The batch split in two (its slots stay assigned), to find which sequences make a step fail."""
        items = [(s, None) for s in self.decode] + self.prefill
        cut = len(items) // 2

        def part(chunk):
            return ScheduledBatch([s for s, n in chunk if n is None], [(s, n) for s, n in chunk if n is not None])
        return part(items[:cut]), part(items[cut:])


class Scheduler:
    def __init__(self, config: EngineConfig, pool: KVPool, table: ReqToTokenTable, cache: RadixCache,
                 policy: SchedulePolicy, device: torch.device = torch.device("cpu"), adapters=None,
                 step_cost: StepCost | None = None, swap=None):
        self.config = config
        self.step_cost = step_cost  # measured forward time by step size: set when lookahead decoding is on
        self.lookahead_host_time = 0.0  # seconds the last schedule() spent planning drafts
        self.adapters = adapters  # kestrel.lora.manager.LoraManager: adapters share the pool with KV
        self.unservable: list[Sequence] = []  # waiting sequences whose adapter could not be read: to fail
        self.device = device  # where forward batches go
        self.pool = pool
        self.table = table
        self.cache = cache
        self.policy = policy
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # admitted, in admission order
        self.new_token_ratio = BASE_NEW_TOKEN_RATIO
        self.num_retractions = 0
        self.in_batch_prefix = config.in_batch_prefix_tokens
        self.clients = ClientLedger(ServiceCost.from_config(config), config.client_idle_timeout,
                                    config.max_idle_clients)
        self.clock = time.monotonic  # when clients go idle (the simulator substitutes its own clock)
        self.pauses = PauseManager(config.pause_policy, config.pause_timeout, cache, swap, lambda: self.clock(),
                                   lambda: (len(self.waiting), sum(s.num_computed for s in self.running)))

    # ---- queue --------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.policy.on_enqueue(seq, self.waiting)
        self.waiting.append(seq)
        self.clients.arrived(seq.client)
        self.clients.queued(seq.client, +1)
        if seq.lora is not None:
            self.adapters.attach(seq.lora)
        if self.pauses.enabled and seq.index == 0:
            seq.resumes = self.pauses.claim(seq.prompt_ids, seq.namespace)

    def credit(self, services: dict[str, float]) -> None:
        """Weighted service clients received on other instances of the deployment (kestrel.cluster): the
        fairness policy counts it as if received here."""
        now = self.clock()
        for client, service in services.items():
            self.policy.credit(client, service)
            self.clients.served_elsewhere(client, now)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- memory helpers -----------------------------------------------------------------
    def available(self) -> int:
        """Slots running work may have: free, cached (evictable), idle adapters', and paused conversations'."""
        idle = self.adapters.idle_pages() if self.adapters is not None else 0
        return self.pool.num_free + self.cache.evictable_size + idle + self.cache.pinned_size

    def _ensure_free(self, n: int) -> bool:
        """At least n free slots, evicting cached prefixes, then idle adapters (LRU), then releasing paused
        conversations (their pause policy decides which and how) if needed."""
        if self.pool.num_free < n:
            self.cache.evict(n - self.pool.num_free)
        while self.pool.num_free < n and self.adapters is not None and self.adapters.evict_idle():
            pass
        while self.pool.num_free < n and self.pauses.release_one():
            self.cache.evict(n - self.pool.num_free)
        return self.pool.num_free >= n

    def _page_in(self, adapter) -> bool:
        """Make an adapter resident: it needs a run of consecutive free slots, so evict cached prefixes
        and idle adapters until one appears (or nothing more can go)."""
        step = adapter.pages
        while not self.adapters.try_page_in(adapter):
            freed = 0 if self.adapters.at_capacity() else self.cache.evict(step)
            if not freed and not self.adapters.evict_idle(keep=adapter):
                return False
            step *= 2
        return True

    def _reserve(self, seq: Sequence) -> float:
        """Slots a running sequence may still need (prompt left to prefill + a share of its output)."""
        prompt_left = max(0, len(seq.prompt_ids) - seq.num_computed)
        return prompt_left + self.new_token_ratio * self._output_left(seq)

    def _output_left(self, seq: Sequence) -> int:
        """Output tokens to plan for: what max_tokens allows, clipped as SGLang does, because a request
        without max_tokens may run up to the context length but rarely does; planning for it would
        admit a fraction of the requests that fit. Retraction covers the rare one that runs long."""
        return min(seq.params.max_tokens - len(seq.output_ids), self.config.clip_max_new_tokens)

    # ---- one step -----------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        """The next step's batch, with its KV slots already assigned in the req-to-token table."""
        self.new_token_ratio = max(BASE_NEW_TOKEN_RATIO, self.new_token_ratio - NEW_TOKEN_RATIO_DECAY)
        for client in self.clients.forget_idle(self.clock()):
            self.policy.forget(client)
        self.pauses.expire()
        for _ in range(len(self.running)):  # the policy may make room for more important waiting work
            victim = self.policy.preempt_for(self.waiting, self.running, self._fits)
            if victim is None:
                break
            self.retract(victim)
        while True:
            batch = self._schedule_once()
            # Running prefills that all stalled on memory would wait for each other forever: retract one.
            if not batch.empty or len(self.running) <= 1:
                return batch
            self.retract(self.policy.victim(self.running))

    def _schedule_once(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        # 1. every decoding sequence needs one slot; retract until they all fit
        while True:
            decode = [s for s in self.running if s.pending == 1]
            if self._ensure_free(len(decode)) or len(self.running) <= 1:
                break
            self.retract(self.policy.victim(self.running))
        if len(decode) > self.pool.num_free:
            raise RuntimeError("KV pool exhausted by a single sequence; admission validation should prevent this")
        need = len(decode)
        budget = self.config.chunked_prefill_size
        # 2. sequences in the middle of a chunked prefill continue
        for seq in self.running:
            if seq.pending > 1 and budget > 0:
                chunk = min(seq.pending, budget)
                if not self._ensure_free(need + chunk):
                    chunk = self.pool.num_free - need
                if chunk <= 0:
                    break
                batch.prefill.append((seq, chunk))
                need += chunk
                budget -= chunk
        # 3. admit waiting sequences in policy order
        if budget > 0 and self.waiting:
            admitted = self._admit(budget, need, batch)
            need += admitted
        # 4. lookahead drafts, when the planner expects them to pay for their tokens
        drafted = []
        if self.step_cost is not None:
            start = time.perf_counter()
            drafted = self._plan_lookahead(decode, need)
            self.lookahead_host_time = time.perf_counter() - start  # the engine adds verification's and learns
        # 5. hand out slots
        if decode:
            self.table.write_cells([s.row for s in decode], [s.num_computed for s in decode],
                                   self.pool.alloc(len(decode)))
            for seq in decode:
                seq.num_slots = seq.num_computed + 1
        for seq in drafted:  # the draft's tokens take the columns after the pending token
            extra = seq.draft.num_tokens - 1
            self.table.write(seq.row, seq.num_computed + 1, self.pool.alloc(extra))
            seq.num_slots += extra
        for seq, chunk in batch.prefill:
            self.table.write(seq.row, seq.num_computed, self.pool.alloc(chunk))
            seq.num_slots = seq.num_computed + chunk
        batch.decode = decode
        return batch

    def _plan_lookahead(self, decode: list[Sequence], step_tokens: int) -> list[Sequence]:
        """Give decoding sequences that use lookahead this step's draft, as deep as `choose_plan` expects to
        pay (nothing when the step is compute-bound), within the free slots (drafts never evict or retract)
        and the table's scratch rows. Returns the drafted sequences."""
        options = []
        users = [seq for seq in decode if seq.lookahead is not None]
        for seq in users:
            seq.lookahead.draft = None
            seq.lookahead.check_shadow(seq.prompt_ids, seq.output_ids)
        if not users or not could_pay([s.lookahead for s in users], step_tokens, len(decode), self.step_cost):
            for seq in users:  # no draft could pay: gather evidence for when one might
                seq.lookahead.learn(seq.prompt_ids, seq.output_ids)
                seq.lookahead.leave_shadow(seq.prompt_ids, seq.output_ids)
            return []
        positions = self.table.table.shape[1] - 1  # the context length: positions 0..positions-1
        for seq in users:
            state = seq.lookahead
            state.learn(seq.prompt_ids, seq.output_ids)
            current = seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1]
            pos_room = positions - 1 - seq.num_computed
            out_room = seq.params.max_tokens - len(seq.output_ids) - 1
            proposals = {}
            for plan in PLANS:
                prop = state.propose(plan, current, pos_room, out_room)
                if prop is not None:
                    proposals[plan] = prop
            options.append((state, proposals))
        plan, depths = choose_plan(options, step_tokens, len(decode), self.step_cost)
        drafted = []
        room = min(self.pool.num_free - step_tokens, self.table.num_scratch)
        for i, seq in enumerate(users):
            prop = options[i][1].get(plan) if plan is not None else None
            draft = prop.draft(depths[i]) if prop is not None else None
            # the row's tokens take table columns up to num_computed + num_tokens - 1 (the table's last column
            # is the context length)
            if (draft is None or draft.num_tokens == 1 or draft.num_tokens - 1 > room
                    or seq.num_computed + draft.num_tokens > positions + 1):
                seq.lookahead.leave_shadow(seq.prompt_ids, seq.output_ids)
                continue
            room -= draft.num_tokens - 1
            seq.lookahead.draft = draft
            seq.lookahead.shadow = None  # this step gives real evidence
            drafted.append(seq)
        return drafted

    def keep_draft_token(self, seq: Sequence, column: int) -> None:
        """An accepted draft token: the K/V the step computed at table column `column` of the sequence's row
        is that of its next token, so the slot moves to column num_computed (swapped, so the row still lists
        every slot the step holds) and counts as computed."""
        table, row, at = self.table.table, seq.row, seq.num_computed
        if column != at:
            table[row, [at, column]] = table[row, [column, at]]
        seq.num_computed += 1

    def drop_draft(self, seq: Sequence) -> None:
        """After verification: free the slots of draft tokens that were not accepted, and charge the client
        for the output tokens the step gave."""
        self._free_uncomputed(seq)
        seq.num_slots = seq.num_computed
        self._account(seq, samples=False)

    def reserve_burst(self, decode: list[Sequence], extra: int) -> torch.Tensor | None:
        """Slots for up to `extra` more decode steps of these sequences, after the step schedule() gave them, written
        to the table columns that follow; from free slots alone (a burst never evicts, retracts or waits, and may
        end early). Returns every step's slots, int64 [steps, rows] (at least 2 steps), or None."""
        n = len(decode)
        extra = min(extra, self.pool.num_free // n)
        if extra < 1:
            return None
        slots = self.table.extend_rows([s.row for s in decode], [s.num_computed for s in decode],
                                       self.pool.alloc(n * extra))
        for seq in decode:
            seq.num_slots += extra
        return slots

    def end_burst(self, decode: list[Sequence], steps: int, keep: int = 0) -> None:
        """After a burst that ran `steps` steps: free the slots it reserved and did not use (all but `keep` past each
        sequence's computed tokens: 1 when the burst failed and its first step runs again as a plain one), and age
        the admission reserve as that many schedule() calls would have."""
        for seq in decode:
            if seq.row is not None:  # (a sequence that finished released its slots)
                self._free_uncomputed(seq, keep)
        self.new_token_ratio = max(BASE_NEW_TOKEN_RATIO,
                                   self.new_token_ratio - NEW_TOKEN_RATIO_DECAY * max(steps - 1, 0))

    def _free_uncomputed(self, seq: Sequence, keep: int = 0) -> None:
        """Free the slots the sequence holds past its computed tokens (a step's that failed, a draft's that was
        not accepted, a burst's that it did not use), all but the first `keep` of them: they hold no K/V anyone
        keeps. The sequence then holds up to `keep` slots past its computed tokens."""
        if seq.num_slots > seq.num_computed + keep:
            self.pool.free(self.table.table[seq.row, seq.num_computed + keep:seq.num_slots].cpu())
            seq.num_slots = seq.num_computed + keep

    def plan(self, batch: ScheduledBatch) -> StepPlan:
        """The ForwardBatch the runner executes for this (part of a) step, and what its logits are for."""
        return build(batch.decode, batch.prefill, self.table, self.device)

    def _room_for_another(self) -> bool:
        return len(self.running) < self.config.max_running_requests and self.table.num_free > 0

    def _reserved(self) -> float:
        return sum(self._reserve(s) for s in self.running)

    def _admit(self, budget: int, need: int, batch: ScheduledBatch) -> int:
        reserved = self._reserved()
        used = 0
        admitted = _PrefixTrie()  # what this step starts computing: prompts that share it wait for the cache
        for seq in self.policy.order(self.waiting, self.cache):
            if seq.waits_for_leader:
                continue
            if not self._room_for_another() or budget <= 0:
                break
            adapter = seq.lora
            if adapter is not None and not self.adapters.host_ready(adapter):
                if adapter.error:
                    self.unservable.append(seq)
                continue  # still being read from disk: others may go first
            if seq.resumes is not None:  # what a paused conversation had swapped out comes back first
                self.pauses.restore(seq.resumes, lambda n: self._ensure_free(need + used + n))
            key = seq.all_ids[:-1]
            if seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt_ids) - seq.prompt_logprob_start:
                key = key[: seq.prompt_logprob_start - 1]  # logits of those positions must be computed, not reused
            prefix, node = self.cache.match_prefix(key, shared=seq.index > 0, namespace=seq.namespace)
            if self.cache.enabled and admitted.shared(key, seq.namespace) >= len(prefix) + self.in_batch_prefix:
                continue  # a prompt admitted this step computes its prefix: next step it is a cache hit (SGLang's rule)
            self.cache.lock(node)
            pending = seq.total_len - len(prefix)
            chunk = min(pending, budget)
            want = self._reserve_for_new(seq, len(prefix))
            if adapter is not None and adapter.residency is None:
                want += adapter.pages
            alone = not self.running and not batch.prefill
            if not alone and self.available() - need - used < reserved + want:
                self.cache.unlock(node)
                break
            if adapter is not None and not self._page_in(adapter):
                self.cache.unlock(node)
                break
            if adapter is not None:
                self.adapters.start_running(adapter)  # pinned in the pool from here until it leaves
            if not self._ensure_free(need + used + chunk):
                self.cache.unlock(node)
                if adapter is not None:
                    self.adapters.stop_running(adapter)
                break
            self.waiting.remove(seq)
            self.clients.queued(seq.client, -1)
            self.policy.on_admit(seq)
            seq.status = Status.RUNNING
            seq.row = self.table.alloc()
            seq.prefix_node, seq.prefix_len, seq.num_computed = node, len(prefix), len(prefix)
            seq.num_slots = len(prefix)
            seq.prompt_charged = max(seq.prompt_charged, min(len(prefix), len(seq.prompt_ids)))  # cache hits are free
            if not seq.admitted_once:
                seq.cached_tokens = min(len(prefix), len(seq.prompt_ids))
                seq.admitted_once = True
                seq.first_admit_time = time.monotonic()
            self.table.write(seq.row, 0, prefix)
            self._end_resume(seq)  # it holds what it reuses: the pause ends
            self.running.append(seq)
            admitted.add(key, seq.namespace)
            batch.prefill.append((seq, chunk))
            used += chunk
            budget -= chunk
            reserved += want
        return used

    def _fits(self, seq: Sequence) -> bool:
        """Whether seq could be admitted now next to the running batch (ignoring cache hits)."""
        return self._room_for_another() and self.available() >= self._reserved() + self._reserve_for_new(seq, 0)

    def _reserve_for_new(self, seq: Sequence, prefix_len: int) -> float:
        return (seq.total_len - prefix_len) + self.new_token_ratio * self._output_left(seq)

    def adopt(self, seq: Sequence, slots: list[int]) -> None:
        """Put a sequence whose first len(slots) tokens already have their K/V in `slots` (handed over by another
        engine) straight into the running batch; the caller has checked there is room (_room_for_another)."""
        seq.row = self.table.alloc()
        self.table.write(seq.row, 0, slots)
        seq.num_computed = seq.num_slots = len(slots)
        seq.status = Status.RUNNING
        self.running.append(seq)

    # ---- after a step -------------------------------------------------------------------
    def advance(self, batch: ScheduledBatch) -> list[Sequence]:
        """Record the K/V computed by a finished step and charge each client for it. Returns the
        sequences that sample a token from this step: every decode, and prefills that reached the end (but for
        prefill-only requests)."""
        for seq in batch.decode:
            seq.num_computed += 1
            self._account(seq, samples=True)
        sampling = list(batch.decode)
        for seq, chunk in batch.prefill:
            seq.num_computed += chunk
            samples = seq.samples_after(seq.num_computed)
            self._account(seq, samples=samples)
            if samples:
                sampling.append(seq)
        return sampling

    def _account(self, seq: Sequence, samples: bool) -> None:
        """Charge prompt tokens the first time they are computed (cache hits and recomputation after a
        preemption are free) and output tokens once each: the one sampled in this step, and any that
        jump-forward appended since."""
        prompt = max(0, min(seq.num_computed, len(seq.prompt_ids)) - seq.prompt_charged)
        output = len(seq.output_ids) + samples - seq.outputs_charged
        seq.prompt_charged += prompt
        seq.outputs_charged += output
        if prompt or output:
            self.clients.charge(seq.client, prompt, output)
            self.policy.account(seq, prompt, output)

    def share_prompt(self, leader: Sequence) -> None:
        """Hand the leader's prompt K/V to the cache so its n-1 siblings reuse it instead of recomputing."""
        self._move_to_cache(leader, len(leader.prompt_ids))

    def cache_prefilled(self, batch: ScheduledBatch) -> None:
        """Insert freshly prefilled tokens into the cache right away (not only at finish), so requests
        admitted in later steps already hit a prefix that is still being generated from."""
        if self.cache.enabled:
            for seq, _ in batch.prefill:
                if seq.row is not None:
                    self._move_to_cache(seq, seq.num_computed)

    def _move_to_cache(self, seq: Sequence, n: int) -> None:
        """Give the cache the first n computed tokens of seq; seq then locks that prefix instead."""
        key = seq.all_ids[:n]
        slots = self.table.table[seq.row, :n].cpu()
        already, _ = self.cache.insert(key, slots, seq.namespace)
        if already > seq.prefix_len:  # someone cached these tokens meanwhile: use theirs, free ours
            self.pool.free(slots[seq.prefix_len:already])
        tree_slots, node = self.cache.match_prefix(key, shared=True, namespace=seq.namespace)
        if already > seq.prefix_len:
            self.table.write(seq.row, seq.prefix_len, tree_slots[seq.prefix_len:already])
        self.cache.lock(node)
        if seq.prefix_node is not None:
            self.cache.unlock(seq.prefix_node)
        seq.prefix_node, seq.prefix_len = node, n

    def release(self, seq: Sequence, pause_for=None) -> None:
        """Give back a sequence's row and slots; its computed tokens go to the radix cache. Slots handed
        out for a step that never completed (it failed) hold no valid K/V: they are only freed. `pause_for`:
        the tools the finished sequence waits on (its conversation pauses)."""
        if seq.row is None:
            return
        n = seq.num_computed
        if self.cache.enabled:
            self._move_to_cache(seq, n)
            if pause_for:
                self.pauses.pause(seq.all_ids[:n], len(seq.prompt_ids), seq.namespace, seq.prefix_node, pause_for)
        else:
            self.pool.free(self.table.table[seq.row, seq.prefix_len:n].cpu())
        self._free_uncomputed(seq)
        seq.num_slots = 0
        if seq.prefix_node is not None:
            self.cache.unlock(seq.prefix_node)
        seq.prefix_node, seq.prefix_len = None, 0
        self.table.free(seq.row)
        seq.row = None
        if seq.lora is not None:
            self.adapters.stop_running(seq.lora)
        if seq in self.running:
            self.running.remove(seq)

    def retract(self, seq: Sequence) -> None:
        """Preempt by recompute: free the sequence's memory (keeping what the cache keeps) and requeue it."""
        self.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_retractions += 1
        self.new_token_ratio = 1.0
        self.waiting.append(seq)
        self.clients.queued(seq.client, +1)

    def finish(self, seq: Sequence) -> None:
        if seq.finished:
            return
        self._account(seq, samples=False)  # output tokens jump-forward appended at the very end
        self.release(seq, self._tools_called(seq))
        seq.status = Status.FINISHED
        self.clients.left(seq.client, self.clock())
        if seq.lora is not None:
            self.adapters.detach(seq.lora)

    def _tools_called(self, seq: Sequence):
        """The tools a completion that stopped on its own calls (its request's `pause` hook reads its text);
        None when it calls none or cannot pause (n > 1: which reply continues is the client's pick)."""
        if seq.pause is None or seq.finish_reason != "stop" or seq.params.n != 1 or not self.pauses.enabled:
            return None
        try:
            return seq.pause(seq.text) or None
        except Exception:  # noqa: BLE001 - a broken hook costs the pause, not the request
            log.exception("the pause hook of request %s failed", seq.request_id)
            return None

    def abort(self, seq: Sequence) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
            self.clients.queued(seq.client, -1)
        self._end_resume(seq)  # its conversation will not continue here
        self.finish(seq)

    def _end_resume(self, seq: Sequence) -> None:
        """The pause `seq` continues ends: it was admitted holding the KV it reuses, or it went away."""
        if seq.resumes is not None:
            self.pauses.resumed(seq.resumes)
            seq.resumes = None


class _PrefixTrie:
    """The prompts admitted in one step, for the longest prefix a waiting prompt shares with any of them."""

    LIMIT = 4096  # tokens of each prompt looked at

    def __init__(self):
        self.roots: dict[int, dict] = {}

    def add(self, key: list[int], namespace: int) -> None:
        node = self.roots.setdefault(namespace, {})
        for t in key[:self.LIMIT]:
            node = node.setdefault(t, {})

    def shared(self, key: list[int], namespace: int) -> int:
        node, n = self.roots.get(namespace), 0
        if node is None:
            return 0
        for t in key[:self.LIMIT]:
            node = node.get(t)
            if node is None:
                break
            n += 1
        return n

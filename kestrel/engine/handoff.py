"""Moving a running request between engines: its K/V and everything else it needs to go on elsewhere.

Live migration (Llumnix) and prefill/decode disaggregation (DistServe) both use it, in stages:

  source                                   destination
  export_kv(rid, 0) -> K/V [0, a)          reserve(mid, a); write(mid, 0, kv)      the request keeps decoding
  export_kv(rid, a) -> K/V [a, b)          write(mid, a, kv)                       ... while the rest shrinks
  suspend(rid, b) -> state, K/V [b, n)     adopt(mid, state, b, kv)                a short stop-and-copy
  commit(rid) | resume(rid)                                                        on success | on failure

A suspended request has left the source's batch but keeps its slots until `commit` (they go to the source's
radix cache, so a prefill instance still serves the prompt as a prefix) or `resume` (the destination failed:
it goes on where it was). A request still waiting in the queue moves the same way with no K/V (`queued`):
`suspend(rid, 0, queued=True)`, `adopt` queues it on the destination in its arrival order, `commit` | `resume`
(Llumnix moves a queue's head-of-line request so it need not wait for memory its instance lacks).

A reservation holds pool slots on the destination before anything is copied, so the copy can never run out
of memory half-way; one that is not adopted or cancelled within `RESERVATION_TTL`
seconds is freed (its source died), so a failed migration leaks no slots on the survivor.

The state carries the request's sampler generator, grammar position (replayed over its output tokens),
stop-string and streaming state (text, what was already sent), VTC charges and timings, so the client sees one
uninterrupted stream and greedy or seeded output is the same as if the request had never moved.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch

from kestrel.decoding.grammar import GrammarSpec
from kestrel.engine.policy import arrival_key
from kestrel.engine.request import Sequence, Status

RESERVATION_TTL = 30.0  # seconds an idle reservation lives before its slots are freed
EXPORT_QUIET = 1.0  # seconds after a request's last K/V export that its move counts as over (or given up)


def clock_shift(state: RequestState) -> float:
    """This process's monotonic clock minus the source's: 0 on one machine; across machines, from both machines'
    wall clocks (as close as NTP keeps them)."""
    if not state.suspended_wall:
        return 0.0
    return (time.monotonic() - time.time()) - (state.suspended_at - state.suspended_wall)


def _time_per_token(seq: Sequence, now: float) -> Optional[float]:
    """The request's mean seconds per output token after its first, up to `now` (its TPOT so far): the decode
    step it knows, the unit a migration's pause is measured in."""
    if seq.first_token_time is None or len(seq.output_ids) < 2:
        return None
    return (now - seq.first_token_time) / (len(seq.output_ids) - 1)


class HandoffRefused(ValueError):
    """The request cannot move (gone, finished, not decoding, n > 1) or the destination has no room for it."""


class HandoffGone(HandoffRefused):
    """The request is no longer where the move expects it: finished, aborted, or (for a queued move) admitted."""


@dataclass
class RequestState:
    """A suspended request, free of anything tied to its source engine (slots, radix nodes, native objects)."""

    seq: Sequence
    lora: Optional[str]  # the adapter's name
    generator_state: Optional[torch.Tensor]  # its seeded sampler's generator
    num_kv: int  # tokens whose K/V travel with it
    suspended_at: float = 0.0  # time.monotonic() when it left its source's batch (downtime starts)
    suspended_wall: float = 0.0  # time.time() then: relates the source's monotonic clock to the destination's
    time_per_token: Optional[float] = None  # its own seconds per output token until then (a move's pause in steps)


@dataclass
class Reservation:
    slots: list[int]
    touched: float


class Handoffs:
    """One engine's side of moving requests: out (export, suspend, commit, resume) and in (reserve, write, adopt)."""

    def __init__(self, engine):
        self.engine = engine
        self.suspended: dict[str, Sequence] = {}
        self.reservations: dict[str, Reservation] = {}
        self.exported: dict[str, float] = {}  # request -> time.monotonic() of its last K/V export (a move's stage)
        self.moved_out = 0
        self.moved_in = 0

    # ---- the source ---------------------------------------------------------------------
    def _movable(self, rid: str, queued: bool = False) -> Sequence:
        seqs = self.engine._requests.get(rid)
        if not seqs:
            raise HandoffGone(f"request {rid!r} is not in this engine")
        if len(seqs) != 1:
            raise HandoffRefused(f"request {rid!r} has n > 1 completions; only n = 1 requests move")
        seq = seqs[0]
        if queued:
            if seq.status is not Status.WAITING or seq not in self.engine.scheduler.waiting:
                raise HandoffGone(f"request {rid!r} is not waiting")
            if seq.resumes is not None:
                raise HandoffRefused(f"request {rid!r} continues a conversation paused here")
            return seq
        if seq.finished or seq.row is None or seq.status is not Status.RUNNING:
            raise HandoffGone(f"request {rid!r} is not running")
        if seq.num_computed < len(seq.prompt_ids) or not seq.output_ids:
            raise HandoffRefused(f"request {rid!r} has not finished its prefill")
        return seq

    def export_kv(self, rid: str, start: int) -> tuple[int, torch.Tensor]:
        """K/V of the request's tokens [start, end) with end = what is computed now; the request runs on."""
        seq = self._movable(rid)
        end = seq.num_computed
        self.exported[rid] = time.monotonic()
        return end, self._read(seq.row, start, end)

    def suspend(self, rid: str, start: int, queued: bool = False) -> tuple[RequestState, torch.Tensor]:
        """Take the request out of the batch (its slots stay held) and return its state and K/V [start, end).
        `queued`: take a request that waits in the queue instead (it holds no K/V; refused once it runs)."""
        s = self.engine.scheduler
        seq = self._movable(rid, queued)
        if queued:
            end, kv = 0, self._read(None, 0, 0)
            s.waiting.remove(seq)
            s.clients.queued(seq.client, -1)
        else:
            end = seq.num_computed
            kv = self._read(seq.row, start, end)
            s.running.remove(seq)
        del self.engine._requests[rid]
        self.exported.pop(rid, None)
        self.suspended[rid] = seq
        gen = seq.generator.get_state() if seq.generator is not None else None
        plain = dataclasses.replace(seq, lora=None, prefix_node=None, row=None, generator=None, grammar=None,
                                    detok=None, lookahead=None, resumes=None, num_slots=0, prefix_len=0)
        now = time.monotonic()
        return RequestState(plain, seq.lora.name if seq.lora is not None else None, gen, end, now, time.time(),
                            _time_per_token(seq, now)), kv

    def commit(self, rid: str) -> None:
        """The destination took the request: free what it held here (computed tokens go to the radix cache)."""
        seq = self.suspended.pop(rid)
        s = self.engine.scheduler
        if seq.row is not None:  # a queued one holds no slots
            s.running.append(seq)  # release() expects a running sequence
            s.release(seq)
        s.clients.left(seq.client, s.clock())
        if seq.lora is not None:
            self.engine.loras.detach(seq.lora)
        self.moved_out += 1

    def resume(self, rid: str) -> None:
        """The move failed after suspend: the request goes on here as if nothing happened."""
        seq = self.suspended.pop(rid)
        s = self.engine.scheduler
        self.engine._requests[rid] = [seq]
        if seq.row is None:  # it was queued: back in the queue, in its arrival order
            s.waiting.append(seq)
            s.clients.queued(seq.client, +1)
        else:
            s.running.append(seq)

    def candidates(self, queued: bool = False) -> list[tuple[str, int, int, bool]]:
        """Requests that could move now: (id, tokens, priority, queued). Running ones that decode, fewest tokens
        of K/V first (cheapest to copy); with `queued`, then the waiting ones, first come first, with the tokens
        they will need (what moving them takes off this instance's load)."""
        s = self.engine.scheduler
        out = sorted(((seq.request_id, seq.num_computed, seq.priority, False) for seq in s.running
                      if seq.params.n == 1 and seq.row is not None and not seq.finished and seq.output_ids
                      and seq.num_computed >= len(seq.prompt_ids)), key=lambda c: c[1])
        if queued:  # first come first (Llumnix's policy; asking the scheduling policy could touch the cache)
            out += [(seq.request_id, seq.total_len - seq.num_computed, seq.priority, True)
                    for seq in sorted(s.waiting, key=arrival_key)
                    if seq.params.n == 1 and seq.resumes is None]
        return out

    def _read(self, row: Optional[int], start: int, end: int) -> torch.Tensor:
        """[2, layers, tokens, kv_heads, head_dim] on the CPU."""
        if row is None:  # a queued request: nothing to read
            slots = torch.zeros(0, dtype=torch.int64, device=self.engine.device)
        else:
            slots = self.engine.table.table[row, start:end]
        caches = self.engine.pool.caches
        return torch.stack([torch.stack([k.index_select(0, slots) for k, _ in caches]),
                            torch.stack([v.index_select(0, slots) for _, v in caches])]).cpu()

    # ---- the destination ----------------------------------------------------------------
    def reserve(self, mid: str, tokens: int) -> bool:
        """Hold pool slots for `tokens` tokens of an incoming request (evicting cached prefixes if needed);
        False when they cannot be had. Growing an existing reservation takes only the difference."""
        self.expire()
        r = self.reservations.get(mid)
        have = len(r.slots) if r is not None else 0
        more = tokens - have
        if more > 0:
            if not self.engine.scheduler._ensure_free(more):
                return False
            slots = self.engine.pool.alloc(more)
            if r is None:
                r = self.reservations[mid] = Reservation([], 0.0)
            r.slots.extend(slots)
        if r is not None:
            r.touched = time.monotonic()
        return True

    def write(self, mid: str, start: int, kv: torch.Tensor) -> None:
        """Store K/V of tokens [start, start + n) of an incoming request into its reservation."""
        end = start + kv.shape[2]
        if not self.reserve(mid, end):
            raise HandoffRefused(f"no room for {end} tokens of K/V")
        slots = torch.tensor(self.reservations[mid].slots[start:end], dtype=torch.int64,
                             device=self.engine.device)
        for layer, (k, v) in enumerate(self.engine.pool.caches):
            k.index_copy_(0, slots, kv[0, layer].to(k.device, k.dtype))
            v.index_copy_(0, slots, kv[1, layer].to(v.device, v.dtype))

    def adopt(self, mid: str, state: RequestState, start: int, kv: torch.Tensor) -> float:
        """Write the last K/V and put the request into this engine's running batch (a queued one, with no K/V,
        into its queue); returns the seconds it was out of any batch or queue (its downtime). Raises
        HandoffRefused (the reservation is then freed) when it cannot run here."""
        engine, s = self.engine, self.engine.scheduler
        seq = state.seq
        queued = seq.status is Status.WAITING
        try:
            if seq.request_id in engine._requests:
                raise HandoffRefused(f"request id {seq.request_id!r} is already in use here")
            adapter = engine.loras.get(state.lora) if state.lora is not None else None
            if not queued:
                if not s._room_for_another():
                    raise HandoffRefused("no free place in the running batch")
                self.write(mid, start, kv)
                if adapter is not None:
                    engine.loras.attach(adapter)
                    if not s._page_in(adapter):
                        engine.loras.detach(adapter)
                        raise HandoffRefused(f"no room for LoRA adapter {state.lora!r}")
                    engine.loras.start_running(adapter)
        except (HandoffRefused, LookupError):
            self.cancel(mid)
            raise
        seq.lora = adapter
        shift = clock_shift(state)
        for name in ("arrival_time", "first_admit_time", "first_token_time", "finish_time"):
            if getattr(seq, name) is not None:  # on this engine's clock: its queue orders by arrival
                setattr(seq, name, getattr(seq, name) + shift)
        self._restore(seq, state)
        if queued:
            s.add(seq)  # attaches its adapter; the queue serves it in its arrival order
        else:
            slots = self.reservations.pop(mid).slots
            if len(slots) > state.num_kv:
                engine.pool.free(slots[state.num_kv:])
            s.adopt(seq, slots[:state.num_kv])
            s.clients.arrived(seq.client)
        engine._requests[seq.request_id] = [seq]
        self.moved_in += 1
        return time.monotonic() - (state.suspended_at + shift)

    def _restore(self, seq: Sequence, state: RequestState) -> None:
        """What a request's state left behind on its source: its sampler's generator, its grammar's position
        (replayed over its output), its text decoder, its lookahead n-grams."""
        engine = self.engine
        if state.generator_state is not None:
            seq.generator = torch.Generator(device="cpu")
            seq.generator.set_state(state.generator_state)
        spec = GrammarSpec.from_params(seq.params)
        if spec is not None:
            seq.grammar = engine.grammars.state(spec)
            for token in seq.output_ids:
                seq.grammar.accept(token)
        seq.detok = engine.output.resume_decoder(seq)
        if engine.lookahead_sizes is not None:
            from kestrel.engine.lookahead import LookaheadState
            seq.lookahead = LookaheadState.for_prompt(engine.lookahead_sizes, seq.all_ids)

    def cancel(self, mid: str) -> bool:
        """Free a reservation (the move was given up); False if there was none."""
        r = self.reservations.pop(mid, None)
        if r is None:
            return False
        self.engine.pool.free(r.slots)
        return True

    def moving(self) -> bool:
        """Whether a request is moving out of or into this engine (exported lately, suspended, or reserved for)."""
        if self.exported:
            now = time.monotonic()
            self.exported = {rid: t for rid, t in self.exported.items() if now - t < EXPORT_QUIET}
        return bool(self.exported or self.suspended or self.reservations)

    def expire(self) -> None:
        now = time.monotonic()
        for mid in [m for m, r in self.reservations.items() if now - r.touched > RESERVATION_TTL]:
            self.cancel(mid)

    @property
    def reserved_tokens(self) -> int:
        return sum(len(r.slots) for r in self.reservations.values())

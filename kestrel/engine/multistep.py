"""Multi-step decoding: several greedy decode steps in one C++ call, where nothing needs the host between tokens.

A plain step pays the host's work (scheduling, building the batch, sampling, Python) for every token; at batch 1
on a CPU that is a fifth of a token's time. When every running sequence picks the argmax of the raw logits and
nothing must be decided between its tokens, `Bursts.run` reserves free slots for several steps, runs them in one
call (the kernels' decode_burst: layers, head and argmax, each pick fed back at the next position, stopping at a
stop token) and commits each step's picks through the engine's usual append, so the outputs, finishes and fairness
charges are those of plain steps (vLLM's multi-step scheduling, without its GPU asynchrony).
"""
from __future__ import annotations

import logging
import time

import torch

from kestrel.engine.scheduler import ScheduledBatch
from kestrel.engine.step_log import batch_shape

log = logging.getLogger("kestrel.engine")
# a burst runs about this long at most: what an arriving request, an abort or a call waits. At batch 1 on a 2-core
# AMX Xeon (4 ms steps) 0.05 s gave 9.7% of a token's time outside matmuls and attention, 0.03 s 10.5%
BURST_SECONDS = 0.05


class Bursts:
    """One engine's multi-step decoding (EngineConfig.num_scheduler_steps)."""

    def __init__(self, engine):
        self.engine = engine
        self.decode_seconds: dict[int, float] = {}  # a decode step's duration by its rows: sizes the bursts

    def steps(self, batch: ScheduledBatch) -> int:
        """How many decode steps this batch may run in one call (1: a plain step). Only a decode-only batch with
        nothing waiting (so no admission, preemption or fairness decision is put off) and no request moving to or
        from another engine (a move's stages come between steps), whose every sequence picks the argmax of the
        raw logits with nothing the host must see between tokens (stop strings are found in detokenized text)
        and no adapter or lookahead; never past a sequence's max_tokens or the context length, and about
        BURST_SECONDS long at most (from the last decode step of this many rows: none yet, no burst)."""
        e = self.engine
        steps = e.config.num_scheduler_steps
        if steps <= 1 or batch.prefill or e.scheduler.waiting or e.handoffs.moving():
            return 1
        rows = len(batch.decode)
        seconds = self.decode_seconds.get(rows)
        if seconds is None or not e.runner.can_burst(rows):
            return 1
        steps = min(steps, int(BURST_SECONDS / max(seconds, 1e-6)))
        for seq in batch.decode:
            p = seq.params
            if (seq.finished or not p.plain_argmax or p.stop or seq.grammar is not None or seq.lookahead is not None
                    or seq.lora is not None or seq.draft is not None):
                return 1
            steps = min(steps, p.max_tokens - len(seq.output_ids), e.context_length - seq.total_len)
        return steps

    def run(self, batch: ScheduledBatch, start: float) -> bool:
        """Run this scheduled batch (its first step's slots assigned) as a burst where `steps` allows one of two
        steps or more: reserve the slots, make the call, commit each step's picks as a plain step would. False,
        with nothing done, where no burst runs: no second step allowed, no free slot for one, or the call failed
        (the plain step the caller then runs isolates a failure to its request)."""
        steps = self.steps(batch)
        if steps < 2:
            return False
        e = self.engine
        seqs = batch.decode
        slots = e.scheduler.reserve_burst(seqs, steps - 1)
        if slots is None:
            return False
        plan = e.scheduler.plan(batch)
        stop_ids = set(e.eos_token_ids)
        for seq in seqs:
            stop_ids.update(seq.params.stop_token_ids)
        t1 = time.perf_counter()
        try:
            picks = e.runner.decode_burst(plan.batch, slots, torch.tensor(sorted(stop_ids), dtype=torch.int64),
                                          BURST_SECONDS)
        except Exception:  # noqa: BLE001 - the plain step that follows finds which request it is, and fails it
            log.exception("a multi-step burst failed; running a plain step instead")
            e.scheduler.end_burst(seqs, 0, keep=1)
            return False
        e.stats.forward_time += time.perf_counter() - t1
        shapes = []
        for tokens in picks.tolist():
            live = [(seq, token) for seq, token in zip(seqs, tokens) if not seq.finished]
            if not live:
                break
            step = ScheduledBatch(decode=[seq for seq, _ in live])
            shapes.append(batch_shape(step))
            e._commit(step, step.decode, [token for _, token in live], [None] * len(live), None, [])
        e.scheduler.end_burst(seqs, len(shapes))
        now = time.perf_counter()
        e.stats.steps += len(shapes)
        e.stats.burst_steps += len(shapes)
        e.stats.step_time += now - start
        e.step_log.ran_burst(shapes, start, now, e.has_unfinished())
        self.decode_seconds[len(seqs)] = (now - start) / len(shapes)
        return True

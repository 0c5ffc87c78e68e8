"""What a step costs, by its shape: the shape of a scheduled batch (shared by the engine and the model-free
simulator) and the engine's log of its recent steps' shapes and durations, which `kestrel plan` can fit its
cost model to on a running deployment (`GET /step_profile`)."""
from __future__ import annotations

from collections import deque
from typing import Optional

STEP_LOG_SIZE = 20000  # steps kept (a few MB at most)


def step_shape(tokens: int, decode_contexts: list[int], prefills: list[tuple[int, int, bool]]) -> tuple[int, int, int]:
    """(tokens, rows that need logits, attention pairs) of a step, what its cost depends on: decode rows attend to
    their contexts and need logits each; a prefill chunk of `chunk` tokens after `done` computed ones attends
    causally (chunk * done + chunk * (chunk + 1) / 2 pairs) and needs logits only when it ends its sequence
    (prefills: (done, chunk, ends))."""
    rows = len(decode_contexts) + sum(ends for _, _, ends in prefills)
    pairs = sum(decode_contexts) + sum(chunk * done + chunk * (chunk + 1) // 2 for done, chunk, _ in prefills)
    return tokens, rows, pairs


def batch_shape(batch) -> tuple[int, int, int]:
    """step_shape of a kestrel.engine.scheduler.ScheduledBatch, taken before the scheduler advances it."""
    return step_shape(batch.num_tokens, [seq.num_computed + 1 for seq in batch.decode],
                      [(seq.num_computed, chunk, seq.samples_after(seq.num_computed + chunk))
                       for seq, chunk in batch.prefill])


class StepLog:
    """(tokens, logits rows, attention pairs, seconds) of the engine's recent steps. While work remains after a
    step, its seconds run to the start of the next one, so the loop's own time between steps (delivering
    tokens, reading new requests, a deployment's messages) is priced in as the requests feel it; a step that
    leaves the engine idle counts its own duration."""

    def __init__(self, size: int = STEP_LOG_SIZE):
        self.samples: deque[tuple[int, int, int, float]] = deque(maxlen=size)
        self._open: Optional[tuple[tuple[int, int, int], float]] = None  # the last step's shape and start

    def begin(self, now: float) -> None:
        """A step call starts at `now`: the step before it, if still open, ends here."""
        if self._open is not None:
            shape, start = self._open
            self.samples.append((*shape, now - start))
            self._open = None

    def ran_burst(self, shapes: list[tuple[int, int, int]], start: float, now: float, more: bool) -> None:
        """Steps of these shapes ran in one call from `start` to `now` (a multi-step burst): each gets an even share."""
        share = (now - start) / len(shapes)
        for shape in shapes[:-1]:
            self.samples.append((*shape, share))
        self.ran(shapes[-1], now - share, now, more)

    def ran(self, shape: tuple[int, int, int], start: float, now: float, more: bool) -> None:
        """A step of `shape` ran from `start` to `now`; `more`: the engine has work left (the next call closes it)."""
        if more:
            self._open = (shape, start)
        else:
            self.samples.append((*shape, now - start))

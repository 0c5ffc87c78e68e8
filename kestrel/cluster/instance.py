"""One engine instance as a Ray actor: the engine driver loop in a thread, with batched messages out.

The API process talks to it through a few methods (Ray runs them on the actor's threads while the driver
thread computes):
  send(commands)        driver commands (Submit, Abort) in order; the API process sends them from one thread
  poll(timeout)         every message since the last poll, one list per call (no round trip per token):
                          ("deltas", [StreamDelta], load) after each step | ("error", rid, message, param)
                          | ("handoff", rid, RequestState, ObjectRef of its K/V) on a prefill instance
                        and the number of messages emitted so far (the mark a migration waits for)
  call(method, kwargs)  an engine management call between steps (load_lora, handoffs.*: see driver.CALLABLE)
  export_kv / suspend / adopt   the moving parts of a migration (of a running or a queued request), with K/V
                        passed as Ray objects
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from concurrent.futures import Future
from typing import Optional

from kestrel.config import EngineConfig

log = logging.getLogger("kestrel.cluster")
ROLES = ("both", "prefill", "decode")


def router_demand(s) -> dict:
    """What the router's least-load dispatch counts beyond a scheduler's KV in use: the tokens of queued requests,
    the prompt that running requests in a chunked prefill have still to compute (vLLM, Llumnix's engine, holds a
    prompt's KV from admission, so its usage counts both), and the high-priority requests."""
    return dict(waiting_tokens=sum(q.total_len - q.num_computed for q in s.waiting),
                prefill_tokens=sum(q.pending for q in s.running if q.pending > 1),
                high_priority=sum(q.priority < 0 for q in itertools.chain(s.waiting, s.running)))


def instance_load(engine) -> dict:
    """What a router ranks an instance by (kestrel.cluster.dispatch.Load): its requests, the KV they hold and
    the demand still to come (an Engine's, or the simulator's in kestrel plan)."""
    from kestrel.server.engine_process import kv_load

    return dict(kv_load(engine), **router_demand(engine.scheduler))


class Inbox(queue.Queue):
    """An instance's command queue, counting the Submits taken out of it. The driver thread takes them, adds them
    to the engine and only then reports its load with these counts, so the router (which counts a request it
    sent as in transit until a report says it was received) never sees a request as received before the load
    shows it. Counted as they came in, a request that arrived during a step was received in the report after that
    step but in none of its queues, and the router saw the instance idle through the whole next step: a long
    prompt's prefill, 4 s on one core, while it sent more long prompts there."""

    def __init__(self):
        super().__init__()
        self.received = self.received_tokens = 0

    def _get(self):  # (queue.Queue's hook, under its lock, in the taking thread)
        from kestrel.engine.driver import Submit

        cmd = super()._get()
        if isinstance(cmd, Submit):
            self.received += 1
            self.received_tokens += len(cmd.prompt)
        return cmd


class CallError(Exception):
    """An engine call the engine refused; kind as the server's CallFailed (engine_process.error_kind)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return CallError, (str(self), self.kind)


class Instance:
    """The actor class; kestrel.cluster.client wraps it with ray.remote when it starts instances."""

    def __init__(self, config: EngineConfig, name: str, role: str = "both"):
        from kestrel.engine.driver import EngineDriver
        from kestrel.engine.engine import Engine
        from kestrel.server.engine_process import LoraCounts, engine_load

        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.name, self.role = name, role
        self.engine = engine = Engine(config=config)
        self._load = engine_load
        self._lora_counts = LoraCounts()
        self._inbox = Inbox()
        self._out: list = []
        self._emitted = 0
        self._cond = threading.Condition()
        self._calls: dict[str, Future] = {}
        self._call_ids = 0
        self._lock = threading.Lock()
        self.keep: set[str] = set()  # prefill instance: requests that decode here after all (no decode room)
        after = self._hand_off if role == "prefill" else None
        self._driver = EngineDriver(engine, self._deliver, self._reject, self._respond, after)
        self._failure: Optional[str] = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"kestrel-{name}")
        self._thread.start()

    # ---- the driver thread's side ---------------------------------------------------------
    def _run(self) -> None:
        try:
            self._driver.run(self._inbox)
        except BaseException as e:  # noqa: BLE001 - the driver failed its requests; this instance is done
            self._failure = f"the engine failed: {type(e).__name__}: {e}"
            log.exception("instance %s: engine failed", self.name)
            os._exit(1)  # Ray sees the actor die and the server restarts it

    def _emit(self, msg) -> None:
        with self._cond:
            self._out.append(msg)
            self._emitted += 1
            self._cond.notify_all()

    def _deliver(self, deltas, finished) -> None:
        inbox = self._inbox  # (this thread takes from it: its counts are what the engine holds)
        # a request held while its grammar compiles is in no queue yet: the router keeps it in transit
        held = self._driver.compiling.held()
        load = dict(self._load(self.engine), loras=self._lora_counts.changes(self.engine),
                    received=inbox.received - len(held),
                    received_tokens=inbox.received_tokens - sum(len(sub.prompt) for sub in held),
                    **router_demand(self.engine.scheduler))
        self._emit(("deltas", deltas, load))

    def _reject(self, rid: str, error: BaseException) -> None:
        self._emit(("error", rid, str(error), getattr(error, "param", None)))

    def _respond(self, call_id: str, result, error) -> None:
        fut = self._calls.pop(call_id, None)
        if fut is None:
            return
        if error is not None:
            from kestrel.server.engine_process import error_kind

            fut.set_exception(CallError(str(error), error_kind(error)))
        else:
            fut.set_result(result)

    def _hand_off(self, engine) -> None:
        """A prefill instance gives away each request that has its first token (its K/V as a Ray object)."""
        import ray

        candidates = engine.handoffs.candidates()
        self.keep.intersection_update(c[0] for c in candidates)  # forget the ones that finished
        for rid, *_ in candidates:
            if rid in self.keep:
                continue
            state, kv = engine.handoffs.suspend(rid, 0)
            self._emit(("handoff", rid, state, ray.put(kv)))

    # ---- what the API process calls -------------------------------------------------------
    def ready(self) -> dict:
        e = self.engine
        return dict(model_dir=e.model_dir, context_length=e.context_length,
                    speculative=e.lookahead_sizes is not None, vocab_size=e.vocab_size,
                    max_total_tokens=e.pool.size, policy=e.config.policy, placement=e.describe(),
                    pid=os.getpid(), name=self.name, role=self.role)

    def send(self, commands: list) -> None:
        for cmd in commands:
            self._inbox.put(cmd)

    def poll(self, timeout: float = 0.5) -> tuple[list, int]:
        with self._cond:
            if not self._out:
                self._cond.wait(timeout)
            out, self._out = self._out, []
            return out, self._emitted

    def call(self, method: str, kwargs: Optional[dict] = None):
        from kestrel.engine.driver import Call

        fut: Future = Future()
        with self._lock:
            self._call_ids += 1
            call_id = f"c{self._call_ids}"
        self._calls[call_id] = fut
        self._inbox.put(Call(call_id, method, kwargs or {}))
        return fut.result()

    def export_kv(self, rid: str, start: int):
        """(end, K/V of tokens [start, end)): a migration stage; two return values (num_returns=2)."""
        return self.call("handoffs.export_kv", dict(rid=rid, start=start))

    def suspend(self, rid: str, start: int, queued: bool = False):
        """(state, K/V [start, end), (mark, end, time per token)): the request stops here; every delta it produced
        is in a message numbered at most `mark`; `end` tokens of K/V move; its own seconds per output token so far
        (None before its second). Three return values (num_returns=3). `queued`: a request still waiting in the
        queue (no K/V)."""
        state, kv = self.call("handoffs.suspend", dict(rid=rid, start=start, queued=queued))
        with self._cond:
            return state, kv, (self._emitted, state.num_kv, state.time_per_token)

    def write(self, mid: str, start: int, kv) -> None:
        self.call("handoffs.write", dict(mid=mid, start=start, kv=kv))

    def adopt(self, mid: str, state, start: int, kv) -> float:
        """Seconds the request was out of any batch (Handoffs.adopt)."""
        return self.call("handoffs.adopt", dict(mid=mid, state=state, start=start, kv=kv))

    def resume(self, rid: str, keep: bool = False) -> None:
        """The move failed: the request goes on here (`keep`: a prefill instance does not offer it again)."""
        if keep:
            self.keep.add(rid)
        self.call("handoffs.resume", dict(rid=rid))

    def kv_state(self) -> dict:
        """Pool accounting (tests check that nothing leaks): every slot is free, cached, or held by someone."""
        return self.call("kv_accounting")

    def pid(self) -> int:
        return os.getpid()

"""The one loop that drives an Engine for concurrent callers: inbox -> hold for grammar compile -> step -> deliver.

The server's engine process and the language's in-process backend both run it; they differ only in
where commands come from (a multiprocessing queue, a thread queue) and in their two delivery hooks.
Every submitted request ends in exactly one of two ways:
  - `deliver(deltas, finished)` hands out its final deltas (finish_reason stop, length, abort or error)
    and, if it ran in the engine, its RequestOutput;
  - `reject(request_id, error)` says it was never run: invalid input or a grammar that does not compile.
If the engine itself breaks (an exception outside the per-request isolation of `Engine.step`), every
request it holds, and every one held for compilation, is failed through the same two hooks before the
exception propagates: no caller is left waiting.
"""
from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from typing import Callable, Optional, Union

from kestrel.decoding.grammar import CompileQueue
from kestrel.engine.engine import Engine, Prompt, StreamDelta
from kestrel.engine.request import RequestOutput
from kestrel.engine.sampling_params import SamplingParams

log = logging.getLogger("kestrel.driver")
IDLE_WAIT = 1.0  # seconds the loop sleeps on an empty inbox while the engine is idle


@dataclass
class Submit:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    client: Optional[str] = None
    priority: int = 0
    lora: Optional[str] = None  # the LoRA adapter's name; None: the base model
    pause: Optional[Callable] = None  # text -> tools it calls (Engine.add_request); module-level: it is pickled


@dataclass
class Abort:
    request_id: str


@dataclass
class Credit:
    """Service clients received on the deployment's other instances (Scheduler.credit), sent by the router."""

    services: dict[str, float]


@dataclass
class Stop:
    pass


@dataclass
class Call:
    """Run an engine method that manages the engine (not a request) between steps, e.g. load_lora."""

    call_id: str
    method: str
    kwargs: dict


# what a Call may run
CALLABLE = ("load_lora", "unload_lora", "flush_cache", "kv_accounting", "client_counters", "step_profile",
            # moving requests between engines (kestrel/engine/handoff.py)
            "handoffs.export_kv", "handoffs.suspend", "handoffs.commit", "handoffs.resume", "handoffs.reserve",
            "handoffs.write", "handoffs.adopt", "handoffs.cancel", "handoffs.candidates")
Command = Union[Submit, Abort, Stop, Call, Credit]
Deliver = Callable[[list[StreamDelta], list[RequestOutput]], None]
Reject = Callable[[str, BaseException], None]
Respond = Callable[[str, object, Optional[BaseException]], None]


class EngineFailed(RuntimeError):
    """The engine broke while the request was queued or running; the request did not complete."""


class EngineDriver:
    def __init__(self, engine: Engine, deliver: Deliver, reject: Reject, respond: Optional[Respond] = None,
                 after_step: Optional[Callable[[Engine], None]] = None):
        self.engine = engine
        self.after_step = after_step  # runs after each step's deltas are delivered (a prefill instance hands off)
        self.deliver = deliver
        self.reject = reject
        self.respond = respond or (lambda call_id, result, error: None)  # respond(call_id, result, error)
        self.compiling = CompileQueue(engine.grammars)
        self.reading: list[tuple[Call, object]] = []  # load_lora calls whose adapter is being read (a Future)
        self.stalled = False  # the last step ran nothing though requests wait (their adapter is being read)

    def run(self, inbox) -> None:
        """Serve commands from `inbox` (anything with get(timeout=) and get_nowait()) until Stop."""
        try:
            while True:
                commands = self._receive(inbox)
                touched: set[str] = set()
                self.engine.expire_pauses()
                self.engine.handoffs.expire()
                self._finish_reads()
                for sub, error in self.compiling.ready():
                    if error is not None:
                        self.reject(sub.request_id, error)
                    else:
                        touched |= self._add(sub)
                for cmd in commands:
                    if isinstance(cmd, Stop):
                        return
                    if isinstance(cmd, Submit):
                        if not self.compiling.hold(cmd.params, cmd):
                            touched |= self._add(cmd)
                    elif isinstance(cmd, Abort):
                        touched |= self._abort(cmd.request_id)
                    elif isinstance(cmd, Call):
                        self._call(cmd)
                    elif isinstance(cmd, Credit):
                        self.engine.scheduler.credit(cmd.services)
                if self.engine.has_unfinished():
                    stepped = self.engine.step()
                    self.stalled = not stepped
                    touched |= stepped
                # a credit alone changes no request: no report for it (else reports and credits ping-pong)
                if touched or any(not isinstance(c, Credit) for c in commands):
                    self._deliver(touched)
                if self.after_step is not None and touched:
                    self.after_step(self.engine)
        except Exception as e:
            log.exception("the engine driver failed; failing every request it holds")
            self._fail_everything(e)
            raise
        finally:
            self.compiling.shutdown()

    def _receive(self, inbox) -> list[Command]:
        """Block only while there is nothing to compute; then take everything queued."""
        commands: list[Command] = []
        if self.stalled or not self.engine.has_unfinished():
            try:
                wait = 0.005 if self.compiling or self.reading or self.stalled else IDLE_WAIT
                commands.append(inbox.get(timeout=wait))
            except queue.Empty:
                pass
        while True:
            try:
                commands.append(inbox.get_nowait())
            except queue.Empty:
                return commands

    def _call(self, call: Call) -> None:
        if call.method not in CALLABLE:
            self.respond(call.call_id, None, ValueError(f"unknown engine call {call.method!r}"))
            return
        if call.method == "load_lora":  # read the adapter's files in the background while the engine computes
            self.reading.append((call, self.engine.loras.read_async(**call.kwargs)))
            return
        target = self.engine
        for name in call.method.split("."):
            target = getattr(target, name)
        self._finish(call, lambda: target(**call.kwargs))

    def _finish_reads(self) -> None:
        for call, fut in [(c, f) for c, f in self.reading if f.done()]:
            self.reading.remove((call, fut))
            self._finish(call, lambda: self.engine.load_lora(**call.kwargs, weights=fut.result()))

    def _finish(self, call: Call, run) -> None:
        try:
            result = run()
        except (ValueError, TypeError, LookupError, OSError) as e:  # the caller's mistake: the engine goes on
            self.respond(call.call_id, None, e)
            return
        self.respond(call.call_id, result, None)

    def _add(self, sub: Submit) -> set[str]:
        try:
            self.engine.add_request(sub.prompt, sub.params, request_id=sub.request_id, client=sub.client,
                                    priority=sub.priority, lora=sub.lora, pause=sub.pause)
        except (ValueError, TypeError, LookupError) as e:
            self.reject(sub.request_id, e)
            return set()
        return {sub.request_id}

    def _abort(self, rid: str) -> set[str]:
        held = self.compiling.remove(lambda sub: sub.request_id == rid)
        if held:  # never reached the engine: end its completions as the engine would
            n = held[0].params.n
            self.deliver([StreamDelta(rid, i, "", [], [], True, "abort") for i in range(n)], [])
            return set()
        return {rid} if self.engine.abort(rid) else set()

    def _deliver(self, touched: set[str]) -> None:
        deltas = self.engine.take_deltas(touched)
        finished = [self.engine.get_output(rid, pop=True) for rid in touched if self.engine.is_finished(rid)]
        self.deliver(deltas, finished)

    def _fail_everything(self, error: BaseException) -> None:
        failure = EngineFailed(f"the engine failed: {type(error).__name__}: {error}"[:500])
        try:
            self._deliver(self.engine.fail_all(failure))
        except Exception:  # noqa: BLE001 - the engine is broken; say so to each caller directly
            log.exception("could not deliver the failed requests' final state")
            for rid in self.engine.request_ids():
                self.reject(rid, failure)
        for sub in self.compiling.remove(lambda sub: True):
            self.reject(sub.request_id, failure)
        for call, _ in self.reading:
            self.respond(call.call_id, None, failure)

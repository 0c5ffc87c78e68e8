"""The engine in its own process, and the API process's supervisor of it.

The API process must answer health checks and accept connections while the engine computes, so the
engine runs the engine driver loop in a child process and talks through two multiprocessing queues:
  to the engine:   driver commands (Submit, Abort, Call, Stop)
  from the engine: ("ready", info) | ("failed", reason) at start;
                   ("deltas", [StreamDelta], load) | ("error", request_id, message, param) | ("fatal", reason)
                   | ("reply", call_id, result, error message, error kind) for a Call (load_lora, unload_lora)
If the engine process dies (killed, out of memory, a fatal error) or the API process's reader thread
does, every in-flight request fails with EngineDead at once, and a fresh engine process is started
with exponential backoff; after too many failures in a short time the supervisor gives up and /health
stays 503 so that an orchestrator can replace the whole server.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import multiprocessing as mp
import queue
import sys
import threading
import time
import traceback
from collections import deque
from typing import Optional

from kestrel.config import EngineConfig

log = logging.getLogger("kestrel.server")
ENGINE_START_TIMEOUT = 600.0
RESTART_WINDOW = 600.0  # seconds over which restarts are counted against max_restarts
OK, STARTING, RESTARTING, FAILED = "ok", "starting", "restarting", "failed"


def engine_main(config: EngineConfig, inbox, outbox) -> None:
    """The engine process: load the model, then run the driver loop until told to stop."""
    from kestrel.engine.driver import EngineDriver
    from kestrel.engine.engine import Engine

    try:
        engine = Engine(config=config)
    except (OSError, ValueError, TypeError) as e:  # a bad model path or setting: one line says it all
        outbox.put(("failed", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    except BaseException as e:  # noqa: BLE001 - a bug: keep the traceback in the log
        traceback.print_exc()
        outbox.put(("failed", f"{type(e).__name__}: {e} (traceback in the server log)"))
        sys.exit(1)
    outbox.put(("ready", dict(model_dir=engine.model_dir, context_length=engine.context_length,
                              speculative=engine.lookahead_sizes is not None,
                              vocab_size=engine.vocab_size, max_total_tokens=engine.pool.size,
                              policy=config.policy, placement=engine.describe())))
    lora_counts = LoraCounts()

    def deliver(deltas, finished) -> None:
        outbox.put(("deltas", deltas, dict(engine_load(engine), loras=lora_counts.changes(engine))))

    def reject(rid: str, error: BaseException) -> None:
        outbox.put(("error", rid, str(error), getattr(error, "param", None)))

    def respond(call_id: str, result, error) -> None:
        kind = None if error is None else error_kind(error)
        outbox.put(("reply", call_id, result, None if error is None else str(error), kind))

    try:
        EngineDriver(engine, deliver, reject, respond).run(inbox)
    except BaseException as e:  # noqa: BLE001 - the driver failed its requests already; exit for a restart
        outbox.put(("fatal", f"the engine failed: {type(e).__name__}: {e}"))
        sys.exit(1)


class LoraCounts:
    """Per adapter name, the loads into and evictions from the pool since the last report (for /metrics)."""

    def __init__(self):
        self._seen: dict[int, tuple[int, int]] = {}

    def changes(self, engine) -> dict[str, tuple[int, int]]:
        out = {}
        for a in engine.loras.by_id.values():
            before = self._seen.get(a.id, (0, 0))
            if (a.loads, a.evictions) != before:
                out[a.name] = (a.loads - before[0], a.evictions - before[1])
                self._seen[a.id] = (a.loads, a.evictions)
        return out


def kv_load(engine) -> dict:
    """Requests and KV memory of anything with a scheduler, pool and cache (an Engine, or the simulator)."""
    s = engine.scheduler
    # "used" = held by requests (incl. locked prefixes); unlocked cached prefixes are free to evict
    used = engine.pool.size - engine.pool.num_free - engine.cache.evictable_size
    return dict(running=len(s.running), waiting=len(s.waiting), kv_used=used, kv_size=engine.pool.size,
                kv_free=engine.pool.num_free, kv_evictable=engine.cache.evictable_size,
                kv_cached=engine.cache.total_size)


def engine_load(engine) -> dict:
    """What the API process shows in /metrics and uses for admission."""
    s = engine.scheduler
    return dict(kv_load(engine), retractions=s.num_retractions,
                clients=s.clients.take_changed(), clients_tracked=len(s.clients.usage),
                spec_steps=engine.take_spec_histogram(), paused=len(engine.pauses.paused),
                paused_tokens=engine.cache.pinned_size, swap_bytes=engine.pauses.swapped_bytes,
                pause_events=engine.pauses.stats.counts())


class RestartBudget:
    """Restarts with exponential backoff (0.5 s, 1 s, 2 s, ... up to 30 s), at most `max_restarts` within
    RESTART_WINDOW seconds; past that the supervisor gives up."""

    def __init__(self, max_restarts: int):
        self.max_restarts = max_restarts
        self.times: deque[float] = deque()

    def next_delay(self) -> Optional[float]:
        """Seconds to wait before the next attempt (which it counts), or None: give up."""
        now = time.monotonic()
        while self.times and now - self.times[0] > RESTART_WINDOW:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return None
        delay = min(30.0, 0.5 * 2 ** len(self.times))
        self.times.append(now + delay)
        return delay

    def gave_up(self) -> str:
        return f"gave up after {self.max_restarts} restarts in {RESTART_WINDOW:.0f} s"


class EngineDead(RuntimeError):
    """The engine process failed; the request did not complete."""


class Rejected(ValueError):
    """The engine refused a request: invalid input, or a grammar that does not compile."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def error_kind(error: BaseException) -> str:
    """How a refused engine call is reported: "not_found" (an unknown name), "gone" (a move found its request
    finished, aborted or admitted first) or "invalid"."""
    from kestrel.engine.handoff import HandoffGone

    return "not_found" if isinstance(error, LookupError) else "gone" if isinstance(error, HandoffGone) else "invalid"


class CallFailed(Exception):
    """The engine refused a management call; kind is error_kind's ("gone" only from moving a request)."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class EngineStartError(RuntimeError):
    """The engine process could not start (bad model path, bad setting, crash while loading)."""


class EngineFront:
    """What the server's clients of one engine process (EngineClient) and of many (kestrel.cluster's ClusterClient)
    share: a stream per request, listeners of each batch of deltas, and the adapters served; `call` is theirs."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.failure: Optional[str] = None  # why the engine is not ok, while it is not
        self.loras: dict[str, str] = dict(config.lora_modules)  # served adapters; a restarted engine loads them
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._listeners = []

    def add_listener(self, fn) -> None:
        """fn(deltas, load) is called (in a reader thread) for every batch of deltas: metrics hook."""
        self._listeners.append(fn)

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is not None:
            _put(*target, item)

    async def call(self, method: str, **kwargs):
        raise NotImplementedError

    async def call_each(self, method: str, **kwargs) -> list[tuple[str, object]]:
        """(instance name, answer) of an engine management call on each engine: here the one."""
        return [("engine", await self.call(method, **kwargs))]

    def role_of(self, name: str) -> str:
        """What the instance of that name runs: "both" (prefill and decode), "prefill" or "decode"."""
        return "both"

    async def load_lora(self, name: str, path: str) -> dict:
        info = await self.call("load_lora", name=name, path=path)
        self.loras[name] = path
        return info

    async def unload_lora(self, name: str) -> None:
        await self.call("unload_lora", name=name)
        self.loras.pop(name, None)


class EngineClient(EngineFront):
    """Starts and supervises the engine process; routes its deltas to per-request asyncio queues."""

    def __init__(self, config: EngineConfig, max_restarts: int = 5, start_timeout: float = ENGINE_START_TIMEOUT):
        super().__init__(config)
        self.start_timeout = start_timeout
        self.state = STARTING
        self.restarts = 0
        self._budget = RestartBudget(max_restarts)
        self._lock = threading.Lock()
        self._generation = 0
        self._calls: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        self._start()  # raises EngineStartError
        self.load: dict = dict(running=0, waiting=0, kv_used=0, kv_size=self.info["max_total_tokens"],
                               kv_free=self.info["max_total_tokens"], kv_evictable=0, retractions=0)

    # ---- the engine process -------------------------------------------------------------
    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        inbox, outbox = ctx.Queue(), ctx.Queue()
        config = dataclasses.replace(self.config, lora_modules=dict(self.loras))
        process = ctx.Process(target=engine_main, args=(config, inbox, outbox), daemon=True, name="kestrel-engine")
        process.start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            try:
                kind, payload = outbox.get(timeout=0.2)
                break
            except queue.Empty:
                if not process.is_alive():
                    raise EngineStartError(f"the engine process exited while starting (exit code "
                                           f"{process.exitcode}); see the log above") from None
                if time.monotonic() > deadline:
                    process.kill()
                    raise EngineStartError(f"the engine did not start within {self.start_timeout:.0f} s") from None
        if kind != "ready":
            process.join(5)
            raise EngineStartError(payload)
        with self._lock:
            self.info: dict = payload
            self.process, self._inbox = process, inbox
            self._generation += 1
            self._reader = threading.Thread(target=self._read, args=(self._generation, outbox, process),
                                            daemon=True, name="kestrel-engine-reader")
            self.state, self.failure = OK, None
        self._reader.start()

    def _read(self, generation: int, outbox, process) -> None:
        reason = "the engine process exited"
        try:
            while True:
                try:
                    msg = outbox.get(timeout=1.0)
                except queue.Empty:
                    if process.is_alive():
                        continue
                    reason = f"the engine process exited (exit code {process.exitcode})"
                    break
                except (EOFError, OSError):
                    reason = "the engine process is unreachable"
                    break
                if msg[0] == "fatal":
                    reason = msg[1]
                    break
                self._dispatch(msg)
        except BaseException as e:  # noqa: BLE001 - a dead reader is a dead engine: messages may be lost
            log.exception("the engine reader thread failed")
            reason = f"the API process's engine reader failed: {type(e).__name__}: {e}"
        self._engine_failed(generation, reason)

    def _dispatch(self, msg) -> None:
        if msg[0] == "deltas":
            _, deltas, load = msg
            self.load = load
            for fn in self._listeners:
                fn(deltas, load)
            for d in deltas:
                self._deliver(d.request_id, d)
        elif msg[0] == "error":
            _, rid, message, param = msg
            self._deliver(rid, Rejected(message, param))
        elif msg[0] == "reply":
            _, call_id, result, message, kind = msg
            target = self._calls.pop(call_id, None)
            if target is not None:
                loop, fut = target
                outcome = CallFailed(message, kind) if message is not None else result
                _resolve(loop, fut, outcome)

    def _engine_failed(self, generation: int, reason: str) -> None:
        with self._lock:
            if generation != self._generation or self.state != OK:
                return
            self.state, self.failure = RESTARTING, reason
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
            process = self.process
        log.error("engine failure: %s; failing %d in-flight requests and restarting", reason, len(streams))
        for loop, q in streams.values():
            _put(loop, q, EngineDead(reason))
        for loop, fut in calls.values():
            _resolve(loop, fut, EngineDead(reason))
        if process.is_alive():
            process.kill()
        process.join(5)
        threading.Thread(target=self._restart, daemon=True, name="kestrel-engine-restart").start()

    def _restart(self) -> None:
        while True:
            delay = self._budget.next_delay()
            if delay is None:
                with self._lock:
                    self.state = FAILED
                    self.failure = f"{self.failure}; {self._budget.gave_up()}"
                log.error("engine: %s", self.failure)
                return
            time.sleep(delay)
            try:
                self._start()
            except EngineStartError as e:
                with self._lock:
                    self.failure = f"restart failed: {e}"
                log.error("engine: %s", self.failure)
                continue
            self.restarts += 1
            log.warning("engine restarted (%d restarts so far)", self.restarts)
            return

    # ---- requests -----------------------------------------------------------------------
    def submit(self, rid: str, prompt_ids: list[int], params, client=None, priority: int = 0,
               lora: Optional[str] = None, pause=None) -> asyncio.Queue:
        """Send a request to the engine; its deltas (or an exception) arrive on the returned queue. `pause`:
        Engine.add_request's hook, a module-level function (it is pickled to the engine process)."""
        from kestrel.engine.driver import Submit

        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self.state != OK:
                raise EngineDead(self.failure or "the engine is not running")
            self._streams[rid] = (asyncio.get_running_loop(), q)
            self._inbox.put(Submit(rid, prompt_ids, params, client, priority, lora, pause))
        return q

    async def call(self, method: str, **kwargs):
        """Run an engine management method (kestrel.engine.driver.CALLABLE) between steps; raises CallFailed
        when the engine refuses it, EngineDead when the engine is down."""
        from kestrel.engine.driver import Call

        fut = asyncio.get_running_loop().create_future()
        with self._lock:
            if self.state != OK:
                raise EngineDead(self.failure or "the engine is not running")
            call_id = f"call-{next(self._call_ids)}"
            self._calls[call_id] = (asyncio.get_running_loop(), fut)
            self._inbox.put(Call(call_id, method, kwargs))
        result = await fut
        if isinstance(result, Exception):
            raise result
        return result

    def abort(self, rid: str) -> None:
        """Ask the engine to stop a request; its stream still receives the final delta (finish_reason abort)."""
        from kestrel.engine.driver import Abort

        with self._lock:
            if self.state == OK:
                self._inbox.put(Abort(rid))

    def release(self, rid: str, abort: bool) -> None:
        """Forget a request's stream (and abort it in the engine if it is still running)."""
        self._streams.pop(rid, None)
        if abort:
            self.abort(rid)

    def health_info(self) -> dict:
        return {"engine_pid": self.process.pid}

    @property
    def alive(self) -> bool:
        return self.state == OK and self.process.is_alive() and self._reader.is_alive()

    def status(self) -> str:
        """ok | starting | restarting | failed; a dead process or reader not yet noticed reads as restarting."""
        if self.state == OK and not (self.process.is_alive() and self._reader.is_alive()):
            return RESTARTING
        return self.state

    def shutdown(self, timeout: float = 10.0) -> None:
        from kestrel.engine.driver import Stop

        with self._lock:
            self.state, self.failure = FAILED, "the server is shutting down"
            process = self.process
        if process.is_alive():
            self._inbox.put(Stop())
            process.join(timeout)
            if process.is_alive():
                process.kill()


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, outcome) -> None:
    def set_result():
        if not fut.done():
            fut.set_result(outcome)
    try:
        loop.call_soon_threadsafe(set_result)
    except RuntimeError:  # the caller's event loop is closed
        pass


def _put(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(q.put_nowait, item)
    except RuntimeError:  # the request's event loop is closed: nobody is listening any more
        pass

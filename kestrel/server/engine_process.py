"""The engine in its own process, and the API process's supervisor of it.

The API process must answer health checks and accept connections while the engine computes, so the
engine runs the engine driver loop in a child process and talks through two multiprocessing queues:
  to the engine:   driver commands (Submit, Abort, Stop)
  from the engine: ("ready", info) | ("failed", reason) at start;
                   ("deltas", [StreamDelta], load) | ("error", request_id, message, param) | ("fatal", reason)
If the engine process dies (killed, out of memory, a fatal error) or the API process's reader thread
does, every in-flight request fails with EngineDead at once, and a fresh engine process is started
with exponential backoff; after too many failures in a short time the supervisor gives up and /health
stays 503 so that an orchestrator can replace the whole server.
"""
from __future__ import annotations

import asyncio
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
                              vocab_size=engine.vocab_size, max_total_tokens=engine.pool.size,
                              policy=config.policy, placement=engine.describe())))

    def deliver(deltas, finished) -> None:
        outbox.put(("deltas", deltas, engine_load(engine)))

    def reject(rid: str, error: BaseException) -> None:
        outbox.put(("error", rid, str(error), getattr(error, "param", None)))

    try:
        EngineDriver(engine, deliver, reject).run(inbox)
    except BaseException as e:  # noqa: BLE001 - the driver failed its requests already; exit for a restart
        outbox.put(("fatal", f"the engine failed: {type(e).__name__}: {e}"))
        sys.exit(1)


def engine_load(engine) -> dict:
    """What the API process shows in /metrics and uses for admission."""
    s = engine.scheduler
    # "used" = held by requests (incl. locked prefixes); unlocked cached prefixes are free to evict
    used = engine.pool.size - engine.pool.num_free - engine.cache.evictable_size
    return dict(running=len(s.running), waiting=len(s.waiting), kv_used=used, kv_size=engine.pool.size,
                kv_free=engine.pool.num_free, kv_evictable=engine.cache.evictable_size,
                kv_cached=engine.cache.total_size, retractions=s.num_retractions,
                clients=s.clients.take_changed(), clients_tracked=len(s.clients.usage))


class EngineDead(RuntimeError):
    """The engine process failed; the request did not complete."""


class Rejected(ValueError):
    """The engine refused a request: invalid input, or a grammar that does not compile."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


class EngineStartError(RuntimeError):
    """The engine process could not start (bad model path, bad setting, crash while loading)."""


class EngineClient:
    """Starts and supervises the engine process; routes its deltas to per-request asyncio queues."""

    def __init__(self, config: EngineConfig, max_restarts: int = 5, start_timeout: float = ENGINE_START_TIMEOUT):
        self.config = config
        self.max_restarts = max_restarts
        self.start_timeout = start_timeout
        self.state = STARTING
        self.failure: Optional[str] = None  # why the engine is not ok, while it is not
        self.restarts = 0
        self._restart_times: deque[float] = deque()
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._listeners = []
        self._generation = 0
        self._start()  # raises EngineStartError
        self.load: dict = dict(running=0, waiting=0, kv_used=0, kv_size=self.info["max_total_tokens"],
                               kv_free=self.info["max_total_tokens"], kv_evictable=0, retractions=0)

    # ---- the engine process -------------------------------------------------------------
    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        inbox, outbox = ctx.Queue(), ctx.Queue()
        process = ctx.Process(target=engine_main, args=(self.config, inbox, outbox), daemon=True,
                              name="kestrel-engine")
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

    def _engine_failed(self, generation: int, reason: str) -> None:
        with self._lock:
            if generation != self._generation or self.state != OK:
                return
            self.state, self.failure = RESTARTING, reason
            streams, self._streams = self._streams, {}
            process = self.process
        log.error("engine failure: %s; failing %d in-flight requests and restarting", reason, len(streams))
        for loop, q in streams.values():
            _put(loop, q, EngineDead(reason))
        if process.is_alive():
            process.kill()
        process.join(5)
        threading.Thread(target=self._restart, daemon=True, name="kestrel-engine-restart").start()

    def _restart(self) -> None:
        while True:
            now = time.monotonic()
            while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW:
                self._restart_times.popleft()
            if len(self._restart_times) >= self.max_restarts:
                with self._lock:
                    self.state = FAILED
                    self.failure = (f"{self.failure}; gave up after {self.max_restarts} restarts in "
                                    f"{RESTART_WINDOW:.0f} s")
                log.error("engine: %s", self.failure)
                return
            time.sleep(min(30.0, 0.5 * 2 ** len(self._restart_times)))  # 0.5 s, 1 s, 2 s, ...
            self._restart_times.append(time.monotonic())
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
    def add_listener(self, fn) -> None:
        """fn(deltas, load) is called (in the reader thread) for every batch of deltas: metrics hook."""
        self._listeners.append(fn)

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is not None:
            _put(*target, item)

    def submit(self, rid: str, prompt_ids: list[int], params, client=None, priority: int = 0) -> asyncio.Queue:
        """Send a request to the engine; its deltas (or an exception) arrive on the returned queue."""
        from kestrel.engine.driver import Submit

        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self.state != OK:
                raise EngineDead(self.failure or "the engine is not running")
            self._streams[rid] = (asyncio.get_running_loop(), q)
            self._inbox.put(Submit(rid, prompt_ids, params, client, priority))
        return q

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


def _put(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item) -> None:
    try:
        loop.call_soon_threadsafe(q.put_nowait, item)
    except RuntimeError:  # the request's event loop is closed: nobody is listening any more
        pass

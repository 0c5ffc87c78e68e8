"""The engine in its own process, and the API process's handle on it.

The API process must answer health checks and accept connections while the engine computes, so the
engine loop runs in a child process and talks through two multiprocessing queues:
  to the engine:   ("add", request_id, prompt_ids, SamplingParams, client, priority) | ("abort", request_id)
                   | ("stop",)
  from the engine: ("ready", info) | ("deltas", [StreamDelta], load) | ("error", request_id, message)
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import queue
import threading
import traceback
from kestrel.config import EngineConfig

ENGINE_START_TIMEOUT = 600.0


def _engine_loop(config: EngineConfig, inbox, outbox) -> None:
    from kestrel.decoding.grammar import CompileQueue
    from kestrel.engine.engine import Engine

    engine = Engine(config=config)
    outbox.put(("ready", dict(model_dir=engine.model_dir, context_length=engine.context_length,
                              vocab_size=engine.vocab_size, max_total_tokens=engine.pool.size,
                              policy=config.policy)))
    compiling = CompileQueue(engine.grammars)

    def add(msg) -> None:
        _, rid, ids, params, client, priority = msg
        try:
            engine.add_request(ids, params, request_id=rid, client=client, priority=priority)
        except (ValueError, TypeError) as e:
            outbox.put(("error", rid, str(e)))

    while True:
        idle = not engine.has_unfinished()
        try:
            messages = [inbox.get(timeout=0.005 if compiling else 1.0)] if idle else []  # block only while idle
        except queue.Empty:
            messages = []
        while True:
            try:
                messages.append(inbox.get_nowait())
            except queue.Empty:
                break
        touched: set[str] = set()
        for msg, error in compiling.ready():
            if error is not None:
                outbox.put(("error", msg[1], str(error)))
            else:
                add(msg)
        for msg in messages:
            if msg[0] == "stop":
                compiling.shutdown()
                return
            if msg[0] == "add" and not compiling.hold(msg[3], msg):
                add(msg)
            elif msg[0] == "abort":
                compiling.drop(lambda held: held[1] != msg[1])
                if engine.abort(msg[1]):
                    touched.add(msg[1])
        if engine.has_unfinished():
            try:
                touched |= engine.step()
            except Exception:  # a bug, not bad input (that is rejected at add): fail loudly, never hang clients
                traceback.print_exc()
                outbox.put(("fatal", "the engine failed while running a step; see the server log"))
                return
        if touched:
            deltas = engine.take_deltas(touched)
            for rid in touched:
                seqs = engine._requests.get(rid)
                if seqs and all(s.finished for s in seqs):
                    engine.get_output(rid, pop=True)
            outbox.put(("deltas", deltas, _load(engine)))


def _load(engine) -> dict:
    s = engine.scheduler
    # "used" = held by requests (incl. locked prefixes); unlocked cached prefixes are free to evict
    used = engine.pool.size - engine.pool.num_free - engine.cache.evictable_size
    return dict(running=len(s.running), waiting=len(s.waiting), kv_used=used, kv_size=engine.pool.size,
                kv_cached=engine.cache.total_size, retractions=s.num_retractions, clients=s.clients.take_changed())


class EngineDead(RuntimeError):
    """The engine process is gone; requests cannot be served until the server restarts."""


class EngineClient:
    """Starts the engine process and routes its deltas to per-request asyncio queues."""

    def __init__(self, config: EngineConfig):
        ctx = mp.get_context("spawn")
        self._inbox = ctx.Queue()
        self._outbox = ctx.Queue()
        self.process = ctx.Process(target=_engine_loop, args=(config, self._inbox, self._outbox), daemon=True,
                                   name="kestrel-engine")
        self.process.start()
        kind, *rest = self._outbox.get(timeout=ENGINE_START_TIMEOUT)
        if kind != "ready":
            raise RuntimeError(f"engine failed to start: {rest}")
        self.info: dict = rest[0]
        self.load: dict = dict(running=0, waiting=0, kv_used=0, kv_size=self.info["max_total_tokens"], retractions=0)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.failure: str | None = None
        self._listeners = []
        self._reader = threading.Thread(target=self._read, daemon=True, name="kestrel-engine-reader")
        self._reader.start()

    def add_listener(self, fn) -> None:
        """fn(deltas, load) is called (in the reader thread) for every batch of deltas: metrics hook."""
        self._listeners.append(fn)

    def _read(self) -> None:
        while True:
            try:
                msg = self._outbox.get(timeout=1.0)
            except queue.Empty:
                if self.process.is_alive():
                    continue
                msg = ("fatal", "the engine process exited")
            except (EOFError, OSError):
                msg = ("fatal", "the engine process is unreachable")
            if msg[0] == "fatal":
                self.failure = msg[1]
                for rid in list(self._streams):
                    self._deliver(rid, EngineDead(msg[1]))
                return
            if msg[0] == "deltas":
                _, deltas, load = msg
                self.load = load
                for fn in self._listeners:
                    fn(deltas, load)
                for d in deltas:
                    self._deliver(d.request_id, d)
            elif msg[0] == "error":
                self._deliver(msg[1], ValueError(msg[2]))

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def submit(self, rid: str, prompt_ids: list[int], params, client=None, priority: int = 0) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", rid, prompt_ids, params, client, priority))
        return q

    def release(self, rid: str, abort: bool) -> None:
        self._streams.pop(rid, None)
        if abort:
            self._inbox.put(("abort", rid))

    @property
    def alive(self) -> bool:
        return self.failure is None and self.process.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            self._inbox.put(("stop",))
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()

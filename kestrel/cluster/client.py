"""Several engine instances on Ray behind the one API process: dispatch, live migration, disaggregation, faults.

`ClusterClient` offers the server what `EngineClient` offers (submit, abort, calls, load, health), so every route
works unchanged in front of many instances. Per instance, one thread sends commands (in order, batched) and one
polls its messages (deltas batched per step). The Llumnix policy runs in a thread of its own and moves running
requests from the most to the least used instance (kestrel/engine/handoff.py does the moving on each side); a
prefill instance hands each request over after its first token, and the router places it on a decode instance.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from kestrel.cluster.dispatch import (PRIORITY_HEADROOM, Dispatcher, Load, check_router, least_loaded,
                                     migration_pair, pick_move)
from kestrel.cluster.instance import CallError, Instance
from kestrel.config import EngineConfig
from kestrel.engine.clients import ServiceShare
from kestrel.server.engine_process import (FAILED, OK, RESTARTING, CallFailed, EngineDead, EngineFront,
                                           EngineStartError, Rejected, RestartBudget)

log = logging.getLogger("kestrel.cluster")
POLL_SECONDS = 0.5  # an idle instance's poll returns after this long with nothing
BALANCE_SECONDS = 0.05  # how often the migration policy looks at the loads
STOP_COPY_TOKENS = 4  # a migration stops the request once fewer tokens than this are left to copy
MAX_STAGES = 6  # copy stages before the stop-and-copy, whatever is left
START_TIMEOUT = 600.0
CREDIT_DUE = object()  # in an instance's command queue: its sender adds what other instances' clients received
SUMMED = ("running", "waiting", "kv_used", "kv_size", "kv_free", "kv_evictable", "kv_cached", "retractions",
          "clients_tracked", "paused", "paused_tokens", "swap_bytes", "waiting_tokens", "prefill_tokens",
          "high_priority")


@dataclass
class ClusterConfig:
    """How many engine instances, where, and how requests are spread over them."""

    instances: int = 1  # colocated instances (prefill and decode on each)
    prefill_instances: int = 0  # with decode_instances: disaggregated (DistServe)
    decode_instances: int = 0
    router: str = "least-load"  # kestrel.cluster.dispatch.ROUTERS
    migration: bool = False  # Llumnix: move queued and running requests from the most to the least used instance
    migration_gap: float = 0.25  # usage difference (share of the pool) above which a request moves
    ray_address: Optional[str] = None  # an existing Ray cluster ("auto"); None: a local Ray is started
    cpus_per_instance: Optional[float] = None  # default: this machine's cores over the instances
    gpus_per_instance: float = 0.0

    def __post_init__(self) -> None:
        check_router(self.router)
        if (self.prefill_instances > 0) != (self.decode_instances > 0):
            raise ValueError("disaggregation needs both --prefill-instances and --decode-instances (>= 1 each)")
        if self.instances < 1 and not self.disaggregated:
            raise ValueError(f"--instances must be >= 1, got {self.instances}")
        if self.migration_gap <= 0:
            raise ValueError(f"--migration-gap must be > 0, got {self.migration_gap}")
        if self.router == "llumnix":
            self.migration = True

    @property
    def disaggregated(self) -> bool:
        return self.prefill_instances > 0

    def roles(self) -> list[tuple[str, str]]:
        """(name, role) of every instance."""
        if self.disaggregated:
            return ([(f"prefill-{i}", "prefill") for i in range(self.prefill_instances)]
                    + [(f"decode-{i}", "decode") for i in range(self.decode_instances)])
        return [(f"instance-{i}", "both") for i in range(self.instances)]


@dataclass
class Migration:
    """One move of a running (or queued) request, as the benchmark and /metrics report it."""

    rid: str
    source: str
    destination: str
    outcome: str  # done | gone (finished or aborted first) | refused (no room) | failed (an instance died)
    tokens: int = 0  # K/V tokens moved
    stages: int = 0
    downtime: float = 0.0  # seconds out of any batch: from leaving the source's to joining the destination's
    time_per_token: Optional[float] = None  # the request's own seconds per output token before it stopped
    total: float = 0.0
    queued: bool = False  # it was waiting in the source's queue: nothing was copied, it waits on the destination

    @property
    def downtime_steps(self) -> Optional[float]:
        """The pause in the request's own decode steps (its time per token before the move)."""
        return self.downtime / self.time_per_token if self.time_per_token else None


class SourceLost(Exception):
    """A migration's source died after stopping the request, before all it had streamed reached the client."""


class InstanceHandle:
    """The API process's view of one instance: its actor, its load, its sender and poller threads."""

    def __init__(self, name: str, role: str):
        self.name, self.role = name, role
        self.actor = None
        self.info: dict = {}
        self.alive = False
        self.generation = 0
        self.processed = 0  # messages handled so far (a migration waits for the source's last deltas)
        self.cond = threading.Condition()
        self.commands: queue.Queue = queue.Queue()
        self.budget: Optional[RestartBudget] = None
        self.restarts = 0
        self.failed: Optional[str] = None  # why its restarts were given up

    def send(self, cmd) -> None:
        self.commands.put(cmd)


@dataclass(frozen=True)
class Pinned:
    """An instance as it was when a move began: calls go to that actor (a dead one fails them, rather than a
    restarted successor that never knew the request answering), and `changed` says whether it died since."""

    handle: InstanceHandle
    actor: object
    generation: int

    @classmethod
    def of(cls, h: InstanceHandle) -> "Pinned":  # under the client's lock: actor and generation change together
        return cls(h, h.actor, h.generation)

    @property
    def changed(self) -> bool:
        return not self.handle.alive or self.handle.generation != self.generation


class ClusterClient(EngineFront):
    def __init__(self, config: EngineConfig, cluster: ClusterConfig, max_restarts: int = 5,
                 start_timeout: float = START_TIMEOUT):
        import ray

        super().__init__(config)
        self.cluster = cluster
        self.start_timeout = start_timeout
        self._lock = threading.RLock()
        self._where: dict[str, InstanceHandle] = {}  # request -> the instance running it
        self._submits: dict = {}  # request -> its Submit, while nothing has streamed (re-dispatch on a crash)
        self._moving: set[str] = set()  # requests being migrated or handed over
        self._aborted: set[str] = set()  # ... and aborted meanwhile
        self._stopping = False
        self.dispatcher = Dispatcher(cluster.router)
        self.shares = ServiceShare()  # one fairness counter per client across the instances
        self.loads: dict[str, Load] = {}
        self.migrations: list[Migration] = []
        self._unreported: list[Migration] = []
        self._mids = itertools.count()
        self._started_ray = False
        self._moves = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kestrel-handoff")
        cpus = cluster.cpus_per_instance
        roles = cluster.roles()
        if cpus is None:
            from kestrel.engine.hardware import usable_cpus
            cpus = max(1.0, usable_cpus() // len(roles)) if cluster.gpus_per_instance == 0 else 1.0
        self.cpus = cpus
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
            if cluster.ray_address:
                ray.init(address=cluster.ray_address, **kwargs)
            else:
                ray.init(num_cpus=max(1, int(round(cpus * len(roles) + 0.49))), object_store_memory=1 << 30,
                         **kwargs)
            self._started_ray = True
        need = self.cpus * len(roles)
        free = ray.available_resources().get("CPU", 0.0)
        if not cluster.ray_address and free + 1e-9 < need:  # a local Ray that cannot place them all would wait forever
            raise EngineStartError(f"the local Ray has {free:g} CPUs free; {len(roles)} instances x {self.cpus:g} "
                                   f"CPUs need {need:g} (lower --cpus-per-instance, or stop what holds them)")
        self._actor_class = ray.remote(Instance)
        self.handles = [InstanceHandle(name, role) for name, role in roles]
        for h in self.handles:
            h.budget = RestartBudget(max_restarts)
            self.loads[h.name] = Load()
        try:
            starting = [(h, self._create(h)) for h in self.handles]
            for h, ready in starting:
                self._adopt_actor(h, *ready)
        except EngineStartError:
            self.shutdown()
            raise
        first = self.handles[0].info
        self.info = {k: v for k, v in first.items() if k not in ("pid", "name", "role")}
        self.info["max_total_tokens"] = min(h.info["max_total_tokens"] for h in self.handles)
        self.info["placement"] = (f"{len(self.handles)} instances on Ray ({self._layout()}), router "
                                  f"{cluster.router}{', migration on' if cluster.migration else ''}; each: "
                                  f"{first['placement']}")
        self.load: dict = self._combined({})
        self._balancer = None
        if cluster.migration:
            self._balancer = threading.Thread(target=self._balance, daemon=True, name="kestrel-llumnix")
            self._balancer.start()

    def _layout(self) -> str:
        if self.cluster.disaggregated:
            return f"{self.cluster.prefill_instances} prefill + {self.cluster.decode_instances} decode"
        return f"{self.cpus:g} CPU{'s' if self.cpus != 1 else ''}" + (
            f", {self.cluster.gpus_per_instance:g} GPU" if self.cluster.gpus_per_instance else "") + " each"

    # ---- instances ----------------------------------------------------------------------
    def _create(self, h: InstanceHandle):
        config = dataclasses.replace(self.config, lora_modules=dict(self.loras))
        if self.cluster.gpus_per_instance == 0 and config.num_threads is None:
            config = dataclasses.replace(config, num_threads=max(1, int(self.cpus)))
        actor = self._actor_class.options(num_cpus=self.cpus, num_gpus=self.cluster.gpus_per_instance,
                                          max_concurrency=16, max_restarts=0).remote(config, h.name, h.role)
        return actor, actor.ready.remote()

    def _adopt_actor(self, h: InstanceHandle, actor, ready_ref, restart: bool = False) -> None:
        import ray

        try:
            info = ray.get(ready_ref, timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError:
            ray.kill(actor)
            raise EngineStartError(f"instance {h.name} did not start within {self.start_timeout:.0f} s") from None
        except ray.exceptions.RayError as e:
            raise EngineStartError(f"instance {h.name} failed to start: {_cause(e)}") from None
        with self._lock:
            h.actor, h.info = actor, info
            h.generation += 1
            h.commands = queue.Queue()
            self.shares.take(h.name)  # a new engine starts its counters afresh; what was owed to the old one goes
            h.processed = 0
            if restart:  # counted before it shows alive, so whoever sees it back sees the restart too
                h.restarts += 1
                self.failure = None
            h.alive = True
            self.loads[h.name] = Load(dict(kv_size=info["max_total_tokens"]))  # its pool, before its first report
        gen = h.generation
        threading.Thread(target=self._poll, args=(h, gen), daemon=True, name=f"kestrel-poll-{h.name}").start()
        threading.Thread(target=self._send, args=(h, gen), daemon=True, name=f"kestrel-send-{h.name}").start()

    def _send(self, h: InstanceHandle, gen: int) -> None:
        import ray

        from kestrel.engine.driver import Credit

        while not self._stopping and h.generation == gen:
            try:
                batch = [h.commands.get(timeout=POLL_SECONDS)]
            except queue.Empty:
                continue
            while True:
                try:
                    batch.append(h.commands.get_nowait())
                except queue.Empty:
                    break
            if any(cmd is CREDIT_DUE for cmd in batch):
                batch = [cmd for cmd in batch if cmd is not CREDIT_DUE]
                owed = self.shares.take(h.name)
                if owed:
                    batch.append(Credit(owed))
            if not batch:
                continue
            try:
                ray.get(h.actor.send.remote(batch))
            except ray.exceptions.RayError:
                return  # the poller sees the instance die and handles it

    def _poll(self, h: InstanceHandle, gen: int) -> None:
        import ray

        while not self._stopping and h.generation == gen:
            try:
                messages, mark = ray.get(h.actor.poll.remote(POLL_SECONDS))
            except ray.exceptions.RayError as e:
                if not self._stopping:
                    self._instance_failed(h, gen, f"instance {h.name} died: {_cause(e)}")
                return
            except Exception as e:  # noqa: BLE001 - a broken poller is a lost instance: messages may be gone
                log.exception("the poller of instance %s failed", h.name)
                self._instance_failed(h, gen, f"the poller of instance {h.name} failed: {e}")
                return
            for msg in messages:
                self._dispatch(h, msg)
            with h.cond:
                h.processed = mark
                h.cond.notify_all()

    def _dispatch(self, h: InstanceHandle, msg) -> None:
        kind = msg[0]
        if kind == "deltas":
            _, deltas, report = msg
            self.loads[h.name].update(report)
            alive = {x.name: x for x in self.handles if x.alive}
            for name in self.shares.reported(h.name, report.get("clients", {}), list(alive)):
                alive[name].send(CREDIT_DUE)
            self.load = self._combined(report)
            for fn in self._listeners:
                fn(deltas, self.load)
            for d in deltas:
                if d.token_ids or d.finished:
                    self._submits.pop(d.request_id, None)  # it has streamed: a crash can no longer re-run it
                self._deliver(d.request_id, d)
        elif kind == "error":
            _, rid, message, param = msg
            self._deliver(rid, Rejected(message, param))
        elif kind == "handoff":
            _, rid, state, kv = msg
            with self._lock:
                self._moving.add(rid)
                src = Pinned.of(h)  # the instance this poller reads: a successor cannot be, as it stops then
            self._moves.submit(self._hand_over, src, rid, state, kv)

    def _instance_failed(self, h: InstanceHandle, gen: int, reason: str) -> None:
        with self._lock:
            if h.generation != gen or not h.alive:
                return
            h.alive = False
            mine = [rid for rid, where in self._where.items() if where is h and rid not in self._moving]
            log.error("%s; %d requests were on it", reason, len(mine))
            self._rescue(mine, reason)  # under the lock: a move ending now (_settle) sees them rescued
        self.dispatcher.forget(h.name)
        self.loads[h.name] = Load()
        if not any(x.alive for x in self.handles):
            self.failure = reason
        threading.Thread(target=self._restart, args=(h, reason), daemon=True, name=f"kestrel-restart-{h.name}").start()

    def _rescue(self, rids: list[str], reason: str) -> None:
        """Requests whose instance died: those that have streamed nothing (and were not aborted meanwhile) run
        elsewhere from the start, the others fail with EngineDead. Nothing here blocks: callers hold the lock."""
        redo = []
        for rid in rids:
            sub = self._submits.get(rid)
            if sub is not None and rid not in self._aborted and self._entry_instances():
                redo.append(sub)
            else:
                self._where.pop(rid, None)
                self._deliver(rid, EngineDead(reason))
        for sub in redo:
            try:
                self._place(sub)
            except EngineDead as e:
                self._where.pop(sub.request_id, None)
                self._deliver(sub.request_id, e)

    def _restart(self, h: InstanceHandle, reason: str) -> None:
        import ray

        try:
            ray.kill(h.actor)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        while not self._stopping:
            delay = h.budget.next_delay()
            if delay is None:
                h.failed = f"{reason}; {h.budget.gave_up()}"
                log.error("instance %s: %s", h.name, h.failed)
                return
            time.sleep(delay)
            try:
                self._adopt_actor(h, *self._create(h), restart=True)
            except EngineStartError as e:
                log.error("instance %s: restart failed: %s", h.name, e)
                continue
            log.warning("instance %s restarted (%d restarts so far)", h.name, h.restarts)
            return

    # ---- placing requests ---------------------------------------------------------------
    def _entry_instances(self) -> list[InstanceHandle]:
        role = "prefill" if self.cluster.disaggregated else "both"
        return [h for h in self.handles if h.alive and h.role == role]

    def _decode_instances(self) -> list[InstanceHandle]:
        role = "decode" if self.cluster.disaggregated else "both"
        return [h for h in self.handles if h.alive and h.role == role]

    def _place(self, sub) -> InstanceHandle:
        with self._lock:
            candidates = self._entry_instances()
            if not candidates:
                raise EngineDead(self.failure or "no engine instance is running")
            h = self.dispatcher.choose(candidates, self.loads, sub.prompt, sub.lora)
            if log.isEnabledFor(logging.DEBUG):  # --log-level debug: each decision with the loads it saw
                log.debug("sent %s (%d prompt tokens) to %s; %s", sub.request_id, len(sub.prompt), h.name,
                          self._describe_loads(candidates))
            self.loads[h.name].sent(len(sub.prompt))
            self._where[sub.request_id] = h
            self._submits[sub.request_id] = sub
        h.send(sub)
        return h

    def _hand_over(self, s: Pinned, rid: str, state, kv) -> None:
        """A prefill instance finished a prompt: adopt it on the freest decode instance that has room."""
        import ray

        try:
            tried = set()
            while True:
                with self._lock:
                    options = [h for h in self._decode_instances() if h.name not in tried]
                    d = Pinned.of(least_loaded(options, self.loads)) if options else None
                if d is None:
                    break
                tried.add(d.handle.name)
                try:
                    ray.get(d.actor.adopt.remote(f"{rid}>{d.handle.name}", state, 0, kv))
                except ray.exceptions.RayError as e:
                    log.warning("decode instance %s did not take %s: %s", d.handle.name, rid, _cause(e))
                    continue
                self._moved(rid, s, d)
                return
            ray.get(s.actor.resume.remote(rid, True))  # no decode instance has room: it decodes where it is
            self._settle(rid, s.handle, s)
        except Exception as e:  # noqa: BLE001 - whatever failed, the request must not stay stuck as moving
            log.warning("the hand-over of %s failed: %s", rid, _cause(e),
                        exc_info=not isinstance(e, ray.exceptions.RayError))
            self._settle(rid, s.handle, s, lost=True)

    def _moved(self, rid: str, s: Pinned, d: Pinned) -> bool:
        """The destination runs it now: route to it, free it on the source. False if the destination died
        meanwhile (the request was rescued)."""
        import ray

        lost = self._settle(rid, s.handle, d)
        try:
            ray.get(s.actor.call.remote("handoffs.commit", dict(rid=rid)))
        except ray.exceptions.RayError:
            pass  # the source died: its slots died with it
        return not lost

    def _settle(self, rid: str, was: InstanceHandle, at: Pinned, lost: bool = False) -> bool:
        """A move of a request that ran at `was` is over and the request runs at `at` now: route it there and pass
        on an abort that came meanwhile. If `at` died during the move (`lost`: a call to it failed), its failure
        handling skipped the request, which was moving: it is rescued here, under the lock, so that handling
        cannot take it too. True when it was rescued."""
        from kestrel.engine.driver import Abort

        with self._lock:
            self._moving.discard(rid)
            owner = self._where.get(rid)
            if owner is not was:  # released (ended, or aborted before the move knew of it): stop it at `at` too
                self._aborted.discard(rid)
                if owner is not at.handle and not at.changed:
                    at.handle.send(Abort(rid))  # a no-op for one that finished
                return False
            self._where[rid] = at.handle
            if lost or at.changed:
                self._rescue([rid], f"instance {at.handle.name} failed while the request was moving")
                self._aborted.discard(rid)
                return True
            if rid in self._aborted:  # an abort that came while it moved reached the wrong instance
                self._aborted.discard(rid)
                at.handle.send(Abort(rid))
            return False

    # ---- live migration (Llumnix) -------------------------------------------------------
    def _balance(self) -> None:
        import ray

        while not self._stopping:
            time.sleep(BALANCE_SECONDS)
            with self._lock:
                pair = migration_pair(self._decode_instances(), self.loads, self.cluster.migration_gap)
            if pair is None:
                continue
            src, dst = pair
            try:
                options = ray.get(src.actor.call.remote("handoffs.candidates", dict(queued=True)))
            except ray.exceptions.RayError:
                continue
            with self._lock:
                to = self.loads[dst.name]
                gap_tokens = self.loads[src.name].virtual_usage - to.virtual_usage
                move = pick_move([o for o in options if o[0] in self._where and o[0] not in self._moving],
                                 gap_tokens, PRIORITY_HEADROOM * self.loads[src.name].size,
                                 room=to.size - to.virtual_usage)
            if move is None:
                continue
            (rid, _, _, is_queued), load = move
            if self.migrate(rid, src, dst, queued=is_queued).outcome == "done":
                with self._lock:  # until both report again, count the move in their loads
                    self.loads[src.name].moved_tokens -= load
                    self.loads[dst.name].moved_tokens += load

    def migrate(self, rid: str, src: InstanceHandle, dst: InstanceHandle, queued: bool = False) -> Migration:
        """Move a running request from src to dst while it decodes: copy its K/V in stages, then stop it, copy
        the last few tokens, and resume it on dst. Any failure leaves it running on src (or ends it cleanly
        if src died) and frees dst's reservation. `queued`: move a request still waiting in src's queue to dst's
        queue (refused, as "gone", once src has started it)."""
        import ray

        with self._lock:
            if self._where.get(rid) is not src or rid in self._moving:
                return self._record(Migration(rid, src.name, dst.name, "gone", queued=queued))
            if not (src.alive and dst.alive):  # (a dead source's failure handling has its requests)
                return self._record(Migration(rid, src.name, dst.name, "failed", queued=queued))
            self._moving.add(rid)
            s, d = Pinned.of(src), Pinned.of(dst)
        mid = f"mig-{next(self._mids)}"
        m = Migration(rid, src.name, dst.name, "failed", queued=queued)
        t0 = time.perf_counter()
        start, suspended = 0, False
        try:
            while not queued and m.stages < MAX_STAGES:
                end_ref, kv_ref = s.actor.export_kv.options(num_returns=2).remote(rid, start)
                written = d.actor.write.remote(mid, start, kv_ref)
                end = ray.get(end_ref)
                ray.get(written)
                m.stages += 1
                left, start = end - start, end
                if left < STOP_COPY_TOKENS:
                    break
            state_ref, kv_ref, mark_ref = s.actor.suspend.options(num_returns=3).remote(rid, start, queued)
            mark, m.tokens, m.time_per_token = ray.get(mark_ref)
            suspended = True
            with src.cond:  # every delta the source produced reaches the client before the destination's
                while src.processed < mark and not s.changed:
                    src.cond.wait(0.05)
                whole = src.processed >= mark and src.generation == s.generation
            if not whole:  # the source died holding deltas the client never got: going on would leave a gap
                raise SourceLost(f"instance {src.name} died before its last deltas of {rid} arrived")
            m.downtime = ray.get(d.actor.adopt.remote(mid, state_ref, start, kv_ref))
            m.outcome = "done" if self._moved(rid, s, d) else "failed"
        except Exception as e:  # noqa: BLE001 - whatever failed, the request must not stay stuck as moving
            refused = _refusal(e)
            if refused is None:
                m.outcome = "failed"
                log.warning("migration of %s from %s to %s failed: %s", rid, src.name, dst.name, _cause(e),
                            exc_info=not isinstance(e, (ray.exceptions.RayError, SourceLost)))
            else:  # the request finished or went away first, or the destination had no room
                m.outcome = "gone" if refused.kind == "gone" else "refused"
            self._undo(rid, s, d, mid, suspended)
        m.total = time.perf_counter() - t0
        return self._record(m)

    def _undo(self, rid: str, s: Pinned, d: Pinned, mid: str, suspended: bool) -> None:
        """A migration gave up: free the destination's reservation; a stopped request goes on at the source."""
        import ray

        try:
            ray.get(d.actor.call.remote("handoffs.cancel", dict(mid=mid)))
        except ray.exceptions.RayError:
            pass  # a dead destination holds nothing; an expired reservation is freed already
        lost = False
        if suspended:
            try:
                ray.get(s.actor.resume.remote(rid))
            except ray.exceptions.RayError:
                lost = True
        self._settle(rid, s.handle, s, lost)

    def _record(self, m: Migration) -> Migration:
        with self._lock:
            self.migrations.append(m)
            self._unreported.append(m)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s move of %s from %s to %s: %s, %d tokens copied, %.1f ms paused; %s",
                          "queued" if m.queued else "live", m.rid, m.source, m.destination, m.outcome, m.tokens,
                          1000 * m.downtime, self._describe_loads(self.handles))
        return m

    def _describe_loads(self, handles) -> str:
        """Each instance's load as the router sees it (for debug logs)."""
        parts = []
        for h in handles:
            load, r = self.loads[h.name], self.loads[h.name].report
            parts.append(f"{h.name}: usage {load.usage:.2f}, {r.get('running', 0)} running, {r.get('waiting', 0)} "
                         f"waiting, {r.get('kv_used', 0)} kv used, {r.get('waiting_tokens', 0)} tokens queued, "
                         f"{load.sent_requests} in transit")
        return "; ".join(parts)

    # ---- what the server uses -----------------------------------------------------------
    def _combined(self, report: dict) -> dict:
        """The deployment's load for /metrics: gauges and totals summed over the instances; what changed
        since the last report (per-client service, lookahead steps, adapter paging) from this instance's
        report; each instance's own figures; migrations since the last call."""
        alive = [h for h in self.handles if h.alive]
        out = {k: sum(self.loads[h.name].report.get(k, 0) for h in alive) for k in SUMMED}
        if not any(self.loads[h.name].report for h in alive):
            out["kv_size"] = sum(h.info.get("max_total_tokens", 0) for h in alive)
            out["kv_free"] = out["kv_size"]
        events: dict[str, int] = {}
        for h in alive:
            for k, v in self.loads[h.name].report.get("pause_events", {}).items():
                events[k] = events.get(k, 0) + v
        out["pause_events"] = events
        for k in ("clients", "spec_steps", "loras"):
            out[k] = report.get(k, {})
        out["instances"] = {h.name: dict(self.loads[h.name].report, alive=h.alive) for h in self.handles}
        with self._lock:
            out["migrations"], self._unreported = self._unreported, []
        return out

    def submit(self, rid: str, prompt_ids: list[int], params, client=None, priority: int = 0,
               lora: Optional[str] = None, pause=None) -> asyncio.Queue:
        from kestrel.engine.driver import Submit

        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        try:
            self._place(Submit(rid, prompt_ids, params, client, priority, lora, pause))
        except EngineDead:
            self._streams.pop(rid, None)
            raise
        return q

    def abort(self, rid: str) -> None:
        from kestrel.engine.driver import Abort

        with self._lock:
            h = self._where.get(rid)
            if rid in self._moving:
                self._aborted.add(rid)
        if h is not None and h.alive:
            h.send(Abort(rid))

    def release(self, rid: str, abort: bool) -> None:
        self._streams.pop(rid, None)
        if abort:
            self.abort(rid)
        with self._lock:
            self._where.pop(rid, None)
            self._submits.pop(rid, None)

    async def call(self, method: str, **kwargs):
        """Run an engine management call on every instance; raises CallFailed if one refuses it. Counts are
        summed; anything else is the same on every instance (adapters loaded), so the first answer stands."""
        results = [r for _, r in await self.call_each(method, **kwargs)]
        if all(isinstance(r, int) and not isinstance(r, bool) for r in results):
            return sum(results)
        return results[0]

    async def call_each(self, method: str, **kwargs) -> list[tuple[str, object]]:
        """(instance name, answer) of an engine management call run on every live instance."""
        import ray

        alive = [h for h in self.handles if h.alive]
        if not alive:
            raise EngineDead(self.failure or "no engine instance is running")
        refs = [h.actor.call.remote(method, kwargs) for h in alive]
        try:
            results = await asyncio.gather(*[asyncio.wrap_future(r.future()) for r in refs])
        except ray.exceptions.RayError as e:
            refused = _refusal(e)
            if refused is not None:
                raise CallFailed(str(refused), refused.kind) from None
            raise EngineDead(f"an instance failed during {method}: {_cause(e)}") from None
        return [(h.name, r) for h, r in zip(alive, results)]

    def role_of(self, name: str) -> str:
        return next(h.role for h in self.handles if h.name == name)

    @property
    def restarts(self) -> int:
        return sum(h.restarts for h in self.handles)

    @property
    def alive(self) -> bool:
        return bool(self._entry_instances()) and bool(self._decode_instances())

    def status(self) -> str:
        if self.alive:
            return OK
        if all(getattr(h, "failed", None) for h in self.handles if not h.alive):
            return FAILED
        return RESTARTING

    def health_info(self) -> dict:
        return {"instances": [dict(name=h.name, role=h.role, status="ok" if h.alive else "restarting",
                                   pid=h.info.get("pid"), restarts=h.restarts,
                                   running=self.loads[h.name].report.get("running", 0),
                                   waiting=self.loads[h.name].report.get("waiting", 0)) for h in self.handles],
                "migrations": sum(m.outcome == "done" and not m.queued for m in self.migrations),
                "queued_migrations": sum(m.outcome == "done" and m.queued for m in self.migrations)}

    def kv_states(self) -> dict[str, dict]:
        """Each live instance's pool accounting (Engine.kv_accounting)."""
        import ray

        alive = [h for h in self.handles if h.alive]
        return dict(zip([h.name for h in alive], ray.get([h.actor.kv_state.remote() for h in alive])))

    def shutdown(self, timeout: float = 10.0) -> None:
        import ray

        self._stopping = True
        for h in self.handles:
            h.alive = False
            if h.actor is not None:
                try:
                    ray.kill(h.actor)
                except Exception:  # noqa: BLE001 - it may be gone already
                    pass
        self._moves.shutdown(wait=False, cancel_futures=True)
        if self._started_ray:
            ray.shutdown()


def _refusal(e: BaseException) -> Optional[CallError]:
    """An engine's refusal (CallError) inside a Ray error; None for anything else."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, CallError) else None


def _cause(e: BaseException) -> str:
    """The useful line of a Ray error (the remote exception's own message where there is one)."""
    cause = getattr(e, "cause", None) or getattr(e, "__cause__", None)
    text = str(cause if cause is not None else e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]

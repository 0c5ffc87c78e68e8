"""The adapters an engine serves: names, host copies, residency in the pool, and their life cycle.

Three places an adapter can be, from cheapest to use to cheapest to keep:
  - resident: in the KV pool (kestrel/lora/pool.py), ready for a forward. Requests running with it
    pin it; an adapter no running request uses stays resident until the pool needs its pages and it
    is the least recently used idle one;
  - host: its factors in process memory (at most `max_cpu_loras` idle adapters' worth);
  - disk: only its directory; read again, in a background thread while the engine computes, when a
    request for it arrives.
An adapter is checked completely when it is registered, so nothing about its files fails later.
Unloading takes the name away at once (new requests for it are refused); requests already queued or
running with it finish, and its memory is freed when the last one does.
"""
from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from kestrel.cache.kv_pool import KVPool
from kestrel.lora.adapter import AdapterError, LoraWeights, load_adapter
from kestrel.lora.pool import Residency, pages_needed, place
from kestrel.model.model_config import ModelConfig

log = logging.getLogger("kestrel.lora")
_ids = itertools.count(1)  # adapter ids are never reused: a radix namespace never outlives its adapter


class UnknownAdapter(LookupError):
    """A request named an adapter this engine does not serve."""

    @classmethod
    def named(cls, name: str, known) -> "UnknownAdapter":
        """The error for `name`, listing the adapter names `known` (what the engine has, or will load)."""
        return cls(f"the LoRA adapter {name!r} does not exist (loaded adapters: {', '.join(sorted(known)) or 'none'})")


@dataclass(eq=False)
class Adapter:
    """One registered adapter; requests hold it from arrival until they finish."""

    name: str
    path: str
    pages: int  # pool slots it occupies when resident
    host_bytes: int
    max_rank: int
    id: int = field(default_factory=lambda: next(_ids))
    weights: Optional[LoraWeights] = None  # the host copy, when held
    loading: Optional[Future] = None  # a background read of the host copy
    residency: Optional[Residency] = None
    running: int = 0  # running sequences using it: it may not leave the pool
    users: int = 0  # unfinished sequences (waiting or running) that name it
    unloaded: bool = False
    error: Optional[str] = None  # its files could not be read again: requests waiting for it fail
    last_used: float = 0.0
    loads: int = 0  # times paged into the pool
    evictions: int = 0  # times paged out


class LoraManager:
    def __init__(self, cfg: ModelConfig, pool: KVPool, dtype: torch.dtype, max_cpu_loras: Optional[int] = None,
                 max_loras: Optional[int] = None):
        self.cfg, self.pool, self.dtype = cfg, pool, dtype
        self.max_cpu_loras = max_cpu_loras
        self.max_loras = max_loras
        self.by_name: dict[str, Adapter] = {}
        self.by_id: dict[int, Adapter] = {}  # every adapter still holding memory (unloaded ones until drained)
        self._reader: Optional[ThreadPoolExecutor] = None
        self.on_drop: Callable[[Adapter], None] = lambda adapter: None  # the engine frees its cached prefixes

    # ---- registry -----------------------------------------------------------------------
    def read_async(self, name: str, path: str) -> Future:
        """Read and check an adapter in the background (the engine keeps computing); pass the result to
        register(). The future raises AdapterError for an adapter that cannot be served."""
        return self._executor().submit(self._read, name, path)

    def _read(self, name: str, path: str) -> LoraWeights:
        try:
            return load_adapter(name, path, self.cfg, self.dtype)
        except (AdapterError, TypeError):
            raise
        except Exception as e:  # noqa: BLE001 - whatever a file's contents make a library raise: a bad adapter
            raise AdapterError(f"LoRA adapter {name!r} ({path}) could not be read: {type(e).__name__}: {e}") from e

    def register(self, name: str, path: str, weights: Optional[LoraWeights] = None) -> Adapter:
        """Read (unless `weights` were read already) and check an adapter; raises AdapterError (bad adapter)
        or ValueError (name taken)."""
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise AdapterError("a LoRA adapter needs a non-empty name and path")
        if name in self.by_name:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded; unload it first")
        weights = weights if weights is not None else self._read(name, path)
        pages = pages_needed(weights, self.cfg)
        if pages > self.pool.size * 3 // 4:  # it must leave room for its requests' tokens
            raise AdapterError(f"adapter {name!r} needs {pages} pool slots but the KV pool has {self.pool.size}; "
                               f"raise --kv-cache-memory-gb or use a lower-rank adapter")
        adapter = Adapter(name, path, pages, weights.nbytes(), weights.max_rank, weights=weights,
                          last_used=time.monotonic())
        self.by_name[name] = adapter
        self.by_id[adapter.id] = adapter
        self._trim_host()
        return adapter

    def get(self, name: str) -> Adapter:
        adapter = self.by_name.get(name)
        if adapter is None:
            raise UnknownAdapter.named(name, self.by_name)
        return adapter

    def unregister(self, name: str) -> Adapter:
        """Refuse new requests for `name` now; free its memory once its last request finishes."""
        adapter = self.get(name)
        del self.by_name[name]
        adapter.unloaded = True
        if adapter.users == 0:
            self._drop(adapter)
        return adapter

    def _drop(self, adapter: Adapter) -> None:
        self.by_id.pop(adapter.id, None)
        if adapter.residency is not None:
            self._page_out(adapter, count=False)
        adapter.weights = None
        self.on_drop(adapter)

    # ---- request life cycle -------------------------------------------------------------
    def attach(self, adapter: Adapter) -> None:
        """A sequence naming `adapter` arrived: start reading it from disk if no copy is at hand."""
        adapter.users += 1
        self._ensure_host(adapter)

    def detach(self, adapter: Adapter) -> None:
        """That sequence finished."""
        adapter.users -= 1
        if adapter.unloaded and adapter.users == 0:
            self._drop(adapter)
        else:
            self._trim_host()

    def start_running(self, adapter: Adapter) -> None:
        adapter.running += 1
        adapter.last_used = time.monotonic()

    def stop_running(self, adapter: Adapter) -> None:
        adapter.running -= 1
        adapter.last_used = time.monotonic()

    # ---- residency ----------------------------------------------------------------------
    def host_ready(self, adapter: Adapter) -> bool:
        """Whether the adapter's factors are in host memory (else a background read is under way)."""
        if adapter.weights is None and adapter.loading is not None and adapter.loading.done():
            self._finish_read(adapter)
        if adapter.weights is None and adapter.error is None:
            self._ensure_host(adapter)
        return adapter.weights is not None

    def try_page_in(self, adapter: Adapter) -> bool:
        """Make the adapter resident if a run of free pool slots (and the max_loras cap) allows."""
        if adapter.residency is not None:
            return True
        if self.at_capacity():
            return False
        if not self.host_ready(adapter):
            return False
        first = self.pool.alloc_range(adapter.pages)
        if first is None:
            return False
        adapter.residency = place(adapter.weights, self.pool, first, adapter.pages, self.cfg)
        adapter.loads += 1
        return True

    def evict_idle(self, keep: Optional[Adapter] = None) -> int:
        """Page out the least recently used resident adapter no running request uses; returns slots freed."""
        idle = [a for a in self.by_id.values() if a.residency is not None and a.running == 0 and a is not keep]
        if not idle:
            return 0
        victim = min(idle, key=lambda a: a.last_used)
        self._page_out(victim)
        return victim.pages

    def _page_out(self, adapter: Adapter, count: bool = True) -> None:
        res = adapter.residency
        adapter.residency = None
        self.pool.free(list(range(res.first, res.first + res.pages)))
        adapter.evictions += count
        self._trim_host()

    def at_capacity(self) -> bool:
        """Whether max_loras adapters are resident (another needs one of them paged out)."""
        return self.max_loras is not None and self.num_resident >= self.max_loras

    @property
    def num_resident(self) -> int:
        return sum(a.residency is not None for a in self.by_id.values())

    def idle_pages(self) -> int:
        """Pool slots held by resident adapters that no running request uses (free to evict)."""
        return sum(a.pages for a in self.by_id.values() if a.residency is not None and a.running == 0)

    def resident_pages(self) -> int:
        return sum(a.pages for a in self.by_id.values() if a.residency is not None)

    # ---- host copies --------------------------------------------------------------------
    def _ensure_host(self, adapter: Adapter) -> None:
        if adapter.weights is not None or adapter.loading is not None:
            return
        log.info("reading LoRA adapter %r from %s", adapter.name, adapter.path)
        adapter.loading = self._executor().submit(self._read, adapter.name, adapter.path)

    def _executor(self) -> ThreadPoolExecutor:
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="kestrel-lora-read")
        return self._reader

    def _finish_read(self, adapter: Adapter) -> None:
        future, adapter.loading = adapter.loading, None
        try:
            adapter.weights = future.result()
        except (AdapterError, OSError) as e:  # its files changed on disk since it was registered
            log.error("re-reading LoRA adapter %r failed: %s", adapter.name, e)
            adapter.error = f"LoRA adapter {adapter.name!r} could not be read again from {adapter.path}: {e}"

    def _trim_host(self) -> None:
        """Drop host copies of adapters that are neither resident nor wanted, beyond max_cpu_loras."""
        if self.max_cpu_loras is None:
            return
        spare = [a for a in self.by_id.values() if a.weights is not None and a.residency is None and a.users == 0]
        held = sum(a.weights is not None for a in self.by_id.values())
        for adapter in sorted(spare, key=lambda a: a.last_used):
            if held <= self.max_cpu_loras:
                break
            adapter.weights = None
            held -= 1

    def describe(self) -> list[dict]:
        """The served adapters, for listings."""
        return [describe(a) for a in self.by_name.values()]


def describe(a: Adapter) -> dict:
    return dict(name=a.name, path=a.path, id=a.id, rank=a.max_rank, pages=a.pages, host_bytes=a.host_bytes,
                resident=a.residency is not None, running=a.running, loads=a.loads, evictions=a.evictions)

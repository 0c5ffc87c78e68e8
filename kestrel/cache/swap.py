"""A slower tier for the K/V of paused conversations: pinned host memory when the pool is on a GPU, files on
disk when it is on the CPU (the pool already is host memory; a file lets the OS page it out, and the page cache
keeps it fast while RAM is free). Copies are exact: a restored K/V is bit for bit the one saved.

Measured on AMD EPYC (Zen 4, 2 cores), SmolLM2-135M's K/V of 1000 tokens (23 MB in bfloat16): gather 15 ms,
write 5 ms, read 5 ms, scatter 10 ms, against about half a second to recompute them (benchmarks/agent_pauses.py
reports both on the machine it runs on).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from kestrel.cache.kv_pool import KVPool

DEFAULT_BANDWIDTH = 1e9  # bytes/s each way until a copy has been timed


@dataclass(eq=False)
class Backup:
    """One saved run of tokens' K/V: `num_tokens` tokens, [layers, 2, tokens, kv_heads, head_dim]."""

    num_tokens: int
    nbytes: int
    path: Optional[str] = None  # the disk tier
    host: Optional[torch.Tensor] = None  # the host-memory tier


class SwapStore:
    """Saves and restores the K/V of pool slots, within `capacity_bytes`; learns its own bandwidth."""

    def __init__(self, pool: KVPool, capacity_bytes: int, directory: Optional[str] = None):
        self.pool = pool
        self.capacity = capacity_bytes
        self.used = 0
        self.on_gpu = pool.caches[0][0].device.type == "cuda"
        self.directory = None
        if not self.on_gpu and capacity_bytes > 0:
            if directory:
                os.makedirs(directory, exist_ok=True)
            self.directory = tempfile.mkdtemp(prefix="kestrel-swap-", dir=directory or None)
            weakref.finalize(self, shutil.rmtree, self.directory, True)
        self.seconds_per_byte = {"out": 1 / DEFAULT_BANDWIDTH, "in": 1 / DEFAULT_BANDWIDTH}
        self._names = 0

    @property
    def bytes_per_token(self) -> int:
        k = self.pool.caches[0][0]
        return 2 * len(self.pool.caches) * k[0].numel() * k.element_size()

    def fits(self, num_tokens: int) -> bool:
        return self.used + num_tokens * self.bytes_per_token <= self.capacity

    def seconds(self, num_tokens: int) -> float:
        """Expected time to save and later restore that many tokens."""
        n = num_tokens * self.bytes_per_token
        return n * (self.seconds_per_byte["out"] + self.seconds_per_byte["in"])

    def save(self, slots: torch.Tensor) -> Optional[Backup]:
        """Copy the K/V of `slots` out of the pool; None when it does not fit in the capacity."""
        if not self.fits(len(slots)):
            return None
        start = time.perf_counter()
        index = slots.to(self.pool.caches[0][0].device)
        data = torch.stack([torch.stack([k.index_select(0, index), v.index_select(0, index)])
                            for k, v in self.pool.caches])
        backup = Backup(len(slots), data.numel() * data.element_size())
        if self.on_gpu:
            backup.host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            backup.host.copy_(data)
        else:
            self._names += 1
            backup.path = os.path.join(self.directory, f"{self._names}.kv")
            data.view(-1).view(torch.uint8).numpy().tofile(backup.path)
        self.used += backup.nbytes
        self._learn("out", backup.nbytes, time.perf_counter() - start)
        return backup

    def load(self, backup: Backup, start: int, slots: torch.Tensor) -> None:
        """Write tokens start.. start+len(slots) of `backup` into pool `slots`."""
        began = time.perf_counter()
        k0 = self.pool.caches[0][0]
        shape = (len(self.pool.caches), 2, backup.num_tokens, *k0.shape[1:])
        if self.on_gpu:
            data = backup.host
        else:
            raw = torch.from_numpy(np.fromfile(backup.path, dtype=np.uint8))
            data = raw.view(k0.dtype).view(shape)
        part = data[:, :, start:start + len(slots)].to(k0.device, non_blocking=False)
        index = slots.to(k0.device)
        for layer, (k, v) in enumerate(self.pool.caches):
            k.index_copy_(0, index, part[layer, 0])
            v.index_copy_(0, index, part[layer, 1])
        self._learn("in", part.numel() * part.element_size(), time.perf_counter() - began)

    def drop(self, backup: Optional[Backup]) -> None:
        if backup is None:
            return
        if backup.path is not None:
            try:
                os.remove(backup.path)
            except FileNotFoundError:
                pass
        backup.host = None
        self.used -= backup.nbytes

    def _learn(self, way: str, nbytes: int, seconds: float) -> None:
        if nbytes:
            self.seconds_per_byte[way] = 0.7 * self.seconds_per_byte[way] + 0.3 * seconds / nbytes

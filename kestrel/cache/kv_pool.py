"""Preallocated KV memory with token-granular slots, and the per-request slot table.

Slot 0 is reserved as padding: padded attention reads it and masks it out, so it is never handed out.
The pool is the engine's one memory budget: LoRA adapters in use live in runs of its slots too
(`alloc_range`; see kestrel/lora/pool.py).
"""
from __future__ import annotations

import numpy as np
import torch


class KVPool:
    """Per-layer K and V tensors of shape [size + 1, kv_heads, head_dim] and a free list of slots."""

    def __init__(self, size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        self.size = size
        shape = (size + 1, num_kv_heads, head_dim)
        self.caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]
        self._free: list[int] = list(range(size, 0, -1))  # a stack; low slots handed out first
        self.total_allocated = 0  # slots ever handed out: lets tests see KV sharing

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV pool has {len(self._free)} free slots, {n} requested")
        out = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        out.reverse()
        self.total_allocated += n
        return out

    def alloc_range(self, n: int) -> int | None:
        """n contiguous free slots (the highest such run, away from where KV slots are handed out first);
        returns the first slot, or None if no run of n free slots exists."""
        free = np.zeros(self.size + 2, dtype=np.int8)  # slot 0 and size + 1 stay 0: runs never include them
        free[self._free] = 1
        edges = np.diff(free)
        starts, ends = np.flatnonzero(edges == 1) + 1, np.flatnonzero(edges == -1) + 1  # runs [start, end)
        fits = np.flatnonzero(ends - starts >= n)
        if not len(fits):
            return None
        first = int(ends[fits[-1]]) - n
        self._free = [s for s in self._free if not first <= s < first + n]
        return first

    def free(self, slots) -> None:
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        self._free.extend(slots)


class ReqToTokenTable:
    """Row r, column i = pool slot of the i-th token of the request holding row r.

    Attention reads a request's context as one row slice, so building a batch needs no per-token Python.
    """

    def __init__(self, num_rows: int, max_context: int, device: torch.device, scratch_rows: int = 0):
        self.table = torch.zeros(num_rows + scratch_rows, max_context, dtype=torch.int64, device=device)
        # the same memory as a NumPy array on CPU: a few slots written through it cost a microsecond, where
        # building index tensors and a torch index_put costs ~20 (a decode step writes one slot per sequence)
        self._host = self.table.numpy() if self.table.device.type == "cpu" else None
        self._free_rows = list(range(num_rows - 1, -1, -1))
        # rows after the requests' ones, never handed out: a step writes there what each token of a tree-masked
        # row sees, so the attention kernel (which reads a prefix of a row per token) serves tree rows too
        self.scratch_start, self.num_scratch = num_rows, scratch_rows

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int:
        return self._free_rows.pop()

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write_cells(self, rows: list[int], columns: list[int], slots: list[int]) -> None:
        """table[rows[i], columns[i]] = slots[i] for each i."""
        if self._host is not None:
            self._host[rows, columns] = slots
        else:
            self.table[torch.tensor(rows), torch.tensor(columns)] = torch.tensor(slots, dtype=torch.int64).to(
                self.table.device)

    def read_cells(self, rows: list[int], columns: list[int]) -> torch.Tensor:
        """[table[rows[i], columns[i]] for each i], an int64 tensor on the table's device."""
        if self._host is not None:
            return torch.from_numpy(self._host[rows, columns])
        return self.table[torch.tensor(rows, device=self.table.device), torch.tensor(columns, device=self.table.device)]

    def extend_rows(self, rows: list[int], starts: list[int], slots: list[int]) -> torch.Tensor:
        """Row i gets len(slots) / len(rows) more slots (slots in row-major order) in the columns after starts[i];
        returns each row's slots from column starts[i] on, the new ones included, as int64 [columns, rows] on the
        CPU (what several decode steps in a row write to)."""
        if self._host is None:
            raise RuntimeError("extend_rows serves a table on the CPU (multi-step decoding runs on the C++ CPU kernels)")
        n = len(rows)
        extra = len(slots) // n
        out = np.empty((extra + 1, n), dtype=np.int64)
        for i, (row, start) in enumerate(zip(rows, starts)):  # NumPy slices, no torch ops (see __init__)
            cells = self._host[row, start:start + extra + 1]
            cells[1:] = slots[i * extra:(i + 1) * extra]
            out[:, i] = cells
        return torch.from_numpy(out)

    def write(self, row: int, start: int, slots) -> None:
        if len(slots):
            if not isinstance(slots, torch.Tensor):
                slots = torch.tensor(slots, dtype=torch.int64)
            self.table[row, start:start + len(slots)] = slots.to(self.table.device)

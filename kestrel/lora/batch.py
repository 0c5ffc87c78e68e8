"""The low-rank updates of one mixed batch (S-LoRA / Punica's shrink and expand).

The base linear runs once for every token of the batch; then, per adapter in the batch, its tokens'
inputs are multiplied by the adapter's stacked A factors ("shrink", [n, in] -> [n, sum of ranks]) and
the result by each target's B ("expand", into that target's columns of the fused output). Adapters
of different ranks and target sets mix freely; tokens without an adapter get nothing added.
With Kestrel's C++ kernels the whole update of a linear is one call that loops over tokens.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from kestrel.lora.pool import SITE_ORDER, Residency

Rows = Union[slice, torch.Tensor]


class LoraBatch:
    """Which tokens use which resident adapter in one forward."""

    def __init__(self, residencies: list[Residency], rows: list[Rows], token_adapter: torch.Tensor, kernels=None):
        self.residencies = residencies
        self.rows = rows  # per adapter: its tokens (a slice when they are consecutive)
        self.token_adapter = token_adapter  # [T] int64: index into residencies, -1 for the base model
        self.kernels = kernels
        # the adapters' factor addresses for the C++ kernel: [layers, sites, adapters, targets, 5]
        self.addresses = torch.stack([r.addresses for r in residencies], dim=2) if kernels is not None else None

    @staticmethod
    def build(row_adapters: list[Optional[Residency]], q_starts: list[int], kernels=None,
              device: torch.device = torch.device("cpu")) -> Optional["LoraBatch"]:
        """From each row's adapter (None: the base model) and the rows' token ranges; None if no row has one.
        Token index tensors go to `device` (the model's)."""
        order: dict[int, int] = {}
        residencies: list[Residency] = []
        ranges: list[list[tuple[int, int]]] = []
        token_adapter = torch.full((q_starts[-1],), -1, dtype=torch.int64)
        for r, res in enumerate(row_adapters):
            if res is None:
                continue
            k = order.get(id(res))
            if k is None:
                k = order[id(res)] = len(residencies)
                residencies.append(res)
                ranges.append([])
            start, end = q_starts[r], q_starts[r + 1]
            token_adapter[start:end] = k
            if ranges[k] and ranges[k][-1][1] == start:
                ranges[k][-1] = (ranges[k][-1][0], end)
            else:
                ranges[k].append((start, end))
        if not residencies:
            return None
        rows: list[Rows] = []
        for spans in ranges:
            if len(spans) == 1:
                rows.append(slice(*spans[0]))
            else:
                rows.append(torch.cat([torch.arange(s, e) for s, e in spans]).to(device))
        return LoraBatch(residencies, rows, token_adapter, kernels)

    def apply(self, layer: int, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += the batch's low-rank updates of `site` in `layer` for input x; returns y."""
        if self.kernels is not None:  # (the C++ kernels only ever run on CPU)
            self.kernels.lora_apply(y, x.contiguous(), self.token_adapter, self.addresses, layer,
                                    SITE_ORDER.index(site))
            return y
        for res, rows in zip(self.residencies, self.rows):
            w = res.sites[layer].get(site)
            if w is None:
                continue
            h = x[rows] @ w.a.t()  # shrink: [n, sum of ranks]
            for col, offset, b_t in w.parts:  # expand, into each target's columns
                out = y[:, offset:offset + b_t.shape[1]]
                if isinstance(rows, slice):
                    out[rows].addmm_(h[:, col:col + b_t.shape[0]], b_t)
                else:
                    out.index_add_(0, rows, h[:, col:col + b_t.shape[0]] @ b_t)
        return y

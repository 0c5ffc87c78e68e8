"""Adapters in use live in the KV pool (S-LoRA's unified paging).

An adapter resident in the pool occupies a run of `pages` consecutive slots. In every layer its A
factors ([r, in]) are laid out, one after another, in those slots' K rows, and its B factors, transposed
([r, out]: the expand then streams along the output), in their V rows,
so each factor is a contiguous view of the pool: computing with it copies nothing, and KV tokens and
adapters draw on one budget. A page holds num_kv_heads * head_dim values of each.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kestrel.cache.kv_pool import KVPool
from kestrel.lora.adapter import SITES, TARGETS, LoraWeights, target_shapes
from kestrel.model.model_config import ModelConfig


SITE_ORDER = tuple(SITES)  # qkv, o, gate_up, down: the kernel's site indices
MAX_TARGETS = max(len(t) for t in SITES.values())


@dataclass
class SiteWeights:
    """One adapter's factors for one fused linear of one layer."""

    a: torch.Tensor  # [sum of ranks, in]: the targets' A stacked (they share the input)
    parts: list[tuple[int, int, torch.Tensor]]  # (rank columns start, output offset, B^T [r, out]) per target


@dataclass
class Residency:
    first: int  # first pool slot
    pages: int
    sites: list[dict[str, SiteWeights]] = field(default_factory=list)  # per layer: site -> weights
    # the C++ kernel's view of the same factors: int64 [layers, sites, MAX_TARGETS, 5] of (address of A,
    # address of B^T, r, out, output offset), r = 0 for absent targets (see lora_apply in cpu_kernels.cpp)
    addresses: torch.Tensor = None


def pages_needed(weights: LoraWeights, cfg: ModelConfig) -> int:
    """Pool slots an adapter occupies: its largest layer's A (or B) values over a slot's K (or V) row."""
    per_page = cfg.num_kv_heads * cfg.head_dim
    most = 0
    for layer in range(cfg.num_layers):
        a = sum(weights.modules[(layer, t)][0].numel() for t in TARGETS if (layer, t) in weights.modules)
        b = sum(weights.modules[(layer, t)][1].numel() for t in TARGETS if (layer, t) in weights.modules)
        most = max(most, a, b)
    return max(1, math.ceil(most / per_page))


def place(weights: LoraWeights, pool: KVPool, first: int, pages: int, cfg: ModelConfig) -> Residency:
    """Copy the adapter's factors into pool slots [first, first + pages) and return views of them."""
    shapes = target_shapes(cfg)
    res = Residency(first, pages)
    res.addresses = torch.zeros(cfg.num_layers, len(SITE_ORDER), MAX_TARGETS, 5, dtype=torch.int64)
    for layer, (k_cache, v_cache) in enumerate(pool.caches):
        kbuf = k_cache[first:first + pages].view(-1)
        vbuf = v_cache[first:first + pages].view(-1)
        at = bt = 0
        sites: dict[str, SiteWeights] = {}
        for site_index, (site, targets) in enumerate(SITES.items()):
            start, parts, col = at, [], 0
            for t in targets:
                ab = weights.modules.get((layer, t))
                if ab is None:
                    continue
                a, b = ab
                kbuf[at:at + a.numel()].copy_(a.reshape(-1))
                b_t = vbuf[bt:bt + b.numel()].view(b.shape[1], b.shape[0])
                b_t.copy_(b.t())
                parts.append((col, shapes[t][2], b_t))
                at, bt, col = at + a.numel(), bt + b.numel(), col + a.shape[0]
            if parts:
                w = sites[site] = SiteWeights(kbuf[start:at].view(col, shapes[targets[0]][0]), parts)
                for j, (c, offset, b_t) in enumerate(parts):
                    r = b_t.shape[0]
                    res.addresses[layer, site_index, j] = torch.tensor(
                        [w.a[c:c + r].data_ptr(), b_t.data_ptr(), r, b_t.shape[1], offset])
        res.sites.append(sites)
    return res

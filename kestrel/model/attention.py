"""Attention over a ragged batch whose keys and values live in a token-granular KV pool.

The runner describes each step with an `AttentionMetadata`: where the new tokens' K/V go
(`slot_mapping`) and, for every request, which pool slots its queries read and under which mask.
Single-token rows (decode) are batched into one padded attention call; multi-token rows
(prefill chunks, later lookahead verification) get one call each with a causal or explicit mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class MultiTokenRow:
    """A request contributing several query tokens: rows [start, end) of the flattened batch."""

    start: int
    end: int
    kv_index: torch.Tensor  # [kv_len] pool slots, the request's whole context incl. its new tokens
    mask: Optional[torch.Tensor] = None  # [q_len, q_len] bool over the new tokens (True = attend), each also seeing
    # the whole context before them; None = causal


@dataclass
class AttentionMetadata:
    """One step's attention description. Decode rows come first in the flattened token order."""

    slot_mapping: torch.Tensor  # [num_tokens] pool slot receiving each new token's K/V
    num_decode: int = 0
    decode_kv_index: Optional[torch.Tensor] = None  # [num_decode, max_kv_len], padded with slot 0
    decode_mask: Optional[torch.Tensor] = None  # [num_decode, 1, 1, max_kv_len] bool, None if no padding
    decode_shared_len: int = 0  # leading kv_index columns identical in every decode row (a shared prefix)
    multi: list[MultiTokenRow] = field(default_factory=list)
    # For the C++ kernel, which reads K/V through the req-to-token table in place: the table, and for each
    # query token it serves (all decode tokens, then causal multi-token rows' tokens) its table row and how
    # many positions it sees. Rows with an explicit mask stay in `multi`.
    table: Optional[torch.Tensor] = None
    token_rows: Optional[torch.Tensor] = None
    token_lens: Optional[torch.Tensor] = None


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Query i (the (kv_len - q_len + i)-th token) sees keys 0..kv_len - q_len + i."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Write the new K/V into the pool, then attend every query over its request's slots -> [T, H*D]."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    outs = []
    if meta.num_decode and meta.decode_shared_len:
        outs.append(_shared_prefix_decode(q[:meta.num_decode], k_cache, v_cache, meta))
    elif meta.num_decode:
        b, kv_len = meta.decode_kv_index.shape
        flat = meta.decode_kv_index.view(-1)
        kk = k_cache.index_select(0, flat).view(b, kv_len, num_kv_heads, head_dim).transpose(1, 2)
        vv = v_cache.index_select(0, flat).view(b, kv_len, num_kv_heads, head_dim).transpose(1, 2)
        # Grouped-query attention without repeating K/V: the query heads sharing a KV head
        # become that head's "query positions" (all at the same position, so one mask row serves).
        qd = q[:b].reshape(b, num_kv_heads, num_heads // num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(qd, kk, vv, attn_mask=meta.decode_mask)
        outs.append(o.reshape(b, num_heads * head_dim))
    for row in meta.multi:
        outs.append(_row_attention(q, k_cache, v_cache, row))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def kernel_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                     kernels) -> torch.Tensor:
    """Attention with K/V already in the pool (the caller stored them): the C++ kernel for every token it
    serves, reading slots through the table (rows sharing a cached prefix too: no cascade path here, see
    runner.SHARED_PREFIX_MIN_ROWS); rows with an explicit mask go through SDPA. q: [T, H, D] -> [T, H*D]."""
    head_dim = q.shape[2]
    outs = []
    rows, lens = meta.token_rows, meta.token_lens
    if rows is not None and rows.shape[0]:
        kernel_q = q if rows.shape[0] == q.shape[0] else q[:rows.shape[0]]  # the usual step: q as it is
        outs.append(kernels.paged_attention(kernel_q, k_cache, v_cache, meta.table, rows, lens, head_dim ** -0.5))
    for row in meta.multi:
        outs.append(_row_attention(q, k_cache, v_cache, row))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _row_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, row: MultiTokenRow) -> torch.Tensor:
    """One multi-token row's attention over its gathered K/V (causal, or its explicit mask)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    kk = k_cache.index_select(0, row.kv_index).transpose(0, 1).unsqueeze(0)
    vv = v_cache.index_select(0, row.kv_index).transpose(0, 1).unsqueeze(0)
    qq = q[row.start:row.end].transpose(0, 1).unsqueeze(0)
    q_len, kv_len = row.end - row.start, row.kv_index.shape[0]
    mask = row.mask
    if mask is not None and q_len != kv_len:
        mask = mask.to(q.device)
        mask = torch.cat((mask.new_ones(q_len, kv_len - q_len), mask), dim=1)
    elif mask is None and q_len != kv_len:
        mask = causal_mask(q_len, kv_len, q.device)
    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
    return o[0].transpose(0, 1).reshape(q_len, num_heads * head_dim)


def _shared_prefix_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata) -> torch.Tensor:
    """Decode attention when every row starts with the same cached prefix (cascade attention).

    The shared prefix's K/V are read once and multiplied against all rows' queries in one GEMM per
    KV head, instead of being gathered and read once per row; only the short per-row suffixes are
    gathered. One softmax runs over [prefix scores | suffix scores], so the result is exact attention.
    """
    b, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[1]
    group = num_heads // num_kv
    shared = meta.decode_shared_len
    index = meta.decode_kv_index
    suffix_len = index.shape[1] - shared
    scale = head_dim ** -0.5
    qh = q.view(b, num_kv, group, head_dim)
    # prefix: [kv, b*group, d] x [kv, d, shared]
    prefix = index[0, :shared]
    kp = k_cache.index_select(0, prefix).permute(1, 2, 0)
    vp = v_cache.index_select(0, prefix).transpose(0, 1)
    q_by_head = qh.transpose(0, 1).reshape(num_kv, b * group, head_dim)
    scores_p = torch.matmul(q_by_head, kp).view(num_kv, b, group, shared).transpose(0, 1)
    # suffix: per row
    suffix = index[:, shared:].reshape(-1)
    ks = k_cache.index_select(0, suffix).view(b, suffix_len, num_kv, head_dim).permute(0, 2, 3, 1)
    vs = v_cache.index_select(0, suffix).view(b, suffix_len, num_kv, head_dim).transpose(1, 2)
    scores_s = torch.matmul(qh, ks)
    scores = torch.cat((scores_p, scores_s), dim=-1).float().mul_(scale)
    if meta.decode_mask is not None:
        scores.masked_fill_(~meta.decode_mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    probs_p = probs[..., :shared].transpose(0, 1).reshape(num_kv, b * group, shared)
    out = torch.matmul(probs_p, vp).view(num_kv, b, group, head_dim).transpose(0, 1)
    out = out + torch.matmul(probs[..., shared:], vs)
    return out.reshape(b, num_heads * head_dim)

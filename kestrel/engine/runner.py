"""The model runner: executes a ForwardBatch as one forward pass and returns the logits it asks for."""
from __future__ import annotations

from typing import Optional

import torch

from kestrel.cache.kv_pool import KVPool, ReqToTokenTable
from kestrel.engine.forward_batch import ForwardBatch
from kestrel.model.attention import AttentionMetadata, MultiTokenRow
from kestrel.model.llama import LlamaForCausalLM

SHARED_PREFIX_MIN_ROWS = 4  # cascade attention pays off once several rows share a prefix
SHARED_PREFIX_MIN_LEN = 32


def _common_prefix_columns(kv_index: torch.Tensor, limit: int) -> int:
    """How many leading slots all decode rows share (0 if fewer than SHARED_PREFIX_MIN_LEN)."""
    same = (kv_index[:, :limit] == kv_index[:1, :limit]).all(dim=0)
    n = int(same.int().cumprod(0).sum()) if limit else 0
    return n if n >= SHARED_PREFIX_MIN_LEN else 0


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, table: ReqToTokenTable, device: torch.device):
        self.model = model
        self.pool = pool
        self.table = table
        self.device = device
        self.shared_prefix_steps = 0  # decode steps that used cascade attention over a shared prefix

    def attention_metadata(self, fb: ForwardBatch) -> AttentionMetadata:
        """Where each row's keys and values are in the pool, read from the req-to-token table."""
        table = self.table.table
        nd = fb.num_decode
        meta = AttentionMetadata(slot_mapping=fb.slot_mapping, num_decode=nd)
        if nd:
            lens = fb.kv_lens[:nd]
            max_len, min_len = max(lens), min(lens)
            meta.decode_kv_index = table[fb.kv_rows[:nd], :max_len]
            if nd >= SHARED_PREFIX_MIN_ROWS:
                meta.decode_shared_len = _common_prefix_columns(meta.decode_kv_index, min_len - 1)
                self.shared_prefix_steps += meta.decode_shared_len > 0
            if min_len != max_len:
                lengths = torch.tensor(lens, device=table.device)
                mask = torch.arange(max_len, device=table.device).unsqueeze(0) < lengths.unsqueeze(1)
                meta.decode_mask = mask.view(nd, 1, 1, max_len)
        kv_rows = fb.kv_rows.tolist()
        for i, r in enumerate(range(nd, fb.num_rows)):
            meta.multi.append(MultiTokenRow(fb.q_starts[r], fb.q_starts[r + 1], table[kv_rows[r], :fb.kv_lens[r]],
                                            fb.masks[i]))
        return meta

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run one step: float32 logits for the batch's logit_index tokens (empty if none), and for its
        prompt_logit_index tokens (None if none). The only state it changes is the K/V of the batch's
        own slots, so running it again is harmless."""
        hidden = self.model(fb.input_ids, fb.positions, self.attention_metadata(fb), self.pool.caches)
        prompt_logits = None
        if fb.prompt_logit_index is not None:
            prompt_logits = self.model.logits(hidden[fb.prompt_logit_index])
        if fb.logit_index is None:
            return hidden.new_empty(0, 0), prompt_logits
        rows = hidden if fb.logit_index.shape[0] == fb.num_tokens else hidden[fb.logit_index]
        return self.model.logits(rows), prompt_logits

"""The model runner: turns a scheduled batch into one forward pass and returns logits to sample from."""
from __future__ import annotations

from typing import Optional

import torch

from kestrel.cache.kv_pool import KVPool, ReqToTokenTable
from kestrel.engine.request import Sequence
from kestrel.engine.scheduler import ScheduledBatch
from kestrel.model.attention import AttentionMetadata, MultiTokenRow
from kestrel.model.llama import LlamaForCausalLM


PromptLogits = tuple[torch.Tensor, list[tuple[Sequence, int]]]  # logits rows, (sequence, prompt position) each

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

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence], Optional[PromptLogits]]:
        """Run one step. Returns float32 logits [rows, vocab] for the sequences that sample this step, and
        the logits that score prompt tokens (for requests that asked for prompt logprobs), if any.
        The only state it changes is the K/V of the batch's own slots, so running it again is harmless."""
        ids: list[int] = []
        positions: list[int] = []
        token_rows: list[int] = []
        sample_at: list[int] = []
        sample_seqs: list[Sequence] = []
        prompt_lp_at: list[int] = []  # rows whose logits score a prompt token (prompt_logprobs)
        prompt_lp_for: list[tuple[Sequence, int]] = []
        for seq in batch.decode:
            pos = seq.num_computed
            sample_at.append(len(ids))
            sample_seqs.append(seq)
            ids.append(seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1])  # the one pending token
            positions.append(pos)
            token_rows.append(seq.row)
        num_decode = len(ids)
        multi: list[MultiTokenRow] = []
        table = self.table.table
        for seq, chunk in batch.prefill:
            start, end = seq.num_computed, seq.num_computed + chunk
            first = len(ids)
            ids.extend(seq.all_ids[start:end])
            positions.extend(range(start, end))
            token_rows.extend([seq.row] * chunk)
            multi.append(MultiTokenRow(first, first + chunk, table[seq.row, :end]))
            if seq.params.prompt_logprobs is not None:
                # position p's logits score prompt token p + 1
                for pos in range(max(start, seq.prompt_logprob_start - 1), min(end, len(seq.prompt_ids) - 1)):
                    prompt_lp_at.append(first + pos - start)
                    prompt_lp_for.append((seq, pos + 1))
            if end == seq.total_len:  # the chunk reaches the end: its last logits give the next token
                sample_at.append(first + chunk - 1)
                sample_seqs.append(seq)
        dev = self.device
        ids_t = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        rows_t = torch.tensor(token_rows, dtype=torch.int64, device=dev)
        meta = AttentionMetadata(slot_mapping=table[rows_t, pos_t], num_decode=num_decode, multi=multi)
        if num_decode:
            dec_rows, dec_pos = rows_t[:num_decode], pos_t[:num_decode]
            max_len = max(positions[:num_decode]) + 1
            meta.decode_kv_index = table[dec_rows, :max_len]
            if num_decode >= SHARED_PREFIX_MIN_ROWS:
                meta.decode_shared_len = _common_prefix_columns(meta.decode_kv_index, min(positions[:num_decode]))
                self.shared_prefix_steps += meta.decode_shared_len > 0
            if min(positions[:num_decode]) + 1 != max_len:
                lengths = dec_pos + 1
                mask = torch.arange(max_len, device=dev).unsqueeze(0) < lengths.unsqueeze(1)
                meta.decode_mask = mask.view(num_decode, 1, 1, max_len)
        hidden = self.model(ids_t, pos_t, meta, self.pool.caches)
        prompt_logits = None
        if prompt_lp_for:
            prompt_logits = (self.model.logits(hidden[torch.tensor(prompt_lp_at, device=dev)]), prompt_lp_for)
        if not sample_at:
            return hidden.new_empty(0, 0), [], prompt_logits
        rows = hidden if len(sample_at) == len(ids) else hidden[torch.tensor(sample_at, device=dev)]
        return self.model.logits(rows), sample_seqs, prompt_logits

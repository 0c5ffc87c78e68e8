"""The one description of a forward step: plain tensors the runner executes, nothing about requests.

The scheduler decides which sequences run and which KV slots their new tokens get; `build` turns that
into a ForwardBatch: the flattened tokens, their positions and slots, one row per sequence (its
req-to-token table row, how many KV positions it attends over, its mask), which tokens need logits,
and a per-row adapter id. Prefill chunks, decode tokens, jump-forward chunks, lookahead verification
(an explicit tree mask) and batched LoRA (adapter ids) all go through this one shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from kestrel.cache.kv_pool import ReqToTokenTable
from kestrel.engine.request import Sequence


@dataclass
class ForwardBatch:
    """Rows [0, num_decode) have one query token each (tokens 0..num_decode-1, in that order); the rows
    after them have several (prefill chunks and the like), laid out one after another."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: each token's position in its sequence
    slot_mapping: torch.Tensor  # [T] int64: the KV pool slot that receives each token's K and V
    kv_rows: torch.Tensor  # [R] int64: each row's row in the req-to-token table
    kv_lens: list[int]  # [R]: KV positions each row attends over, its new tokens included
    q_starts: list[int]  # [R + 1]: row r's tokens are q_starts[r]:q_starts[r + 1]
    num_decode: int
    masks: list[Optional[torch.Tensor]] = field(default_factory=list)  # per multi-token row: None = causal,
    # else [q_len, q_len] bool over the row's own tokens, True = attend (a tree mask); every token of a row also
    # sees the row's context before its new tokens
    logit_index: Optional[torch.Tensor] = None  # [S] tokens whose logits are sampled from
    prompt_logit_index: Optional[torch.Tensor] = None  # [P] tokens whose logits score a given next token
    adapter_ids: Optional[list[int]] = None  # [R] LoRA adapter id of each row (0: none); None: no row has one
    logits_in_order: bool = False  # logit_index is every token in order (no gather needed)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_rows(self) -> int:
        return len(self.kv_lens)


@dataclass
class StepPlan:
    """A ForwardBatch and what its outputs mean: which sequence samples from each logits row (the first
    len(sampling) rows), which (sequence, prompt position) each prompt-logits row scores, and for each
    lookahead row its sequence and where its tokens' logits start (after the sampling rows)."""

    batch: ForwardBatch
    sampling: list[Sequence]
    prompt_scoring: list[tuple[Sequence, int]]
    drafts: list[tuple[Sequence, int]] = field(default_factory=list)


def build(decode: list[Sequence], prefill: list[tuple[Sequence, int]], req_to_token: ReqToTokenTable,
          device: torch.device) -> StepPlan:
    """The step for these decode sequences and (sequence, chunk length) prefill chunks, whose slots the
    scheduler has already written into the req-to-token table. A decode sequence with a lookahead
    draft becomes a multi-token row (its pending token and the draft, under the draft's tree mask), placed
    between the one-token rows and the prefill chunks."""
    ids: list[int] = []
    positions: list[int] = []
    rows: list[int] = []
    kv_lens: list[int] = []
    q_starts: list[int] = [0]
    logit_at: list[int] = []
    sampling: list[Sequence] = []
    prompt_at: list[int] = []
    prompt_scoring: list[tuple[Sequence, int]] = []
    masks: list[Optional[torch.Tensor]] = []
    plain = [s for s in decode if s.draft is None]
    drafted = [s for s in decode if s.draft is not None]
    for seq in plain:
        pos = seq.num_computed
        logit_at.append(len(ids))
        sampling.append(seq)
        ids.append(seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1])  # the one pending token
        positions.append(pos)
        rows.append(seq.row)
        kv_lens.append(pos + 1)
        q_starts.append(len(ids))
    draft_at: list[int] = []
    for seq in drafted:
        pos, draft = seq.num_computed, seq.draft
        draft_at.append(len(ids))
        ids.append(seq.output_ids[-1] if seq.output_ids else seq.prompt_ids[-1])
        ids.extend(draft.tokens)
        positions.append(pos)
        positions.extend(pos + d for d in draft.depth)
        rows.append(seq.row)
        kv_lens.append(pos + draft.num_tokens)
        q_starts.append(len(ids))
        masks.append(draft.mask)
    for seq, chunk in prefill:
        start, end = seq.num_computed, seq.num_computed + chunk
        first = len(ids)
        ids.extend(seq.all_ids[start:end])
        positions.extend(range(start, end))
        rows.append(seq.row)
        kv_lens.append(end)
        q_starts.append(len(ids))
        masks.append(None)
        if seq.params.prompt_logprobs is not None:
            # position p's logits score prompt token p + 1
            for pos in range(max(start, seq.prompt_logprob_start - 1), min(end, len(seq.prompt_ids) - 1)):
                prompt_at.append(first + pos - start)
                prompt_scoring.append((seq, pos + 1))
        if seq.samples_after(end):  # its last logits give the next token
            logit_at.append(first + chunk - 1)
            sampling.append(seq)
    drafts = []
    for seq, first in zip(drafted, draft_at):  # every token of a lookahead row needs its logits
        drafts.append((seq, len(logit_at)))
        logit_at.extend(range(first, first + seq.draft.num_tokens))
    table = req_to_token.table
    rows_t = torch.tensor(rows, dtype=torch.int64, device=table.device)
    pos_t = torch.tensor(positions, dtype=torch.int64, device=table.device)
    if len(ids) == len(rows):  # one token a row (decode steps): each token's slot is at its row and position
        slot_mapping = req_to_token.read_cells(rows, positions)
    else:
        counts = torch.tensor([q_starts[i + 1] - q_starts[i] for i in range(len(rows))], device=table.device)
        token_rows = torch.repeat_interleave(rows_t, counts)
        # a lookahead row's tokens take the table columns after its pending token, in row order
        columns = pos_t
        if drafted:
            columns = pos_t.clone()
            for seq, first in zip(drafted, draft_at):
                n = seq.draft.num_tokens
                columns[first:first + n] = torch.arange(seq.num_computed, seq.num_computed + n)
        slot_mapping = table[token_rows, columns]
    if table.device != device:
        pos_t, slot_mapping, rows_t = pos_t.to(device), slot_mapping.to(device), rows_t.to(device)
    batch = ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=pos_t,
        slot_mapping=slot_mapping,
        kv_rows=rows_t,
        kv_lens=kv_lens,
        q_starts=q_starts,
        num_decode=len(plain),
        masks=masks,
        logit_index=torch.tensor(logit_at, dtype=torch.int64, device=device) if logit_at else None,
        prompt_logit_index=torch.tensor(prompt_at, dtype=torch.int64, device=device) if prompt_at else None,
        logits_in_order=logit_at == list(range(len(ids))),
    )
    adapters = ([seq.namespace for seq in plain] + [seq.namespace for seq in drafted]
                + [seq.namespace for seq, _ in prefill])
    if any(adapters):
        batch.adapter_ids = adapters
    return StepPlan(batch, sampling, prompt_scoring, drafts)

"""The model runner: executes a ForwardBatch as one forward pass and returns the logits it asks for."""
from __future__ import annotations

from typing import Optional

import torch

from kestrel.cache.kv_pool import KVPool, ReqToTokenTable
from kestrel.engine.forward_batch import ForwardBatch
from kestrel.lora.batch import LoraBatch
from kestrel.model.attention import AttentionMetadata, MultiTokenRow
from kestrel.model.llama import LlamaForCausalLM

# cascade attention pays off once several rows share a prefix, on PyTorch ops. The C++ kernel is faster without it
# (rows sharing a prefix read the same slots, which the CPU's caches then serve): 16 rows on a cached 512-token
# prefix, embedded model, decode step 21 ms against cascade's 35 (bf16; float32 59 against 69; AMX Xeon)
SHARED_PREFIX_MIN_ROWS = 4
SHARED_PREFIX_MIN_LEN = 32
KERNEL_MAX_QUERY_ROWS = 64  # multi-token rows up to this long go to the C++ kernel; longer (prefill) ones to SDPA


def _common_prefix_columns(kv_index: torch.Tensor, limit: int) -> int:
    """How many leading slots all decode rows share (0 if fewer than SHARED_PREFIX_MIN_LEN)."""
    same = (kv_index[:, :limit] == kv_index[:1, :limit]).all(dim=0)
    n = int(same.int().cumprod(0).sum()) if limit else 0
    return n if n >= SHARED_PREFIX_MIN_LEN else 0


def _prefix_rows(mask: torch.Tensor) -> torch.Tensor:
    """Which rows of a [q, q] tree mask are causal (query i sees exactly new tokens 0..i)."""
    q = mask.shape[0]
    return (mask == torch.ones(q, q, dtype=torch.bool).tril()).all(dim=1)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: KVPool, table: ReqToTokenTable, device: torch.device,
                 adapters=None):
        self.model = model
        self.adapters = adapters  # kestrel.lora.manager.LoraManager: where a row's adapter id is resident
        self.pool = pool
        self.table = table
        self.device = device
        self.shared_prefix_steps = 0  # decode steps that used cascade attention over a shared prefix
        self._burst_heads: dict[int, Optional[list[torch.Tensor]]] = {}  # by rows (the model's weights do not change)

    def attention_metadata(self, fb: ForwardBatch) -> AttentionMetadata:
        """Where each row's keys and values are in the pool, read from the req-to-token table."""
        table = self.table.table
        nd = fb.num_decode
        meta = AttentionMetadata(slot_mapping=fb.slot_mapping, num_decode=nd)
        if nd:
            lens = fb.kv_lens[:nd]
            max_len, min_len = max(lens), min(lens)
            if self.model.kernels is None:  # (the C++ kernel reads K/V through the table itself)
                meta.decode_kv_index = table[fb.kv_rows[:nd], :max_len]
                if nd >= SHARED_PREFIX_MIN_ROWS:
                    meta.decode_shared_len = _common_prefix_columns(meta.decode_kv_index, min_len - 1)
                    self.shared_prefix_steps += meta.decode_shared_len > 0
            if min_len != max_len and self.model.kernels is None:
                lengths = torch.tensor(lens, device=table.device)
                mask = torch.arange(max_len, device=table.device).unsqueeze(0) < lengths.unsqueeze(1)
                meta.decode_mask = mask.view(nd, 1, 1, max_len)
        first_multi = nd
        if self.model.kernels is not None:
            first_multi = self._kernel_rows(fb, meta)
        kv_rows = fb.kv_rows.tolist() if first_multi < fb.num_rows else []
        for i, r in enumerate(range(first_multi, fb.num_rows), start=first_multi - nd):
            meta.multi.append(MultiTokenRow(fb.q_starts[r], fb.q_starts[r + 1], table[kv_rows[r], :fb.kv_lens[r]],
                                            fb.masks[i]))
        return meta

    def _kernel_rows(self, fb: ForwardBatch, meta: AttentionMetadata) -> int:
        """Give the C++ kernel the decode rows and the multi-token rows up to KERNEL_MAX_QUERY_ROWS long that
        follow them (in order: its output comes first); returns the first row left to `meta.multi`. A token of a
        tree-masked row that sees more than a prefix of its row reads a scratch row of the table listing what it
        sees (while scratch rows last)."""
        nd, end = fb.num_decode, fb.num_decode
        scratch = self.table.num_scratch
        trees = []  # (row, its tokens that need a scratch row)
        while end < fb.num_rows and fb.q_starts[end + 1] - fb.q_starts[end] <= KERNEL_MAX_QUERY_ROWS:
            mask = fb.masks[end - nd]
            if mask is not None:
                tree = (~_prefix_rows(mask)).nonzero().view(-1)
                if tree.shape[0] > scratch:
                    break
                scratch -= tree.shape[0]
                trees.append((end, tree))
            end += 1
        if end == 0:
            return 0
        # token i of a causal row with q_len queries and kv_len positions sees kv_len - q_len + i + 1 positions
        q_lens = [fb.q_starts[r + 1] - fb.q_starts[r] for r in range(end)]
        lens: list[int] = []
        for r in range(end):
            first = fb.kv_lens[r] - q_lens[r] + 1
            lens.extend(range(first, first + q_lens[r]))
        meta.table = self.table.table
        rows = fb.kv_rows if end == fb.num_rows else fb.kv_rows[:end]
        meta.token_rows = torch.repeat_interleave(rows, torch.tensor(q_lens)) if end > nd else rows
        meta.token_lens = torch.tensor(lens, dtype=torch.int64)
        next_scratch = self.table.scratch_start
        for r, tree in trees:
            next_scratch = self._tree_rows(fb, r, tree, meta, next_scratch)
        return end

    def _tree_rows(self, fb: ForwardBatch, r: int, tree: torch.Tensor, meta: AttentionMetadata, scratch: int) -> int:
        """Point the tokens `tree` of tree-masked row r (those that see more than a prefix of the row) at scratch
        rows holding the row's context and then the slots of the new tokens each one sees; returns the next free
        scratch row."""
        table, mask = self.table.table, fb.masks[r - fb.num_decode]
        q0, q_len = fb.q_starts[r], fb.q_starts[r + 1] - fb.q_starts[r]
        ctx = fb.kv_lens[r] - q_len
        k = tree.shape[0]
        if not k:
            return scratch
        row = int(fb.kv_rows[r])
        sub = mask[tree]
        order = torch.sort((~sub).to(torch.uint8), dim=1, stable=True).indices  # what each sees first, in row order
        table[scratch:scratch + k, :ctx] = table[row, :ctx]
        table[scratch:scratch + k, ctx:ctx + q_len] = table[row, ctx:ctx + q_len][order]
        meta.token_rows[q0 + tree] = torch.arange(scratch, scratch + k, device=meta.token_rows.device)
        meta.token_lens[q0 + tree] = ctx + sub.sum(dim=1)
        return scratch + k

    def burst_head(self, rows: int) -> Optional[list[torch.Tensor]]:
        """The model's head as decode_burst takes it for `rows` rows (None: no burst runs), looked up once per size."""
        if rows not in self._burst_heads:
            self._burst_heads[rows] = self.model.burst_head(rows)
        return self._burst_heads[rows]

    def can_burst(self, rows: int) -> bool:
        """Whether decode_burst runs for a batch of `rows` one-token rows on this model and machine."""
        return self.burst_head(rows) is not None

    def decode_burst(self, fb: ForwardBatch, slots: torch.Tensor, stop_ids: torch.Tensor,
                     max_seconds: float) -> torch.Tensor:
        """Greedy decode steps of `fb` (one-token rows, no adapters) in one call: each row's argmax fed back at the
        next position, step s's K/V into slots[s]. Stops after slots.shape[0] steps, a step that picks one of
        `stop_ids`, or the first step that ends past `max_seconds`; returns the picks, [steps run, rows]. Like
        forward(), it changes only the K/V of those slots."""
        return self.model.decode_burst(self.burst_head(fb.num_rows), fb.input_ids, fb.positions,
                                       self.attention_metadata(fb), self.pool.caches, slots, stop_ids, max_seconds)

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run one step: float32 logits for the batch's logit_index tokens (empty if none), and for its
        prompt_logit_index tokens (None if none). The only state it changes is the K/V of the batch's
        own slots, so running it again is harmless."""
        lora = None
        if fb.adapter_ids is not None:
            by_id = self.adapters.by_id
            lora = LoraBatch.build([by_id[i].residency if i else None for i in fb.adapter_ids], fb.q_starts,
                                   self.model.kernels, self.device)
        hidden = self.model(fb.input_ids, fb.positions, self.attention_metadata(fb), self.pool.caches, lora)
        prompt_logits = None
        if fb.prompt_logit_index is not None:
            prompt_logits = self.model.logits(hidden[fb.prompt_logit_index])
        if fb.logit_index is None:
            return hidden.new_empty(0, 0), prompt_logits
        rows = hidden if fb.logits_in_order else hidden[fb.logit_index]
        return self.model.logits(rows), prompt_logits

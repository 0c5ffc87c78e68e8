"""Vectorized sampling over the batch's logits: penalties, temperature, top-k/top-p/min-p, seeds, logprobs."""
from __future__ import annotations

from typing import Optional, Sequence as Seq

import torch

from kestrel.decoding.grammar import apply_bitmask, new_bitmask
from kestrel.engine.request import Sequence, TokenLogprob


CANDIDATES = 256  # ranks a top-k / top-p row draws from without sorting the vocabulary, when they hold its nucleus


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, eos_token_ids: Seq[int] = (), kernels=None):
        self.device = device
        self.kernels = kernels  # the C++ CPU kernels (their argmax is ~15x faster than torch's on a vocabulary)
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.eos_token_ids = sorted(eos_token_ids)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> tuple[list[int], list[Optional[TokenLogprob]]]:
        """logits: float32 [rows, vocab], one row per sequence. Returns sampled ids and logprob records."""
        params = [s.params for s in seqs]
        rows = len(seqs)
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # the model's distribution, as vLLM reports
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if constrained:
            bitmask = new_bitmask(len(constrained), logits.shape[1])
            for row, i in enumerate(constrained):
                seqs[i].grammar.fill_bitmask(bitmask, row)
            apply_bitmask(logits, bitmask, constrained)
        if any(p.penalized for p in params):
            logits = self._apply_penalties(logits.clone(), seqs)
        early = [i for i, s in enumerate(seqs) if len(s.output_ids) < s.params.min_tokens]
        if early:
            logits = self._forbid_ending(logits.clone(), [seqs[i] for i in early], early)
        if all(p.greedy for p in params):
            tokens = self.argmax(logits)
        else:
            tokens = self._sample(logits, seqs)
        token_list = tokens.tolist()
        records: list[Optional[TokenLogprob]] = [None] * rows
        if raw_logprobs is not None:
            k = max(p.logprobs or 0 for p in params)
            chosen = raw_logprobs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
            top_vals, top_ids = raw_logprobs.topk(max(k, 1), dim=-1)
            top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
            for i, p in enumerate(params):
                if p.logprobs is not None:
                    n = p.logprobs
                    records[i] = TokenLogprob(token_list[i], chosen[i], dict(zip(top_ids[i][:n], top_vals[i][:n])))
        return token_list, records

    def _sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """One uniform per row mapped through its distribution's CDF. A row with top-k or top-p walks the
        tokens in descending order (_draw_in_rank_order); any other row walks them in id order, which draws
        from the same distribution without ranking them (a sort of the vocabulary cost ~3.6 ms a row on one
        core). Which walk a row takes depends on its own parameters only, so a seeded row's tokens never depend
        on its batch."""
        params = [s.params for s in seqs]
        dev = logits.device
        u = self._uniforms(seqs).to(dev)  # one per row, greedy rows included: the stream does not depend on paths
        greedy = any(p.greedy for p in params)
        tokens = self.argmax(logits) if greedy else torch.empty(len(seqs), dtype=torch.int64, device=dev)
        plain = [i for i, p in enumerate(params) if not p.greedy and p.top_k <= 0 and p.top_p >= 1.0]
        ranked = [i for i, p in enumerate(params) if not p.greedy and (p.top_k > 0 or p.top_p < 1.0)]
        for rows, draw in ((plain, self._draw_in_id_order), (ranked, self._draw_in_rank_order)):
            if rows:
                index = torch.tensor(rows, device=dev)
                tokens[index] = draw(logits.index_select(0, index), u[index], [params[i] for i in rows])
        return tokens

    @staticmethod
    def _scaled(logits: torch.Tensor, params: list) -> torch.Tensor:
        return logits / torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)

    def _draw_in_id_order(self, logits: torch.Tensor, u: torch.Tensor, params: list) -> torch.Tensor:
        probs = torch.softmax(self._scaled(logits, params), dim=-1)
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=logits.device)
            probs.masked_fill_(probs < (min_p * probs.amax(dim=-1)).unsqueeze(1), 0.0)
        return self._invert(probs, u).view(-1)

    def _draw_in_rank_order(self, logits: torch.Tensor, u: torch.Tensor, params: list) -> torch.Tensor:
        """Top-k / top-p / min-p over the tokens in descending order. The first CANDIDATES ranks (a top-k, much
        cheaper than sorting the vocabulary) hold every token a row can draw when its top_k is within them or
        their mass exceeds its top_p (the next rank is then cut); only the other rows sort the whole vocabulary.
        The choice depends on the row's own logits and parameters, so a seeded row's tokens never depend on its
        batch."""
        scaled = self._scaled(logits, params)
        vocab = scaled.shape[1]
        tokens = torch.empty(len(params), dtype=torch.int64, device=logits.device)
        if vocab > CANDIDATES:
            values, ids = scaled.topk(CANDIDATES, dim=-1)
            probs = torch.exp(values - torch.logsumexp(scaled, dim=-1, keepdim=True))
            mass = probs.sum(dim=-1).tolist()
            head = [i for i, p in enumerate(params) if 0 < p.top_k <= CANDIDATES or mass[i] > p.top_p < 1.0]
        else:
            head = []
        rest = sorted(set(range(len(params))) - set(head))
        if head:
            index = torch.tensor(head, device=logits.device)
            tokens[index] = self._truncate_and_draw(probs[index], ids[index], u[index], [params[i] for i in head])
        if rest:
            index = torch.tensor(rest, device=logits.device)
            sorted_logits, sorted_ids = scaled[index].sort(dim=-1, descending=True)
            tokens[index] = self._truncate_and_draw(torch.softmax(sorted_logits, dim=-1), sorted_ids, u[index],
                                                    [params[i] for i in rest])
        return tokens

    def _truncate_and_draw(self, probs: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, params: list
                           ) -> torch.Tensor:
        """probs: each row's largest probabilities in descending order (of the whole vocabulary's softmax), ids:
        their tokens. Drops what top-k, top-p and min-p cut and draws from the rest."""
        rows, width = probs.shape
        dev = probs.device
        drop = torch.zeros_like(probs, dtype=torch.bool)
        if any(p.top_k > 0 for p in params):
            k = torch.tensor([p.top_k if p.top_k > 0 else width for p in params], device=dev)
            drop |= torch.arange(width, device=dev).unsqueeze(0) >= k.unsqueeze(1)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=dev)
            drop |= (probs.cumsum(dim=-1) - probs) > top_p.unsqueeze(1)  # the top token always stays
        if any(p.min_p > 0.0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
            drop |= probs < (min_p * probs[:, 0]).unsqueeze(1)
        return ids.gather(1, self._invert(probs.masked_fill(drop, 0.0), u)).view(-1)

    @staticmethod
    def _invert(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The column where each row's CDF (unnormalized) first reaches its uniform's share of the total."""
        cdf = probs.cumsum(dim=-1)
        return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1)).clamp_(max=probs.shape[1] - 1)

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's argmax (greedy picks), on the C++ kernel where it applies."""
        if self.kernels is not None and logits.dtype == torch.float32 and logits.stride(-1) == 1:
            return self.kernels.argmax_rows(logits)
        return logits.argmax(dim=-1)

    def _uniforms(self, seqs: Seq[Sequence]) -> torch.Tensor:
        """One uniform per row; a seeded request draws from its own generator, so its samples do not
        depend on what else is in the batch."""
        for s in seqs:
            if s.params.seed is not None and s.generator is None:
                # one stream per completion of the request, from a 64-bit mix of its seed and index
                s.generator = torch.Generator(device="cpu").manual_seed((s.params.seed * 1000003 + s.index) % 2**64)
        u = torch.rand(len(seqs), generator=self.generator, dtype=torch.float64)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                u[i] = torch.rand(1, generator=s.generator, dtype=torch.float64)[0]
        return u.float()

    def _forbid_ending(self, logits: torch.Tensor, seqs: Seq[Sequence], rows: list[int]) -> torch.Tensor:
        """min_tokens: before a row has that many output tokens, EOS and its stop_token_ids cannot be drawn."""
        for row, seq in zip(rows, seqs):
            enders = list(seq.params.stop_token_ids) + ([] if seq.params.ignore_eos else self.eos_token_ids)
            if enders:
                logits[row, torch.tensor(enders, device=logits.device)] = float("-inf")
        return logits

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """vLLM semantics: repetition penalty over prompt and output tokens, frequency and presence
        penalties over output tokens only."""
        rows, vocab = logits.shape
        dev = logits.device
        max_out = max(1, max(len(s.output_ids) for s in seqs))
        out_ids = torch.full((rows, max_out), vocab, dtype=torch.int64)
        for i, s in enumerate(seqs):
            if s.output_ids:
                out_ids[i, : len(s.output_ids)] = torch.tensor(s.output_ids)
        counts = torch.zeros(rows, vocab + 1, device=dev)
        counts.scatter_add_(1, out_ids.to(dev), torch.ones_like(out_ids, dtype=torch.float32, device=dev))
        counts = counts[:, :vocab]
        params = [s.params for s in seqs]
        rep = torch.tensor([p.repetition_penalty for p in params], device=dev).unsqueeze(1)
        if (rep != 1.0).any():
            seen = counts > 0
            for i, s in enumerate(seqs):
                if params[i].repetition_penalty != 1.0:
                    seen[i, torch.tensor(s.prompt_ids, device=dev)] = True
            penalized = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalized, logits)
        freq = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(1)
        pres = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(1)
        return logits - freq * counts - pres * (counts > 0).float()

"""Sampling behaviour through the public Engine API on the embedded model."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from kestrel import Engine, SamplingParams
from kestrel.engine.request import Sequence
from kestrel.engine.sampler import Sampler


@pytest.fixture(scope="module")
def engine():
    # float32 so that comparisons between runs do not hinge on bf16 rounding, which shifts slightly
    # with the batch's shapes and with prefix-cache hits (the same holds for vLLM and SGLang)
    return Engine(dtype="float32", max_total_tokens=4096)


def test_same_seed_same_text_whatever_the_batch(engine, chat_prompt_ids):
    p = chat_prompt_ids[1]
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234)
    alone = engine.generate([p], seeded)[0]
    others = [SamplingParams(max_tokens=30, temperature=1.0) for _ in chat_prompt_ids[2:6]]
    crowded = engine.generate([p] + chat_prompt_ids[2:6], [seeded] + others)[0]
    assert alone.token_ids == crowded.token_ids
    different = engine.generate([p], SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=99))[0]
    assert different.token_ids != alone.token_ids


def test_top_k_one_equals_greedy(engine, chat_prompt_ids):
    greedy = engine.generate(chat_prompt_ids[:4], SamplingParams(max_tokens=20, temperature=0.0))
    top1 = engine.generate(chat_prompt_ids[:4], SamplingParams(max_tokens=20, temperature=1.5, top_k=1))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in top1]


def test_sampling_varies_without_seed(engine, chat_prompt_ids):
    outs = engine.generate([chat_prompt_ids[1]] * 4, SamplingParams(max_tokens=16, temperature=1.0))
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_stop_string_cuts_exactly_across_tokens(engine, chat_prompt_ids):
    base = engine.generate([chat_prompt_ids[7]], SamplingParams(max_tokens=40, temperature=0.0))[0]
    text = base.text
    assert len(text) > 20
    stop = text[10:16]  # six characters from the middle, usually spanning a token boundary
    first = text.find(stop)
    cut = engine.generate([chat_prompt_ids[7]], SamplingParams(max_tokens=40, temperature=0.0, stop=[stop, "zzzz"]))[0]
    assert cut.text == text[:first]
    assert cut.finish_reason == "stop"


def test_stop_token_ids_and_max_tokens(engine, chat_prompt_ids):
    base = engine.generate([chat_prompt_ids[3]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 12
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    out = engine.generate([chat_prompt_ids[3]], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def test_eos_stops_unless_ignored(engine, chat_prompt_ids):
    out = engine.generate([chat_prompt_ids[8]], SamplingParams(max_tokens=200, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in engine.eos_token_ids
    forced = engine.generate([chat_prompt_ids[8]], SamplingParams(max_tokens=len(out.token_ids) + 5, temperature=0.0,
                                                                  ignore_eos=True))[0]
    assert forced.finish_reason == "length" and len(forced.token_ids) == len(out.token_ids) + 5


def test_n_shares_prompt_slots(chat_prompt_ids):
    prompt = chat_prompt_ids[9] * 3  # a long prompt makes sharing visible in the slot accounting
    for disable in (False, True):
        engine = Engine(max_total_tokens=4096, disable_radix_cache=disable)
        out = engine.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7))[0]
        assert len(out.outputs) == 4
        assert len({tuple(o.token_ids) for o in out.outputs}) > 1
        generated = sum(len(o.token_ids) for o in out.outputs)
        # prompt once, each sibling recomputes only the prompt's last token, plus the generated tokens
        assert engine.pool.total_allocated <= len(prompt) + 3 + generated
        assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size


def test_logprobs(engine, chat_prompt_ids):
    out = engine.generate([chat_prompt_ids[0]], SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.logprob <= 0.0
        assert max(lp.top.values()) == pytest.approx(lp.logprob)  # greedy picks the top token
        assert list(lp.top.values()) == sorted(lp.top.values(), reverse=True)


def test_penalties_reduce_repetition(engine, tokenizer):
    prompt = tokenizer("apple apple apple apple apple apple apple apple").input_ids
    plain = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True))[0]
    penal = engine.generate([prompt], SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True,
                                                     frequency_penalty=2.0, presence_penalty=1.0,
                                                     repetition_penalty=1.5))[0]
    assert len(set(penal.token_ids)) > len(set(plain.token_ids))


def test_stream_reassembles_generate(engine, chat_prompt_ids):
    params = SamplingParams(max_tokens=30, temperature=0.0, stop=["\n\n"])
    full = engine.generate([chat_prompt_ids[9]], params)[0]
    deltas = list(engine.stream(chat_prompt_ids[9], params))
    assert "".join(d.text for d in deltas) == full.text
    assert sum((d.token_ids for d in deltas), []) == full.token_ids
    assert deltas[-1].finished and deltas[-1].finish_reason == full.finish_reason
    assert len(deltas) > 3


def test_abort_frees_memory(engine, chat_prompt_ids):
    rid = engine.add_request(chat_prompt_ids[2], SamplingParams(max_tokens=50))
    for _ in range(3):
        engine.step()
    assert engine.abort(rid)
    assert not engine.has_unfinished()
    assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size
    assert engine.get_output(rid, pop=True).finish_reason == "abort"


# ---- the sampler alone, on fixed logits ---------------------------------------------------------
def _rows(*params):
    return [Sequence(f"r{i}", 0, [1], p) for i, p in enumerate(params)]


def test_temperature_sampling_without_a_sort_draws_from_the_softmax():
    """A row with neither top-k nor top-p maps its uniform through the CDF in token-id order (no sort of the
    vocabulary); its draws must still follow softmax(logits / T), and min_p must still cut the tail."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0, 0.0, -3.0]])
    sampler = Sampler(torch.device("cpu"), seed=3)
    n = 6000
    for params, expected in [
            (SamplingParams(temperature=0.7), torch.softmax(logits[0] / 0.7, -1)),
            (SamplingParams(temperature=1.0, min_p=0.3), torch.softmax(logits[0], -1))]:
        batch = _rows(*[params] * n)
        tokens, _ = sampler(logits.expand(n, -1).contiguous(), batch)
        counts = torch.bincount(torch.tensor(tokens), minlength=logits.shape[1]).double()
        if params.min_p:
            keep = expected >= params.min_p * expected.max()
            assert counts[~keep].sum() == 0  # below min_p of the top token: never drawn
            expected = torch.where(keep, expected, 0.0)
            expected /= expected.sum()
            counts, expected = counts[keep], expected[keep]
        assert chisquare(counts.numpy(), (expected.double() / expected.double().sum() * counts.sum()).numpy()).pvalue > 1e-3


def test_a_seeded_row_draws_alike_beside_rows_that_sort():
    """Whether a row walks its CDF in id order or in rank order depends on its own parameters, never on the
    others in the batch: a seeded plain row gives the same tokens alone and beside top-p and greedy rows."""
    torch.manual_seed(0)
    logits = torch.randn(3, 500) * 3
    sampler = Sampler(torch.device("cpu"))

    def draw(params, rows):
        seqs = _rows(*params)
        return [sampler(logits[rows], seqs)[0] for _ in range(20)], seqs

    seeded = SamplingParams(temperature=1.0, seed=11)
    alone, _ = draw([seeded], [0])
    crowded, _ = draw([SamplingParams(temperature=0.8, top_p=0.9), seeded, SamplingParams(temperature=0)],
                      [1, 0, 2])
    assert [t[0] for t in alone] == [t[1] for t in crowded]
    assert all(t[2] == int(logits[2].argmax()) for t in crowded)
    assert len({t[0] for t in alone}) > 3  # it really samples


@pytest.mark.parametrize("case", ["nucleus within the first ranks", "nucleus wider than them"])
def test_top_p_draws_from_the_nucleus_whether_or_not_it_sorts_the_vocabulary(case):
    """A top-p row draws from the first CANDIDATES ranks (no sort) when they hold its nucleus, else from the
    sorted vocabulary: either way only nucleus tokens, with their renormalized probabilities."""
    from kestrel.engine.sampler import CANDIDATES

    torch.manual_seed(1)
    vocab = 4 * CANDIDATES
    if case == "nucleus within the first ranks":
        logits = torch.full((vocab,), -4.0)
        logits[torch.randperm(vocab)[:12]] = torch.linspace(1.0, 3.0, 12)
        top_p = 0.8
    else:  # nearly flat: the nucleus holds about half the vocabulary
        logits, top_p = torch.randn(vocab) * 0.05, 0.5
    probs = torch.softmax(logits, -1)
    ranked, order = probs.sort(descending=True)
    nucleus = order[(ranked.cumsum(0) - ranked) <= top_p]
    assert (len(nucleus) < CANDIDATES) == (case == "nucleus within the first ranks")
    n = 20 * len(nucleus) + 4000
    params = SamplingParams(temperature=1.0, top_p=top_p)
    tokens, _ = Sampler(torch.device("cpu"), seed=5)(logits.expand(n, -1).contiguous(), _rows(*[params] * n))
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    inside = torch.zeros(vocab, dtype=torch.bool)
    inside[nucleus] = True
    assert counts[~inside].sum() == 0
    expected = probs.double()[inside]
    assert chisquare(counts[inside].numpy(), (expected / expected.sum() * n).numpy()).pvalue > 1e-3

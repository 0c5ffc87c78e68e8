"""Sampling behaviour through the public Engine API on the embedded model."""
from __future__ import annotations

import pytest

from kestrel import Engine, SamplingParams


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

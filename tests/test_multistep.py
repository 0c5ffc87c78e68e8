"""Multi-step decoding (EngineConfig.num_scheduler_steps): greedy decode steps run in bursts of one C++ call each
give exactly the tokens, finishes and memory accounting of plain steps, and happen only where nothing is put off."""
from __future__ import annotations

import random

import pytest

from kestrel import Engine, SamplingParams

MAX_NEW = 40


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 60))] for _ in range(n)]


def _greedy(n: int = MAX_NEW, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def _run(model_dir, prompts, params, steps, **kwargs):
    engine = Engine(model_dir, dtype="float32", num_scheduler_steps=steps, **kwargs)
    outs = engine.generate(prompts, params)
    return outs, engine


def _summary(outs):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason, o.outputs[0].text)
            for o in outs]


@pytest.mark.parametrize("policy", ["fcfs", "vtc"])
def test_bursts_give_the_tokens_and_accounting_of_plain_steps(tiny_llama_dir, policy):
    prompts = _prompts(6, seed=5)
    # different lengths, so rows leave the batch at different steps, inside bursts and between them
    params = [_greedy(n) for n in (40, 3, 17, 33, 9, 26)]
    clients = ["a", "b", "a", "c", "b", "a"]
    runs = []
    for steps in (1, 8):
        engine = Engine(tiny_llama_dir, dtype="float32", num_scheduler_steps=steps, policy=policy)
        outs = engine.generate(prompts, params, client=clients)
        runs.append((_summary(outs), engine))
    (plain, e1), (burst, e8) = runs
    assert burst == plain
    assert e1.stats.burst_steps == 0 and e8.stats.burst_steps > 0
    assert e8.stats.steps == e1.stats.steps  # each burst step counts as one
    assert e8.kv_accounting() == e1.kv_accounting()
    assert e8.pool.num_free + e8.cache.evictable_size == e8.pool.size
    assert e8.client_counters() == pytest.approx(e1.client_counters())
    assert e8.client_usage() == e1.client_usage()


def test_a_burst_ends_at_a_stop_token(tiny_llama_dir):
    prompt = _prompts(1, seed=9)
    free, _ = _run(tiny_llama_dir, prompt, _greedy(), steps=1)
    tokens = free[0].outputs[0].token_ids
    stop = tokens[11]  # a token the model picks mid-burst (its first occurrence ends the output)
    first = tokens.index(stop)
    outs = {}
    for steps in (1, 8):
        out, engine = _run(tiny_llama_dir, prompt, _greedy(stop_token_ids=[stop]), steps)
        outs[steps] = _summary(out)
        assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size
    assert outs[8] == outs[1]
    assert outs[8][0][0] == tokens[:first + 1] and outs[8][0][1] == "stop" and outs[8][0][2] == stop


def test_the_embedded_model_bursts_on_its_int8_head(embedded_dir, chat_prompt_ids):
    """The default engine (bf16, int4 layers, int8 head on the C++ kernel): bursts against its own plain steps."""
    prompts = chat_prompt_ids[:3]
    results = []
    for steps in (1, 8):
        engine = Engine(num_scheduler_steps=steps)
        results.append(([o.outputs[0].token_ids for o in engine.generate(prompts, _greedy(24))], engine))
    (plain, _), (burst, engine) = results
    assert burst == plain
    assert engine.stats.burst_steps > 0
    assert "bursts of up to 8 steps" in engine.describe()


@pytest.mark.parametrize("params", [
    _greedy(stop=["zz"]),  # stop strings are found in the detokenized text, after each token
    _greedy(logprobs=2),
    _greedy(repetition_penalty=1.3),
    SamplingParams(max_tokens=MAX_NEW, temperature=0.8, seed=3),
], ids=["stop-strings", "logprobs", "penalty", "sampled"])
def test_requests_that_need_the_host_each_token_never_burst(tiny_llama_dir, params):
    prompts = _prompts(2, seed=3)
    (plain, _), (burst, engine) = (_run(tiny_llama_dir, prompts, params, steps) for steps in (1, 8))
    assert engine.stats.burst_steps == 0
    assert _summary(burst) == _summary(plain)


def test_a_waiting_request_is_admitted_on_the_next_step(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, dtype="float32", num_scheduler_steps=8)
    first = engine.add_request(_prompts(1, seed=1)[0], _greedy(200))
    for _ in range(6):
        engine.step()
    assert engine.stats.burst_steps > 0  # the lone request runs in bursts
    done = engine.stats.steps
    second = engine.add_request(_prompts(1, seed=2)[0], _greedy(5))
    engine.step()
    assert engine.stats.steps == done + 1  # no burst while it waited
    seq = engine._requests[second][0]
    assert seq.num_computed > 0 and not engine.scheduler.waiting
    engine.run_until_done([first, second])


def test_a_failing_burst_falls_back_to_plain_steps(tiny_llama_dir, monkeypatch):
    prompts = _prompts(3, seed=4)
    plain, _ = _run(tiny_llama_dir, prompts, _greedy(), steps=1)
    engine = Engine(tiny_llama_dir, dtype="float32", num_scheduler_steps=8)

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault in the burst kernel")
    monkeypatch.setattr(engine.runner, "decode_burst", broken)
    outs = engine.generate(prompts, _greedy())
    assert _summary(outs) == _summary(plain)
    assert engine.stats.burst_steps == 0
    assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size


def test_aborts_between_bursts_leave_no_slot_behind(tiny_llama_dir):
    rng = random.Random(7)
    engine = Engine(tiny_llama_dir, dtype="float32", num_scheduler_steps=8, max_total_tokens=600)
    rids = [engine.add_request(p, _greedy(rng.randint(5, 60))) for p in _prompts(8, seed=8)]
    while engine.has_unfinished():
        engine.step()
        for seq in engine.scheduler.running:  # between steps no sequence holds a slot it has not computed
            assert seq.num_slots == seq.num_computed
        live = [r for r in rids if not engine.is_finished(r)]
        if live and rng.random() < 0.3:
            engine.abort(rng.choice(live))
    assert engine.stats.burst_steps > 0
    assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size


def test_num_scheduler_steps_is_validated():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        Engine(num_scheduler_steps=0)

"""Scheduling under memory pressure and continuous batching, on a tiny random model (float32)."""
from __future__ import annotations

import random

from kestrel import Engine, SamplingParams


def _prompts(n, length, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(length + i)] for i in range(n)]


def test_pool_far_too_small_still_finishes_everything_exactly(tiny_llama_dir):
    prompts = _prompts(6, 200)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = Engine(tiny_llama_dir, dtype="float32")
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    # each request fits alone (<= 245 tokens) but no two fit together: admission, chunked prefill and
    # retraction must take turns without deadlock
    tight = Engine(tiny_llama_dir, dtype="float32", max_total_tokens=260, chunked_prefill_size=48)
    got = [o.token_ids for o in tight.generate(prompts, params)]
    assert got == expected
    assert tight.pool.num_free + tight.cache.evictable_size == tight.pool.size
    tight_off = Engine(tiny_llama_dir, dtype="float32", max_total_tokens=260, chunked_prefill_size=48,
                       disable_radix_cache=True)
    assert [o.token_ids for o in tight_off.generate(prompts, params)] == expected
    assert tight_off.pool.num_free == tight_off.pool.size


def test_preemption_happens_and_is_exact(tiny_llama_dir):
    prompts = _prompts(8, 20, seed=1)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in Engine(tiny_llama_dir, dtype="float32").generate(prompts, params)]
    engine = Engine(tiny_llama_dir, dtype="float32", max_total_tokens=200)
    assert [o.token_ids for o in engine.generate(prompts, params)] == expected
    assert engine.scheduler.num_retractions > 0


def test_new_requests_join_running_batch(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, dtype="float32")
    batches = []
    forward = engine.runner.forward

    def record(batch):
        batches.append((len(batch.decode), [n for _, n in batch.prefill]))
        return forward(batch)

    engine.runner.forward = record
    a = engine.add_request(_prompts(1, 30)[0], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    for _ in range(5):
        engine.step()
    b = engine.add_request(_prompts(1, 30, seed=5)[0], SamplingParams(max_tokens=5, temperature=0.0))
    engine.run_until_done([a, b])
    assert batches[5] == (1, [30]), "B's prefill should share a step with A's decode"
    assert engine.get_output(a).output_tokens == 20


def test_chunked_prefill_respects_budget(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, dtype="float32", chunked_prefill_size=16)
    sizes = []
    forward = engine.runner.forward
    engine.runner.forward = lambda batch: (sizes.append(sum(n for _, n in batch.prefill)), forward(batch))[1]
    engine.generate(_prompts(3, 50), SamplingParams(max_tokens=3, temperature=0.0))
    assert max(sizes) <= 16 and sum(sizes) == 50 + 51 + 52

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


def _chunks(fb) -> list[int]:
    """Token counts of a ForwardBatch's multi-token rows (prefill chunks)."""
    return [fb.q_starts[r + 1] - fb.q_starts[r] for r in range(fb.num_decode, fb.num_rows)]


def test_new_requests_join_running_batch(tiny_llama_dir):
    # plain steps, each one forward: A's decode alone would otherwise run in multi-step bursts (test_multistep.py)
    engine = Engine(tiny_llama_dir, dtype="float32", num_scheduler_steps=1)
    batches = []
    forward = engine.runner.forward

    def record(fb):
        batches.append((fb.num_decode, _chunks(fb)))
        return forward(fb)

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
    engine.runner.forward = lambda fb: (sizes.append(sum(_chunks(fb))), forward(fb))[1]
    engine.generate(_prompts(3, 50), SamplingParams(max_tokens=3, temperature=0.0))
    assert max(sizes) <= 16 and sum(sizes) == 50 + 51 + 52


def test_admission_clips_the_output_estimate():
    """Requests without max_tokens (up to the context length): planning for the whole remaining context
    admits about half as many as planning for at most clip_max_new_tokens."""
    from kestrel import EngineConfig
    from kestrel.engine.simulator import Simulator

    running = {}
    for clip in (4096, 10**9):
        sim = Simulator(EngineConfig(max_total_tokens=16384, clip_max_new_tokens=clip), context_length=8192)
        for i in range(32):
            sim.add([7] * 99 + [i], max_tokens=8192 - 100)
        for _ in range(3):
            sim.step()
        running[clip] = len(sim.scheduler.running)
    # 16384 slots over (100 + 0.3 * min(8092, clip)) reserved per request: 6.5 unclipped, 12.3 clipped
    assert running[10**9] == 6
    assert running[4096] >= 2 * running[10**9]

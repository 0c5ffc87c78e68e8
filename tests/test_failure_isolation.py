"""A step that raises fails only the requests that make it raise; the rest of the batch is exact and no
KV slot is lost. The in-process language backend fails every waiting call when the engine itself breaks."""
from __future__ import annotations

import random
import threading

import pytest

import kestrel as kl
from kestrel import Engine, SamplingParams

POISON = 31337  # a token id that makes the patched engine raise when a row carrying it is computed


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 30000) for _ in range(rng.randint(5, 40))] for _ in range(n)]


def _poisoned(seqs) -> bool:
    return any(POISON in s.prompt_ids for s in seqs)


def _break_forward(engine: Engine) -> None:
    """The forward runs (writing K/V into the batch's slots), then raises if the poisoned prompt's
    prefill is in it."""
    real = engine.runner.forward

    def forward(fb):
        out = real(fb)
        if bool((fb.input_ids == POISON).any()):
            raise RuntimeError("injected forward failure")
        return out
    engine.runner.forward = forward


def _break_sampler(engine: Engine) -> None:
    real = engine.sampler.__call__

    class Sampler:
        generator = engine.sampler.generator

        def __call__(self, logits, seqs):
            if _poisoned(seqs):
                raise OverflowError("injected sampler failure")
            return real(logits, seqs)
    engine.sampler = Sampler()


def _break_detokenizer(engine: Engine) -> None:
    """Fails after sampling, in the per-request commit (as a detokenizer or grammar bug would)."""
    real = engine.output.append

    def append(seq, token, lp):
        if POISON in seq.prompt_ids and len(seq.output_ids) >= 3:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "injected")
        return real(seq, token, lp)
    engine.output.append = append


@pytest.mark.parametrize("breaker", [_break_forward, _break_sampler, _break_detokenizer])
@pytest.mark.parametrize("radix", [True, False])
def test_only_the_failing_request_fails(tiny_llama_dir, breaker, radix):
    prompts = _prompts(7, seed=1)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in Engine(tiny_llama_dir, dtype="float32").generate(prompts, params)]
    engine = Engine(tiny_llama_dir, dtype="float32", disable_radix_cache=not radix, chunked_prefill_size=64)
    breaker(engine)
    bad = [5, 6, POISON, 7, 8]
    mixed = prompts[:3] + [bad] + prompts[3:]
    outs = engine.generate(mixed, [params] * 3 + [SamplingParams(max_tokens=12, n=2, ignore_eos=True)] + [params] * 4)
    failed = outs.pop(3)
    assert failed.finish_reason == "error" and "injected" in failed.error
    assert all(o.finish_reason == "error" for o in failed.outputs)  # both of its n completions
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" and o.error is None for o in outs)
    assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size
    # and the engine goes on serving, poisoned requests included, once the fault is gone
    again = engine.generate(prompts, params)
    assert [o.token_ids for o in again] == expected


def test_sampling_edge_values_are_safe(tiny_llama_dir):
    engine = Engine(tiny_llama_dir, dtype="float32")
    prompt = _prompts(1, seed=2)[0]
    greedy = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    for t in (1e-40, 1e-7, 5e-6):  # below the greedy threshold: no inf/NaN, exactly greedy
        out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=t, ignore_eos=True, logprobs=1))[0]
        assert out.token_ids == greedy.token_ids
        assert all(x.logprob == x.logprob and x.logprob > float("-inf") for x in out.logprobs)
    for seed in (2**64 - 1, -(2**63), 0):  # every 64-bit seed works and is reproducible
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, n=2, ignore_eos=True)
        a, b = (engine.generate([prompt], params)[0] for _ in range(2))
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]


@pytest.fixture(scope="module")
def validating_engine(tiny_llama_dir) -> Engine:
    """One engine for the validation cases (module-scoped, so it is freed with the module)."""
    return Engine(tiny_llama_dir, dtype="float32")


@pytest.mark.parametrize("params, name", [
    (dict(seed=10**20), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(temperature="hot"), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("inf")), "top_p"),
    (dict(max_tokens=True), "max_tokens"),
    (dict(max_tokens=2.0), "max_tokens"),
    (dict(stop=5), "stop"),
    (dict(stop=["a"] * 100), "stop"),
    (dict(stop_token_ids=["1"]), "stop_token_ids"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(n="2"), "n"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(repetition_penalty=1e9), "repetition_penalty"),
    (dict(choices=[1, 2]), "choices"),
    (dict(regex=7), "regex"),
    (dict(json_schema=[1]), "json_schema"),
    (dict(logprob_start_len=-1), "logprob_start_len"),
])
def test_wrong_types_and_ranges_name_the_parameter(validating_engine, params, name):
    engine = validating_engine
    with pytest.raises(ValueError) as info:
        engine.add_request([1, 2, 3], SamplingParams(**params))
    assert info.value.param == name and str(info.value).startswith(name)
    assert not engine.has_unfinished()


def test_language_backend_fails_every_waiting_call_when_the_engine_breaks(tiny_llama_dir):
    backend = kl.EngineBackend(Engine(tiny_llama_dir, dtype="float32"))
    engine = backend.engine
    assert backend.generate([5, 6, 7], {"max_tokens": 3, "temperature": 0.0})["meta_info"]["completion_tokens"] == 3
    # hold a constrained request in compilation until the engine has broken
    gate = threading.Event()
    real_compile = engine.grammars.compile

    def slow_compile(spec):
        gate.wait(30)
        return real_compile(spec)
    engine.grammars.compile = slow_compile

    def broken_schedule():
        raise RuntimeError("scheduler bug")
    results: dict = {}

    def call(name, prompt, params):
        try:
            results[name] = backend.generate(prompt, params)
        except Exception as e:  # noqa: BLE001
            results[name] = e
    held = threading.Thread(target=call, args=("held", [5, 6], {"max_tokens": 4, "regex": "[ab]+"}))
    held.start()
    while not backend._driver.compiling:
        threading.Event().wait(0.01)
    engine.scheduler.schedule = broken_schedule
    running = threading.Thread(target=call, args=("running", [8, 9], {"max_tokens": 4}))
    running.start()
    running.join(30)
    assert not running.is_alive(), "a call waited forever on a broken engine"
    gate.set()
    held.join(30)
    assert not held.is_alive(), "a request held for grammar compilation was never failed"
    for name in ("held", "running"):
        assert isinstance(results[name], Exception) and "scheduler bug" in str(results[name]), results[name]
    with pytest.raises(RuntimeError, match="scheduler bug"):  # later calls fail at once, naming the cause
        backend.generate([1, 2], {"max_tokens": 2})
    backend.shutdown()

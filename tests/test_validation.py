"""Bad input gets a clear exception, and the engine keeps working afterwards."""
from __future__ import annotations

import pytest

from kestrel import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine():
    return Engine(max_total_tokens=1024)


@pytest.mark.parametrize("params, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0, n=2), "n must be 1 when max_tokens is 0"),  # prefill only samples nothing to share
    (dict(max_tokens=2, min_tokens=5), "min_tokens must be at most max_tokens"),
    (dict(n=0), "n "),
    (dict(logprobs=100), "logprobs"),
    (dict(frequency_penalty=5.0), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(stop_token_ids=[10**9]), "stop_token_ids"),
    (dict(stop=[""]), "stop"),
])
def test_bad_sampling_values(engine, params, match):
    with pytest.raises(ValueError, match=match):
        engine.generate(["hello"], SamplingParams(**params))


def test_empty_prompt(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.generate([""], SamplingParams())


def test_bad_token_ids(engine):
    with pytest.raises(ValueError, match="token ids"):
        engine.generate([[1, 2, 10**7]])
    with pytest.raises(TypeError):
        engine.generate([[1.5, 2]])


def test_beyond_context_length(engine):
    with pytest.raises(ValueError, match="context length"):
        engine.generate([[5] * 10], SamplingParams(max_tokens=engine.context_length))


def test_request_that_can_never_fit_the_pool(engine):
    with pytest.raises(ValueError, match="max_total_tokens"):
        engine.generate([[5] * 900], SamplingParams(max_tokens=200))


def test_unknown_model_path():
    with pytest.raises(FileNotFoundError, match="not found"):
        Engine("/no/such/model")


def test_bad_config():
    with pytest.raises(ValueError, match="policy"):
        Engine(policy="random")


def test_engine_still_serves_after_errors(engine):
    with pytest.raises(ValueError):
        engine.generate(["ok", ""], SamplingParams())
    out = engine.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.output_tokens == 4
    assert not engine.has_unfinished()

"""The offline API end to end: chat, multi-turn prefix reuse, stats, the CLI."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kestrel import Engine, SamplingParams


@pytest.fixture(scope="module")
def engine():
    return Engine(max_total_tokens=8192)


def test_multi_turn_chat_hits_the_cache(engine):
    convo = [{"role": "user", "content": "Name a famous bridge."}]
    first = engine.chat(convo, SamplingParams(max_tokens=24, temperature=0))[0]
    assert first.cached_tokens == 0  # a fresh engine has nothing cached
    convo += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Where is it?"}]
    second = engine.chat(convo, SamplingParams(max_tokens=24, temperature=0))[0]
    # the whole first prompt (and usually most of the reply) comes from the radix cache
    assert second.cached_tokens >= first.prompt_tokens
    assert second.time_to_first_token is not None and second.time_to_first_token > 0
    assert second.latency >= second.time_to_first_token


def test_shared_system_prompt_hits_across_requests(engine):
    system = {"role": "system", "content": "You are a terse assistant who answers with one word. " * 8}
    engine.chat([system, {"role": "user", "content": "Colour of grass?"}], SamplingParams(max_tokens=4))
    outs = engine.chat([[system, {"role": "user", "content": q}] for q in ("Capital of Peru?", "Opposite of hot?")],
                       SamplingParams(max_tokens=4))
    for o in outs:
        assert o.cached_tokens / o.prompt_tokens > 0.8


def test_generate_accepts_text_and_ids(engine):
    ids = engine.tokenizer("The capital of France is").input_ids
    a = engine.generate("The capital of France is", SamplingParams(max_tokens=5, temperature=0))[0]
    b = engine.generate([ids], SamplingParams(max_tokens=5, temperature=0))[0]
    assert a.token_ids == b.token_ids and a.prompt_token_ids == ids
    assert engine.generate(ids, SamplingParams(max_tokens=2))[0].prompt_tokens == len(ids)


def test_per_prompt_sampling_params(engine):
    outs = engine.generate(["a", "b"], [SamplingParams(max_tokens=3, ignore_eos=True),
                                         SamplingParams(max_tokens=7, ignore_eos=True)])
    assert [o.output_tokens for o in outs] == [3, 7]
    with pytest.raises(ValueError, match="sampling params"):
        engine.generate(["a", "b"], [SamplingParams()])


def test_cli_generate(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 2+2?\nName a colour.\n")
    proc = subprocess.run([sys.executable, "-m", "kestrel.cli", "generate", "--file", str(prompts),
                           "--max-tokens", "8", "--temperature", "0", "--max-total-tokens", "2048"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "### What is 2+2?" in proc.stdout and "### Name a colour." in proc.stdout
    assert "output tokens" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "kestrel.cli", "generate", "x", "--model", "/no/such/dir"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not found" in bad.stderr

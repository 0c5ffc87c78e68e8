"""`kestrel serve --speculative lookahead` through the real openai client: outputs as plain decoding gives them,
usage reports what lookahead accepted, streaming, the native API and /metrics."""
from __future__ import annotations

import httpx
import pytest

from kestrel import Engine, SamplingParams
from tests.server_utils import ServerProcess

PROMPT = "one two three four five six seven eight nine ten " * 4


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--max-total-tokens", "4096",
                        "--speculative", "lookahead", "--lookahead-window", "3", "--lookahead-ngram", "4", "--lookahead-pool", "4",
                        "--lookahead-always")  # the planner's choices are tested offline; here, the plumbing
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return Engine(tiny_llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def looping(plain) -> str:
    """PROMPT followed by the tiny model's own greedy continuation, which loops: its n-grams predict what the
    model says next, so drafts pay whatever this machine's step costs are."""
    ids = plain.tokenize(PROMPT)
    return plain.tokenizer.decode(ids + plain.generate(ids, SamplingParams(max_tokens=32, temperature=0,
                                                                           ignore_eos=True))[0].token_ids)


def test_completions_match_plain_decoding_and_usage_says_what_was_accepted(server, client, plain, looping):
    r = client.completions.create(model="default", prompt=looping, max_tokens=48, temperature=0,
                                  extra_body={"ignore_eos": True})
    want = plain.generate(looping, SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))[0]
    assert r.choices[0].text == want.text
    usage = r.model_dump()["usage"]
    look = usage["lookahead"]
    assert look["steps"] > 0 and look["accepted_tokens_per_step"] > 1.0
    details = usage["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] == round(look["steps"] * look["accepted_tokens_per_step"]) - look["steps"]
    assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] >= 0
    # fewer forward steps than tokens: the point of it
    assert look["steps"] < usage["completion_tokens"]
    assert "lookahead decoding (W=3, N=4, G=4; on every step)" in server.log()


def test_streaming_sends_accepted_runs_and_the_same_text(server, client, plain, looping):
    stream = client.completions.create(model="default", prompt=looping, max_tokens=40, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.generate(looping, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0].text
    usage = chunks[-1].usage.model_dump()
    assert usage["completion_tokens"] == 40 and usage["lookahead"]["steps"] > 0
    text_chunks = [c for c in chunks if c.choices and c.choices[0].text]
    assert len(text_chunks) < 40  # several accepted tokens arrive as one delta


def test_native_generate_reports_verify_steps_and_metrics_histogram(server, looping):
    before = server.metric("kestrel:spec_decode_tokens_per_step_count")
    r = httpx.post(server.url + "/generate", json={"text": looping, "sampling_params": {
        "max_new_tokens": 32, "temperature": 0, "ignore_eos": True}}, timeout=60).json()
    meta = r["meta_info"]
    assert 0 < meta["spec_verify_ct"] < meta["completion_tokens"] == 32
    after = server.metric("kestrel:spec_decode_tokens_per_step_count")
    assert after >= before + meta["spec_verify_ct"]
    assert server.metric("kestrel:spec_decode_tokens_per_step_sum") > after  # more than one token a step


def test_sampled_requests_and_bad_sizes(server, client):
    r = client.completions.create(model="default", prompt=PROMPT, max_tokens=20, temperature=0.8, seed=3, n=2)
    again = client.completions.create(model="default", prompt=PROMPT, max_tokens=20, temperature=0.8, seed=3, n=2)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert r.usage.completion_tokens > 0


def test_the_cli_refuses_bad_lookahead_sizes(tiny_llama_dir):
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "kestrel.cli", "serve", "--model", tiny_llama_dir,
                          "--speculative", "lookahead", "--lookahead-ngram", "1"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "lookahead_ngram must be >= 2" in out.stderr

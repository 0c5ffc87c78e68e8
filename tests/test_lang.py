"""The frontend language on the embedded model, through the in-process engine and a real server."""
from __future__ import annotations

import json

import pytest
import torch

import kestrel as kl
from benchmarks.programs import Facts, brainstorm, chat, classify, fork_heavy, review, tree_of_thought
from kestrel import Engine
from tests.server_utils import ServerProcess


@pytest.fixture(scope="module")
def local(embedded_dir):
    backend = kl.EngineBackend(Engine(embedded_dir, dtype="float32"))
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def remote():
    server = ServerProcess("--dtype", "float32")
    backend = kl.RuntimeEndpoint(server.url)
    yield backend
    backend.shutdown()
    server.stop()


def run_all(backend) -> dict:
    out = {}
    s = review.run(text="The blender is loud but crushes ice perfectly. Four stars.", backend=backend)
    out["review"] = (s.text(), s["tone"], s["facts"])
    s = brainstorm.run(topic="city cycling", temperature=0.0, backend=backend)
    out["brainstorm"] = (s.text(), [f for f in s.messages()], s["best"])
    states = classify.run_batch([{"text": t} for t in ("I regret buying this.", "Five stars, would buy again!",
                                                       "It is a kettle.")], backend=backend)
    out["classify"] = [st["label"] for st in states]
    s = chat.run(turns=["What is the capital of France?", "And of Italy?"], backend=backend)
    out["chat"] = s.messages()
    s = tree_of_thought.run(question="How can I water plants while on holiday?", backend=backend)
    out["tot"] = (s.text(), s["answer"])
    return out


def test_programs_agree_between_backends(local, remote):
    here, there = run_all(local), run_all(remote)
    assert here == there
    text, tone, facts = here["review"]
    assert tone in ("positive", "negative") and text.endswith("<|im_end|>\n")
    Facts.model_validate_json(facts)
    assert here["brainstorm"][2] in ("Idea 1", "Idea 2", "Idea 3")
    assert here["classify"][0] == "negative" and here["classify"][1] == "positive"
    msgs = here["chat"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"] and "Paris" in msgs[1]["content"]


def test_fork_heavy_program_reuses_prefixes(local):
    stats = local.engine.stats
    local.engine.cache.evict(local.engine.cache.evictable_size)  # start cold
    prompt0, cached0 = stats.prompt_tokens, stats.cached_tokens
    states = fork_heavy.run_batch([{"text": t} for t in ("Cheap and cheerful.", "Broke on day one.")],
                                  backend=local, num_threads=1)
    calls = [c for s in states for c in s.calls]
    later = calls[1:]
    hit = sum(c["cached_tokens"] for c in later) / sum(c["prompt_tokens"] for c in later)
    assert hit >= 0.8, hit
    # the engine's own counters agree (they also count the priming calls fork and select make)
    first = calls[0]
    engine_hit = ((stats.cached_tokens - cached0 - first["cached_tokens"])
                  / (stats.prompt_tokens - prompt0 - first["prompt_tokens"]))
    assert engine_hit >= 0.8, engine_hit
    assert all(s["label"] in ("positive", "negative", "neutral") for s in states)


def test_streaming_a_program(local):
    state = review.run(text="Nice hat.", backend=local, stream=True)
    pieces = list(state.text_iter())
    assert len(pieces) > 10 and "".join(pieces) == state.text()


def test_errors_surface_where_the_program_reads(local):
    @kl.function
    def bad(s):
        s += kl.user("hi")
        s += kl.assistant(kl.gen("x", regex="a(b"))

    with pytest.raises(ValueError, match="regex is invalid"):
        bad.run(backend=local)
    with pytest.raises(TypeError, match="unknown sampling"):
        kl.gen("x", max_new_tokenz=3)
    with pytest.raises(ValueError, match="choices"):
        kl.select("x", choices=[])
    state = kl.ProgramState(local)
    with pytest.raises(TypeError):
        state += 42


def test_select_matches_brute_force_scoring(tiny_llama_dir):
    """Each choice scored separately by HF transformers, mean log-probability of its tokens."""
    from transformers import AutoModelForCausalLM

    backend = kl.EngineBackend(Engine(tiny_llama_dir, dtype="float32"))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = backend.engine.tokenizer
    try:
        for prefix, choices in [("The weather today is", [" sunny", " rainy and cold", " unknown"]),
                                ("Answer:", ["yes", "no", "maybe so", "42"]),
                                ("Pick one of these:", ["a b c d e", "a"])]:
            best, scores = backend.select(prefix, choices)
            n = len(tok(prefix).input_ids)
            reference = []
            for c in choices:
                ids = tok(prefix + c).input_ids
                start = next((i for i, (a, b) in enumerate(zip(tok(prefix).input_ids, ids)) if a != b), n)
                with torch.no_grad():
                    logprobs = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
                reference.append(sum(logprobs[p - 1, ids[p]].item() for p in range(start, len(ids))) / (len(ids) - start))
            assert scores == pytest.approx(reference, abs=1e-3)
            assert best == max(range(len(choices)), key=lambda i: reference[i])

        @kl.function
        def pick(s):
            s += "Answer:"
            s += kl.gen("a", choices=["yes", "no", "maybe so", "42"])  # gen with choices is select, as in SGLang

        assert pick.run(backend=backend)["a"] == ["yes", "no", "maybe so", "42"][
            backend.select("Answer:", ["yes", "no", "maybe so", "42"])[0]]
    finally:
        backend.shutdown()


def test_default_backend_and_json_schema_dict(local):
    kl.set_default_backend(local)

    @kl.function
    def extract(s, sentence):
        s += kl.user(f"Extract the city and country as JSON: {sentence}")
        s += kl.assistant(kl.gen("out", max_tokens=48, temperature=0.0, json_schema={
            "type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"]}))

    data = json.loads(extract.run(sentence="I flew to Lyon, in France.")["out"])
    assert list(data) == ["city", "country"]

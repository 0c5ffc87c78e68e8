"""SGLang's native HTTP API: the calls the real `sglang` frontend makes (recorded once from sglang 0.5.23 against
`kestrel serve`, kept in tests/data), replayed and checked for what the frontend reads; prefill-only requests;
and the /generate features SGLang users' scripts use."""
from __future__ import annotations

import json
import os
import re

import httpx
import jsonschema
import pytest

from kestrel import Engine, SamplingParams

RECORDING = os.path.join(os.path.dirname(__file__), "data", "sglang_frontend_calls.json")


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _prompts(body: dict) -> tuple[list, bool]:
    prompt = body.get("text", body.get("input_ids"))
    batched = isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], (str, list))
    return (prompt if batched else [prompt]), batched


def _check_completion(item: dict, ids: list[int], body: dict, sp: dict, tokenizer) -> None:
    """What the frontend reads from one /generate result, and that its values agree with the request."""
    meta = item["meta_info"]
    assert isinstance(item["text"], str) and meta["completion_tokens"] == len(item["output_ids"])
    assert meta["prompt_tokens"] == len(ids) and 0 <= meta["cached_tokens"] <= len(ids)
    assert meta["finish_reason"]["type"] in ("stop", "length")
    if sp.get("max_new_tokens") == 0:  # prefill only: nothing sampled
        assert item["text"] == "" and item["output_ids"] == [] and meta["finish_reason"] == {"type": "length",
                                                                                             "length": 0}
    if sp.get("regex") and meta["finish_reason"]["type"] == "stop":
        assert re.fullmatch(sp["regex"], item["text"] + (meta["finish_reason"]["matched"]
                                                         if isinstance(meta["finish_reason"]["matched"], str) else ""))
    if sp.get("json_schema") and meta["finish_reason"]["type"] == "stop":
        jsonschema.validate(json.loads(item["text"]), json.loads(sp["json_schema"]))
    if body.get("return_logprob"):
        start = body.get("logprob_start_len", -1)
        start = (0 if sp.get("max_new_tokens") == 0 else len(ids)) if start == -1 else start
        entries = meta["input_token_logprobs"]
        assert [e[1] for e in entries] == ids[start:]  # [logprob, token_id, text]
        assert all((e[0] is None) == (start + i == 0) for i, e in enumerate(entries))  # only the first has none
        assert all(isinstance(e[0], float) and e[0] <= 0 for e in entries if e[0] is not None)
        texts = [e[2] for e in entries + meta["output_token_logprobs"]]
        if body.get("return_text_in_logprobs"):
            assert texts == [tokenizer.decode([e[1]]) for e in entries + meta["output_token_logprobs"]]
        else:
            assert all(t is None for t in texts)
        assert [e[1] for e in meta["output_token_logprobs"]] == item["output_ids"]
        if body.get("top_logprobs_num"):
            assert all(len(top) == body["top_logprobs_num"] for top in meta["output_top_logprobs"])


def test_recorded_sglang_frontend_calls_get_what_the_frontend_reads(http, tokenizer):
    with open(RECORDING) as f:
        calls = json.load(f)["calls"]
    assert {c["path"] for c in calls} >= {"/get_model_info", "/generate", "/server_info", "/flush_cache"}
    for call in calls:
        if call["method"] == "GET":
            r = http.get(call["path"])
        elif call["stream"]:
            with http.stream("POST", call["path"], json=call["body"]) as r:
                lines = [line for line in r.iter_lines() if line]
        else:
            r = http.post(call["path"], json=call["body"])
        assert r.status_code == 200, (call["path"], call["body"], r.text if not call["stream"] else lines)
        if call["path"] == "/get_model_info":
            assert os.path.isdir(r.json()["model_path"])
        elif call["path"] == "/server_info":
            assert r.json()["version"] and r.json()["max_total_num_tokens"] == 8192
        elif call["path"] == "/generate":
            body = call["body"]
            prompts, batched = _prompts(body)
            ids = [tokenizer(p).input_ids if isinstance(p, str) else p for p in prompts]
            sps = body["sampling_params"] if isinstance(body["sampling_params"], list) else \
                [body["sampling_params"]] * len(prompts)
            if call["stream"]:
                assert lines[-1] == "data: [DONE]"
                events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
                for before, after in zip(events, events[1:]):  # each event carries the text so far
                    assert after["text"].startswith(before["text"]) and after["meta_info"]["completion_tokens"] >= \
                        before["meta_info"]["completion_tokens"]
                assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
                _check_completion(events[-1], ids[0], body, sps[0], tokenizer)
                continue
            out = r.json()
            items = out if batched else [out]
            assert isinstance(out, list) == batched and len(items) == len(prompts)
            for item, prompt_ids, sp in zip(items, ids, sps):
                _check_completion(item, prompt_ids, body, sp, tokenizer)


def test_select_priming_caches_the_prefix_the_choices_then_find(http, tokenizer):
    """The frontend's select: a prefill-only request caches the text, then the choices are scored in one batch
    and find it cached; the prefill-only request samples nothing."""
    text = "Q: Is the sky blue on a clear day? A:"
    generated = lambda: float(next(line.rsplit(" ", 1)[1] for line in http.get("/metrics").text.splitlines()  # noqa
                                   if line.startswith("kestrel:generation_tokens_total")))
    before = generated()
    primed = http.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 0}}).json()
    assert primed["meta_info"]["prompt_tokens"] == len(tokenizer(text).input_ids)
    assert generated() == before  # no token was sampled
    n = primed["meta_info"]["prompt_tokens"]
    scored = http.post("/generate", json={"text": [text + c for c in (" yes", " no")],
                                          "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                                          "return_logprob": True, "return_text_in_logprobs": True,
                                          "logprob_start_len": n - 2}).json()
    assert [s["meta_info"]["cached_tokens"] for s in scored] == [n - 3] * 2, n  # up to the first scored position
    assert [s["meta_info"]["input_token_logprobs"][-1][2] for s in scored] == [" yes", " no"]


def test_prefill_only_requests_in_the_engine(tiny_llama_dir):
    """max_tokens=0: the prompt is computed, scored and cached; nothing is sampled or charged as output; its
    prompt logprobs are those of a request that goes on to sample."""
    engine = Engine(tiny_llama_dir, dtype="float32")
    prompt = [5 + (7 * i) % 900 for i in range(70)]
    sampled_before = engine.stats.output_tokens
    only = engine.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    assert only.output_tokens == 0 and only.text == "" and only.finish_reason == "length"
    assert engine.stats.output_tokens == sampled_before
    again = engine.generate([prompt + [11]], SamplingParams(max_tokens=2, temperature=0))[0]
    assert again.cached_tokens == len(prompt)  # the prefill-only request left its prompt in the cache
    fresh = Engine(tiny_llama_dir, dtype="float32").generate(
        [prompt], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert only.prompt_logprobs == fresh.prompt_logprobs
    assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size


def test_streamed_text_never_shows_what_a_stop_string_may_cut(tiny_llama_dir):
    """Deltas hold back a possible stop string's start; a text shorter than that hold shows nothing yet (it
    once showed a prefix, so streams repeated text)."""
    engine = Engine(tiny_llama_dir, dtype="float32")
    stop = "<|im_end|> and then some"  # a long stop string the output does not contain
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True))
    streamed = ""
    while engine.has_unfinished():
        for d in engine.take_deltas(engine.step()):
            streamed += d.text
    assert streamed == engine.get_output(rid).text and len(engine.get_output(rid).token_ids) == 12


def test_native_generate_features(http, server, tokenizer):
    ids = [[5 + i for i in range(12)], [40 + i for i in range(9)]]
    # a batch of input_ids with a sampling_params per prompt, and n
    out = http.post("/generate", json={"input_ids": ids, "sampling_params": [
        {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}, {"max_new_tokens": 4, "n": 2, "temperature": 1,
                                                                      "ignore_eos": True, "sampling_seed": 3}]}).json()
    assert [o["meta_info"]["completion_tokens"] for o in out] == [3, 4, 4]
    assert [o["meta_info"]["prompt_tokens"] for o in out] == [12, 9, 9]
    # stop strings and stop tokens say what matched; min_new_tokens holds back the stop token
    greedy = http.post("/generate", json={"input_ids": ids[0], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}).json()
    first = greedy["output_ids"][0]
    stopped = http.post("/generate", json={"input_ids": ids[0], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "stop_token_ids": [first]}}).json()
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    held = http.post("/generate", json={"input_ids": ids[0], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "stop_token_ids": [first], "min_new_tokens": 1}}).json()
    assert held["output_ids"][0] != first and held["meta_info"]["completion_tokens"] >= 1
    word = tokenizer.decode(greedy["output_ids"][1:3])
    cut = http.post("/generate", json={"input_ids": ids[0], "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "ignore_eos": True, "stop": [word]}}).json()
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": word} and word not in cut["text"]
    # top logprobs, and tokens' text only when asked
    lp = http.post("/generate", json={"text": "Hello there", "sampling_params": {"max_new_tokens": 3},
                                      "return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0}).json()
    meta = lp["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"] and meta["input_top_logprobs"][0] is None
    assert all(len(t) == 2 and t[0][2] is None for t in meta["output_top_logprobs"])
    # an EBNF grammar
    ebnf = http.post("/generate", json={"text": "x", "sampling_params": {
        "max_new_tokens": 10, "ebnf": 'root ::= "n=" [0-9] [0-9]'}}).json()
    assert re.fullmatch(r"n=\d\d", ebnf["text"])
    # SGLang parameters Kestrel lacks are refused, not ignored; OpenAI's routes keep needing a token
    bad = http.post("/generate", json={"text": "x", "sampling_params": {"stop_regex": "a+"}})
    assert bad.status_code == 400 and "stop_regex" in bad.json()["error"]["message"]
    image = http.post("/generate", json={"text": "x", "image_data": "data:image/png;base64,AAAA"})
    assert image.status_code == 400 and "text-only" in image.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": "x", "max_tokens": 0}).status_code == 400
    assert http.get("/get_server_info").json()["context_length"] == http.get("/server_info").json()["context_length"]


def test_client_rids_batched_streams_and_abort_request(http):
    """A client's rid names its request for /abort_request (SGLang's route) but is not the engine's id, so a
    repeated rid cannot collide; a batch with n streams every completion with its prompt-major index."""
    import concurrent.futures as cf

    body = {"text": "x", "rid": "mine", "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}}
    with cf.ThreadPoolExecutor(2) as pool:  # the same rid twice at once: both complete, neither aborts the other
        first = pool.submit(http.post, "/generate", json=body)
        second = pool.submit(http.post, "/generate", json=dict(body, sampling_params={"max_new_tokens": 2}))
        outs = [f.result(timeout=60) for f in (first, second)]
    assert [o.status_code for o in outs] == [200, 200]
    assert [o.json()["meta_info"]["completion_tokens"] for o in outs] == [300, 2]
    assert {o.json()["meta_info"]["id"] for o in outs} == {"mine"}
    gone = http.post("/abort_request", json={"rid": "mine"})  # SGLang's route and body
    assert gone.status_code == 404 and "mine" in gone.json()["error"]["message"]
    events = {}
    with http.stream("POST", "/generate", json={"text": ["a", "b"], "stream": True, "sampling_params": {
            "max_new_tokens": 3, "n": 2, "ignore_eos": True, "temperature": 1}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[len("data: "):])
                events[event["index"]] = event
    assert sorted(events) == [0, 1, 2, 3] and all(len(e["output_ids"]) == 3 for e in events.values())
    assert [e["meta_info"]["prompt_tokens"] for e in events.values()] == [1, 1, 1, 1]


def test_flush_cache(http):
    body = {"text": "A fairly long prompt that the radix cache keeps after the request ends.",
            "sampling_params": {"max_new_tokens": 0}}
    http.post("/generate", json=body)
    assert http.post("/generate", json=body).json()["meta_info"]["cached_tokens"] > 0
    r = http.post("/flush_cache")
    assert r.status_code == 200 and r.json()["success"]
    assert http.post("/generate", json=body).json()["meta_info"]["cached_tokens"] == 0


def test_flush_cache_is_refused_while_requests_run(tiny_llama_dir):
    """(In the engine, where "running" is not a race with a fast tiny model.)"""
    engine = Engine(tiny_llama_dir, dtype="float32")
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="not flushed while requests are running"):
        engine.flush_cache()
    while engine.has_unfinished():
        engine.step()
    assert engine.flush_cache() >= 3 and engine.cache.total_size == 0

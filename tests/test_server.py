"""The OpenAI-compatible server, driven by the real `openai` client over real HTTP."""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest


MSG = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server(embedded_server):
    return embedded_server


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


def test_models(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["default"]


def test_chat_and_stream_agree(client):
    full = client.chat.completions.create(model="default", messages=MSG, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model="default", messages=MSG, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_usage_counts_match_tokenizer(server, client):
    r = client.chat.completions.create(model="default", messages=MSG, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    count = httpx.post(server.url + "/tokenize", json={"messages": MSG}).json()["count"]
    assert r.usage.prompt_tokens == count and r.usage.completion_tokens == 5
    assert r.usage.total_tokens == count + 5


def test_completions_forms(client):
    one = client.completions.create(model="default", prompt="The capital of France is", max_tokens=6, temperature=0)
    assert one.choices[0].text
    many = client.completions.create(model="default", prompt=["Hello", "The capital of France is"], max_tokens=6,
                                     temperature=0)
    assert len(many.choices) == 2 and many.choices[1].text == one.choices[0].text
    ids = client.completions.create(model="default", prompt=[504, 3575, 282, 4649, 314], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 5
    echo = client.completions.create(model="default", prompt="The capital of France is", max_tokens=6, temperature=0,
                                     echo=True)
    assert echo.choices[0].text == "The capital of France is" + one.choices[0].text


def test_n_and_seed(client):
    kw = dict(model="default", messages=MSG, max_tokens=16, temperature=1.0, seed=42)
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert len(a.choices) == 2
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content


def test_stop(client):
    base = client.completions.create(model="default", prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0)
    text = base.choices[0].text
    stop = text[4:7]
    cut = client.completions.create(model="default", prompt="Count: 1, 2, 3,", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model="default", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)
    c = client.completions.create(model="default", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.token_logprobs) == 3


def test_native_generate_tokenize_detokenize(server):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == "Hello world"
    r = httpx.post(server.url + "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 4,
                                                                                         "temperature": 0}}, timeout=60)
    assert r.status_code == 200 and len(r.json()["output_ids"]) <= 4


def test_disconnect_aborts_and_frees_kv(server):
    body = {"model": "default", "messages": MSG, "max_tokens": 2000, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data:"):
                seen += 1
            if seen >= 5:
                break
    deadline = time.time() + 20
    while time.time() < deadline:
        if server.metric("kestrel:num_requests_running") == 0 and server.metric("kestrel:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.2)
    assert server.metric("kestrel:num_requests_running") == 0
    assert server.metric("kestrel:kv_cache_usage_perc") == 0.0
    assert server.metric("kestrel:generation_tokens_total") > 0


@pytest.mark.parametrize("workload", ["random", "shared-prefix", "multi-turn"])
def test_bench_against_the_server(server, tmp_path, workload):
    import json
    import subprocess
    import sys
    out, png = tmp_path / "results" / "r.json", tmp_path / "plots" / "p.png"  # folders it makes
    proc = subprocess.run([sys.executable, "-m", "kestrel.cli", "bench", "--base-url", server.url, "--workload", workload,
                           "--num-requests", "6", "--request-rate", "20", "--input-len", "40", "--output-len", "8",
                           "--system-prompt-len", "100", "--num-groups", "2", "--turns", "2", "--slo-ttft", "60",
                           "--burstiness", "0.5",
                           "--output", str(out), "--plot", str(png)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["failed"] == 0 and result["completed"] == 6
    assert all(r["output_tokens"] == 8 for r in result["requests_detail"])
    assert result["ttft"]["p50_ms"] > 0 and result["e2e_latency"]["p99_ms"] >= result["e2e_latency"]["p50_ms"]
    assert result["goodput"] > 0 and png.stat().st_size > 1000
    assert "output tok/s" in proc.stdout


def test_plan_fits_its_cost_model_to_the_servers_own_steps(server, tmp_path):
    """GET /step_profile gives the steps the engine took under the load it had; kestrel plan --profile-from fits
    its cost model to them."""
    import json
    import subprocess
    import sys
    from kestrel.cluster.plan import CostModel
    from kestrel.engine.step_log import step_shape
    for n in (1, 2, 3):  # a few more step shapes: one and several decode rows
        c = httpx.post(server.url + "/v1/completions", json={"model": "default", "prompt": ["Hi there"] * n,
                                                              "max_tokens": 8}, timeout=120)
        assert c.status_code == 200
    profile = httpx.get(server.url + "/step_profile").json()
    [engine] = profile["instances"]
    assert engine["instance"] == "engine" and engine["role"] == "both" and engine["kv_tokens"] == 16384
    assert len(engine["samples"]) > 10
    assert all(t >= 1 and 0 <= r <= t and p >= t and s > 0 for t, r, p, s in engine["samples"])
    cost = CostModel.from_profile(profile)
    assert 0 < cost.seconds(*step_shape(1, [100], [])) < cost.seconds(*step_shape(512, [], [(0, 512, True)]))
    (tmp_path / "trace.json").write_text(json.dumps([{"prompt_tokens": 300, "output_tokens": 20}] * 10))
    out = subprocess.run([sys.executable, "-m", "kestrel.cli", "plan", "disaggregation", "--workload",
                          str(tmp_path / "trace.json"), "--slo-ttft", "5", "--slo-tpot", "0.5", "--profile-from",
                          server.url, "--max-instances", "2", "--format", "json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["cost_model"]["kv_tokens"] == 16384 and len(result["options"]) == 3


def test_generate_logprobs_of_a_given_continuation(server):
    prefix = httpx.post(server.url + "/tokenize", json={"prompt": "The capital of France is"}).json()["tokens"]
    cont = httpx.post(server.url + "/tokenize", json={"prompt": " Paris"}).json()["tokens"]
    r = httpx.post(server.url + "/generate", json={"input_ids": prefix + cont, "return_logprob": True,
                                                   "logprob_start_len": len(prefix),
                                                   "sampling_params": {"max_new_tokens": 1, "temperature": 0}},
                   timeout=60).json()
    lps = r["meta_info"]["input_token_logprobs"]
    assert [x[1] for x in lps] == cont and all(x[0] <= 0 for x in lps)
    assert len(r["meta_info"]["output_token_logprobs"]) == 1
    assert "kestrel:request_queue_time_seconds_count" in httpx.get(server.url + "/metrics").text


def test_structured_outputs(server, client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                               "population": {"type": "integer", "minimum": 0, "maximum": 10**8}},
              "required": ["city", "population"]}
    msgs = [{"role": "user", "content": "The largest city in Japan, as JSON."}]
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=64, temperature=0.0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "city", "schema": schema}})
    data = json.loads(r.choices[0].message.content)
    assert list(data) == ["city", "population"] and isinstance(data["population"], int)
    stream = client.chat.completions.create(model="default", messages=msgs, max_tokens=64, temperature=0.0,
                                            stream=True, response_format={"type": "json_schema",
                                                                          "json_schema": {"name": "c", "schema": schema}})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=96, temperature=1.0, seed=3,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{")  # constrained (unconstrained, it writes prose)
    if r.choices[0].finish_reason == "stop":  # an open-ended object may run to max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.chat.completions.create(model="default", messages=msgs, max_tokens=8, temperature=1.0,
                                       extra_body={"guided_choice": ["Tokyo", "Osaka", "Kyoto"]})
    assert r.choices[0].message.content in ("Tokyo", "Osaka", "Kyoto")
    r = client.completions.create(model="default", prompt="A date: ", max_tokens=16, temperature=1.0,
                                  extra_body={"guided_regex": r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", r.choices[0].text)
    r = client.completions.create(model="default", prompt="Answer: ", max_tokens=16,
                                  extra_body={"guided_grammar": 'root ::= ("yes" | "no") "."'})
    assert r.choices[0].text in ("yes.", "no.")
    g = httpx.post(server.url + "/generate", json={"text": "Pick a color:", "sampling_params": {
        "max_new_tokens": 8, "temperature": 0.0, "regex": "(red|green|blue)"}}).json()
    assert g["text"] in ("red", "green", "blue")
    g = httpx.post(server.url + "/generate", json={"text": "Say yes:", "sampling_params": {
        "max_new_tokens": 8, "ebnf": 'root ::= "yes" | "YES"'}}).json()
    assert g["text"] in ("yes", "YES")

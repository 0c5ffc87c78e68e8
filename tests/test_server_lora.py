"""LoRA adapters through the HTTP server: the `openai` client picks one by `model`, vLLM's load/unload
routes work while traffic flows, SGLang's /generate takes lora_path, and /metrics counts per adapter."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from kestrel import Engine, SamplingParams
from tests.lora_utils import make_adapter
from tests.server_utils import ServerProcess

TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, tiny_llama_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("server-lora")
    return {name: make_adapter(tiny_llama_dir, str(root / name), r, TARGETS, seed=i)
            for i, (name, r) in enumerate([("sql", 4), ("chat", 8), ("fr", 2)])}


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapter_dirs):
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--max-total-tokens", "4096",
                        "--lora-modules", f"sql={adapter_dirs['sql']}", f"chat={adapter_dirs['chat']}")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.openai_client()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, adapter_dirs):
    return Engine(tiny_llama_dir, dtype="float32", lora_modules=adapter_dirs)


MESSAGES = [{"role": "user", "content": "Say something about SQL."}]


def test_openai_client_selects_adapters_by_model(client, reference):
    texts = {}
    for model in ("default", "sql", "chat"):
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
        assert r.model == model if model != "default" else True
        texts[model] = r.choices[0].message.content
        expected = reference.chat(MESSAGES, SamplingParams(max_tokens=10, temperature=0),
                                  lora=None if model == "default" else model)[0].text
        assert texts[model] == expected
    assert len(set(texts.values())) == 3  # each adapter changes the answer
    # completions too, streamed
    chunks = client.completions.create(model="chat", prompt="SELECT", max_tokens=8, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == reference.generate("SELECT", SamplingParams(max_tokens=8, temperature=0), lora="chat")[0].text


def test_models_lists_adapters_with_their_parent(client, adapter_dirs):
    models = {m.id: m for m in client.models.list().data}
    assert {"default", "sql", "chat"} <= set(models)
    assert models["sql"].parent == "default" and models["sql"].root == adapter_dirs["sql"]
    assert models["default"].parent is None


def test_unknown_adapter_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=4)
    assert e.value.code == "model_not_found" and "nope" in e.value.message


def test_generate_takes_lora_path(server, reference):
    ids = [1, 2, 3, 400, 500]
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    out = httpx.post(server.url + "/generate", json=dict(body, lora_path="sql")).json()
    assert out["output_ids"] == reference.generate(ids, SamplingParams(max_tokens=8, temperature=0),
                                                   lora="sql")[0].token_ids
    r = httpx.post(server.url + "/generate", json=dict(body, lora_path="missing"))
    assert r.status_code == 404 and r.json()["error"]["param"] == "lora_path"


def test_load_and_unload_while_traffic_flows(server, client, adapter_dirs, reference):
    url = server.url + "/v1"
    # a long request on `chat` keeps running while adapters come and go
    done = {}

    def long_request():
        r = client.completions.create(model="chat", prompt=[5, 6, 7, 8], max_tokens=1500, temperature=0,
                                      extra_body={"ignore_eos": True})
        done["text"] = r.choices[0].text
        done["tokens"] = r.usage.completion_tokens

    t = threading.Thread(target=long_request)
    t.start()
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "fr", "lora_path": adapter_dirs["fr"]})
    assert r.status_code == 200 and "fr" in r.text
    assert "fr" in {m.id for m in client.models.list().data}
    out = client.chat.completions.create(model="fr", messages=MESSAGES, max_tokens=6, temperature=0)
    assert out.choices[0].message.content == reference.chat(MESSAGES, SamplingParams(max_tokens=6, temperature=0),
                                                           lora="fr")[0].text
    # unloading `chat` while its request runs: the request finishes with it; new ones get a 404
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "chat"})
    assert r.status_code == 200
    assert t.is_alive(), "the long request should still be running when its adapter is unloaded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=4)
    t.join(timeout=120)
    assert done["tokens"] == 1500
    expected = reference.generate([5, 6, 7, 8], SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True),
                                  lora="chat")[0].text
    assert done["text"] == expected
    # errors in vLLM's shapes
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "fr", "lora_path": adapter_dirs["fr"]})
    assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "bad", "lora_path": "/does/not/exist"})
    assert r.status_code == 400 and "not a directory" in r.json()["error"]["message"]
    r = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "chat"})
    assert r.status_code == 404
    # and back again under the same name
    r = httpx.post(url + "/load_lora_adapter", json={"lora_name": "chat", "lora_path": adapter_dirs["chat"]})
    assert r.status_code == 200
    out = client.completions.create(model="chat", prompt=[5, 6, 7, 8], max_tokens=20, temperature=0)
    assert out.choices[0].text == expected[:len(out.choices[0].text)]


def test_bench_spreads_requests_over_adapters(server, tmp_path):
    import json
    import subprocess
    import sys
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "kestrel.cli", "bench", "--base-url", server.url, "--num-requests", "8",
                           "--request-rate", "50", "--input-len", "20", "--output-len", "4", "--lora-models", "sql",
                           "chat", "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["completed"] == 8
    text = httpx.get(server.url + "/metrics").text
    assert 'kestrel:lora_requests_total{adapter="chat"}' in text and 'kestrel:lora_requests_total{adapter="sql"}' in text


def test_metrics_per_adapter(server, client):
    client.completions.create(model="sql", prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    requests = {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("kestrel:lora_requests_total{")}
    assert requests.get("sql", 0) >= 1
    assert server.metric('kestrel:lora_loads_total{adapter="sql"}') >= 1
    assert server.metric('kestrel:lora_generation_tokens_total{adapter="sql"}') >= 3

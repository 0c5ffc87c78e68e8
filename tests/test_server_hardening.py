"""The server's guards and failure paths, through a real `kestrel serve` on a tiny model: the API key on
every route, abort, the queue limit for streams, engine restarts, a bad model path, bounded per-client state."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.server_utils import ServerProcess

KEY = "k3y"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--api-key", KEY,
                        "--max-running-requests", "2", "--max-queued-requests", "1", "--max-idle-clients", "16",
                        headers=AUTH)
    yield srv
    assert srv.stop() == 0


def chat(**kw) -> dict:
    return dict({"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, **kw)


def test_every_route_but_health_needs_the_key(server):
    spec = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    routes = [(m.upper(), p) for p, ops in spec["paths"].items() for m in ops] + [
        ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/metrics"), ("POST", "/no/such/route")]
    assert ("POST", "/generate") in routes and ("POST", "/abort") in routes and ("POST", "/tokenize") in routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, json={}, headers=headers)
            if path == "/health":
                assert r.status_code == 200, r.text
                continue
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
        with_key = httpx.request(method, server.url + path, json={}, headers=AUTH)
        assert with_key.status_code != 401, (method, path)


def test_abort_ends_the_stream(server):
    body = chat(max_tokens=1500, ignore_eos=True, stream=True)
    events, status = [], {}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 5:
                rid = json.loads(events[0])["id"]
                status["abort"] = httpx.post(server.url + "/abort", json={"request_id": rid}, headers=AUTH).status_code
    assert status["abort"] == 200
    assert events[-1] == "[DONE]"
    reasons = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert reasons == ["abort"]
    assert len(events) < 1000  # it stopped long before max_tokens
    gone = httpx.post(server.url + "/abort", json={"request_id": rid}, headers=AUTH)
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "request_id"


def test_abort_on_the_native_route(server):
    """SGLang's stream: the id in meta_info is what /abort takes; the last event says abort."""
    last, lines = None, []
    with httpx.stream("POST", server.url + "/generate", headers=AUTH, timeout=60,
                      json={"text": "x", "stream": True, "sampling_params": {"max_new_tokens": 1500,
                                                                             "ignore_eos": True}}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            lines.append(line)
            if line.startswith("data: {"):
                last = json.loads(line[6:])
                if last["meta_info"]["completion_tokens"] == 3:
                    httpx.post(server.url + "/abort", json={"request_id": last["meta_info"]["id"]}, headers=AUTH)
    assert lines[-1] == "data: [DONE]"
    assert last["meta_info"]["finish_reason"]["type"] == "abort" and last["meta_info"]["completion_tokens"] < 1500


def test_stream_over_the_queue_limit_gets_503_before_any_body(server):
    long = chat(max_tokens=1000, ignore_eos=True)

    def hold():
        httpx.post(server.url + "/v1/chat/completions", json=long, headers=AUTH, timeout=120)
    holders = [threading.Thread(target=hold) for _ in range(3)]  # 2 running + 1 queued = the limit
    for t in holders:
        t.start()
    deadline = time.time() + 30
    while server.metric("kestrel:num_requests_running") < 2 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(stream=True), headers=AUTH) as r:
        body = r.read()
    assert r.status_code == 503, body
    assert r.headers["retry-after"] and r.headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["type"] == "service_unavailable"
    for t in holders:
        t.join(120)


def test_per_client_state_stays_bounded(server):
    """Many distinct `user` values: the engine forgets idle clients beyond --max-idle-clients."""
    async def main():
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
            sem = asyncio.Semaphore(3)

            async def one(i):
                async with sem:
                    r = await http.post("/v1/completions", json={"model": "default", "prompt": [5, 6, 7],
                                                                 "max_tokens": 1, "user": f"user-{i}"})
                    while r.status_code == 503:  # the queue limit of this server is tiny
                        await asyncio.sleep(0.01)
                        r = await http.post("/v1/completions", json={"model": "default", "prompt": [5, 6, 7],
                                                                     "max_tokens": 1, "user": f"user-{i}"})
                    assert r.status_code == 200, r.text
            await asyncio.gather(*(one(i) for i in range(400)))
    asyncio.run(main())
    tracked = server.metric("kestrel:clients_tracked")
    assert 0 < tracked <= 16 + 3, tracked  # the idle cap plus what may be in flight
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    labels = {line.split('"')[1] for line in text.splitlines() if line.startswith("kestrel:client_generation_tokens")
              and "{" in line}
    assert len(labels) <= 33 and "other" in labels  # 32 named clients, the rest as one label


def test_bad_model_path_exits_fast_with_one_line():
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "kestrel.cli", "serve", "--model", "/no/such/model"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.time() - t < 60
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "not found" in lines[-1] and "/no/such/model" in lines[-1]
    assert "Traceback" not in proc.stderr


def test_engine_is_restarted_after_it_dies(server):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok"
    restarts = health["restarts"]
    result = {}

    def long_request():
        body = chat(max_tokens=1800, ignore_eos=True)
        result["r"] = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 30
    while server.metric("kestrel:num_requests_running") < 1 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(health["engine_pid"], signal.SIGKILL)
    t.join(timeout=30)
    assert not t.is_alive(), "the in-flight request hung after the engine died"
    r = result["r"]
    assert r.status_code == 503 and "engine" in r.json()["error"]["message"]
    seen = set()
    deadline = time.time() + 120
    while time.time() < deadline:
        h = httpx.get(server.url + "/health")
        seen.add((h.status_code, h.json()["status"]))
        if h.status_code == 200:
            break
        time.sleep(0.1)
    assert (503, "restarting") in seen and h.status_code == 200
    assert h.json()["restarts"] == restarts + 1 and h.json()["engine_pid"] != health["engine_pid"]
    again = httpx.post(server.url + "/v1/chat/completions", json=chat(), headers=AUTH, timeout=60)
    assert again.status_code == 200 and again.json()["choices"][0]["finish_reason"] == "length"
    assert server.metric("kestrel:engine_restarts") == restarts + 1
    # the module's later tests go on on the restarted engine, and its teardown checks it still stops cleanly


def test_client_leaving_a_non_streaming_request_aborts_it(server):
    def aborted() -> float:
        for line in httpx.get(server.url + "/metrics", headers=AUTH).text.splitlines():
            if line.startswith('kestrel:request_success_total{finished_reason="abort"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0
    before = aborted()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=1.0,
                   json={"model": "default", "prompt": "x", "max_tokens": 2000, "ignore_eos": True})
    deadline = time.time() + 10
    while aborted() == before and time.time() < deadline:
        time.sleep(0.1)
    assert aborted() == before + 1
    assert server.metric("kestrel:num_requests_running") == 0

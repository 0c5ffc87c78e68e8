"""Chaos: 32 concurrent clients for about a minute, mixing streaming and non-streaming requests, n > 1,
constrained outputs, mid-stream disconnects, /abort and invalid bodies. Every valid request that was not
cancelled gets a complete answer, the engine is never restarted, and the KV pool is whole at the end."""
from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter

import httpx
import openai
import pytest

from tests.server_utils import ServerProcess

CLIENTS = 32
DURATION = 45.0  # seconds of load; the test takes about a minute with start-up and the final checks
REGEX = r"[a-z]{2,6}-[0-9]{2}"
CHOICES = ["red", "green", "blue"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"]}
INVALID = [
    {"model": "default"},
    {"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
    {"model": "default", "messages": [{"role": "user", "content": "x"}], "seed": 10**20},
    {"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
    {"model": "default", "messages": [{"role": "user", "content": "x"}], "guided_regex": "(("},
    {"model": "default", "messages": [{"role": "user", "content": "x"}], "n": 1000},
    {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    # a KV pool small enough that memory runs out now and then (preemption is part of the chaos, though how
    # often it happens depends on timing, so the test reports it rather than requiring it)
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--context-length", "512",
                        "--max-total-tokens", "1500", "--max-running-requests", "16")
    yield srv
    assert srv.stop() == 0


class Chaos:
    def __init__(self, url: str):
        self.url = url
        self.counts: Counter = Counter()
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.failures.append(what[:500])

    def check_choice(self, kind: str, text: str, reason: str) -> None:
        if reason not in ("stop", "length"):
            self.fail(f"{kind}: finish_reason {reason!r}")
        elif reason == "stop" and kind == "regex" and not re.fullmatch(REGEX, text):
            self.fail(f"regex: {text!r}")
        elif kind == "choice" and text not in CHOICES:
            self.fail(f"choice: {text!r}")
        elif reason == "stop" and kind == "json":
            try:
                data = json.loads(text)
                assert list(data) == ["name", "age"]
            except (ValueError, AssertionError):
                self.fail(f"json: {text!r}")

    @staticmethod
    def constraint(kind: str) -> dict:
        return {"regex": {"guided_regex": REGEX}, "choice": {"guided_choice": CHOICES},
                "json": {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}},
                "plain": {}}[kind]

    async def non_streaming(self, api: openai.AsyncOpenAI, rng: random.Random) -> None:
        kind = rng.choice(["plain", "plain", "regex", "choice", "json"])
        n = rng.choice([1, 1, 2, 3])
        r = await api.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"q{rng.random()}"}], n=n,
            max_tokens=rng.randint(4, 40), temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(2**32),
            extra_body=self.constraint(kind))
        if len(r.choices) != n or r.usage.completion_tokens < 1:
            self.fail(f"non-streaming: {len(r.choices)} choices for n={n}")
        for c in r.choices:
            self.check_choice(kind, c.message.content, c.finish_reason)
        self.counts["completed non-streaming"] += 1

    async def streaming(self, http: httpx.AsyncClient, rng: random.Random, action: str) -> None:
        kind = rng.choice(["plain", "regex", "json"])
        n = rng.choice([1, 2])
        body = dict({"model": "default", "messages": [{"role": "user", "content": f"s{rng.random()}"}], "n": n,
                     "max_tokens": rng.randint(20, 200), "stream": True, "stream_options": {"include_usage": True},
                     "ignore_eos": action != "stream"}, **self.constraint(kind))
        texts, reasons, events, done = [""] * n, [None] * n, 0, False
        stop_after = rng.randint(1, 6)
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                self.fail(f"stream: {r.status_code} {await r.aread()}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    self.fail(f"stream error event: {chunk}")
                    return
                for c in chunk["choices"]:
                    texts[c["index"]] += c["delta"].get("content") or ""
                    reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
                events += 1
                if action == "disconnect" and events == stop_after:
                    self.counts["disconnected mid-stream"] += 1
                    return  # leaving the block closes the connection
                if action == "abort" and events == stop_after:
                    a = await http.post("/abort", json={"request_id": chunk["id"]})
                    if a.status_code not in (200, 404):  # 404: it finished just before
                        self.fail(f"abort: {a.status_code}")
        if not done:
            self.fail(f"stream ({action}) ended without [DONE]")
        elif action == "abort":
            if any(x not in ("abort", "stop", "length") for x in reasons):
                self.fail(f"aborted stream: reasons {reasons}")
            self.counts["aborted via /abort"] += 1
        else:
            for text, reason in zip(texts, reasons):
                self.check_choice(kind, text, reason)
            self.counts["completed streaming"] += 1

    async def native(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        r = await http.post("/generate", json={"input_ids": [rng.randrange(3, 40000) for _ in range(rng.randint(1, 60))],
                                               "sampling_params": {"max_new_tokens": rng.randint(1, 30),
                                                                   "temperature": 0.7, "regex": REGEX}})
        if r.status_code != 200:
            self.fail(f"generate: {r.status_code} {r.text}")
            return
        out = r.json()
        self.check_choice("regex", out["text"], out["meta_info"]["finish_reason"]["type"])  # SGLang's object
        self.counts["completed native"] += 1

    async def invalid(self, http: httpx.AsyncClient, rng: random.Random) -> None:
        body = rng.choice(INVALID + [b"{broken", b"\x00\xff" * 10])
        r = await (http.post("/v1/chat/completions", content=body) if isinstance(body, bytes)
                   else http.post("/v1/chat/completions", json=body))
        if r.status_code not in (400, 404) or set(r.json()["error"]) != {"message", "type", "param", "code"}:
            self.fail(f"invalid body got {r.status_code}: {r.text[:200]}")
        self.counts["invalid bodies rejected"] += 1

    async def client(self, i: int, deadline: float) -> None:
        rng = random.Random(1000 + i)
        # A fresh connection per request: reusing an idle keep-alive connection races with the server closing
        # it (uvicorn's keep-alive timeout) and fails on the client side, whatever the server does.
        fresh = httpx.Limits(max_keepalive_connections=0)
        api = openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="x", max_retries=0, timeout=120,
                                 http_client=httpx.AsyncClient(limits=fresh, timeout=120))
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=fresh) as http:
            while time.monotonic() < deadline:
                action = rng.choices(["non-streaming", "stream", "disconnect", "abort", "native", "invalid"],
                                     [4, 3, 1, 1, 2, 1])[0]
                try:
                    if action == "non-streaming":
                        await self.non_streaming(api, rng)
                    elif action == "native":
                        await self.native(http, rng)
                    elif action == "invalid":
                        await self.invalid(http, rng)
                    else:
                        await self.streaming(http, rng, action)
                except Exception as e:  # noqa: BLE001 - every unexpected error is a finding
                    self.fail(f"{action}: {type(e).__name__}: {e}")
        await api.close()


def test_chaos(server):
    chaos = Chaos(server.url)

    async def main():
        deadline = time.monotonic() + DURATION
        await asyncio.gather(*(chaos.client(i, deadline) for i in range(CLIENTS)))
    asyncio.run(main())
    deadline = time.time() + 60  # aborted and disconnected requests drain
    while time.time() < deadline and (server.metric("kestrel:num_requests_running")
                                      or server.metric("kestrel:num_requests_waiting")):
        time.sleep(0.2)
    free, evictable, size = (server.metric(f"kestrel:kv_cache_{m}_tokens") for m in ("free", "evictable", "size"))
    health = httpx.get(server.url + "/health").json()
    preempted = server.metric("kestrel:num_preemptions_total")
    print(f"\nchaos: {dict(chaos.counts)}; KV at the end: {free:.0f} free + {evictable:.0f} evictable of "
          f"{size:.0f}; {preempted:.0f} preemptions; engine restarts {health['restarts']}; "
          f"failures {len(chaos.failures)}")
    assert not chaos.failures, (chaos.failures[:10], server.log()[-5000:])
    assert health["status"] == "ok" and health["restarts"] == 0
    assert free + evictable == size
    assert all(chaos.counts[k] > 0 for k in ("completed non-streaming", "completed streaming", "completed native",
                                             "disconnected mid-stream", "aborted via /abort",
                                             "invalid bodies rejected"))

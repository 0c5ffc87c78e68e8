"""Malformed and hostile requests get the right 4xx with an OpenAI error body; the server keeps serving."""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_utils import ServerProcess

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}"}
OK_MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--api-key", KEY, "--max-total-tokens", "4096", "--max-running-requests", "2",
                        "--max-queued-requests", "1")
    yield srv
    assert srv.stop() == 0


def chat(**kw):
    return dict({"model": "default", "messages": OK_MSG, "max_tokens": 2}, **kw)


HOSTILE = [
    ("bad json", "/v1/chat/completions", b"{not json", 400, None),
    ("json array body", "/v1/chat/completions", [1, 2], 400, None),
    ("empty body", "/v1/chat/completions", b"", 400, None),
    ("missing messages", "/v1/chat/completions", {"model": "default"}, 400, "messages"),
    ("empty messages", "/v1/chat/completions", chat(messages=[]), 400, "messages"),
    ("unknown role", "/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages"),
    ("content wrong type", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400, "messages"),
    ("messages not a list", "/v1/chat/completions", chat(messages="hello"), 400, "messages"),
    ("missing model", "/v1/chat/completions", {"messages": OK_MSG}, 400, "model"),
    ("unknown model", "/v1/chat/completions", chat(model="gpt-9"), 404, "model"),
    ("negative max_tokens", "/v1/chat/completions", chat(max_tokens=-5), 400, "max_tokens"),
    ("zero max_tokens", "/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens"),
    ("huge max_tokens", "/v1/chat/completions", chat(max_tokens=10**9), 400, "max_tokens"),
    ("max_tokens string", "/v1/chat/completions", chat(max_tokens="ten"), 400, "max_tokens"),
    ("temperature -1", "/v1/chat/completions", chat(temperature=-1), 400, "temperature"),
    ("temperature string", "/v1/chat/completions", chat(temperature="hot"), 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", chat(top_p=0), 400, "top_p"),
    ("top_p 2", "/v1/chat/completions", chat(top_p=2), 400, "top_p"),
    ("n=0", "/v1/chat/completions", chat(n=0), 400, "n"),
    ("n huge", "/v1/chat/completions", chat(n=10**6), 400, "n"),
    ("presence_penalty 9", "/v1/chat/completions", chat(presence_penalty=9), 400, "presence_penalty"),
    ("top_logprobs 100", "/v1/chat/completions", chat(logprobs=True, top_logprobs=100), 400, "logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions", chat(top_logprobs=2), 400, "top_logprobs"),
    ("stop wrong type", "/v1/chat/completions", chat(stop=5), 400, "stop"),
    ("response_format unknown type", "/v1/chat/completions", chat(response_format={"type": "yaml"}), 400,
     "response_format"),
    ("response_format schema missing", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400, "response_format"),
    ("response_format invalid schema", "/v1/chat/completions",
     chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
     400, "json_schema"),
    ("guided_regex unclosed group", "/v1/chat/completions", chat(guided_regex="a(b"), 400, "regex"),
    ("guided_grammar syntax error", "/v1/completions", {"model": "default", "prompt": "x", "guided_grammar": 'root ::= ("a"'},
     400, "grammar"),
    ("guided_choice empty", "/v1/chat/completions", chat(guided_choice=[]), 400, "choices"),
    ("two constraints", "/v1/chat/completions", chat(guided_regex="a", guided_choice=["a"]), 400, "response_format"),
    ("generate invalid json_schema", "/generate", {"text": "hi", "sampling_params": {"json_schema": "{oops"}}, 400,
     "json_schema"),
    ("1 MB prompt", "/v1/completions", {"model": "default", "prompt": "word " * 200_000, "max_tokens": 2}, 400, None),
    ("completion token ids out of range", "/v1/completions", {"model": "default", "prompt": [10**9], "max_tokens": 2},
     400, "prompt"),
    ("completion empty prompt", "/v1/completions", {"model": "default", "prompt": ""}, 400, "prompt"),
    ("completion prompt dict", "/v1/completions", {"model": "default", "prompt": {"a": 1}}, 400, "prompt"),
    ("generate with neither text nor ids", "/generate", {"sampling_params": {}}, 400, "text"),
    ("generate unknown sampling param", "/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, 400,
     "sampling_params"),
    ("detokenize bad ids", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("seed beyond 64 bits", "/v1/chat/completions", chat(seed=10**20, temperature=1), 400, "seed"),
    ("generate temperature string", "/generate", {"text": "hi", "sampling_params": {"temperature": "hot"}}, 400,
     "temperature"),
    ("generate seed beyond 64 bits", "/generate", {"text": "hi", "sampling_params": {"seed": 10**20}}, 400, "seed"),
    ("generate stop wrong type", "/generate", {"text": "hi", "sampling_params": {"stop": 5}}, 400, "stop"),
    ("generate stop_token_ids strings", "/generate", {"text": "hi", "sampling_params": {"stop_token_ids": ["a"]}},
     400, "stop_token_ids"),
    ("generate n string", "/generate", {"text": "hi", "sampling_params": {"n": "2"}}, 400, "n"),
    ("generate max_new_tokens float", "/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2.5}}, 400,
     "max_tokens"),
    ("generate choices not strings", "/generate", {"text": "hi", "sampling_params": {"choices": [1, 2]}}, 400,
     "choices"),
    ("generate top_logprobs_num huge", "/generate", {"text": "hi", "return_logprob": True, "top_logprobs_num": 99},
     400, "logprobs"),
    ("generate priority huge", "/generate", {"text": "hi", "priority": 10**30}, 400, "priority"),
    ("tokenize prompt and messages", "/tokenize", {"prompt": "a", "messages": OK_MSG}, 400, "prompt"),
    ("user too long", "/v1/chat/completions", chat(user="u" * 1000), 400, "user"),
    ("too many stop strings", "/v1/chat/completions", chat(stop=["x"] * 100), 400, "stop"),
    ("5 MB body", "/v1/completions", {"model": "default", "prompt": "word " * 1_000_000}, 413, None),
    ("unknown path", "/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("name, path, body, status, param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request(server, name, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers=dict(AUTH, **{"Content-Type": "application/json"}),
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    # and a normal request right after still succeeds
    ok = httpx.post(server.url + "/v1/chat/completions", json=chat(), headers=AUTH, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_api_key(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(), timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = httpx.post(server.url + "/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


def test_queue_limit_answers_503(server):
    body = chat(max_tokens=150, ignore_eos=True)
    with cf.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH,
                                                   timeout=120), range(6)))
    statuses = sorted(r.status_code for r in codes)
    assert 200 in statuses and 503 in statuses, statuses
    busy = next(r for r in codes if r.status_code == 503)
    assert busy.headers.get("retry-after") and busy.json()["error"]["type"] == "service_unavailable"


json_values = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20), lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=6)
fuzz_body = st.fixed_dictionaries(
    # max_tokens is always present and small when valid: an absent one means "up to the context length",
    # which is valid but would make each example a long generation
    {"max_tokens": st.integers(-3, 3) | st.integers(10**6, 10**9) | st.text(max_size=4) | st.floats(-1, 1)},
    optional={
        "model": st.sampled_from(["default", "other"]) | json_values,
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot"]),
                                                    "content": st.text(max_size=30) | json_values}), max_size=3)
        | json_values,
        "temperature": st.floats(-2, 3, allow_nan=False) | json_values,
        "top_p": st.floats(-1, 2, allow_nan=False) | json_values,
        "n": st.integers(-1, 3) | json_values,
        "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | json_values,
        "seed": st.integers(-10, 10**20) | json_values,
        "logprobs": json_values,
        "top_logprobs": st.integers(-2, 30) | json_values,
        "stream": st.booleans(),
        "frequency_penalty": st.floats(-5, 5, allow_nan=False) | json_values,
    })


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=fuzz_body)
def test_fuzzed_bodies_never_5xx(server, body):
    # requests go one at a time, so the queue limit is never reached: a 503 here is a dead engine
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert r.status_code < 500, (body, r.text)
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["restarts"] == 0, (body, health)

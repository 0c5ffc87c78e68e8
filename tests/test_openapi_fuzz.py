"""Schema-driven fuzzing of the server's own OpenAPI document (schemathesis): whatever a client sends to any
route, the answer is never a 5xx, and the engine is alive and unrestarted afterwards with its KV all back."""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.server_utils import ServerProcess

KEY = "fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 30  # per operation and mode


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir):
    # a short context keeps every valid generation short (n up to 128, max_tokens up to the context)
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--api-key", KEY, "--context-length", "96",
                        "--max-total-tokens", "8192", headers=AUTH)
    yield srv
    assert srv.stop() == 0


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_route_answers_5xx(fuzz_server, mode):
    """Every operation of /openapi.json, with bodies that follow its schema (positive) and that break it
    (negative); bounded in examples, derandomized."""
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", headers=AUTH)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    for op in operations:
        if mode is GenerationMode.NEGATIVE and not len(op.body):
            continue  # nothing to break in a request without a body (GET /health, /v1/models, /metrics)
        # no shrinking: against a live server it can take many minutes; the failing body is reported as is
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def call(case):
            response = case.call(headers=AUTH, timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:  # every error is OpenAI's body
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
        call()


def test_engine_alive_and_kv_back_after_fuzzing(fuzz_server):
    health = httpx.get(fuzz_server.url + "/health").json()
    assert health["status"] == "ok" and health["restarts"] == 0
    ok = httpx.post(fuzz_server.url + "/v1/completions", headers=AUTH, timeout=60,
                    json={"model": "default", "prompt": "hello", "max_tokens": 3, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    free, evictable, size = (fuzz_server.metric(f"kestrel:kv_cache_{m}_tokens") for m in ("free", "evictable", "size"))
    assert free + evictable == size

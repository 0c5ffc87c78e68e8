"""If the engine process dies, clients get a clear 503 instead of hanging, and health says so."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx

from tests.server_utils import ServerProcess


def test_engine_death_fails_requests_fast():
    srv = ServerProcess("--max-total-tokens", "2048")
    try:
        pid = httpx.get(srv.url + "/health").json()["engine_pid"]
        result = {}

        def long_request():
            body = {"model": "default", "messages": [{"role": "user", "content": "Tell a story."}],
                    "max_tokens": 1500, "ignore_eos": True}
            result["r"] = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=120)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(2.0)
        os.kill(pid, signal.SIGKILL)
        t.join(timeout=30)
        assert not t.is_alive(), "the in-flight request hung after the engine died"
        r = result["r"]
        assert r.status_code == 503 and "engine unavailable" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").status_code == 503
        again = httpx.post(srv.url + "/v1/chat/completions", timeout=10,
                           json={"model": "default", "messages": [{"role": "user", "content": "hi"}]})
        assert again.status_code == 503 and again.json()["error"]["type"] == "service_unavailable"
    finally:
        assert srv.stop() == 0

"""Fair sharing through the real server on the embedded model: two clients at a 4:1 load."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from openai import AsyncOpenAI

from server_utils import ServerProcess

WARMUP_TOKENS, WINDOW_TOKENS = 96, 800  # measure once the load runs, over this many generated tokens


def client_tokens(server: ServerProcess) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("kestrel:client_generation_tokens_total{"):
            out[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
    return out


async def closed_loop(api: AsyncOpenAI, user: str, workers: int, stop: asyncio.Event):
    async def worker(w: int):
        i = 0
        while not stop.is_set():
            await api.completions.create(model="default", prompt=f"{user} {w} {i}: count to ten:", max_tokens=16,
                                         temperature=0.0, user=user, extra_body={"ignore_eos": True})
            i += 1

    await asyncio.gather(*(worker(w) for w in range(workers)))


def light_share(server: ServerProcess) -> float:
    """Keep 16 requests of a heavy client and 4 of a light one in flight (both more than their share of
    the 4-request batch, so both stay backlogged); the light client's share of the output tokens
    generated in a window of WINDOW_TOKENS, read from the per-client metrics."""
    async def main():
        api = AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=300)
        stop = asyncio.Event()
        load = asyncio.gather(closed_loop(api, "heavy", 16, stop), closed_loop(api, "light", 4, stop))
        marks, target = [], WARMUP_TOKENS
        while len(marks) < 2:
            await asyncio.sleep(0.25)
            seen = await asyncio.to_thread(client_tokens, server)
            if sum(seen.values()) >= target:
                marks.append(seen)
                target = sum(seen.values()) + WINDOW_TOKENS
        stop.set()
        await load
        return marks

    before, after = asyncio.run(main())
    heavy, light = (after.get(c, 0) - before.get(c, 0) for c in ("heavy", "light"))
    return light / (heavy + light)


@pytest.fixture(scope="module")
def vtc_server():
    s = ServerProcess("--policy", "vtc", "--max-running-requests", "4")
    yield s
    s.stop()


def test_vtc_gives_the_light_client_half_the_service(vtc_server):
    share = light_share(vtc_server)
    assert abs(share - 0.5) <= 0.15 * 0.5, share


@pytest.fixture(scope="module")
def fcfs_server():
    # two client labels: the load-share test's clients (it runs first, in file order) take both
    s = ServerProcess("--policy", "fcfs", "--max-running-requests", "4", "--max-client-labels", "2")
    yield s
    s.stop()


def test_fcfs_gives_the_light_client_its_load_share(fcfs_server):
    share = light_share(fcfs_server)
    assert abs(share - 0.5) > 0.15 * 0.5, share


def test_light_client_behind_a_burst_is_served_long_before_it_drains(vtc_server):
    """A late client's one request overtakes the burst still queued when it arrives (fcfs would finish it after
    all of them). Measured from its arrival, so it does not depend on how fast the engine drains the burst."""
    burst_size = 32

    async def main():
        api = AsyncOpenAI(base_url=vtc_server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        done: list[str] = []

        async def one(user: str, i: int, header: bool):
            kw = {"extra_headers": {"X-Kestrel-Client": user}} if header else {"user": user}
            await api.completions.create(model="default", prompt=f"burst {i}: tell a story", max_tokens=24,
                                         temperature=0.0, extra_body={"ignore_eos": True}, **kw)
            done.append(user)

        burst = [asyncio.create_task(one("burst", i, header=False)) for i in range(burst_size)]
        await asyncio.sleep(0.5)
        before = len(done)
        await one("late", 0, header=True)  # the header names the client when `user` is absent
        await asyncio.gather(*burst)
        return done, before

    done, before = asyncio.run(main())
    assert burst_size - before >= 12, f"the burst had nearly drained before the late request came ({before} done)"
    # it waits for at most the requests running when it came (4) and a few admitted beside it
    assert done.index("late") - before <= 8, (before, done)


def test_per_client_metrics_and_priority_validation(vtc_server):
    text = httpx.get(vtc_server.url + "/metrics").text
    assert 'kestrel:client_service_total{client="burst"}' in text
    assert 'kestrel:client_requests_waiting{client="late"} 0.0' in text
    r = httpx.post(vtc_server.url + "/v1/completions",
                   json={"model": "default", "prompt": "hi", "max_tokens": 2, "priority": "high"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "priority"


def test_priority_needs_a_priority_aware_policy(fcfs_server):
    server = fcfs_server
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": "default", "prompt": "hi", "max_tokens": 2, "priority": 1})
    assert r.status_code == 400 and "--policy priority" in r.json()["error"]["message"]
    before = client_tokens(server)
    for user in ("a", "b", "c"):
        r = httpx.post(server.url + "/v1/completions",
                       json={"model": "default", "prompt": "hi", "max_tokens": 2, "user": user})
        assert r.status_code == 200
    after = client_tokens(server)
    named = set(after) - {"other"}
    # --max-client-labels 2: the first two clients seen keep their names, every later one counts as "other"
    assert len(named) == 2 and "c" not in named, after
    assert after["other"] - before.get("other", 0) == 2 * len({"a", "b", "c"} - named), (before, after)

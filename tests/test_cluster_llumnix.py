"""The Llumnix router migrates by itself: with `router="llumnix"` the balancer watches the instances' loads and,
once one holds much more than the other, moves a queued request that can start at the destination, then running
ones; every output stays the one engine's. Its own module: it needs a deployment with migration on, and the
2-instance deployment of test_cluster.py holds the local Ray's CPUs until that module ends."""
from __future__ import annotations

import asyncio
import logging

import pytest

from kestrel import Engine, SamplingParams
from kestrel.cluster.client import ClusterClient, ClusterConfig
from kestrel.config import EngineConfig
from tests.test_cluster import ENGINE, OTHER, PROMPT, assert_no_leaks, expected, stream


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return Engine(tiny_llama_dir, disable_radix_cache=True, **ENGINE)


def test_llumnix_router_moves_queued_then_running_requests_exactly(tiny_llama_dir, reference, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="kestrel.cluster")  # as `kestrel serve --log-level debug`
    c = ClusterClient(EngineConfig(model=tiny_llama_dir, **ENGINE),
                      ClusterConfig(instances=2, router="llumnix", cpus_per_instance=1))
    try:
        assert c.cluster.migration  # the llumnix router is least-load plus migration
        h0 = c.handles[0]
        monkeypatch.setattr(c.dispatcher, "choose", lambda *args: h0)  # a bad dispatch: everything on instance-0
        # three long requests fill instance-0's batch (max_running_requests=3); a fourth then waits in its queue.
        # As their K/V grows (to ~2400 tokens of the 3000-token pool in all: no preemption), instance-0's usage
        # passes instance-1's by the migration gap (a quarter of the pool)
        hog = SamplingParams(max_tokens=700, temperature=0, ignore_eos=True)
        short = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        cases = [(f"hog{i}", PROMPT[:40 + 20 * i], hog) for i in range(3)] + [("queued", OTHER, short)]

        async def main():
            loop, started = asyncio.get_running_loop(), [asyncio.Event() for _ in range(3)]
            hogs = [asyncio.ensure_future(stream(c, rid, prompt, params,  # (on_token runs in a thread)
                                                 on_token=lambda n, e=e: loop.call_soon_threadsafe(e.set)))
                    for (rid, prompt, params), e in zip(cases, started)]
            for e in started:
                await e.wait()
            return await asyncio.gather(*hogs, stream(c, *cases[3]))
        results = asyncio.run(main())
        for (rid, prompt, params), (tokens, _, reason) in zip(cases, results):
            assert tokens == expected(reference, prompt, params), rid  # moved or not, the one engine's tokens
            assert reason == "length", rid
        moves = [(m.rid, m.outcome, m.queued, m.destination) for m in c.migrations]
        done = [m for m in c.migrations if m.outcome == "done"]
        queued = [m for m in done if m.queued]
        running = [m for m in done if not m.queued]
        # the waiting request could start on the idle instance: it moved there, nothing copied
        assert [m.rid for m in queued] == ["queued"] and queued[0].destination == c.handles[1].name, moves
        assert running and all(m.rid.startswith("hog") and m.tokens > 0 for m in running), moves
        # the debug log says where each request went and why each move happened: the loads the router saw
        h1 = c.handles[1].name
        logged = [r.getMessage() for r in caplog.records if r.name == "kestrel.cluster"]
        assert any(line.startswith(f"sent queued ({len(OTHER)} prompt tokens) to {h0.name}; {h0.name}: usage ")
                   for line in logged), logged
        assert any(line.startswith(f"queued move of queued from {h0.name} to {h1}: done, 0 tokens copied")
                   and f"; {h1}: usage " in line for line in logged), logged
        assert_no_leaks(c)
    finally:
        c.shutdown()

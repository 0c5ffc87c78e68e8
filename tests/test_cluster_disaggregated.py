"""Prefill/decode disaggregation (DistServe) on Ray: a prefill instance computes the prompt and the first token,
a decode instance goes on with the K/V it was handed; the result is the one engine's. Its own module: the
2-instance deployment of test_cluster.py holds the local Ray's CPUs until that module ends."""
from __future__ import annotations

import asyncio

import pytest

from kestrel import Engine, SamplingParams
from kestrel.cluster.client import ClusterClient, ClusterConfig
from kestrel.config import EngineConfig
from kestrel.server.engine_process import EngineDead
from tests.test_cluster import (ENGINE, OTHER, PROMPT, KilledAfter, assert_no_leaks, expected, read_to_end, stream,
                                wait_idle, wait_restarted)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    return Engine(tiny_llama_dir, disable_radix_cache=True, **ENGINE)


def test_disaggregated_prefill_then_decode_is_exact(tiny_llama_dir, reference, monkeypatch):
    c = ClusterClient(EngineConfig(model=tiny_llama_dir, **ENGINE),
                      ClusterConfig(prefill_instances=1, decode_instances=1, cpus_per_instance=1))
    try:
        params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
        seeded = SamplingParams(max_tokens=40, temperature=1.0, seed=9, ignore_eos=True)

        async def main():  # the sampled one alone (see test_cluster's exactness test)
            return [*await asyncio.gather(stream(c, "d1", PROMPT, params),
                                          stream(c, "d3", PROMPT[:9], SamplingParams(max_tokens=1))),
                    await stream(c, "d2", OTHER, seeded)]
        results = asyncio.run(main())
        results = [results[0], results[2], results[1]]
        assert results[0][0] == expected(reference, PROMPT, params)
        assert results[1][0] == expected(reference, OTHER, seeded)
        assert len(results[2][0]) == 1  # done at its first token: it never leaves the prefill instance
        states = wait_idle(c)
        assert states["prefill-0"]["evictable"] >= len(PROMPT)  # the prefill instance keeps prompts cached
        assert states["decode-0"]["evictable"] >= len(PROMPT) + 49  # and the decode instance what it decoded
        decode = next(h for h in c.handles if h.role == "decode")
        assert decode.info["role"] == "decode"
        # each instance's steps under its role (GET /step_profile, which kestrel plan fits per role): prompts on
        # the prefill instance, decode rows alone on the decode instance
        profiles = dict(asyncio.run(c.call_each("step_profile")))
        assert (c.role_of("prefill-0"), c.role_of("decode-0")) == ("prefill", "decode")
        assert profiles["prefill-0"]["samples"] and all(t >= 9 for t, *_ in profiles["prefill-0"]["samples"])
        assert profiles["decode-0"]["samples"] and all(t == r for t, r, *_ in profiles["decode-0"]["samples"])
        assert_no_leaks(c)

        # released (its client went away) while its hand-over was on the way: the abort reached the prefill
        # instance after it had suspended the request, so the decode instance that adopts it is told to stop it
        from kestrel.engine.driver import Abort

        sent, dispatch, send = [], c._dispatch, decode.send

        def released_first(h, msg):
            if msg[0] == "handoff" and msg[1] == "gone":
                c.release("gone", abort=True)
            dispatch(h, msg)
        monkeypatch.setattr(c, "_dispatch", released_first)
        monkeypatch.setattr(decode, "send", lambda cmd: (sent.append(cmd), send(cmd)))

        async def unheard():
            c.submit("gone", OTHER, SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True))
            while not any(isinstance(cmd, Abort) and cmd.request_id == "gone" for cmd in sent):
                await asyncio.sleep(0.01)
        asyncio.run(asyncio.wait_for(unheard(), 30))
        assert_no_leaks(c)

        # the decode instance dies right after adopting a request: the request (it streamed its first token from
        # the prefill instance) fails with EngineDead, whichever of the hand-over's end and the instance's failure
        # handling sees the death first, rather than waiting forever on an instance that skipped it as moving
        monkeypatch.undo()
        with c._lock:
            real, decode.actor = decode.actor, KilledAfter(decode, "adopt")
        try:
            tokens = []

            async def orphan():  # (submit needs the running loop)
                return await read_to_end(c, "orphan", c.submit("orphan", OTHER, params), tokens)
            last = asyncio.run(orphan())
        finally:
            with c._lock:
                if isinstance(decode.actor, KilledAfter):
                    decode.actor = real
        assert isinstance(last, EngineDead) and decode.name in str(last)
        assert tokens == expected(reference, OTHER, params)[:len(tokens)] and len(tokens) >= 1
        wait_restarted(c, decode)
        assert_no_leaks(c)
    finally:
        c.shutdown()

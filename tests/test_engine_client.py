"""The API process's supervisor of the engine process, in this process: start failures, a dead reader thread."""
from __future__ import annotations

import asyncio
import time

import pytest

from kestrel import EngineConfig, SamplingParams
from kestrel.server.engine_process import EngineClient, EngineDead, EngineStartError


async def _drain(q: asyncio.Queue) -> list:
    items = []
    while True:
        item = await asyncio.wait_for(q.get(), 60)
        items.append(item)
        if isinstance(item, Exception) or item.finished:
            return items


def test_start_failure_is_one_clear_error_within_seconds():
    t = time.monotonic()
    with pytest.raises(EngineStartError, match="not found") as info:
        EngineClient(EngineConfig(model="/no/such/model"))
    assert time.monotonic() - t < 60
    assert "\n" not in str(info.value)


def test_dead_reader_thread_is_an_engine_failure(tiny_llama_dir):
    client = EngineClient(EngineConfig(model=tiny_llama_dir, dtype="float32"))
    try:
        async def main():
            real, calls = client._dispatch, {"n": 0}

            def flaky(msg):  # a bug in the reader: it dies on the second message
                calls["n"] += 1
                if calls["n"] == 2:
                    raise RuntimeError("reader bug")
                real(msg)
            client._dispatch = flaky
            first_pid = client.process.pid
            items = await _drain(client.submit("r1", [5, 6, 7], SamplingParams(max_tokens=1000, ignore_eos=True)))
            assert isinstance(items[-1], EngineDead) and "reader bug" in str(items[-1])
            assert client.status() != "ok"
            with pytest.raises(EngineDead):  # nothing is accepted until the restart is done
                client.submit("r2", [5, 6, 7], SamplingParams(max_tokens=2))
            deadline = time.monotonic() + 120
            while client.status() != "ok" and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert client.status() == "ok" and client.restarts == 1 and client.process.pid != first_pid
            client._dispatch = real
            items = await _drain(client.submit("r3", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True)))
            assert items[-1].finished and sum(len(d.token_ids) for d in items) == 3
        asyncio.run(main())
    finally:
        client.shutdown()

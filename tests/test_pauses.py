"""Paused conversations (APIServe): a reply that calls tools keeps, swaps or releases its KV by the pause policy,
and the conversation's next turn reuses it. Every policy gives the outputs of a run without pausing (float32 greedy),
under memory pressure too; pauses that never return are released; paused memory never blocks running work."""
from __future__ import annotations

import os
import time

import pytest

from kestrel import Engine, SamplingParams

CALL = SamplingParams(max_tokens=12, temperature=0, regex="call [a-z]{3}")  # a reply that stops on its own
ANSWER = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
RESULT = [2000 + i for i in range(6)]  # the tool's result, as tokens the next turn appends


def calls_calc(text: str):
    return ["calc"]


def calls_by_name(text: str):
    return [text.split()[-1]]  # "call abc" calls the tool "abc"


def _prompt(k: int, n: int = 40) -> list[int]:
    return [300 + 97 * k + i for i in range(n)]


def _engine(model_dir, policy, **kw):
    kw.setdefault("max_total_tokens", 2048)
    return Engine(model_dir, dtype="float32", pause_policy=policy, **kw)


def _accounting(e: Engine) -> None:
    """Every slot is free or owned by the tree; nothing is pinned once no conversation is paused."""
    assert e.pool.num_free + e.cache.total_size == e.pool.size
    assert e.pool.num_free == len(set(e.pool._free))
    if not e.pauses.paused:
        assert e.cache.pinned_size == 0


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Turn-2 outputs of conversations 0..3 on an engine that neither caches nor pauses."""
    e = Engine(tiny_llama_dir, dtype="float32", disable_radix_cache=True, max_total_tokens=2048)
    out = {}
    for k in range(4):
        first = e.generate(_prompt(k), CALL)[0]
        second = e.generate(_prompt(k) + first.token_ids + RESULT, ANSWER)[0]
        out[k] = (first.token_ids, second.token_ids)
    return out


@pytest.mark.parametrize("policy", ["keep", "swap", "discard", "auto"])
def test_each_policy_resumes_on_the_kept_kv_with_exact_outputs(tiny_llama_dir, reference, policy):
    e = _engine(tiny_llama_dir, policy)
    rid = e.add_request(_prompt(0), CALL, pause=calls_calc)
    e.run_until_done([rid])
    first = e.get_output(rid, pop=True)
    assert first.token_ids == reference[0][0] and first.finish_reason == "stop"
    assert len(e.pauses.paused) == 1
    assert (e.cache.pinned_size > 0) == (policy in ("keep", "auto"))
    assert (e.pauses.swapped_bytes > 0) == (policy == "swap")
    second = e.generate(_prompt(0) + first.token_ids + RESULT, ANSWER)[0]
    assert second.token_ids == reference[0][1]
    # the whole first turn came from the cache but its last token (sampled, never fed back)
    assert second.cached_tokens == len(_prompt(0)) + len(first.token_ids) - 1
    assert e.pauses.stats.resumed == 1 and not e.pauses.paused and e.pauses.swapped_bytes == 0
    _accounting(e)


@pytest.mark.parametrize("policy", ["keep", "swap", "discard", "auto"])
def test_memory_pressure_releases_pauses_and_outputs_stay_exact(tiny_llama_dir, reference, policy):
    """Three paused conversations fill most of a small pool; a long unrelated request needs it. Pauses are released
    (none of the running work is preempted), then each conversation resumes with the outputs of the reference."""
    e = _engine(tiny_llama_dir, policy, max_total_tokens=200)
    firsts = {}
    for k in range(3):
        rid = e.add_request(_prompt(k), CALL, pause=calls_calc)
        e.run_until_done([rid])
        firsts[k] = e.get_output(rid, pop=True).token_ids
        assert firsts[k] == reference[k][0]
    held = len(e.pauses.paused)
    other = e.generate(_prompt(9, 150), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(other.token_ids) == 20 and e.scheduler.num_retractions == 0
    if policy in ("keep", "auto"):
        assert e.pauses.stats.released >= 1
    for k in range(3):
        second = e.generate(_prompt(k) + firsts[k] + RESULT, ANSWER)[0]
        assert second.token_ids == reference[k][1], f"conversation {k}"
    assert e.pauses.stats.resumed == held == 3
    if policy == "swap":  # what the long request evicted came back from the swap tier, not recomputed
        assert e.pauses.stats.restored_tokens > 0
    _accounting(e)
    e.flush_cache()
    assert e.pool.num_free == e.pool.size


def test_a_pause_that_never_returns_is_released_after_the_timeout(tiny_llama_dir, tmp_path):
    for policy in ("keep", "swap"):
        e = _engine(tiny_llama_dir, policy, pause_timeout=0.2, swap_dir=str(tmp_path))
        e.generate(_prompt(1), CALL)  # no hook: it does not pause
        assert not e.pauses.paused
        rid = e.add_request(_prompt(0), CALL, pause=calls_calc)
        e.run_until_done([rid])
        e.get_output(rid, pop=True)
        assert len(e.pauses.paused) == 1 and (e.cache.pinned_size > 0 or e.pauses.swapped_bytes > 0)
        assert e.expire_pauses() == 0
        time.sleep(0.25)
        assert e.expire_pauses() == 1
        assert not e.pauses.paused and e.cache.pinned_size == 0 and e.pauses.swapped_bytes == 0
        assert not any(f.endswith(".kv") for _, _, fs in os.walk(tmp_path) for f in fs)
        _accounting(e)
        e.flush_cache()
        assert e.pool.num_free == e.pool.size


def test_paused_memory_never_blocks_admission(tiny_llama_dir, reference):
    """The pool holds one paused conversation or one long request, not both: the pause gives way."""
    e = _engine(tiny_llama_dir, "keep", max_total_tokens=120)
    rid = e.add_request(_prompt(0), CALL, pause=calls_calc)
    e.run_until_done([rid])
    e.get_output(rid, pop=True)
    assert e.cache.pinned_size > 0
    out = e.generate(_prompt(5, 90), SamplingParams(max_tokens=25, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 25 and e.scheduler.num_retractions == 0
    assert e.cache.pinned_size == 0 and e.pauses.stats.released == 1
    _accounting(e)


def test_tool_durations_are_learned_and_auto_releases_the_longest_wait_first(tiny_llama_dir):
    e = _engine(tiny_llama_dir, "auto")
    now = [100.0]
    e.scheduler.clock = lambda: now[0]

    def turn(k, tool_regex):
        rid = e.add_request(_prompt(k), SamplingParams(max_tokens=12, temperature=0, regex=tool_regex),
                            pause=calls_by_name)
        e.run_until_done([rid])
        return e.get_output(rid, pop=True).token_ids

    fast, slow = turn(0, "call fst"), turn(1, "call slw")
    assert e.pauses.tools.estimate(["fst"]) == e.pauses.tools.estimate(["slw"])  # nothing learned yet
    now[0] += 0.05
    e.generate(_prompt(0) + fast + RESULT, ANSWER)
    now[0] += 9.95
    e.generate(_prompt(1) + slow + RESULT, ANSWER)
    assert e.pauses.tools.estimate(["fst"]) == pytest.approx(0.05)
    assert e.pauses.tools.estimate(["slw"]) == pytest.approx(10.0)
    assert e.pauses.tools.estimate(["fst", "slw"]) == pytest.approx(10.0)  # parallel calls: the slowest
    turn(2, "call slw")
    turn(3, "call fst")  # paused later, but back much sooner
    by_tool = {rec.tools[0]: rec for rec in e.pauses.paused}
    assert e.pauses.release_one()
    assert by_tool["slw"].pinned is None and by_tool["fst"].pinned is not None
    # with requests waiting for memory, auto decides at pause by the least waste (token-seconds): a conversation
    # whose tool is slow is swapped out at once, one whose tool returns at once stays pinned
    e.pauses.load = lambda: (3, 5000)  # (waiting requests, tokens the running batch holds)
    e.pauses.swap.seconds_per_byte = {"out": 1e-7, "in": 1e-7}  # a slow tier, so keeping can win
    turn(4, "call slw")
    turn(5, "call fst")
    slow_rec, fast_rec = e.pauses.paused[-2:]
    assert slow_rec.backup is not None and slow_rec.pinned is None
    assert fast_rec.pinned is not None and fast_rec.backup is None

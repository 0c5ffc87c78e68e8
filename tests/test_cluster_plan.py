"""The pieces of the cluster that need no Ray: dispatch policies, the migration trigger, the handoff of a request
between two in-process engines (reservations, refusals, expiry), and `kestrel plan disaggregation`."""
from __future__ import annotations

import dataclasses
import itertools
import json
import random
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from kestrel import Engine, SamplingParams
from kestrel.cluster.dispatch import PRIORITY_HEADROOM, Dispatcher, Load, migration_pair, pick_move
from kestrel.cluster.plan import CostModel, Workload, colocated, disaggregated, goodput, plan, role_costs
from kestrel.engine.step_log import step_shape
from kestrel.config import EngineConfig
from kestrel.engine.handoff import HandoffGone, HandoffRefused

A, B = SimpleNamespace(name="a"), SimpleNamespace(name="b")


def loads(a: dict, b: dict) -> dict:
    out = {"a": Load(), "b": Load()}
    out["a"].update(dict(dict(kv_size=1000), **a))
    out["b"].update(dict(dict(kv_size=1000), **b))
    return out


def test_least_load_counts_queued_demand_priority_headroom_and_what_it_sent():
    d = Dispatcher("least-load")
    assert d.choose([A, B], loads(dict(kv_used=500, running=2), dict(kv_used=100, running=2)), [1]) is B
    # b holds less KV but has 800 tokens queued: a is freer
    assert d.choose([A, B], loads(dict(kv_used=300, running=2), dict(kv_used=100, running=2, waiting=2,
                                                                    waiting_tokens=800)), [1]) is A
    # b's one request is a long prompt mid-way through its chunked prefill: the rest of it counts as b's load
    assert d.choose([A, B], loads(dict(kv_used=300, running=3), dict(kv_used=256, running=1,
                                                                    prefill_tokens=944)), [1]) is A
    # a high-priority request on b keeps headroom around it
    assert d.choose([A, B], loads(dict(kv_used=300, running=1), dict(kv_used=200, running=1, high_priority=1)),
                    [1]) is A
    ls = loads(dict(kv_used=100, running=1), dict(kv_used=100, running=1))
    first = d.choose([A, B], ls, [1] * 300)
    ls[first.name].sent(300)
    assert d.choose([A, B], ls, [1]) is not first  # a burst does not all land on one instance
    ls[first.name].update(dict(kv_used=100, running=1, kv_size=1000, received=0, received_tokens=0))
    assert ls[first.name].sent_requests == 1  # a report from before the request arrived still counts it
    ls[first.name].update(dict(kv_used=400, running=2, kv_size=1000, received=1, received_tokens=300))
    assert ls[first.name].sent_requests == 0 and ls[first.name].sent_tokens == 0


def test_an_instance_reports_the_prompt_left_to_prefill_as_demand(tiny_llama_dir):
    """A long prompt in its chunked prefill holds only the chunks computed so far: the rest is reported apart, with
    the queued requests' tokens, so least-load does not take the instance for idle."""
    from kestrel.cluster.instance import router_demand

    e = Engine(tiny_llama_dir, dtype="float32", max_total_tokens=600, num_threads=1, chunked_prefill_size=32,
               max_running_requests=1)
    e.add_request(list(range(10, 110)), SamplingParams(max_tokens=4))
    e.add_request(list(range(200, 240)), SamplingParams(max_tokens=4), priority=-1)
    e.step()  # the first 32 of 100 prompt tokens; the second request waits (one running at a time)
    assert router_demand(e.scheduler) == dict(waiting_tokens=40, prefill_tokens=68, high_priority=1)
    while e.scheduler.running and e.scheduler.running[0].pending > 1:
        e.step()
    assert router_demand(e.scheduler)["prefill_tokens"] == 0  # decoding: one pending token is no prefill


def test_an_instance_counts_a_request_received_only_in_a_report_that_shows_it(tiny_llama_dir, monkeypatch):
    """The router counts a request it sent as in transit until a report says the instance received it, so that
    report must hold the request in its queues. One that arrives while a step runs is in none of them after that
    step: counted as received there, the router took the instance for idle through the whole next step (a long
    prompt's prefill) and sent it more."""
    from kestrel.cluster.instance import Instance
    from kestrel.engine.driver import Stop, Submit

    inst = Instance(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1), "instance-0")
    entered, release = threading.Event(), threading.Event()
    step = inst.engine.step

    def held_step():  # the first step waits until the test lets it end
        if not release.is_set():
            entered.set()
            release.wait(30)
        return step()
    monkeypatch.setattr(inst.engine, "step", held_step)
    try:
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        inst.send([Submit("a", list(range(10, 50)), params)])
        assert entered.wait(30)
        inst.send([Submit("b", list(range(60, 100)), params)])  # during a's first step
        release.set()
        reports = _counts_until(_load_reports(inst), {"a", "b"})
        assert reports[0] == (1, 1, 40)  # after a's step: b had come, but is not in the load, nor received
        assert all(received == held for received, held, _ in reports) and reports[-1] == (2, 2, 80)
    finally:
        release.set()
        inst.send([Stop()])
        inst._thread.join(30)


def _load_reports(inst, seconds: float = 60.0):
    """Each load report an in-process Instance sends (for up to `seconds`), with the set of requests finished by
    then. The counts: (requests received, requests waiting, running or finished, prompt tokens received)."""
    finished: set[str] = set()
    deadline = time.time() + seconds
    while time.time() < deadline:
        for kind, *rest in inst.poll(1.0)[0]:
            if kind == "deltas":
                deltas, load = rest
                finished |= {d.request_id for d in deltas if d.finished}
                yield (load["received"], load["running"] + load["waiting"] + len(finished),
                       load["received_tokens"]), set(finished)


def _counts_until(reports, rids: set[str]) -> list[tuple[int, int, int]]:
    """The counts of each report from `reports` (a _load_reports generator) until every one of `rids` finished."""
    out = []
    for counts, finished in reports:
        out.append(counts)
        if finished == rids:
            return out
    raise AssertionError(f"not all of {rids} finished: reports {out}")


def test_a_request_whose_grammar_compiles_is_in_transit_to_the_router(tiny_llama_dir, monkeypatch):
    """A constrained request waits outside the scheduler's queues while its grammar compiles on a side thread: the
    reports in that time do not count it as received, so the router keeps counting it as sent there."""
    from kestrel.cluster.instance import Instance
    from kestrel.engine.driver import Stop, Submit

    inst = Instance(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1), "instance-0")
    compiling, release = threading.Event(), threading.Event()
    compile_grammar = inst.engine.grammars.compile

    def held_compile(spec):
        compiling.set()
        release.wait(30)
        return compile_grammar(spec)
    monkeypatch.setattr(inst.engine.grammars, "compile", held_compile)
    try:
        reports = _load_reports(inst)
        regex = SamplingParams(max_tokens=3, temperature=0, regex="[a-z]{3,8}")
        inst.send([Submit("g", list(range(10, 40)), regex)])
        assert compiling.wait(30)
        assert next(reports)[0] == (0, 0, 0)  # the report after g was taken in: in no queue, not received
        inst.send([Submit("h", list(range(60, 80)), SamplingParams(max_tokens=3, temperature=0))])
        assert next(reports)[0] == (1, 1, 20)  # h, taken in while g's grammar compiles
        release.set()
        counts = _counts_until(reports, {"g", "h"})
        assert all(received == held for received, held, _ in counts) and counts[-1] == (2, 2, 50)
    finally:
        release.set()
        inst.send([Stop()])
        inst._thread.join(30)


def test_cache_aware_follows_the_longest_prefix_unless_unbalanced():
    d = Dispatcher("cache-aware")
    system = list(range(100, 164))
    ls = loads(dict(running=1), dict(running=0))
    first = d.choose([A, B], ls, system + [1, 2, 3])
    assert first is B  # nothing cached anywhere: least load
    for i in range(5):  # the same system prompt follows its cache although A is as free
        assert d.choose([A, B], loads(dict(running=0), dict(running=0)), system + [i] * 20) is B
    assert d.choose([A, B], loads(dict(running=0), dict(running=0)), list(range(900, 960))) is A  # none: least load
    assert d.choose([A, B], loads(dict(running=0), dict(running=40)), system + [9] * 20) is A  # b is swamped
    rr = Dispatcher("round-robin")
    assert [rr.choose([A, B], ls, [1]).name for _ in range(4)] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="router must be one of"):
        Dispatcher("random")


def test_migration_trigger_needs_a_gap_and_something_to_move():
    assert migration_pair([A, B], loads(dict(kv_used=900, running=3), dict(kv_used=100, running=1)), 0.25) == (A, B)
    assert migration_pair([A, B], loads(dict(kv_used=400, running=3), dict(kv_used=300, running=1)), 0.25) is None
    assert migration_pair([A, B], loads(dict(kv_used=900, running=1), dict(kv_used=0)), 0.25) is None  # lone request
    assert migration_pair([A, B], loads(dict(kv_used=900, running=1, waiting=1, waiting_tokens=100),
                                        dict(kv_used=0)), 0.25) == (A, B)  # ... unless others queue behind it
    assert migration_pair([A], loads(dict(kv_used=900, running=3), {}), 0.25) is None


@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    kw = dict(dtype="float32", max_total_tokens=600, num_threads=1)
    return Engine(tiny_llama_dir, **kw), Engine(tiny_llama_dir, **kw)


def accounted(e: Engine) -> bool:
    s = e.kv_accounting()
    return s["free"] + s["evictable"] == s["size"] and s["reserved"] == 0 and s["suspended"] == 0


def test_handoff_refusals_free_everything(engines, monkeypatch):
    a, b = engines
    prompt = list(range(200, 420))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    rid = a.add_request(prompt, params, request_id="moving")
    with pytest.raises(HandoffGone, match="is not running"):  # still waiting for admission
        a.handoffs.export_kv(rid, 0)
    while not a._requests[rid][0].output_ids:
        a.step()
    with pytest.raises(HandoffGone, match="not in this engine"):
        a.handoffs.suspend("nobody", 0)
    assert not b.handoffs.reserve("big", 601)  # more than the destination's pool: refused, nothing held
    state, kv = a.handoffs.suspend(rid, 0)
    assert state.time_per_token is None  # one token so far (the prompt's): no decode step to measure a pause in
    b.handoffs.reserve("m", 100)
    b.add_request(list(range(500, 900)), SamplingParams(max_tokens=150), request_id="filler")  # the destination fills up meanwhile
    b.step()
    with pytest.raises(HandoffRefused, match="no room"):
        b.handoffs.adopt("m", state, 0, kv)
    assert b.handoffs.reserved_tokens == 0  # a refused adoption frees its reservation
    a.handoffs.resume(rid)  # the request goes on where it was
    while a.has_unfinished() or b.has_unfinished():
        a.step(), b.step()
    out = a.get_output(rid, pop=True)
    b.get_output("filler", pop=True)
    ref = a.generate([prompt], params)[0]
    assert out.token_ids == ref.token_ids
    # a reservation whose source died is freed after its time to live
    assert b.handoffs.reserve("orphan", 50) and b.handoffs.reserved_tokens == 50
    monkeypatch.setattr("kestrel.engine.handoff.RESERVATION_TTL", 0.0)
    b.handoffs.expire()
    assert accounted(a) and accounted(b)



def test_queued_requests_move_between_engines_queues_exactly(engines):
    """Llumnix's first-come-waiting move: a request queued behind a full pool leaves for another engine's queue
    with nothing copied, and goes back to its place when the move is undone. One that was preempted after it had
    streamed moves with its output, sampler and grammar position, and goes on there as if it had never moved."""
    a, b = engines
    a.add_request(list(range(1000, 1400)), SamplingParams(max_tokens=150, temperature=0, ignore_eos=True),
                  request_id="hog")
    a.step()
    prompt = list(range(2000, 2200))
    seeded = SamplingParams(max_tokens=20, temperature=0.8, seed=11, ignore_eos=True)
    a.add_request(prompt, seeded, request_id="waiter")
    a.step()
    assert [s.request_id for s in a.scheduler.waiting] == ["waiter"]  # no room beside the hog
    assert a.handoffs.candidates(queued=True)[-1] == ("waiter", 200, 0, True)
    assert all(not c[3] for c in a.handoffs.candidates())  # without `queued`, running ones only
    with pytest.raises(HandoffGone, match="not waiting"):
        a.handoffs.suspend("hog", 0, queued=True)
    state, kv = a.handoffs.suspend("waiter", 0, queued=True)
    assert kv.shape[2] == 0 and state.num_kv == 0 and not a.scheduler.waiting
    a.handoffs.resume("waiter")  # the destination refused: back in the queue
    assert [s.request_id for s in a.scheduler.waiting] == ["waiter"]
    state, kv = a.handoffs.suspend("waiter", 0, queued=True)
    arrived = state.seq.arrival_time
    state.suspended_at += 1000.0  # as if it came from a machine whose monotonic clock is 1000 s ahead
    state.seq.arrival_time += 1000.0
    b.handoffs.adopt("q", state, 0, kv)
    a.handoffs.commit("waiter")
    assert abs(b._requests["waiter"][0].arrival_time - arrived) < 0.5  # queued in its place on this clock
    assert b.kv_accounting()["waiting"] == 1 and a.kv_accounting()["requests"] == 1
    while b.has_unfinished():
        b.step()
    out, want = b.get_output("waiter", pop=True), b.generate([prompt], seeded)[0]
    assert out.token_ids == want.token_ids and out.text == want.text

    # preempted after 6 tokens (its memory went to others): it waits with its output, and moves with it
    regex = SamplingParams(max_tokens=40, temperature=0.7, seed=3, regex=r"(yes|no)( [a-z]{2,6}){3,9}\.")
    short = list(range(3000, 3040))
    a.add_request(short, regex, request_id="preempted")
    seq = a._requests["preempted"][0]
    while len(seq.output_ids) < 6:
        a.step()
    a.scheduler.retract(seq)
    streamed = seq.text
    state, kv = a.handoffs.suspend("preempted", 0, queued=True)
    b.handoffs.adopt("p", state, 0, kv)
    a.handoffs.commit("preempted")
    while a.has_unfinished() or b.has_unfinished():
        a.step(), b.step()
    out = b.get_output("preempted", pop=True)
    a.get_output("hog", pop=True)
    want = b.generate([short], regex)[0]
    assert out.token_ids == want.token_ids and out.text == want.text and out.text.startswith(streamed)
    assert accounted(a) and accounted(b)


def test_the_migration_policy_moves_the_first_queued_request_then_the_cheapest_running_one():
    running = [("r1", 300, 0, False), ("r2", 120, 0, False), ("vip", 50, -1, False)]
    queued = [("q1", 900, 0, True), ("q2", 200, 0, True)]
    assert pick_move(running + queued, 1000) == (queued[0], 900)  # the first come
    assert pick_move(running + queued, 500) == (queued[1], 200)  # q1 would leave a larger gap the other way
    assert pick_move(running, 500) == (running[1], 120)  # high priority keeps its place; then the cheapest to copy
    assert pick_move(running, 100) == (running[2], 50)  # ... unless nothing else fits the gap
    assert pick_move(running, 40) is None
    # a queued request that would wait at the destination too stays: a running one moves, making room for it
    assert pick_move(running + queued, 1000, room=500) == (queued[1], 200)
    assert pick_move(running + queued, 1000, room=150) == (running[1], 120)
    # ... if it fits there too: it would run ahead of the destination's own queue
    assert pick_move(running + queued, 1000, room=100) == (running[2], 50)
    assert pick_move(running + queued, 1000, room=40) is None
    # a high-priority request carries the headroom kept around it: moving it must not turn the imbalance around
    # (it would then move straight back, again and again)
    assert pick_move([("vq", 500, -1, True)], 1000, headroom=750) is None
    assert pick_move([("vq", 500, -1, True)], 1300, headroom=750) == (("vq", 500, -1, True), 1250)


def test_moving_the_chosen_request_shrinks_the_imbalance_and_never_moves_it_back():
    """The router's loop on its own load figures: whatever it picks, the gap shrinks, and the request moved is
    not a candidate to move back."""
    rng = random.Random(3)
    for _ in range(200):
        a, b = Load(), Load()
        a.update(dict(kv_size=3000, kv_used=rng.randrange(3000), waiting_tokens=rng.randrange(2000),
                      high_priority=rng.randrange(2)))
        b.update(dict(kv_size=3000, kv_used=rng.randrange(1500)))
        options = [(f"r{i}", rng.randrange(1, 1500), rng.choice([0, 0, -1]), rng.random() < 0.5) for i in range(4)]
        gap = a.virtual_usage - b.virtual_usage
        move = pick_move(options, gap, PRIORITY_HEADROOM * a.size)
        if move is None:
            continue
        _, load = move
        a.moved_tokens -= load
        b.moved_tokens += load
        after = a.virtual_usage - b.virtual_usage
        assert abs(after) < gap
        assert pick_move([move[0]], -after, PRIORITY_HEADROOM * b.size) is None

def _shapes():
    """Step shapes as kestrel.cluster.plan.measure times them: prefills of t tokens, decodes of b rows at context c."""
    prefills = [step_shape(t, [], [(0, t, True)]) for t in (4, 16, 64, 256, 1024)]
    decodes = [step_shape(b, [c] * b, []) for b in (1, 4, 16, 32, 48) for c in (64, 1024)]
    return prefills + decodes


def test_step_shape_counts_logits_rows_and_causal_attention_pairs():
    # two decode rows at contexts 10 and 20; a chunk of 4 after 6 computed tokens ending its prompt; a middle chunk
    assert step_shape(2 + 4 + 3, [10, 20], [(6, 4, True), (0, 3, False)]) == (9, 3, 30 + 4 * 6 + 10 + 6)


def test_cost_model_fit_recovers_its_coefficients():
    def truth(t, r, p):
        return 0.01 + 0.002 * t + 0.0007 * r + 3e-8 * p

    m = CostModel.fit([(*x, truth(*x)) for x in _shapes()], kv_tokens=4096)
    for got, want in zip((m.step, m.per_token, m.per_row, m.per_pair), (0.01, 0.002, 0.0007, 3e-8)):
        assert got == pytest.approx(want, rel=1e-4)


def test_cost_model_fits_each_side_of_the_kernel_switch(tmp_path):
    """Steps of up to 24 tokens on int4 kernels and larger ones on dense copies cost differently per token: one
    fit a side recovers both, where one plane through all of them misprices some steps by over 20%."""
    def truth(t, r, p):
        return 0.006 + 0.0015 * t + 0.0004 * r + 2e-8 * p if t <= 24 else 0.02 + 0.0009 * t + 0.001 * r + 1e-8 * p

    samples = [(*x, truth(*x)) for x in _shapes()]
    m = CostModel.fit(samples, kv_tokens=4096, split=24)
    assert m.large is not None and m.split == 24
    for shape in [(1, 1, 100), (8, 8, 3000), (24, 1, 500), (25, 25, 500), (300, 1, 50000), (2000, 1, 10 ** 6)]:
        assert m.seconds(*shape) == pytest.approx(truth(*shape), rel=1e-4)
    one = CostModel.fit(samples, kv_tokens=4096)
    assert one.large is None and max(abs(one.seconds(*x[:3]) / x[3] - 1) for x in samples) > 0.2
    assert "steps of up to 24 tokens" in m.describe() and "larger steps" in m.describe()
    m.save(tmp_path / "cost.json")
    assert CostModel.load(tmp_path / "cost.json") == m
    # one side with too few step shapes cannot be fitted alone: one fit for all
    few = [x for x in samples if x[0] in (1, 4, 64, 256)]
    assert CostModel.fit(few, kv_tokens=4096, split=24).large is None
    # a profile saved before the per-row and per-pair terms says what to do
    (tmp_path / "old.json").write_text(json.dumps(dict(step=0.01, per_token=0.001, per_context=1e-6, kv_tokens=99)))
    with pytest.raises(ValueError, match="--save-profile"):
        CostModel.load(tmp_path / "old.json")


def test_simulated_deployments_dispatch_as_their_router():
    """The plan's instances run side by side in simulated time and take new requests where the deployment's
    router would send them: least-load steers around an instance busy with a long prompt, where round-robin
    (here sending every long prompt to the same instance) lets them queue."""
    cost = CostModel(step=0.005, per_token=0.001, per_row=0.0, per_pair=0.0, kv_tokens=40000)
    requests = Workload([(1000, 20), (20, 20)] * 12).arrivals(3.0)
    config = EngineConfig(chunked_prefill_size=256)
    rr = colocated(cost, config, requests, 2, "round-robin")
    ll = colocated(cost, config, requests, 2, "least-load")
    assert len(rr) == len(ll) == len(requests)
    assert max(t for t, _ in ll) < 0.5 * max(t for t, _ in rr)
    # round-robin alone is as two separate instances each given every other request
    alone = [colocated(cost, config, requests[k::2], 1, "round-robin") for k in (0, 1)]
    flat = lambda pairs: [x for pair in sorted(pairs) for x in pair]  # noqa: E731
    assert flat(rr) == pytest.approx(flat(alone[0] + alone[1]))


def test_plan_prefers_disaggregation_where_prefill_stalls_decode(tmp_path):
    # long prompts and a tight TPOT: on colocated instances every prefill stalls the decodes beside it
    # (DistServe's interference); on a decode instance nothing does, so 1 + 1 beats 2 colocated
    cost = CostModel(step=0.005, per_token=0.0004, per_row=0.0, per_pair=0.0, kv_tokens=40000)
    work = Workload([(1500, 100)] * 40)
    config = EngineConfig(chunked_prefill_size=2048)
    co = goodput(lambda r: colocated(cost, config, work.arrivals(r), 2), 3.0, 0.008)
    dis = goodput(lambda r: disaggregated(cost, config, work.arrivals(r), 1, 1), 3.0, 0.008)
    assert dis > 1.5 * co
    # with a TTFT bound one prefill instance cannot meet, two colocated instances (twice the prefill) win
    assert goodput(lambda r: disaggregated(cost, config, work.arrivals(r), 1, 1), 1.0, 0.1) < goodput(
        lambda r: colocated(cost, config, work.arrivals(r), 2), 1.0, 0.1)
    # short prompts: nothing to separate, colocation wins per instance
    short = Workload([(20, 100)] * 40)
    best = plan(cost, config, short, 1.0, 0.05, max_instances=2, progress=False)[0]
    assert best.prefill == 0
    # the CLI, on a saved profile
    cost.save(tmp_path / "cost.json")
    out = _plan_cli(tmp_path, (1500, 100), 3, 0.008, "--max-instances", "2", "--format", "json")
    assert out.returncode == 0, out.stderr
    options = json.loads(out.stdout)["options"]
    assert options[0]["label"] == "1 prefill + 1 decode" and len(options) == 3
    bad = _plan_cli(tmp_path, (1500, 100), 0, 0.02)
    assert bad.returncode != 0 and "--slo-ttft must be > 0" in bad.stderr


def _plan_cli(tmp_path, lengths: tuple[int, int], slo_ttft: float, slo_tpot: float, *flags: str):
    """`kestrel plan disaggregation` on 20 requests of `lengths` (prompt, output tokens) with the profile saved
    as cost.json in `tmp_path`."""
    (tmp_path / "trace.json").write_text(json.dumps([dict(prompt_tokens=lengths[0], output_tokens=lengths[1])] * 20))
    return subprocess.run([sys.executable, "-m", "kestrel.cli", "plan", "disaggregation", "--workload",
                           str(tmp_path / "trace.json"), "--slo-ttft", str(slo_ttft), "--slo-tpot", str(slo_tpot),
                           "--profile", str(tmp_path / "cost.json"), *flags],
                          capture_output=True, text=True, timeout=300)


def test_a_disaggregated_profile_gets_a_cost_model_per_role(tmp_path):
    """A disaggregated deployment's /step_profile: its prefill instances' steps fit the prefill instances' cost
    model and its decode instances' the decode instances' (a decode instance that runs decodes alone is not
    priced as a colocated one); the simulator prices each role's instances with its own, and the plan its splits."""
    prefill_truth = CostModel(step=0.05, per_token=0.002, per_row=0.001, per_pair=1e-8, kv_tokens=40000)
    decode_truth = CostModel(step=0.004, per_token=0.0005, per_row=0.0005, per_pair=2e-8, kv_tokens=40000)
    prefills = [step_shape(t, [], [(d, t, e)]) for t in (64, 256, 512) for d in (0, 256) for e in (False, True)]
    decodes = [step_shape(b, [c] * b, []) for b in (1, 2, 4, 8) for c in (100, 1000)]
    profile = {"instances": [
        dict(samples=[[*x, prefill_truth.seconds(*x)] for x in prefills], kv_tokens=900, dense_split=0,
             instance="prefill-0", role="prefill"),
        dict(samples=[[*x, decode_truth.seconds(*x)] for x in decodes], kv_tokens=700, dense_split=0,
             instance="decode-0", role="decode")]}
    prefill_cost, decode_cost = role_costs(profile)
    assert (prefill_cost.kv_tokens, decode_cost.kv_tokens) == (900, 700)
    for x in prefills:
        assert prefill_cost.seconds(*x) == pytest.approx(prefill_truth.seconds(*x), rel=1e-3)
    for x in decodes:
        assert decode_cost.seconds(*x) == pytest.approx(decode_truth.seconds(*x), rel=1e-3)
    # one fit over both roles misprices the decode steps
    both = CostModel.from_profile(profile)
    assert max(abs(both.seconds(*x) / decode_truth.seconds(*x) - 1) for x in decodes) > 0.2
    # a colocated deployment's profile has no roles to split; a role with no instances cannot be fitted
    assert role_costs({"instances": [dict(profile["instances"][0], role="both")]}) is None
    with pytest.raises(ValueError, match="decode instances' step profile"):
        CostModel.from_profile({"instances": profile["instances"][:1]}, role="decode")
    # the decode instances' model prices only the decode side: first tokens as before, later tokens slower
    config = EngineConfig(chunked_prefill_size=512)
    requests = Workload([(300, 30)] * 8).arrivals(1.0)
    fast = disaggregated(prefill_truth, config, requests, 1, 1, decode_cost=decode_truth)
    slow = disaggregated(prefill_truth, config, requests, 1, 1)  # decodes priced as the prefill instance's steps
    assert sorted(t for t, _ in slow) == pytest.approx(sorted(t for t, _ in fast))
    assert min(p for _, p in slow) > 2 * max(p for _, p in fast)
    # and the plan prices its splits with them: a TPOT only the fast decode instance meets
    work = Workload([(300, 30)] * 20)
    split = lambda options: next(o for o in options if o.prefill)  # noqa: E731
    fast_plan = plan(prefill_truth, config, work, 5.0, 0.03, max_instances=2, progress=False,
                     split_costs=(prefill_truth, decode_truth))
    slow_plan = plan(prefill_truth, config, work, 5.0, 0.03, max_instances=2, progress=False)
    assert split(fast_plan).goodput > 0 and split(slow_plan).goodput == 0
    assert [o.goodput for o in fast_plan if not o.prefill] == [o.goodput for o in slow_plan if not o.prefill]
    # --save-profile keeps the per-role models beside the combined one, and --profile prices the splits with them
    both.save(tmp_path / "cost.json", (prefill_cost, decode_cost))
    assert CostModel.load_with_roles(tmp_path / "cost.json") == (both, (prefill_cost, decode_cost))
    assert CostModel.load(tmp_path / "cost.json") == both
    both.save(tmp_path / "combined.json")
    assert CostModel.load_with_roles(tmp_path / "combined.json") == (both, None)
    out = _plan_cli(tmp_path, (300, 30), 5, 0.03, "--max-instances", "2", "--format", "json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["decode_cost_model"] == dataclasses.asdict(decode_cost)
    assert split([SimpleNamespace(**o) for o in result["options"]]).goodput > 0


def test_bursty_arrivals_keep_the_rate_and_raise_the_variation():
    """Workload.arrivals (and kestrel bench --burstiness): gamma gaps of shape b have the mean 1/rate and a
    coefficient of variation 1/sqrt(b); b = 1 is the Poisson process, drawn as before."""
    work = Workload([(10, 10)] * 20000)
    for b, cv in ((1.0, 1.0), (0.25, 2.0), (4.0, 0.5)):
        gaps = np.diff([t for t, _, _ in work.arrivals(2.0, burstiness=b)])
        assert gaps.mean() == pytest.approx(0.5, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    rng = random.Random(0)  # the times kestrel bench sends at from the same seed: the first at 0, then the gaps
    assert [t for t, _, _ in work.arrivals(2.0)][:3] == pytest.approx(list(itertools.accumulate(
        [0.0] + [rng.expovariate(2.0) for _ in range(2)])))
    with pytest.raises(ValueError, match="burstiness"):
        work.arrivals(2.0, burstiness=0)


def test_an_engine_logs_the_shape_and_time_of_each_step(tiny_llama_dir):
    """The step log (GET /step_profile): a 10-token prompt's prefill step, then its decode steps, each with its
    logits rows and attention pairs; the cost model fits such a profile, and refuses one of too few shapes."""
    engine = Engine(tiny_llama_dir, dtype="float32", disable_radix_cache=True)
    engine.generate([list(range(100, 110))], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    profile = engine.step_profile()
    assert [tuple(s[:3]) for s in profile["samples"]] == [(10, 1, 55), (1, 1, 11), (1, 1, 12), (1, 1, 13)]
    assert all(s[3] > 0 for s in profile["samples"]) and profile["kv_tokens"] == engine.pool.size
    with pytest.raises(ValueError, match="too few shapes"):
        CostModel.from_profile({"instances": [dict(profile, instance="engine")]})
    # steps priced by a known model are fitted back to it, whichever instance they ran on
    truth = CostModel(step=0.004, per_token=0.0006, per_row=0.0003, per_pair=2e-8, kv_tokens=1)
    shapes = [step_shape(t, [], [(0, t, True)]) for t in (4, 16, 64, 256)] + [
        step_shape(b, [c] * b, []) for b in (1, 8, 32) for c in (64, 512)]
    timed = [[*x, truth.seconds(*x)] for x in shapes]
    fitted = CostModel.from_profile({"instances": [dict(samples=timed[::2], kv_tokens=900, dense_split=0),
                                                   dict(samples=timed[1::2], kv_tokens=800, dense_split=0)]})
    assert fitted.kv_tokens == 800
    for x in shapes:
        assert fitted.seconds(*x) == pytest.approx(truth.seconds(*x), rel=1e-3)

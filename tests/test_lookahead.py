"""Lookahead decoding: the draft layout and mask, exactness against plain decoding on every path, the sampling
rule's distribution, and KV bookkeeping."""
from __future__ import annotations

import random

import pytest
import torch

from kestrel import Engine, SamplingParams
from kestrel.engine.lookahead import (LOOKUP_PLAN, SINGLE_PLAN, WINDOW_PLAN, LookaheadSizes, LookaheadState,
                                      NgramPool, StepCost, choose_plan)

REPETITIVE = "one two three four five six seven eight nine ten " * 4


def free_cost(engine: Engine) -> Engine:
    """Make every step size cost the same (a GPU's regime at small batches), so the planner drafts as deep as
    it can on every step: the tests then exercise drafts on every path, whatever this CPU measured
    (what lookahead_always does; kept here for engines built without it)."""
    engine.step_cost = StepCost.flat()
    engine.scheduler.step_cost = engine.step_cost
    return engine


def assert_pool_whole(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size


@pytest.fixture(scope="module")
def plain(tiny_llama_dir):
    return Engine(tiny_llama_dir, dtype="float32")


@pytest.fixture(scope="module")
def spec(tiny_llama_dir):
    return free_cost(Engine(tiny_llama_dir, dtype="float32", speculative="lookahead", lookahead_window=3,
                            lookahead_ngram=4, lookahead_pool=3))


# ---- the algorithm's parts ------------------------------------------------------------------
def test_ngram_pool_keeps_the_most_recent_per_key():
    pool = NgramPool(3, limit=2)
    pool.add_from([5, 1, 2, 5, 3, 4, 5, 6, 7, 5, 1, 2], 0)
    assert pool.candidates(5) == [(1, 2), (6, 7)]  # (3, 4) dropped when (1, 2) was seen again, most recent first
    assert pool.candidates(9) == []


def test_window_mask_follows_the_paper():
    sizes = LookaheadSizes(window=3, ngram=4, pool=2)
    state = LookaheadState(sizes, NgramPool(4, 2), levels=[[11, 12], [21, 22, 23], [31, 32, 33]])
    state.pool.add(7, (40, 41, 42))
    state.pool.add(7, (40, 43, 44))
    draft = state.propose(WINDOW_PLAN, current=7, pos_room=100, out_room=100).draft(depth=3)
    row = [7] + draft.tokens
    index = {t: i for i, t in enumerate(row) if row.count(t) == 1}
    m = draft.mask

    def sees(a, b):
        return bool(m[index[a], index[b]])
    # level 0 (the pending token is its column 0) is causal
    assert sees(12, 11) and sees(12, 7) and not sees(11, 12)
    # level l, column j: the pending token, level 0 up to column j, its own column's earlier levels, nothing else
    assert sees(32, 7) and sees(32, 11) and sees(32, 22) and sees(32, 32)
    assert not sees(32, 12) and not sees(32, 21) and not sees(32, 31) and not sees(32, 33)
    assert sees(31, 21) and sees(31, 7) and not sees(31, 11)
    # positions: level l column j at p + j + l
    assert draft.depth[draft.tokens.index(33)] == 2 + 2
    # candidates share their common prefix (a trie) and are causal within themselves, blind to the window
    assert row.count(40) == 1 and draft.proposed == 5
    a44, a43, a40 = index[44], index[43], index[40]
    assert m[a44, a43] and m[a44, a40] and m[a44, 0] and not m[a44, index[42]] and not m[a44, index[11]]
    assert draft.children[0] == {40: a40} and set(draft.children[a40]) == {41, 43}


def test_window_moves_on_and_feeds_the_pool():
    sizes = LookaheadSizes(window=2, ngram=3, pool=4)
    state = LookaheadState(sizes, NgramPool(3, 4), levels=[[10], [20, 21]])  # full: N-1 = 2 levels
    draft = state.propose(WINDOW_PLAN, current=5, pos_room=100, out_room=100).draft(depth=0)
    argmax = [0] * draft.num_tokens
    argmax[-2:] = [30, 31]  # outputs of the last level's columns
    out = state.window_outputs(draft, argmax)
    assert out == [30, 31]
    state.after_step(draft, out, current=5)
    assert state.pool.candidates(5) == [(20, 30)] and state.pool.candidates(10) == [(21, 31)]
    assert state.levels == [[21], [30, 31]]


def test_planner_drafts_when_tokens_are_cheap_and_not_when_they_are_not():
    sizes = LookaheadSizes(window=0, ngram=5, pool=2)
    state = LookaheadState.for_prompt(sizes, [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1])
    props = {p: state.propose(p, 1, 100, 100) for p in (SINGLE_PLAN, LOOKUP_PLAN)}
    flat = StepCost()
    flat.seconds = {1: 1.0, 4096: 1.0}
    plan, depths = choose_plan([(state, props)], 1, 1, flat)
    assert plan is not None and depths == [4]
    linear = StepCost()
    linear.seconds = {1: 1.0}  # every token costs a full step: a compute-bound machine
    assert choose_plan([(state, props)], 1, 1, linear) == (None, [])
    busy = StepCost()  # a batch of 16 where a token costs a sixteenth of the step: not enough for a 0.5 guess
    busy.seconds = {1: 1.0, 16: 16.0, 64: 64.0}
    assert choose_plan([(state, props)] + [(state, {})] * 15, 16, 16, busy)[0] is None


# ---- exactness ------------------------------------------------------------------------------
def prompts(tokenizer) -> list[list[int]]:
    texts = [REPETITIVE, "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n", "Tell me about kestrels.",
             "the cat sat on the mat. the cat sat on the"]
    return [tokenizer(t).input_ids for t in texts]


def test_greedy_identical_to_plain_decoding_on_a_tiny_model(plain, spec, tokenizer):
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    ps = prompts(tokenizer)
    want = [o.token_ids for o in plain.generate(ps, params)]
    before = spec.stats.spec_tokens - spec.stats.spec_steps
    outs = spec.generate(ps, params)
    assert [o.token_ids for o in outs] == want
    assert sum(o.spec_steps for o in outs) > 0
    assert spec.stats.spec_tokens - spec.stats.spec_steps > before + 20  # drafts were accepted, not only tried
    for p in ps:  # one at a time too (a row alone), and again from the radix cache
        for _ in range(2):
            assert spec.generate(p, params)[0].token_ids == plain.generate(p, params)[0].token_ids
    assert_pool_whole(spec)


@pytest.mark.parametrize("case", ["stop", "max_tokens", "n", "penalty", "chunked", "logprobs", "regex"])
def test_greedy_identical_on_every_path(plain, spec, tiny_llama_dir, tokenizer, case):
    p = prompts(tokenizer)[0]
    base = dict(max_tokens=40, temperature=0, ignore_eos=True)
    engines = (plain, spec)
    if case == "stop":
        text = plain.generate(p, SamplingParams(**base))[0].text
        params = SamplingParams(**base, stop=[text[len(text) // 2:len(text) // 2 + 3]])
    elif case == "max_tokens":  # ends in the middle of an accepted run
        params = [SamplingParams(**dict(base, max_tokens=k)) for k in (1, 2, 5, 7, 13)]
    elif case == "n":
        params = SamplingParams(**base, n=3)
    elif case == "penalty":
        params = SamplingParams(**base, repetition_penalty=1.3, frequency_penalty=0.2)
    elif case == "chunked":
        engines = (Engine(tiny_llama_dir, dtype="float32", chunked_prefill_size=7),
                   free_cost(Engine(tiny_llama_dir, dtype="float32", chunked_prefill_size=7,
                                    speculative="lookahead")))
        params = SamplingParams(**base)
    elif case == "logprobs":
        params = SamplingParams(**base, logprobs=2)
    else:
        params = SamplingParams(**base, regex=r"(one|two|three)( (one|two|three)){3,9}", jump_forward=True)
    many = isinstance(params, list)
    got = engines[1].generate([p] * len(params) if many else p, params)
    want = engines[0].generate([p] * len(params) if many else p, params)
    for g, w in zip(got, want):
        assert [o.token_ids for o in g.outputs] == [o.token_ids for o in w.outputs]
        assert [o.text for o in g.outputs] == [o.text for o in w.outputs]
        assert g.finish_reason == w.finish_reason
    if case == "logprobs":
        for a, b in zip(got[0].logprobs, want[0].logprobs):
            assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert list(a.top) == list(b.top)
    if case in ("n", "penalty", "chunked"):
        assert sum(g.spec_steps for g in got) > 0
    assert_pool_whole(engines[1])


def test_greedy_identical_on_the_embedded_model(embedded_dir, tokenizer):
    from kestrel.model.loader import chat_template_ids
    plain = Engine(embedded_dir, dtype="float32")
    spec = Engine(embedded_dir, dtype="float32", speculative="lookahead", lookahead_always=True)
    ps = [chat_template_ids(tokenizer, [{"role": "user", "content": q}]) for q in (
        "Write a Python function that checks whether a number is prime.",
        "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over the lazy dog.",
        "What is the capital of France?")]
    params = SamplingParams(max_tokens=40, temperature=0)
    outs = spec.generate(ps, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.generate(ps, params)]
    assert sum(o.accepted_draft_tokens for o in outs) > 10
    assert_pool_whole(spec)


# ---- sampling -------------------------------------------------------------------------------
def test_seeded_sampling_gives_plain_sampling_tokens(plain, spec, tokenizer):
    """Each token is drawn as plain sampling draws it (one uniform of the request's own stream) and a draft is
    accepted when it equals it: speculative sampling's rule for one-hot drafts. So a seeded request gives the
    very tokens it gives without lookahead, drafts or not, with every sampling parameter."""
    p = tokenizer(REPETITIVE).input_ids
    p += plain.generate(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    params = [SamplingParams(max_tokens=24, temperature=t, top_k=k, top_p=q, min_p=m, seed=s, ignore_eos=True,
                             repetition_penalty=r)
              for s, (t, k, q, m, r) in enumerate([(1.0, 3, 1.0, 0.0, 1.0), (0.7, 0, 0.9, 0.0, 1.0),
                                                   (1.3, 0, 1.0, 0.05, 1.1), (0.5, 5, 0.95, 0.0, 1.0)] * 12)]
    want = plain.generate([p] * len(params), params)
    got = spec.generate([p] * len(params), params)
    same = sum(g.token_ids == w.token_ids for g, w in zip(got, want))
    # A tree row's float32 logits differ from a one-token row's in the last bits (as a batch's do from a lone
    # request's), which can move a uniform across a CDF boundary, at any token: measured 3 and 5 requests in 100
    # over 24 tokens (AMX Xeon; the same restricted to AVX2). Lookahead drawing from the wrong uniforms would make
    # nearly every request differ from its first accepted draft on; a quarter differing is ~1e-6 likely at 5%.
    assert same >= 0.75 * len(params), f"{len(params) - same} of {len(params)} requests differ"
    assert sum(o.accepted_draft_tokens for o in got) > 20  # drafts were accepted while sampling


def test_sampling_with_lookahead_follows_plain_sampling(plain, spec, tokenizer):
    """Unseeded requests draw from the engine's one stream, whose draws lookahead consumes differently; the
    first three tokens' joint distribution must still be plain sampling's (chi-square over 400 samples each)."""
    p = tokenizer(REPETITIVE).input_ids
    # the prompt ends with the model's own greedy loop: its n-grams are drafted, and often sampled
    p += plain.generate(p, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0].token_ids
    params = [SamplingParams(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)] * 400
    a = [tuple(o.token_ids) for o in plain.generate([p] * 400, params)]
    outs = spec.generate([p] * 400, params)
    assert sum(o.accepted_draft_tokens for o in outs) > 50  # drafts were verified and accepted
    b = [tuple(o.token_ids) for o in outs]
    keys = sorted(set(a) | set(b))
    ca = torch.tensor([a.count(k) for k in keys], dtype=torch.float64)
    cb = torch.tensor([b.count(k) for k in keys], dtype=torch.float64)
    big = (ca + cb) >= 10  # chi-square needs expected counts of a few per cell: pool the rare ones
    ca = torch.cat((ca[big], ca[~big].sum(0, keepdim=True)))
    cb = torch.cat((cb[big], cb[~big].sum(0, keepdim=True)))
    from scipy.stats import chi2_contingency
    assert chi2_contingency(torch.stack((ca, cb)).numpy() + 1e-9).pvalue > 1e-3


def test_a_seeded_request_reproduces_itself(spec, tokenizer):
    p = tokenizer(REPETITIVE).input_ids
    params = SamplingParams(max_tokens=30, temperature=0.9, seed=7)
    first = spec.generate(p, params)[0]
    assert first.spec_steps > 0
    assert spec.generate(p, params)[0].token_ids == first.token_ids


# ---- KV bookkeeping -------------------------------------------------------------------------
def test_rejected_slots_return_at_once_and_aborts_lose_nothing(spec, tokenizer):
    rng = random.Random(0)
    ps = prompts(tokenizer)
    rids = [spec.add_request(ps[i % len(ps)], SamplingParams(max_tokens=60, temperature=0.7, seed=i,
                                                              ignore_eos=True)) for i in range(10)]
    steps = 0
    while spec.has_unfinished():
        spec.step()
        steps += 1
        running = spec.scheduler.running
        # between steps a sequence holds exactly its computed tokens: rejected draft slots went back
        assert all(s.num_slots == s.num_computed for s in running)
        if rng.random() < 0.15 and running:
            spec.abort(rng.choice(running).request_id)
    for r in rids:
        spec.get_output(r, pop=True)
    assert steps > 0
    assert_pool_whole(spec)


def test_the_radix_cache_holds_accepted_tokens_with_their_kv(plain, spec, tokenizer):
    """A request that continues a lookahead output hits the cache for all of it and continues exactly as plain
    decoding does: the cached K/V are those of the accepted tokens at their positions."""
    p = prompts(tokenizer)[3]
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    out = spec.generate(p, greedy)[0]
    assert out.accepted_draft_tokens > 0
    follow = p + out.token_ids[:20]
    again = spec.generate(follow, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert again.cached_tokens >= len(follow) - 1
    assert again.token_ids == plain.generate(follow, SamplingParams(max_tokens=10, temperature=0,
                                                                    ignore_eos=True))[0].token_ids
    assert_pool_whole(spec)


def test_config_errors_say_what_to_fix():
    from kestrel.config import EngineConfig
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(speculative="medusa")
    with pytest.raises(ValueError, match="lookahead_ngram"):
        EngineConfig(speculative="lookahead", lookahead_ngram=1)


# ---- with everything else -------------------------------------------------------------------
def test_preemption_and_fair_accounting_charge_only_accepted_tokens(tiny_llama_dir, tokenizer):
    """A pool too small for the batch forces retractions while drafts run; outputs stay those of plain decoding,
    and each client is charged for the output tokens it got, not for the draft tokens verified."""
    kw = dict(dtype="float32", max_total_tokens=220, policy="vtc")
    plain = Engine(tiny_llama_dir, **kw)
    spec = Engine(tiny_llama_dir, speculative="lookahead", lookahead_always=True, **kw)
    ps = prompts(tokenizer)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    clients = ["a", "b"] * len(ps)
    want = plain.generate(ps * 2, params, client=clients)
    got = spec.generate(ps * 2, params, client=clients)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert spec.scheduler.num_retractions > 0 and sum(o.accepted_draft_tokens for o in got) > 0
    usage = spec.client_usage()
    for c in ("a", "b"):
        outputs = sum(o.output_tokens for o, who in zip(got, clients) if who == c)
        assert usage[c][2] == outputs
    assert_pool_whole(spec)


def test_programs_run_unchanged_with_lookahead(embedded_dir):
    import kestrel as kl
    from benchmarks.programs import chat, review
    results = []
    for kw in ({}, {"speculative": "lookahead", "lookahead_always": True}):
        backend = kl.EngineBackend(Engine(embedded_dir, dtype="float32", **kw))
        try:
            s = review.run(text="The blender is loud but crushes ice perfectly. Four stars.", backend=backend)
            c = chat.run(turns=["What is the capital of France?", "And of Italy?"], backend=backend)
            results.append((s.text(), s["tone"], s["facts"], c.messages()))
            if kw:
                assert backend.engine.stats.spec_steps > 0
        finally:
            backend.shutdown()
    assert results[0] == results[1]


def test_drafts_stop_at_the_end_of_the_context(tiny_llama_dir, tokenizer):
    """Near the context's end a draft may not reach past the last position (nor past the table's last column,
    which a wide tree could even where its depth fits)."""
    p = tokenizer(REPETITIVE).input_ids[:40]
    kw = dict(dtype="float32", context_length=64)
    params = SamplingParams(max_tokens=64 - len(p), temperature=0, ignore_eos=True)
    want = Engine(tiny_llama_dir, **kw).generate(p, params)[0]
    spec = Engine(tiny_llama_dir, speculative="lookahead", lookahead_always=True, lookahead_pool=8, **kw)
    got = spec.generate(p, params)[0]
    assert got.token_ids == want.token_ids and len(got.token_ids) == 64 - len(p)
    assert got.spec_steps > 0
    assert_pool_whole(spec)

"""Compound inference (kestrel/lang/compound.py): vote and filter-vote in programs, and the number-of-calls model.

Unit tests run on a scripted backend; the end-to-end ones on the tiny random-weight model, whose constrained
one-digit answers at temperature 1 are samples from a fixed distribution, so vote accuracy is predictable.
"""
from __future__ import annotations

import itertools
import re
import threading
from collections import Counter
from math import comb

import numpy as np
import pytest
from scipy.special import factorial
from scipy.stats import binom

import kestrel as kl
from kestrel import Engine
from kestrel.lang.compound import estimate_calls, filter_vote, vote


# ---- a scripted backend: the fork numbered i (see `numbered`) answers script[i] ---------------------------
class Scripted(kl.Backend):
    def __init__(self, script):
        self.script = script

    def generate(self, prompt, params, on_text=None, lora=None):
        numbers = re.findall(r"#(\d+):", prompt)
        return {"text": self.script[int(numbers[-1])] if numbers else "", "meta_info": {}}


def numbered(name="a"):
    """A callable expr that tells each fork its number, so the scripted backend knows what to answer."""
    counter = itertools.count()

    def add(fork):
        fork += f"#{next(counter)}:"
        fork += kl.gen(name)
    return add


def in_program(backend, body):
    """Run body(s) inside a program on `backend` and return its result (errors raise from run)."""
    out = []

    @kl.function
    def program(s):
        s += "Q: "
        out.append(body(s))

    program.run(backend=backend)
    return out[0]


def test_vote_takes_the_plurality_and_breaks_ties_by_first_occurrence():
    backend = Scripted([" b", "a ", "a", "b\n", "c"])
    r = in_program(backend, lambda s: vote(s, numbered(), 5, name="a"))
    assert r.answers == ["b", "a", "a", "b", "c"]  # stripped by default
    assert r.counts == Counter(a=2, b=2, c=1) and r.answer == "b"  # 2-2 tie: "b" came first
    assert r.kept == [True] * 5 and not r.filtered_all and len(r.forks) == 5
    r = in_program(Scripted(["07", "7", "8", " 8", "8."]), lambda s: vote(s, numbered(), 5, name="a", key=float))
    assert r.answer == 8.0 and r.counts == Counter({8.0: 3, 7.0: 2})


def test_filter_vote_counts_only_kept_answers_and_falls_back_when_none_kept():
    backend = Scripted(["b", "b", "b", "a", "a"])
    r = in_program(backend, lambda s: filter_vote(s, numbered(), 5, lambda fork, a: a != "b", name="a"))
    assert r.answer == "a" and r.counts == Counter(a=2) and r.kept == [False] * 3 + [True] * 2
    assert not r.filtered_all and r.answers == ["b", "b", "b", "a", "a"]
    r = in_program(backend, lambda s: filter_vote(s, numbered(), 5, lambda fork, a: False, name="a"))
    assert r.filtered_all and r.answer == "b" and r.counts == Counter(b=3, a=2) and r.kept == [False] * 5


def test_judges_run_concurrently():
    barrier = threading.Barrier(4, timeout=10)  # breaks (and the judge raises) unless all 4 wait at once

    def judge(fork, answer):
        barrier.wait()
        return True

    r = in_program(Scripted(["x"] * 4), lambda s: vote(s, numbered(), 4, name="a", judge=judge))
    assert r.answer == "x" and not barrier.broken


def test_the_answer_name_comes_from_the_expression():
    backend = Scripted(["5"] * 3)

    def body(s):
        s += "#0:"  # every fork answers script[0]
        return vote(s, "Answer: " + kl.gen("n", max_tokens=2), 3)

    r = in_program(backend, body)
    assert r.answer == "5" and r.forks[0]["n"] == "5" and r.forks[0].text().endswith("#0:Answer: 5")


@pytest.mark.parametrize("kwargs, message", [
    (dict(expr=kl.gen("a"), k=0), "k >= 1"),
    (dict(expr=kl.gen("a"), k=-2), "k >= 1"),
    (dict(expr=kl.gen("a"), k=2.5), "k >= 1"),
    (dict(expr=kl.gen("a"), k=True), "k >= 1"),
    (dict(expr=numbered(), k=3), "callable expr needs name="),
    (dict(expr=kl.gen(), k=3), "named gen"),
    (dict(expr="just text", k=3), "named gen"),
    (dict(expr=kl.gen("a") + kl.gen("b"), k=3), r"\['a', 'b'\]: pass name="),
    (dict(expr=kl.gen("a"), k=3, name="b"), "not 'b'"),
    (dict(expr=kl.select("a", ["x", "y"]), k=3), "every fork would agree"),
    (dict(expr=kl.gen("a", temperature=0.0), k=3), "greedy or seeded"),
    (dict(expr=kl.gen("a", seed=7), k=3), "greedy or seeded"),
    (dict(expr=numbered("a"), k=3, name="answer"), "no variable 'answer'"),
])
def test_vote_errors_say_what_to_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        in_program(Scripted(["1"] * 3), lambda s: vote(s, **kwargs))


def test_filter_vote_needs_a_judge():
    with pytest.raises(ValueError, match="needs judge"):
        in_program(Scripted(["1"] * 3), lambda s: filter_vote(s, kl.gen("a"), 3, None))


# ---- the number-of-calls model (pure maths) ----------------------------------------------------------------
def brute_force_curve(answers, label):
    """Mean accuracy of a plurality vote over every K-subset, ties split evenly, for K = 1..len(answers)."""
    out = []
    for k in range(1, len(answers) + 1):
        shares = []
        for subset in itertools.combinations(answers, k):
            counts = Counter(subset)
            tied = [a for a, c in counts.items() if c == max(counts.values())]
            shares.append((label in tied) / len(tied))
        out.append(sum(shares) / comb(len(answers), k))
    return out


def test_observed_curve_is_the_exact_subset_average():
    samples = [list("aabbbcad"), list("abcabcaa"), list("xyzzyxxw"), list("aaaaaaab")]
    est = estimate_calls(samples, ["a"] * 4, max_calls=9)
    expected = np.mean([brute_force_curve(q, "a") for q in samples], axis=0)
    assert list(est.observed) == list(range(1, 9))
    assert np.allclose(list(est.observed.values()), expected, atol=1e-12)


def mixture_samples(seed, n_queries=200, n_samples=15, alpha=0.6, p_easy=0.8, p_hard=0.3):
    rng = np.random.default_rng(seed)
    p = np.where(rng.random(n_queries) < alpha, p_easy, p_hard)
    return [list(rng.random(n_samples) < pi) for pi in p], [True] * n_queries


def two_answer_vote(k, p):
    """P(right wins k calls, each right with probability p, else the one wrong answer; a tie is a coin flip)."""
    return binom.sf(k // 2, k, p) + (k % 2 == 0) * 0.5 * binom.pmf(k // 2, k, p)


K = np.arange(1, 65)
TRUE_CURVE = 0.6 * two_answer_vote(K, 0.8) + 0.4 * two_answer_vote(K, 0.3)  # 0.60, up to 0.63 at K=5..7, down


@pytest.mark.parametrize("seed", range(5))
def test_fit_recovers_a_known_mixture(seed):
    samples, labels = mixture_samples(seed)
    counts = estimate_calls(samples, labels, fit="counts")
    assert abs(counts.alpha - 0.6) < 0.08 and abs(counts.p_easy - 0.8) < 0.04 and abs(counts.p_hard - 0.3) < 0.06
    # the pick sits in the true curve's flat top (K = 5..11 are within 0.005 of the best)
    assert TRUE_CURVE.max() - TRUE_CURVE[counts.best_calls - 1] < 0.005
    curve = estimate_calls(samples, labels)
    assert curve.fit_error < 0.01  # (the observed curve differs from TRUE_CURVE by this sample's luck)
    assert TRUE_CURVE.max() - TRUE_CURVE[curve.best_calls - 1] < 0.035
    # its parameters are weakly identified by a curve over K <= 15, but the mixture is still found
    assert 0.25 < curve.alpha < 0.75 and curve.p_easy > 0.7
    assert set(curve.predicted) == set(range(1, 65)) and curve.best_calls % 2 == 1


@pytest.mark.parametrize("fit", ["curve", "counts"])
def test_easy_queries_want_every_call_and_hard_ones_one(fit):
    rng = np.random.default_rng(1)
    easy = estimate_calls([list(rng.random(15) < 0.8) for _ in range(100)], [True] * 100, max_calls=31, fit=fit)
    hard = estimate_calls([list(rng.random(15) < 0.3) for _ in range(100)], [True] * 100, max_calls=31, fit=fit)
    assert easy.best_calls == 31 and hard.best_calls == 1
    assert list(easy.predicted.values()) == sorted(easy.predicted.values())
    assert list(hard.predicted.values()) == sorted(hard.predicted.values(), reverse=True)
    # a tolerance trades accuracy for calls: the fewest calls within it of the best
    cheap = estimate_calls([list(rng.random(15) < 0.8) for _ in range(100)], [True] * 100, max_calls=31,
                           fit=fit, tolerance=0.01)
    best = max(cheap.predicted.values())
    assert cheap.best_calls < 31 and cheap.predicted[cheap.best_calls] >= best - 0.01
    assert all(cheap.predicted[k] < best - 0.01 for k in range(1, cheap.best_calls))


def test_estimate_calls_errors():
    with pytest.raises(ValueError, match="one label per query"):
        estimate_calls([[1, 2, 3]], [1, 2])
    with pytest.raises(ValueError, match="at least 3 samples"):
        estimate_calls([[1, 2, 3], [1, 2]], [1, 2])
    with pytest.raises(ValueError, match="max_calls"):
        estimate_calls([[1, 2, 3]], [1], max_calls=0)
    with pytest.raises(ValueError, match="fit must be"):
        estimate_calls([[1, 2, 3]], [1], fit="magic")


# ---- end to end on the tiny model --------------------------------------------------------------------------
PREFIX = "The kestrel hovers over the field, watching the grass for the smallest movement. " * 8 + "The answer is "


def digit(seed=None):
    """One sampled digit, temperature 1. Seeded, a call's draw does not depend on which other calls share its
    batches (threads interleave differently each run), so the statistical tests below are reproducible."""
    return kl.gen("d", regex="[0-9]", max_tokens=2, seed=seed)


def seeded_digits(first: int):
    """A vote's expression: fork j samples its digit with seed first + j."""
    seeds = itertools.count(first)

    def add(fork):
        fork += digit(next(seeds))
    return add


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    backend = kl.EngineBackend(Engine(tiny_llama_dir, dtype="float32"))
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def singles(tiny):
    """800 independent single-call answers to PREFIX."""
    @kl.function
    def one(s, i):
        s += PREFIX
        s += digit(i)

    return Counter(st["d"] for st in one.run_batch([{"i": i} for i in range(800)], backend=tiny))


def plurality_win(probs: np.ndarray, right: int, k: int) -> np.ndarray:
    """P(answer `right` wins a plurality of k independent calls, a tie going to a random tied answer), for each
    row of probs: a sum over every vector of answer counts, weighted by its multinomial probability."""
    counts = np.array([np.bincount(c, minlength=probs.shape[-1])
                       for c in itertools.combinations_with_replacement(range(probs.shape[-1]), k)])
    pmf = factorial(k) / factorial(counts).prod(1) * np.prod(probs[..., None, :] ** counts, axis=-1)
    top = counts.max(1)
    return (pmf * (counts[:, right] == top) / (counts == top[:, None]).sum(1)).sum(-1)


def test_vote_accuracy_matches_the_multinomial_prediction(tiny, singles):
    answers = sorted(singles)
    right = max(answers, key=singles.__getitem__)  # "right" = the model's most frequent answer
    n = sum(singles.values())
    probs = np.array([singles[a] for a in answers]) / n
    p, predicted = probs[answers.index(right)], float(plurality_win(probs, answers.index(right), 5))
    # the prediction's own sampling error, by a parametric bootstrap of the 800 single calls
    resampled = np.random.default_rng(0).multinomial(n, probs, size=200) / n
    prediction_var = plurality_win(resampled, answers.index(right), 5).var()

    results = {}

    @kl.function
    def voted(s, i):
        s += PREFIX
        results[i] = vote(s, seeded_digits(10_000 + 5 * i), 5, name="d")

    runs = 200
    voted.run_batch([{"i": i} for i in range(runs)], backend=tiny)
    observed = sum(r.answer == right for r in results.values()) / runs
    se = np.sqrt(predicted * (1 - predicted) / runs + prediction_var)
    assert abs(observed - predicted) < 3 * se, (observed, predicted, se)
    assert predicted - p > 3 * se, (p, predicted, se)  # the test can tell a vote from a single call
    # every fork found the shared prefix in the radix cache (fork computed it before the forks ran)
    metas = [f.get_meta_info("d") for r in results.values() for f in r.forks]
    assert len(metas) == 5 * runs and all(m["cached_tokens"] >= m["prompt_tokens"] - 1 for m in metas)


def test_a_vote_computes_the_shared_prefix_once(tiny):
    engine = tiny.engine
    engine.cache.evict(engine.cache.evictable_size)  # start cold
    prompt0, cached0 = engine.stats.prompt_tokens, engine.stats.cached_tokens

    @kl.function
    def voted(s):
        s += PREFIX
        vote(s, digit(), 8)

    voted.run(backend=tiny)
    computed = (engine.stats.prompt_tokens - prompt0) - (engine.stats.cached_tokens - cached0)
    prefix = len(tiny.tokenize(PREFIX))
    assert prefix > 100 and prefix <= computed <= prefix + 8 * 2, (prefix, computed)  # not 8 x prefix


def test_filter_vote_with_an_llm_judge_never_returns_a_rejected_answer(tiny, singles):
    bad = max(singles, key=singles.__getitem__)  # reject the model's favourite

    def judge(fork, answer):
        fork += "\nIs that right? " + kl.select("ok", ["yes", "no"])  # an LLM call on the fork
        return fork["ok"] == "yes" and answer != bad

    results = {}

    @kl.function
    def voted(s, i):
        s += PREFIX
        results[i] = filter_vote(s, seeded_digits(20_000 + 5 * i), 5, judge, name="d")

    voted.run_batch([{"i": i} for i in range(40)], backend=tiny)
    filtered = 0
    for r in results.values():
        oks = [f["ok"] for f in r.forks]
        assert r.kept == [ok == "yes" and a != bad for ok, a in zip(oks, r.answers)]
        voters = [a for a, kept in zip(r.answers, r.kept) if kept]
        assert r.filtered_all == (not voters) and r.counts == Counter(voters or r.answers)
        if not r.filtered_all:
            assert r.answer != bad
            filtered += bad in r.answers
    assert filtered >= 10  # the judge did change outcomes: the favourite was among the answers and lost

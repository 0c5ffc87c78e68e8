"""Compound inference: many LLM calls, one answer (Chen et al. 2024, "Are More LLM Calls All You Need?").

    @kl.function
    def solve(s, question):
        s += kl.user(question)
        result = vote(s, kl.assistant(kl.gen("answer", regex=r"[0-9]+")), k=5)
        ...  # result.answer, result.counts

`vote` samples k answers from forks of the state (the shared prefix is computed once) and returns the
plurality; `filter_vote` first lets a judge drop candidates. `estimate_calls` fits the paper's
easy/hard mixture model to single-call samples on a labeled set and picks the number of calls.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from math import comb
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import numpy as np

from kestrel.lang.interpreter import ProgramState
from kestrel.lang.ir import Concat, Gen, Role, Select

Judge = Callable[[ProgramState, Any], bool]


@dataclass
class VoteResult:
    """The plurality `answer`, the `counts` it won by, and every fork's (normalised) answer."""

    answer: Any
    counts: Counter
    answers: list
    kept: list[bool]  # per fork: did the judge keep its answer (all True without a judge)
    filtered_all: bool = False  # the judge kept none, so every answer voted
    forks: list[ProgramState] = field(default_factory=list, repr=False)


def vote(s: ProgramState, expr, k: int, *, name: Optional[str] = None, key: Optional[Callable[[str], Hashable]] = None,
         judge: Optional[Judge] = None) -> VoteResult:
    """Fork `s` k ways, add `expr` to each fork, and return the plurality of their answers.

    expr: a sampled gen() (or a Concat/role holding one), or a callable `f(fork)` that adds expressions to a
    fork, e.g. to vary its prompt (a static select() or a greedy/seeded gen() would make every fork agree, so
    they are refused; a callable may use them). name: the variable holding each fork's answer
    (default: the expression's only named gen/select; required for a callable). key: normalises an answer
    before counting (default: the text stripped). judge: `judge(fork, answer) -> bool`, run concurrently on
    every fork (it may add LLM calls to the fork); only kept answers vote, or all if it keeps none.
    Ties go to the answer seen first in fork order; the forks are exchangeable, so this is a fair coin.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"vote needs k >= 1 forks (an int), got {k!r}")
    name = _answer_name(expr, name)
    forks = s.fork(k)
    for f in forks:
        if callable(expr):
            expr(f)
        else:
            f += expr
    answers = [_read(f, name, key) for f in forks]
    if judge is None:
        kept = [True] * k
    else:  # judges block on their own LLM calls: give each fork a thread so the calls batch together
        with ThreadPoolExecutor(k, thread_name_prefix="kestrel-judge") as pool:
            kept = [bool(ok) for ok in pool.map(judge, forks, answers)]
    voters = [a for a, ok in zip(answers, kept) if ok]
    counts = Counter(voters or answers)  # a Counter keeps first-occurrence order, so max() breaks ties by it
    return VoteResult(max(counts, key=counts.__getitem__), counts, answers, kept, not voters, forks)


def filter_vote(s: ProgramState, expr, k: int, judge: Judge, *, name: Optional[str] = None,
                key: Optional[Callable[[str], Hashable]] = None) -> VoteResult:
    """`vote` with a required judge (the paper's Filter-Vote)."""
    if not callable(judge):
        raise ValueError("filter_vote needs judge(fork, answer) -> bool; use vote() to vote without one")
    return vote(s, expr, k, name=name, key=key, judge=judge)


def _answer_name(expr, name: Optional[str]) -> str:
    """The variable each fork's answer lands in; rejects expressions that cannot give k different answers."""
    if callable(expr):
        if name is None:
            raise ValueError("vote with a callable expr needs name=: the variable the callable generates")
        return name
    nodes = {n.name: n for n in _generators(expr) if n.name is not None}
    if not nodes:
        raise ValueError(f"vote needs a named gen() or select() (or a callable f(fork)) as expr, got {expr!r}")
    if name is None:
        if len(nodes) > 1:
            raise ValueError(f"expr generates {sorted(nodes)}: pass name= to say which one is the answer")
        name = next(iter(nodes))
    if name not in nodes:
        raise ValueError(f"expr generates {sorted(nodes)}, not {name!r}: pass one of those as name=")
    node = nodes[name]
    # identical forks with a deterministic call would pay k calls for one answer
    if isinstance(node, Select):
        raise ValueError(f"select {name!r} always picks the likeliest choice, so every fork would agree: sample "
                         "instead with gen(regex='(a|b)'), or pass a callable that varies each fork's prompt")
    if node.sampling.get("temperature") == 0 or node.sampling.get("seed") is not None:
        raise ValueError(f"gen {name!r} is greedy or seeded, so every fork would agree: sample with temperature > 0 "
                         "and no seed, or pass a callable that varies each fork")
    return name


def _generators(expr) -> list[Union[Gen, Select]]:
    if isinstance(expr, (Gen, Select)):
        return [expr]
    parts = expr.parts if isinstance(expr, Concat) else expr.content if isinstance(expr, Role) else []
    return [n for p in parts for n in _generators(p)]


def _read(fork: ProgramState, name: str, key) -> Hashable:
    if name not in fork:  # (waits for the fork, and raises its error if it failed)
        raise ValueError(f"the forks define no variable {name!r} (they have {sorted(fork.variables())}): "
                         "pass the answer's variable as name=")
    value = fork[name]
    return key(value) if key is not None else str(value).strip()


# ---- how many calls ---------------------------------------------------------------------------
@dataclass
class CallEstimate:
    """The number of calls that maximises predicted vote accuracy, and the fitted model behind it.

    Model (the paper's two-answer form): a fraction `alpha` of queries is easy, each call right with
    probability `p_easy` > 1/2; the rest are hard, right with `p_hard` < 1/2. A K-call vote on a query
    is right when the right answer has more than half the votes (half a point for a K/2 tie).
    """

    best_calls: int
    predicted: dict[int, float]  # K -> predicted vote accuracy, K = 1..max_calls
    observed: dict[int, float]  # K -> vote accuracy measured on the samples
    alpha: float
    p_easy: float
    p_hard: float
    fit_error: float  # root-mean-square gap between the fitted curve and `observed`


def estimate_calls(samples: Sequence[Sequence[Hashable]], labels: Sequence[Hashable], max_calls: int = 64, *,
                   fit: str = "curve", tolerance: float = 0.0) -> CallEstimate:
    """Fit the easy/hard mixture model to `samples` (independent single-call answers, a list per query)
    against `labels` (each query's right answer), and pick the number of calls K in 1..max_calls.

    `observed[K]` is the exact mean accuracy of a K-call vote over all K-subsets of each query's samples
    (K up to the fewest samples a query has). fit="curve" (the paper's procedure) fits the model to it by
    least squares: good predictions, also where wrong answers scatter, but the parameters themselves are
    weakly identified (a curve over small K barely tells a few hard queries from many borderline ones).
    fit="counts" maximises the likelihood of each query's number of right answers (any wrong answer counts
    as the one wrong answer): sharp parameters, exact for two-answer tasks. `best_calls` is the fewest calls
    whose predicted accuracy is within `tolerance` of the best (the optimum is often flat, and calls cost);
    in this model K = 2j ties K = 2j - 1, so the pick is odd.
    """
    if len(samples) != len(labels) or not samples:
        raise ValueError(f"need one label per query and at least one query; got {len(samples)} sample lists "
                         f"and {len(labels)} labels")
    m = min(len(q) for q in samples)
    if m < 3:
        raise ValueError(f"every query needs at least 3 samples to fit the model; the fewest is {m}")
    if max_calls < 1:
        raise ValueError(f"max_calls must be >= 1, got {max_calls}")
    tallies = [_tally(q, y) for q, y in zip(samples, labels)]
    observed = np.mean([_subset_vote_accuracy(*t)[:m] for t in tallies], axis=0)
    ks = np.arange(1, m + 1)
    if fit == "curve":
        alpha, p_easy, p_hard = _fit_curve(ks, observed)
    elif fit == "counts":
        alpha, p_easy, p_hard = _fit_counts(np.array([r for r, _ in tallies]), np.array([len(q) for q in samples]))
    else:
        raise ValueError(f"fit must be 'curve' or 'counts', got {fit!r}")
    curve = _mixture_accuracy(np.arange(1, max_calls + 1), alpha, p_easy, p_hard)
    best = int(np.flatnonzero(curve >= curve.max() - tolerance)[0]) + 1
    gap = _mixture_accuracy(ks, alpha, p_easy, p_hard) - observed
    return CallEstimate(best, {k + 1: float(v) for k, v in enumerate(curve)},
                        {int(k): float(v) for k, v in zip(ks, observed)}, alpha, p_easy, p_hard,
                        float(np.sqrt(np.mean(gap ** 2))))


# several starts: both objectives have local optima (e.g. swapping which component explains the curve)
_STARTS = [(a, p1, p2) for a in (0.25, 0.5, 0.75) for p1 in (0.6, 0.9) for p2 in (0.1, 0.4)]
_BOUNDS = ([1e-6, 0.5, 1e-6], [1 - 1e-6, 1 - 1e-6, 0.5])  # easy: p > 1/2, hard: p < 1/2


def _fit_curve(ks: np.ndarray, observed: np.ndarray) -> tuple[float, float, float]:
    from scipy.optimize import least_squares

    fits = [least_squares(lambda x: _mixture_accuracy(ks, *x) - observed, x0, bounds=_BOUNDS) for x0 in _STARTS]
    return tuple(float(v) for v in min(fits, key=lambda f: f.cost).x)


def _fit_counts(right: np.ndarray, n: np.ndarray) -> tuple[float, float, float]:
    from scipy.optimize import minimize
    from scipy.stats import binom

    def nll(x):
        alpha, p_easy, p_hard = x
        return -np.logaddexp(np.log(alpha) + binom.logpmf(right, n, p_easy),
                             np.log1p(-alpha) + binom.logpmf(right, n, p_hard)).sum()

    fits = [minimize(nll, x0, bounds=list(zip(*_BOUNDS))) for x0 in _STARTS]
    return tuple(float(v) for v in min(fits, key=lambda f: f.fun).x)


def _mixture_accuracy(ks: np.ndarray, alpha: float, p_easy: float, p_hard: float) -> np.ndarray:
    return alpha * _two_answer_accuracy(ks, p_easy) + (1 - alpha) * _two_answer_accuracy(ks, p_hard)


def _two_answer_accuracy(ks: np.ndarray, p: float) -> np.ndarray:
    """P(the right answer wins a K-call vote) when each call is right with probability p and otherwise gives
    the one wrong answer. An even K ties K - 1 (a K/2 tie is a coin flip), so it is taken from K - 1 exactly:
    computing it separately would let rounding make it look better."""
    from scipy.stats import binom

    odd = ks - (ks % 2 == 0)
    return binom.sf(odd // 2, odd, p)  # P(X >= (K+1)/2) = I_p((K+1)/2, (K+1)/2), the paper's form


def _tally(answers: Sequence[Hashable], label: Hashable) -> tuple[int, tuple[int, ...]]:
    """(how many answers are right, the wrong answers' counts sorted): all a subset vote depends on."""
    counts = Counter(answers)
    right = counts.pop(label, 0)
    return right, tuple(sorted(counts.values()))


@lru_cache(maxsize=4096)  # queries share few distinct tallies, so most are computed once
def _subset_vote_accuracy(right: int, wrong: tuple[int, ...]) -> np.ndarray:
    """For K = 1..m: the probability the right answer wins a plurality vote over a uniformly random K-subset
    of m samples (`right` right ones, `wrong` the counts of each wrong answer), a t+1-way tie counting 1/(t+1)
    (as a random tie-break would). Exact: sum over j right votes, counting the ways to draw the wrong votes
    with none above j, by how many wrong answers tie at j."""
    m = right + sum(wrong)
    wins = np.zeros(m + 1)  # indexed by K
    for j in range(1, right + 1):
        ways = np.zeros((len(wrong) + 1, m + 1))  # [t answers tied at j, s wrong samples drawn]
        ways[0, 0] = 1.0
        for n in wrong:
            new = np.zeros_like(ways)
            for c in range(min(n, j) + 1):
                tie = int(c == j)
                new[tie:, c:] += comb(n, c) * ways[:len(ways) - tie, :m + 1 - c]
            ways = new
        by_drawn = (ways / np.arange(1, len(wrong) + 2)[:, None]).sum(0)
        wins[j:] += comb(right, j) * by_drawn[:m + 1 - j]
    out = wins[1:] / np.array([comb(m, k) for k in range(1, m + 1)], dtype=float)
    out.setflags(write=False)  # cached and shared
    return out

"""Ratings from pairwise battles, as Chatbot Arena computes them.

Bradley–Terry by maximum likelihood: P(a beats b) = 1 / (1 + 10^((R_b - R_a) / 400)), a win counted twice and a tie
once for each side (a tie is half a win), ratings centred on 1000 (or one model anchored there). 95% intervals by
bootstrap over battles; a model's rank is one plus the number of models whose lower bound is above its upper
bound. The online Elo of the first leaderboards is here for comparison, and the sampling rule that picks the next
pair to battle (uniform, or active: pairs whose next vote narrows the intervals most).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
SCALE, BASE, INIT = 400.0, 10.0, 1000.0


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    winner: str  # one of WINNERS

    def __post_init__(self):
        if self.winner not in WINNERS:
            raise ValueError(f"winner must be one of {WINNERS}, got {self.winner!r}")
        if self.model_a == self.model_b:
            raise ValueError(f"a battle needs two different models, got {self.model_a!r} twice")


def _tally(battles: Sequence[Battle], models: list[str]) -> np.ndarray:
    """W[i, j]: weight of "i beat j" observations: 2 per win, 1 per tie (each side)."""
    index = {m: k for k, m in enumerate(models)}
    w = np.zeros((len(models), len(models)))
    for b in battles:
        a, c = index[b.model_a], index[b.model_b]
        if b.winner == "model_a":
            w[a, c] += 2
        elif b.winner == "model_b":
            w[c, a] += 2
        else:
            w[a, c] += 1
            w[c, a] += 1
    return w


def bradley_terry(battles: Sequence[Battle], models: Optional[list[str]] = None, anchor: Optional[str] = None,
                  weights: Optional[np.ndarray] = None) -> dict[str, float]:
    """Maximum-likelihood ratings on the 400-point scale, centred on 1000 (or with `anchor` at 1000)."""
    from scipy.optimize import minimize

    models = models or sorted({m for b in battles for m in (b.model_a, b.model_b)})
    w = weights if weights is not None else _tally(battles, models)
    ln = math.log(BASE)
    n = len(models)
    i, j = np.nonzero(w)
    counts = w[i, j]

    def nll(beta):
        d = ln * (beta[i] - beta[j])
        loss = np.sum(counts * np.logaddexp(0.0, -d))  # -log sigmoid(d)
        g = counts * -ln * (1.0 / (1.0 + np.exp(d)))  # d loss / d beta_i per observation
        grad = np.zeros(n)
        np.add.at(grad, i, g)
        np.add.at(grad, j, -g)
        # a tiny ridge pins the scale's free shift (and keeps a model that never lost finite); 1e-8 moves
        # ratings by far less than a point
        return loss + 0.5e-8 * beta @ beta, grad + 1e-8 * beta

    beta = minimize(nll, np.zeros(n), jac=True, method="L-BFGS-B", options={"gtol": 1e-10, "maxiter": 10000}).x
    ratings = SCALE * beta
    shift = ratings[models.index(anchor)] if anchor is not None else ratings.mean()
    return {m: float(INIT + r - shift) for m, r in zip(models, ratings)}


@dataclass
class Leaderboard:
    models: list[str]
    rating: dict[str, float]
    lower: dict[str, float]  # 2.5th percentile of the bootstrap
    upper: dict[str, float]  # 97.5th
    rank: dict[str, int]
    battles: dict[str, int]
    win_rate: dict[str, dict[str, Optional[float]]]  # observed share of a's wins over b (ties half), None: no battle
    elo: dict[str, float] = field(default_factory=dict)  # online Elo, for comparison

    def rows(self) -> list[dict]:
        order = sorted(self.models, key=lambda m: -self.rating[m])
        return [{"rank": self.rank[m], "model": m, "rating": round(self.rating[m], 1),
                 "ci_lower": round(self.lower[m], 1), "ci_upper": round(self.upper[m], 1),
                 "battles": self.battles[m], "elo": round(self.elo.get(m, INIT), 1)} for m in order]

    def to_json(self) -> dict:
        return {"leaderboard": self.rows(), "win_rate": self.win_rate}

    def table(self) -> str:
        lines = [f"{'rank':>4}  {'model':<28} {'rating':>7}  {'95% CI':>15}  {'battles':>7}  {'online elo':>10}"]
        for r in self.rows():
            ci = f"{r['ci_lower']:.0f} to {r['ci_upper']:.0f}"
            lines.append(f"{r['rank']:>4}  {r['model']:<28} {r['rating']:>7.1f}  {ci:>15}  {r['battles']:>7}  "
                         f"{r['elo']:>10.1f}")
        return "\n".join(lines)

    def plot(self, fmt: str = "svg") -> bytes:
        """The ratings with their 95% intervals, best first, as an image (matplotlib: svg or png)."""
        import io

        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()[::-1]  # best on top
        fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
        y = range(len(rows))
        ax.errorbar([r["rating"] for r in rows], y, fmt="o", color="#1f6feb", ecolor="#555", capsize=3,
                    xerr=[[r["rating"] - r["ci_lower"] for r in rows], [r["ci_upper"] - r["rating"] for r in rows]])
        ax.set_yticks(list(y), [f"{r['rank']}. {r['model']}" for r in rows])
        ax.set_xlabel("Bradley–Terry rating (95% bootstrap interval)")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        out = io.BytesIO()
        fig.savefig(out, format=fmt)
        plt.close(fig)
        return out.getvalue()


def leaderboard(battles: Sequence[Battle], rounds: int = 200, seed: int = 0, anchor: Optional[str] = None,
                progress: bool = False) -> Leaderboard:
    """Ratings, bootstrap intervals (`rounds` resamples of the battles), ranks, counts, win rates, online Elo."""
    if not battles:
        raise ValueError("no battles to rate: vote in the arena first, or give a battle log")
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    rating = bradley_terry(battles, models, anchor)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(models)))
    picks = range(rounds)
    if progress:
        from tqdm import tqdm
        picks = tqdm(picks, desc="bootstrap", unit="round")
    for r in picks:
        sample = [battles[k] for k in rng.integers(0, len(battles), len(battles))]
        got = bradley_terry(sample, models, anchor, weights=_tally(sample, models))
        samples[r] = [got[m] for m in models]
    lower = dict(zip(models, map(float, np.percentile(samples, 2.5, axis=0))))
    upper = dict(zip(models, map(float, np.percentile(samples, 97.5, axis=0))))
    rank = {m: 1 + sum(int(lower[o] > upper[m]) for o in models if o != m) for m in models}
    count = {m: 0 for m in models}
    for b in battles:
        count[b.model_a] += 1
        count[b.model_b] += 1
    return Leaderboard(models, rating, lower, upper, rank, count, win_rates(battles, models), online_elo(battles))


def win_rates(battles: Sequence[Battle], models: list[str]) -> dict[str, dict[str, Optional[float]]]:
    w = _tally(battles, models)
    out: dict[str, dict[str, Optional[float]]] = {}
    for a, m in enumerate(models):
        out[m] = {}
        for c, o in enumerate(models):
            total = w[a, c] + w[c, a]
            out[m][o] = None if a == c or total == 0 else float(w[a, c] / total)
    return out


def online_elo(battles: Iterable[Battle], k: float = 4.0) -> dict[str, float]:
    """Elo updated battle by battle in the log's order (K = 4, as Chatbot Arena's online variant)."""
    rating: dict[str, float] = {}
    for b in battles:
        ra, rb = rating.setdefault(b.model_a, INIT), rating.setdefault(b.model_b, INIT)
        expect_a = 1 / (1 + BASE ** ((rb - ra) / SCALE))
        score_a = {"model_a": 1.0, "model_b": 0.0}.get(b.winner, 0.5)
        rating[b.model_a] = ra + k * (score_a - expect_a)
        rating[b.model_b] = rb - k * (score_a - expect_a)
    return rating


def pair_weights(models: list[str], battles: Sequence[Battle], rule: str = "uniform") -> dict[tuple[str, str], float]:
    """How likely each pair is to battle next. `uniform`: all pairs alike. `active`: in proportion to how much one
    more vote of the pair is expected to shrink the ratings' variance (the trace of the inverse Fisher information
    of the Bradley–Terry fit, by Sherman–Morrison): pairs whose ratings are least certain, and close enough that a
    vote says something, come first."""
    pairs = [(a, b) for k, a in enumerate(models) for b in models[k + 1:]]
    if rule == "uniform" or not battles:
        return {p: 1.0 for p in pairs}
    if rule != "active":
        raise ValueError(f"sampling rule must be 'uniform' or 'active', got {rule!r}")
    index = {m: k for k, m in enumerate(models)}
    ours = [b for b in battles if b.model_a in index and b.model_b in index]
    # the ratings behind the choice get one virtual tie per pair: a model that has not lost yet must not look
    # infinitely strong, or no pair with it would seem worth a vote, and it would never lose
    prior = _tally(ours, models) + (1 - np.eye(len(models)))
    rating = bradley_terry(ours, models, weights=prior)
    ln = math.log(BASE) / SCALE  # per rating point

    def info(a: str, b: str) -> float:  # Fisher information of one battle about r_a - r_b
        p = 1 / (1 + BASE ** ((rating.get(b, INIT) - rating.get(a, INIT)) / SCALE))
        return ln * ln * p * (1 - p)

    fisher = np.eye(len(models)) * 1e-6  # a weak prior keeps models without battles finite
    for b in ours:
        e = np.zeros(len(models))
        e[index[b.model_a]], e[index[b.model_b]] = 1, -1
        fisher += info(b.model_a, b.model_b) * np.outer(e, e)
    cov = np.linalg.inv(fisher)
    out = {}
    for a, b in pairs:
        e = np.zeros(len(models))
        e[index[a]], e[index[b]] = 1, -1
        v = info(a, b)
        ce = cov @ e
        out[(a, b)] = float(v * (ce @ ce) / (1 + v * (e @ ce)))  # drop in trace(cov) from one more vote
    return out


def draw_pair(models: list[str], battles: Sequence[Battle], rule: str, rng) -> tuple[str, str]:
    """Two different models for the next battle, in random sides."""
    if len(models) < 2:
        raise ValueError("the arena needs at least two models (serve adapters, or add --arena-endpoint)")
    weights = pair_weights(models, battles, rule)
    pairs = list(weights)
    w = np.array([weights[p] for p in pairs], dtype=float)
    a, b = pairs[rng.choice(len(pairs), p=w / w.sum())]
    return (a, b) if rng.random() < 0.5 else (b, a)

"""Arena ratings against independent computations: Bradley–Terry by maximum likelihood against Zermelo's
minorize-maximize iteration written here from the model's formula, ratings recovered from votes simulated with
known ratings, ranks by interval overlap, online Elo by hand, and active sampling against uniform."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kestrel.arena.ratings import Battle, bradley_terry, draw_pair, leaderboard, online_elo, pair_weights


def _simulate(true: dict[str, float], n: int, seed: int, tie_share: float = 0.1, rule: str = "uniform",
              battles=None, models=None) -> list[Battle]:
    rng = np.random.default_rng(seed)
    battles = list(battles or [])
    models = models or sorted(true)
    for _ in range(n):
        a, b = draw_pair(models, battles, rule, rng)
        p_a = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
        if rng.random() < tie_share:
            winner = "tie" if rng.random() < 0.5 else "tie (bothbad)"
        else:
            winner = "model_a" if rng.random() < p_a else "model_b"
        battles.append(Battle(a, b, winner))
    return battles


def _zermelo(battles: list[Battle]) -> dict[str, float]:
    """Bradley–Terry with ties as half a win, by the MM iteration g_i <- W_i / sum_j n_ij / (g_i + g_j)."""
    models = sorted({m for b in battles for m in (b.model_a, b.model_b)})
    wins = {m: 0.0 for m in models}
    games: dict[tuple[str, str], int] = {}
    for b in battles:
        games[(b.model_a, b.model_b)] = games.get((b.model_a, b.model_b), 0) + 1
        games[(b.model_b, b.model_a)] = games.get((b.model_b, b.model_a), 0) + 1
        if b.winner == "model_a":
            wins[b.model_a] += 1
        elif b.winner == "model_b":
            wins[b.model_b] += 1
        else:
            wins[b.model_a] += 0.5
            wins[b.model_b] += 0.5
    g = {m: 1.0 for m in models}
    for _ in range(20000):
        new = {m: wins[m] / sum(n / (g[m] + g[o]) for (x, o), n in games.items() if x == m) for m in models}
        scale = math.exp(sum(math.log(v) for v in new.values()) / len(new))  # geometric mean 1: ratings centred
        new = {m: v / scale for m, v in new.items()}
        done = max(abs(new[m] - g[m]) for m in models) < 1e-13
        g = new
        if done:
            break
    return {m: 1000 + 400 * math.log10(g[m]) for m in models}


TRUE = {"alpha": 1150.0, "bravo": 1080.0, "charlie": 1000.0, "delta": 950.0, "echo": 820.0}


def test_maximum_likelihood_matches_an_independent_fit():
    battles = _simulate(TRUE, 1500, seed=1)
    got, want = bradley_terry(battles), _zermelo(battles)
    assert set(got) == set(TRUE)
    for m in TRUE:
        assert got[m] == pytest.approx(want[m], abs=0.05), m
    assert sum(got.values()) / len(got) == pytest.approx(1000, abs=1e-6)  # centred on 1000
    anchored = bradley_terry(battles, anchor="charlie")
    assert anchored["charlie"] == pytest.approx(1000, abs=1e-6)
    assert anchored["alpha"] - anchored["echo"] == pytest.approx(got["alpha"] - got["echo"], abs=1e-6)


def test_ratings_from_simulated_votes_fall_in_their_intervals():
    centre = sum(TRUE.values()) / len(TRUE)
    true = {m: r - centre + 1000 for m, r in TRUE.items()}
    covered = 0
    for seed in range(3):
        # no ties: ties that come regardless of strength, counted as half wins, pull ratings together
        board = leaderboard(_simulate(TRUE, 2500, seed=seed, tie_share=0), rounds=100, seed=seed)
        for m in TRUE:
            assert board.lower[m] < board.rating[m] < board.upper[m]
            covered += board.lower[m] <= true[m] <= board.upper[m]
        # 170 points apart and more: the intervals separate them, and the ranks follow the true order
        assert board.rank["alpha"] == 1 and board.rank["echo"] == 5
        assert sum(board.battles.values()) == 2 * 2500
    assert covered >= 13  # of 15: 95% intervals


def test_ranks_tie_where_intervals_overlap_and_win_rates_count_ties_as_half():
    battles = [Battle("a", "b", "model_a")] * 30 + [Battle("b", "a", "model_a")] * 28 + \
        [Battle("c", "a", "model_b")] * 60 + [Battle("c", "b", "tie")] * 2 + [Battle("b", "c", "model_a")] * 60
    board = leaderboard(battles, rounds=60)
    assert board.rank == {"a": 1, "b": 1, "c": 3}  # a and b overlap; both are far above c
    assert board.win_rate["a"]["b"] == pytest.approx(30 / 58) and board.win_rate["b"]["c"] == pytest.approx(61 / 62)
    assert board.win_rate["a"]["a"] is None
    assert board.battles == {"a": 118, "b": 120, "c": 122}
    assert [r["model"] for r in board.rows()][2] == "c" and b"<svg" in board.plot("svg")
    with pytest.raises(ValueError, match="winner must be"):
        Battle("a", "b", "draw")
    with pytest.raises(ValueError, match="no battles"):
        leaderboard([])


def test_online_elo_by_hand():
    elo = online_elo([Battle("a", "b", "model_a"), Battle("a", "b", "tie")])
    # first: expected 0.5, a gains 4 * 0.5 = 2; second: a at 1002 expects 1/(1+10^(-4/400)), scores 0.5
    expect = 1 / (1 + 10 ** (-4 / 400))
    assert elo["a"] == pytest.approx(1002 + 4 * (0.5 - expect))
    assert elo["a"] + elo["b"] == pytest.approx(2000)


def test_active_sampling_narrows_intervals_faster_than_uniform():
    """A new model joins five that have 600 votes between them; 150 more votes drawn uniformly or actively."""
    true = {**{f"m{i}": r for i, r in enumerate([800, 900, 1000, 1100, 1200])}, "new": 1050}
    old = sorted(true)[:5]
    for seed in range(3):
        history = _simulate(true, 600, seed=seed, models=old)
        widths = {}
        for rule in ("uniform", "active"):
            battles = _simulate(true, 150, seed=100 + seed, rule=rule, battles=history, models=sorted(true))
            board = leaderboard(battles, rounds=100, seed=seed)
            widths[rule] = (np.mean([board.upper[m] - board.lower[m] for m in true]),
                            board.upper["new"] - board.lower["new"])
        assert widths["active"][0] < widths["uniform"][0] and widths["active"][1] < widths["uniform"][1], widths
    weights = pair_weights(sorted(true), history, "active")
    assert max(weights, key=weights.get) in {(m, "new") for m in old}  # the unknown model first
    with pytest.raises(ValueError, match="sampling rule"):
        pair_weights(sorted(true), history, "greedy")


def test_cli_leaderboard_from_a_battle_log(tmp_path):
    import json
    import subprocess
    import sys

    log = tmp_path / "battles.jsonl"
    log.write_text("".join(json.dumps({"model_a": b.model_a, "model_b": b.model_b, "winner": b.winner, "turn": 1,
                                       "tstamp": 0}) + "\n" for b in _simulate(TRUE, 800, seed=5)))
    cmd = [sys.executable, "-m", "kestrel.cli", "arena", "leaderboard", "--votes", str(log), "--rounds", "50"]
    out = subprocess.run(cmd + ["--format", "json", "--plot", str(tmp_path / "board.png")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    board = json.loads(out.stdout)
    assert board["votes"] == 800 and board["leaderboard"][0]["model"] == "alpha"
    assert board["leaderboard"][0]["ci_lower"] < board["leaderboard"][0]["rating"] < board["leaderboard"][0]["ci_upper"]
    assert (tmp_path / "board.png").read_bytes()[:4] == b"\x89PNG"
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "alpha" in table.stdout.splitlines()[1]
    log.write_text('{"model_a": "x", "winner": "tie"}\n')
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "line 1" in bad.stderr

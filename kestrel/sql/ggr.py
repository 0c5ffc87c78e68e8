"""Row and field orders for prefix reuse: greedy group recursion (GGR), functional dependencies, and the global
field order of the simpler plans. After Liu et al., "Optimizing LLM Queries in Relational Workloads" (2024).

A prompt is fixed text and a sequence of segments: a pinned field (the template fixes where it goes) or a record
(fields whose order the planner picks per row). Two prompts share a prefix as long as they agree on the leading
fields, so the planner groups rows that agree on long values, puts those values first, and recurses inside
each group on the fields left.
"""
from __future__ import annotations

import heapq
import itertools
from collections import Counter
from typing import Iterable, Optional, Sequence

Row = Sequence[str]
Placement = tuple[int, tuple[int, ...]]  # (row index, field indices in prompt order)


def discover_fds(rows: Sequence[Row], among: Iterable[int]) -> dict[int, list[int]]:
    """Functional dependencies a -> b among the fields `among` that hold in `rows` (every value of a comes with one
    value of b). Key-like fields (every value distinct) are left out: they share nothing, so GGR never groups on
    them."""
    import numpy as np

    among = list(among)
    if len(rows) < 2 or len(among) < 2:
        return {}
    codes = {f: np.unique(np.array([r[f] for r in rows], dtype=object).astype(str), return_inverse=True)[1]
             for f in among}
    distinct = {f: int(codes[f].max()) + 1 for f in among}
    fds: dict[int, list[int]] = {}
    for a in among:
        if distinct[a] == len(rows):
            continue
        for b in among:
            if b != a and distinct[b] <= distinct[a]:
                pairs = codes[a].astype(np.int64) * distinct[b] + codes[b]
                if np.unique(pairs).size == distinct[a]:
                    fds.setdefault(a, []).append(b)
    return fds


def global_field_order(rows: Sequence[Row], segments: Sequence[tuple[int, ...]], extra: Sequence[int]) -> tuple[int, ...]:
    """One field order for every row: pinned fields where the template puts them, each record's fields by how much
    they share (average length squared times rows per distinct value, less one: few distinct values and long
    text first)."""
    n = len(rows)

    def score(f: int) -> float:
        values = [r[f] for r in rows]
        avg = sum(len(v) + extra[f] for v in values) / n
        return avg * avg * (n / len(set(values)) - 1)

    order: list[int] = []
    for seg in segments:
        order += sorted(seg, key=lambda f: (-score(f), seg.index(f))) if n and len(seg) > 1 else list(seg)
    return tuple(order)


def ggr(rows: Sequence[Row], segments: Sequence[tuple[int, ...]], extra: Optional[Sequence[int]] = None,
        fds: Optional[dict[int, list[int]]] = None) -> list[Placement]:
    """Greedy group recursion: every row once, in the order to run them, each with its field order.

    Among the fields the next segment allows, take the value whose group scores highest (value length squared,
    plus that of the fields it determines, times rows in the group less one), run that group first with its
    shared fields leading, recurse inside it on the remaining fields, and repeat on the rows left. `extra[f]` is
    text the field adds around its value (a record's `Name: `); `fds` maps a field to the fields it determines."""
    extra = extra if extra is not None else [0] * (len(rows[0]) if rows else 0)
    fds = fds or {}
    # values as small ints, one list per field: hashing and comparing them is what the recursion does most
    width = len(extra)
    interned: list[dict] = [{} for _ in range(width)]
    cols = [[interned[f].setdefault(r[f], len(interned[f])) for r in rows] for f in range(width)]
    length = [[0] * len(interned[f]) for f in range(width)]
    for f in range(width):
        for v, c in interned[f].items():
            length[f][c] = len(str(v)) + extra[f]
    # a determined field's value for each value of its determinant (the first met, for declared FDs that the
    # data breaks: the score is then only an estimate, the orders stay valid)
    implied: dict[int, dict[int, dict[int, int]]] = {}
    for a, bs in fds.items():
        implied[a] = {b: {} for b in bs}
        for b in bs:
            for va, vb in zip(cols[a], cols[b]):
                implied[a][b].setdefault(va, vb)
    placements: list[Placement] = []
    _solve(list(range(len(rows))), [tuple(s) for s in segments], cols, length, implied, placements, ())
    return placements


def _solve(idx: list[int], segments: list[tuple[int, ...]], cols, length, implied, out: list[Placement],
           head: tuple[int, ...]) -> None:
    segments = [s for s in segments if s]
    if not segments or len(idx) == 1:
        rest = tuple(f for s in segments for f in s)
        out.extend((i, head + rest) for i in idx)
        return
    cand = segments[0]
    # (map over a column's list keeps the per-row work in C: this runs for every row at every level)
    count = {f: Counter(map(cols[f].__getitem__, idx)) for f in cand}
    constant = [f for f in cand if len(count[f]) == 1]
    if constant:  # fields every row here agrees on lead for all of them: that costs no other field anything
        constant.sort(key=lambda f: -length[f][cols[f][idx[0]]])
        left = [tuple(f for f in s if f not in constant) for s in segments]
        _solve(idx, left, cols, length, implied, out, head + tuple(constant))
        return
    members: dict[tuple[int, int], list[int]] = {}  # rows of each shared value, in idx order
    for f in cand:
        get = cols[f].__getitem__
        for v, rows in itertools.groupby(sorted(idx, key=get), key=get):  # stable: idx order within a value
            rows = list(rows)
            if len(rows) > 1:
                members[(f, v)] = rows

    def score(f: int, v: int, n: int) -> int:
        s = length[f][v] ** 2
        for g, by in implied.get(f, {}).items():
            if g in cand and v in by:
                s += length[g][by[v]] ** 2
        return s * (n - 1)

    heap = [(-score(f, v, len(rows)), f, v, len(rows)) for (f, v), rows in members.items()]
    heapq.heapify(heap)
    taken: set[int] = set()
    while heap:
        _, f, v, n = heapq.heappop(heap)
        group = [i for i in members[(f, v)] if i not in taken]
        if len(group) != n:  # stale: rows of this value went with an earlier group; score what is left
            if len(group) > 1:
                heapq.heappush(heap, (-score(f, v, len(group)), f, v, len(group)))
            continue
        taken.update(group)
        # every field the group agrees on leads, the chosen one first, then the longer
        same = [g for g in cand if g != f and len(set(map(cols[g].__getitem__, group))) == 1]
        lead = (f, *sorted(same, key=lambda g: -length[g][cols[g][group[0]]]))
        left = [tuple(g for g in cand if g not in lead)] + [tuple(g for g in s if g not in lead) for s in segments[1:]]
        _solve(group, left, cols, length, implied, out, head + lead)
    rest = tuple(f for s in segments for f in s)
    out.extend((i, head + rest) for i in idx if i not in taken)  # rows that share no value on these fields

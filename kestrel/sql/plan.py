"""Planning a batch of LLM calls for the prefix cache: deduplicate identical prompts, order the rows (and the fields
of the templates' records) so that prompts sharing a prefix run next to each other, and predict the share of prompt
tokens the cache will serve.

Orders: `original` (the query's), `sorted` (rows sorted by their fields in one field order), `ggr` (the greedy group
recursion of Liu et al., kestrel/sql/ggr.py: groups, and per-row field orders inside records). With
`reorder_fields`, a record's fields are ordered for sharing (one order for all rows under original and sorted, per
row under ggr); pinned fields always stay where the template puts them.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

from kestrel.sql.ggr import discover_fds, ggr, global_field_order
from kestrel.sql.template import Template, parse

ORDERS = ("original", "sorted", "ggr")
RECORD_LINE = 3  # text a record adds to a value besides its name: ": " and a newline


@dataclass(frozen=True)
class Call:
    """One row's LLM call: the template, its options (JSON text or None) and the row's field values."""

    template: str
    options: Optional[str]
    values: tuple


@dataclass(frozen=True)
class Task:
    """A call to run, with its prompt (the template filled in the field order the plan chose)."""

    call: Call
    text: str


@dataclass
class Plan:
    rows: int  # calls asked for (rows of the query)
    run: list[Task]  # the calls to run, in order
    order: str
    dedup: bool
    reorder_fields: bool = False
    prompt_tokens: int = 0  # of the calls to run
    predicted_hit_tokens: int = 0  # of those, expected from the prefix cache
    seconds: float = 0.0  # planning time
    cache_tokens: Optional[int] = None  # the KV pool the prediction assumed (None: unbounded)
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_hit_rate(self) -> float:
        return self.predicted_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def describe(self) -> str:
        lines = [f"rows: {self.rows}", f"distinct prompts: {len({t.text for t in self.run})}",
                 f"prompts to run: {len(self.run)} (dedup {'on' if self.dedup else 'off'})",
                 f"order: {self.order}, record fields {'reordered' if self.reorder_fields else 'as written'}",
                 f"prompt tokens: {self.prompt_tokens}",
                 f"predicted prefix hit rate: {self.predicted_hit_rate:.1%} ({self.predicted_hit_tokens} tokens)",
                 "prefix cache: " + (f"{self.cache_tokens} tokens, least recently used evicted"
                                     if self.cache_tokens is not None else "unbounded"),
                 f"planning time: {self.seconds * 1000:.0f} ms"]
        return "\n".join(lines + self.notes)


FDs = Union[str, Iterable[tuple[str, str]], None]


def plan_calls(calls: list[Call], tokenize: Callable[[list[str]], list[list[int]]], dedup: bool = True,
               order: str = "ggr", reorder_fields: bool = True, fds: FDs = "discover",
               cache_tokens: Optional[int] = None) -> Plan:
    """Plan `calls` (one per row, in the query's order). `tokenize(texts)` gives prompts' tokens. `fds`:
    "discover" (functional dependencies among a record's fields, found in the rows), pairs of field names
    declared (a, b): a determines b, or None. `cache_tokens` is the KV pool's size, for the prediction."""
    check_order(order)
    start = time.perf_counter()
    plan = Plan(len(calls), [], order, dedup, reorder_fields)
    todo = list(dict.fromkeys(calls)) if dedup else list(calls)
    groups: dict[tuple, list[Call]] = {}  # calls that share template and options: planned together
    for c in todo:
        groups.setdefault((c.template, c.options), []).append(c)
    keys = list(groups) if order == "original" else sorted(groups, key=lambda k: (k[0], k[1] or ""))
    text: dict[int, str] = {}  # id of a call in `todo` -> its prompt (calls may repeat without dedup)
    ordered: list[Call] = []
    for key in keys:
        members = groups[key]
        template = parse(key[0])
        rows = [tuple(str(v) for v in c.values) for c in members]
        placements = _place(template, rows, order, reorder_fields, fds, plan.notes)
        for i, layout in placements:
            ordered.append(members[i])
            text[id(members[i])] = template.render(rows[i], layout)
    if order == "original":
        ordered = todo
    plan.run = [Task(c, text[id(c)]) for c in ordered]
    plan.predicted_hit_tokens, plan.prompt_tokens, _ = predict_hits(tokenize([t.text for t in plan.run]), cache_tokens)
    plan.cache_tokens = cache_tokens
    plan.seconds = time.perf_counter() - start
    return plan


def _place(template: Template, rows: list[tuple], order: str, reorder_fields: bool, fds: FDs,
           notes: list[str]) -> list[tuple[int, tuple[int, ...]]]:
    """(row, field order) for one template's rows, in the order to run them."""
    in_record = {f for r in template.records for f in r}
    extra = [len(n) + RECORD_LINE if f in in_record else 0 for f, n in enumerate(template.names)]
    segments = template.segments if reorder_fields else tuple((f,) for f in template.default_order())
    label = template.text if len(template.text) <= 40 else template.text[:37] + "..."
    if order == "ggr":
        found = _fds(template, rows, fds, in_record) if reorder_fields and in_record else {}
        if found:
            notes.append(f"functional dependencies in {label!r}: " + ", ".join(
                f"{template.names[a]} -> {template.names[b]}" for a, bs in found.items() for b in bs))
        return ggr(rows, segments, extra, found)
    layout = global_field_order(rows, segments, extra) if reorder_fields else template.default_order()
    if in_record and reorder_fields:
        notes.append(f"field order in {label!r}: " + ", ".join(template.names[f] for f in layout))
    idx = list(range(len(rows)))
    if order == "sorted":
        idx.sort(key=lambda i: tuple(rows[i][f] for f in layout))
    return [(i, layout) for i in idx]


def _fds(template: Template, rows: list[tuple], fds: FDs, in_record: set[int]) -> dict[int, list[int]]:
    if fds == "discover":
        return discover_fds(rows, sorted(in_record))
    found: dict[int, list[int]] = {}
    for a, b in fds or ():
        if a in template.names and b in template.names:
            found.setdefault(template.names.index(a), []).append(template.names.index(b))
    return found


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


class _Node:
    __slots__ = ("key", "children", "parent", "last")

    def __init__(self, key: tuple, parent: Optional["_Node"], last: int):
        self.key, self.children, self.parent, self.last = key, {}, parent, last


def predict_hits(prompts: list[list[int]], capacity: Optional[int] = None) -> tuple[int, int, int]:
    """(tokens found in the cache, prompt tokens, tokens put into the cache) when `prompts` run one after another
    on a radix cache of `capacity` tokens (None: unbounded) that evicts least recently used leaves, as the
    engine's does. Each prompt reuses its longest cached prefix, except its last token, which is always computed
    (its logits are needed)."""
    root = _Node((), None, 0)
    leaves: list = []  # heap of (last use, tiebreak, node): eviction candidates, checked when popped
    hits = total = inserted = size = 0
    for clock, ids in enumerate(prompts, 1):
        key, n, pos, node = tuple(ids), len(ids), 0, root
        while pos < n:
            child = node.children.get(key[pos])
            if child is None:
                break
            k = child.key
            if key[pos:pos + len(k)] == k:
                node, pos = child, pos + len(k)
                child.last = clock
                continue
            j = 1  # the first token matched (it is the child's key); split the child where they part
            while pos + j < n and key[pos + j] == k[j]:
                j += 1
            mid = _Node(k[:j], node, clock)
            node.children[k[0]] = mid
            child.key, child.parent = k[j:], mid
            mid.children[k[j]] = child
            node, pos = mid, pos + j
            break
        hits += min(pos, n - 1)
        total += n
        if pos < n:
            leaf = _Node(key[pos:], node, clock)
            node.children[key[pos]] = leaf
            heapq.heappush(leaves, (clock, id(leaf), leaf))
            size += n - pos
            inserted += n - pos
        while capacity is not None and size > capacity and leaves:
            last, _, leaf = heapq.heappop(leaves)
            if leaf.children or leaf.parent is None or leaf.parent.children.get(leaf.key[0]) is not leaf:
                continue  # no longer a leaf, or evicted already
            if leaf.last != last:
                heapq.heappush(leaves, (leaf.last, id(leaf), leaf))
                continue
            if leaf.last == clock:  # in use by the prompt running now
                heapq.heappush(leaves, (last, id(leaf), leaf))
                break
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            leaf.parent = None
            size -= len(leaf.key)
            if not parent.children and parent is not root:
                heapq.heappush(leaves, (parent.last, id(parent), parent))
    return hits, total, inserted

"""Planning a batch of LLM calls for the prefix cache: deduplicate identical prompts, order them so that prompts
sharing a prefix run next to each other, and predict the share of prompt tokens the cache will serve.

The fields of a template keep the order the template gives them (its text pins it), so prompts share a prefix
exactly when they agree on the template's first fields. For such rows, the greedy group recursion of Liu et al.
("Optimizing LLM Queries in Relational Workloads") reduces to grouping rows by their first field's value, then by the
second within each group, and so on: a lexicographic order of the field values, which puts every prompt next to the
earlier prompt it shares the most with.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

ORDERS = ("original", "sorted")


@dataclass(frozen=True)
class Call:
    """One row's LLM call: the template, its options (JSON text or None) and the row's field values."""

    template: str
    options: Optional[str]
    values: tuple


@dataclass
class Plan:
    rows: int  # calls asked for (rows of the query)
    run: list[Call]  # the calls to run, in order
    order: str
    dedup: bool
    prompt_tokens: int = 0  # of the calls to run
    predicted_hit_tokens: int = 0  # of those, expected from the prefix cache
    seconds: float = 0.0  # planning time
    trie_tokens: int = 0  # distinct prompt tokens: what the KV pool must hold for the prediction to hold
    notes: list[str] = field(default_factory=list)

    @property
    def predicted_hit_rate(self) -> float:
        return self.predicted_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def describe(self) -> str:
        lines = [f"rows: {self.rows}", f"distinct prompts: {len(set(self.run))}",
                 f"prompts to run: {len(self.run)} (dedup {'on' if self.dedup else 'off'})",
                 f"order: {self.order}", f"prompt tokens: {self.prompt_tokens}",
                 f"predicted prefix hit rate: {self.predicted_hit_rate:.1%} ({self.predicted_hit_tokens} tokens)",
                 f"distinct prompt tokens (KV the cache needs): {self.trie_tokens}",
                 f"planning time: {self.seconds * 1000:.0f} ms"]
        return "\n".join(lines + self.notes)


def plan_calls(calls: list[Call], render: Callable[[Call], list[int]], dedup: bool = True, order: str = "sorted",
               cache_tokens: Optional[int] = None) -> Plan:
    """Plan `calls` (one per row, in the query's order). `render(call)` gives a call's prompt tokens; `cache_tokens`
    is the KV pool's size, to say when the prediction assumes more than it holds."""
    check_order(order)
    start = time.perf_counter()
    run = list(dict.fromkeys(calls)) if dedup else list(calls)
    if order == "sorted":
        run.sort(key=_sort_key)
    plan = Plan(len(calls), run, order, dedup)
    hits, total, distinct = predict_hits([render(c) for c in run])
    plan.predicted_hit_tokens, plan.prompt_tokens, plan.trie_tokens = hits, total, distinct
    if cache_tokens is not None and distinct > cache_tokens:
        plan.notes.append(f"note: the distinct prompt tokens exceed the KV pool ({cache_tokens}); the prediction assumes "
                          f"a prompt's prefix is still cached when the prompt runs, which holds best in sorted order")
    plan.seconds = time.perf_counter() - start
    return plan


def check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def _sort_key(call: Call):
    # group by template and options, then by each field in the template's order; None sorts first
    return (call.template, call.options or "", tuple((v is not None, str(v)) for v in call.values))


def predict_hits(prompts: list[list[int]]) -> tuple[int, int, int]:
    """(tokens found in the cache, prompt tokens, distinct tokens) when `prompts` run in this order and the cache
    keeps everything: each prompt reuses its longest prefix shared with any earlier one (a token trie), except its
    last token, which is always computed (its logits are needed)."""
    trie: dict = {}
    hits = total = distinct = 0
    for ids in prompts:
        node, matched = trie, 0
        for t in ids:
            child = node.get(t)
            if child is None:
                child = node[t] = {}
                distinct += 1
            else:
                matched += 1
            node = child
        hits += min(matched, len(ids) - 1)
        total += len(ids)
    return hits, total, distinct

"""Prompt templates of llm(): fixed text, pinned fields and records.

    'Classify {Product} in {Category}.'                    two pinned fields: the text fixes their order
    'Is this order urgent? {Ship Mode, Segment, City}'      a record: one `Name: value` line per field, in an order
                                                           the planner may choose per row (fields that many rows
                                                           share go first, so that their prompts share a prefix)

The columns given to llm() fill the fields in order of first appearance (a record's in the order it lists them).
`{{` and `}}` are literal braces.
"""
from __future__ import annotations

import functools
import string
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class Template:
    text: str
    names: tuple[str, ...]  # the fields, in the order the columns fill them
    parts: tuple  # literal strings and field-index tuples (a pinned field: one index; a record: its indices)
    segments: tuple[tuple[int, ...], ...]  # the field tuples in prompt order, each field once

    @property
    def records(self) -> tuple[tuple[int, ...], ...]:
        """The records' field indices (a record lists two fields or more; a pinned field is one index)."""
        return tuple(s for s in self.segments if len(s) > 1)

    def default_order(self) -> tuple[int, ...]:
        """Every field, in the order the template lists them."""
        return tuple(f for s in self.segments for f in s)

    def check(self, n_values: int) -> None:
        if n_values != len(self.names):
            raise ValueError(f"the template has {len(self.names)} field(s) {list(self.names)} but llm() got "
                             f"{n_values} value(s): give one column per field, in the order the fields first appear")

    def render(self, values: Sequence, order: Optional[Sequence[int]] = None) -> str:
        """The prompt for one row; `order` (field indices) says in which order each record lists its fields."""
        self.check(len(values))
        rank = {f: k for k, f in enumerate(order)} if order is not None else None
        out = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif len(part) > 1:
                fields = sorted(part, key=rank.__getitem__) if rank is not None else part
                out.append("\n".join(f"{self.names[f]}: {values[f]}" for f in fields))
            else:
                out.append(str(values[part[0]]))
        return "".join(out)


@functools.lru_cache(maxsize=256)  # a query's rows share a few templates: parse each once
def parse(text: str) -> Template:
    """A template's structure; ValueError says what is wrong with it."""
    names: list[str] = []
    parts: list = []
    segments: list[tuple[int, ...]] = []
    in_record: set[str] = set()
    for literal, field, spec, conv in string.Formatter().parse(text):
        if literal:
            parts.append(literal)
        if field is None:
            continue
        if spec or conv or not field.strip():
            raise ValueError(f"template field {{{field}}} must be a {{Name}} or a record {{Name, Name, ...}}")
        is_record = "," in field
        group = [n.strip() for n in field.split(",")]
        if any(not n for n in group) or len(set(group)) != len(group):
            raise ValueError(f"record {{{field}}} must list distinct field names separated by commas")
        for n in group:
            if n in in_record or (is_record and n in names):
                raise ValueError(f"field {n!r} of template {text!r} is in a record and appears elsewhere too: a "
                                 f"record's fields go only in it")
            if is_record:
                in_record.add(n)
            if n not in names:
                names.append(n)
        idx = tuple(names.index(n) for n in group)
        parts.append(idx)
        placed = {f for s in segments for f in s}
        if not set(idx) <= placed:  # a pinned field written twice is placed where it first appears
            segments.append(idx)
    return Template(text, tuple(names), tuple(parts), tuple(segments))


def fields(template: str) -> tuple[str, ...]:
    """A template's fields, in the order llm()'s columns fill them."""
    return parse(template).names

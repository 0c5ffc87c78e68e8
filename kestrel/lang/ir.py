"""The expressions of an LLM program: what `s += ...` accepts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

SAMPLING_KEYS = ("max_tokens", "stop", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "seed", "ignore_eos", "stop_token_ids")


class Concatenable:
    """`"text" + gen(...)` and `gen(...) + "text"` build a Concat, as string concatenation reads."""

    def __add__(self, other):
        return Concat([self, other])

    def __radd__(self, other):
        return Concat([other, self])


@dataclass
class Concat(Concatenable):
    parts: list

    def __add__(self, other):
        return Concat(self.parts + [other])

    def __radd__(self, other):
        return Concat([other] + self.parts)


@dataclass
class Gen(Concatenable):
    """Generate text into variable `name` (SGLang's defaults: up to 128 tokens, temperature 1)."""

    name: Optional[str]
    sampling: dict[str, Any]
    constraint: dict[str, Any] = field(default_factory=dict)  # regex / json_schema / grammar
    lora: Optional[str] = None  # the LoRA adapter that generates it (None: the base model)


@dataclass
class Select(Concatenable):
    """Pick one of `choices` by its token-length-normalised log-probability given the text so far."""

    name: Optional[str]
    choices: list[str]


@dataclass
class Role:
    role: str  # system | user | assistant
    content: list  # strings, Gen and Select, in order


Expr = Union[str, Gen, Select, Role, Concat]


def gen(name: Optional[str] = None, max_tokens: int = 128, stop=None, temperature: float = 1.0, *,
        regex: Optional[str] = None, json_schema=None, grammar: Optional[str] = None,
        choices: Optional[list[str]] = None, lora: Optional[str] = None, **sampling) -> Union[Gen, Select]:
    """Generate into `name`. Sampling keywords as in SamplingParams (top_p, top_k, seed, ...);
    constrain the output with `regex`, `json_schema` (dict, JSON text or pydantic model) or `grammar`
    (EBNF); `lora` names the LoRA adapter that generates it. With `choices`, this is `select` (as in SGLang)."""
    if choices is not None:
        return select(name, choices)
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"gen() got unknown sampling parameters {sorted(unknown)}; known: {SAMPLING_KEYS}")
    constraint = {k: v for k, v in (("regex", regex), ("json_schema", json_schema), ("grammar", grammar))
                  if v is not None}
    if len(constraint) > 1:
        raise ValueError(f"gen() takes at most one of regex, json_schema, grammar; got {sorted(constraint)}")
    if isinstance(constraint.get("json_schema"), type):
        constraint["json_schema"] = constraint["json_schema"].model_json_schema()  # a pydantic model
    return Gen(name, dict(sampling, max_tokens=max_tokens, stop=stop, temperature=temperature), constraint, lora)


def select(name: Optional[str] = None, choices: Optional[list[str]] = None) -> Select:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select() needs a non-empty list of non-empty strings as choices")
    return Select(name, list(choices))


def _role(role: str):
    def make(*content) -> Role:
        for c in content:
            if not isinstance(c, (str, Gen, Select, Concat)):
                raise TypeError(f"{role}() content must be strings, gen() or select(), got {type(c).__name__}")
        return Role(role, list(content))
    make.__name__ = role
    make.__doc__ = f"A {role} message; its content may mix text with gen() and select()."
    return make


system = _role("system")
user = _role("user")
assistant = _role("assistant")

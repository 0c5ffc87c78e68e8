"""The expressions of an LLM program: what `s += ...` accepts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

SAMPLING_KEYS = ("max_tokens", "stop", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                 "presence_penalty", "repetition_penalty", "seed", "ignore_eos", "stop_token_ids", "min_tokens")
LOGPROB_KEYS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")  # SGLang's
# gen(dtype=...): SGLang's regexes; numbers may end in a space or newline, where they stop
DTYPE_REGEX = {int: (r"[-+]?[0-9]+[ \n]*", [" ", "\n"]), float: (r"[-+]?[0-9]*\.?[0-9]+[ \n]*", [" ", "\n"]),
               str: (r"\"[\w\d\s]*\"", []), bool: (r"(True|False)", [])}


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
    logprobs: dict[str, Any] = field(default_factory=dict)  # SGLang's return_logprob options (meta_info gets them)


@dataclass
class Select(Concatenable):
    """Pick one of `choices` by its token-length-normalised log-probability given the text so far."""

    name: Optional[str]
    choices: list[str]
    method: Optional[Any] = None  # how choices are scored (kestrel.lang.choices); None: token_length_normalized


@dataclass
class Role:
    role: str  # system | user | assistant
    content: list  # strings, Gen and Select, in order


@dataclass
class RoleBegin(Concatenable):
    """Opens a message (`s.user()` blocks, `user_begin()`); what follows until RoleEnd is its content."""

    role: str


@dataclass
class RoleEnd(Concatenable):
    role: str


@dataclass
class VarScope:
    """`s.var_scope(name)`: the text added between begin and end becomes variable `name`."""

    name: str
    begin: bool


Expr = Union[str, Gen, Select, Role, Concat, RoleBegin, RoleEnd, VarScope]


def gen(name: Optional[str] = None, max_tokens: int = 128, stop=None, temperature: float = 1.0, *,
        regex: Optional[str] = None, json_schema=None, grammar: Optional[str] = None,
        choices: Optional[list[str]] = None, choices_method=None, dtype=None, lora: Optional[str] = None,
        **sampling) -> Union[Gen, Select]:
    """Generate into `name`. Sampling keywords as in SamplingParams (top_p, top_k, seed, min_tokens, ...) and
    SGLang's return_logprob options; constrain the output with `regex`, `json_schema` (dict, JSON text or
    pydantic model), `grammar` (EBNF) or `dtype` (int, float, str or bool, or their names: SGLang's regexes);
    `lora` names the LoRA adapter that generates it. With `choices`, this is `select` (as in SGLang)."""
    if choices is not None:
        return select(name, choices, choices_method=choices_method)
    logprobs = {k: sampling.pop(k) for k in LOGPROB_KEYS if k in sampling}
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"gen() got unknown sampling parameters {sorted(unknown)}; known: "
                        f"{SAMPLING_KEYS + LOGPROB_KEYS}")
    if dtype is not None:
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(dtype, dtype)
        if kind not in DTYPE_REGEX:
            raise ValueError(f"gen() dtype must be int, float, str or bool, got {dtype!r}")
        regex, extra_stop = DTYPE_REGEX[kind]
        stop = ([stop] if isinstance(stop, str) else list(stop or ())) + extra_stop or None
    constraint = {k: v for k, v in (("regex", regex), ("json_schema", json_schema), ("grammar", grammar))
                  if v is not None}
    if len(constraint) > 1:
        raise ValueError(f"gen() takes at most one of regex, json_schema, grammar and dtype; got {sorted(constraint)}")
    if isinstance(constraint.get("json_schema"), type):
        constraint["json_schema"] = constraint["json_schema"].model_json_schema()  # a pydantic model
    return Gen(name, dict(sampling, max_tokens=max_tokens, stop=stop, temperature=temperature), constraint, lora,
               logprobs)


def gen_int(name: Optional[str] = None, **kwargs) -> Gen:
    """An integer (SGLang's gen_int): gen(name, dtype=int)."""
    return gen(name, dtype=int, **kwargs)


def gen_string(name: Optional[str] = None, **kwargs) -> Gen:
    """A double-quoted string of word characters and spaces (SGLang's gen_string): gen(name, dtype=str)."""
    return gen(name, dtype=str, **kwargs)


def select(name: Optional[str] = None, choices: Optional[list[str]] = None, temperature: float = 0.0,
           choices_method=None) -> Select:
    """Pick one of `choices` given the text so far, scored by `choices_method` (kestrel.lang.choices:
    token_length_normalized, the default, greedy_token_selection or unconditional_likelihood_normalized)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select() needs a non-empty list of non-empty strings as choices")
    if temperature > 1e-5:
        raise ValueError("select() picks the most likely choice; sampling among choices (temperature > 0) is "
                         "gen(..., choices=...) with a regex, not select")
    return Select(name, list(choices), choices_method)


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


def _marker(cls, role: str):
    def make():
        return cls(role)
    make.__name__ = f"{role}_{'begin' if cls is RoleBegin else 'end'}"
    make.__doc__ = f"{'Opens' if cls is RoleBegin else 'Closes'} a {role} message (SGLang's {make.__name__})."
    return make


system_begin, system_end = _marker(RoleBegin, "system"), _marker(RoleEnd, "system")
user_begin, user_end = _marker(RoleBegin, "user"), _marker(RoleEnd, "user")
assistant_begin, assistant_end = _marker(RoleBegin, "assistant"), _marker(RoleEnd, "assistant")

"""Per-request sampling settings, validated at the edge (vLLM's names and defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily
MAX_N = 128
MAX_LOGPROBS = 20
MAX_STOP = 64  # stop strings per request
MAX_STOP_LEN = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_CHOICES = 1024
MAX_REPETITION_PENALTY = 10.0
_UNSET = object()


@dataclass
class SamplingParams:
    max_tokens: int = 16  # 0: prefill only (cache the prompt, score it with prompt_logprobs; sample nothing)
    min_tokens: int = 0  # EOS and stop_token_ids cannot end the output before this many tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: Optional[int] = None  # number of top alternatives per token (0 = only the sampled token's)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # accepted for SGLang/vLLM; fast tokenizers (all Kestrel loads) ignore it
    prompt_logprobs: Optional[int] = None  # logprobs of the prompt's own tokens (top alternatives per token)
    logprob_start_len: int = 0  # prompt logprobs from this position on (e.g. where a continuation starts)
    # constrained decoding (at most one): the output matches a regex, a JSON schema (dict, JSON text or a
    # pydantic model class), an EBNF grammar (llama.cpp GBNF or Lark), one of `choices`, or any JSON object
    regex: Optional[str] = None
    json_schema: Optional[Union[str, dict[str, Any], type]] = None
    grammar: Optional[str] = None
    choices: Optional[list[str]] = None
    json_object: bool = False
    jump_forward: bool = True  # append tokens the grammar forces without a forward step each

    def __post_init__(self) -> None:
        # normalise only well-typed values; `validate` names whatever is wrong
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.json_schema, type) and hasattr(self.json_schema, "model_json_schema"):
            self.json_schema = self.json_schema.model_json_schema()  # a pydantic model

    @property
    def constrained(self) -> bool:
        return any(v is not None for v in (self.regex, self.json_schema, self.grammar, self.choices)) or self.json_object

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Check every field's type and range; raise InvalidParameter (a ValueError) naming the first bad one."""
        for name, kind, low, high in _RANGES:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not _is(value, kind):
                raise InvalidParameter(name, f"must be {'an integer' if kind is int else 'a finite number'}", value)
            if not (low <= value <= high):
                raise InvalidParameter(name, f"must be in [{low}, {high}]", value)
        if self.top_p <= 0.0:
            raise InvalidParameter("top_p", "must be in (0, 1]", self.top_p)
        if self.repetition_penalty <= 0.0:
            raise InvalidParameter("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY}]",
                                   self.repetition_penalty)
        if self.max_tokens == 0 and self.n > 1:
            raise InvalidParameter("n", "must be 1 when max_tokens is 0 (prefill only: nothing is sampled)", self.n)
        if self.min_tokens and self.constrained:  # a grammar ends the output when it completes, whatever its length
            raise InvalidParameter("min_tokens", "cannot be combined with an output constraint (regex, json_schema, "
                                                 "grammar, choices)", self.min_tokens)
        if self.min_tokens > self.max_tokens:
            raise InvalidParameter("min_tokens", f"must be at most max_tokens ({self.max_tokens})", self.min_tokens)
        for name in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "json_object",
                     "jump_forward"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(name, "must be true or false", getattr(self, name))
        if not isinstance(self.stop, list) or len(self.stop) > MAX_STOP or any(
                not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_LEN for s in self.stop):
            raise InvalidParameter("stop", f"must be a string or a list of at most {MAX_STOP} non-empty strings of at "
                                           f"most {MAX_STOP_LEN} characters", self.stop)
        top = vocab_size if vocab_size is not None else 2**63
        if not isinstance(self.stop_token_ids, list) or len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(
                not _is(t, int) or not 0 <= t < top for t in self.stop_token_ids):
            raise InvalidParameter("stop_token_ids", f"must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in "
                                                     f"[0, {top})", self.stop_token_ids)
        given = [n for n in ("regex", "json_schema", "grammar", "choices") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) > 1:
            raise InvalidParameter(given[0], f"give at most one output constraint, got {', '.join(given)}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidParameter(name, "must be a non-empty string", value)
        if self.json_schema is not None and not isinstance(self.json_schema, (str, dict)):
            raise InvalidParameter("json_schema", "must be a dict, a JSON string or a pydantic model class",
                                   self.json_schema)
        if self.choices is not None and (not isinstance(self.choices, (list, tuple)) or not self.choices
                                         or len(self.choices) > MAX_CHOICES
                                         or any(not isinstance(c, str) or not c for c in self.choices)):
            raise InvalidParameter("choices", f"must be a list of 1 to {MAX_CHOICES} non-empty strings", self.choices)

    @property
    def greedy(self) -> bool:
        """Temperatures this small are greedy (as in vLLM): dividing logits by them overflows float32."""
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether repetition, frequency or presence penalties change the logits."""
        return self.repetition_penalty != 1.0 or bool(self.frequency_penalty) or bool(self.presence_penalty)

    @property
    def plain_argmax(self) -> bool:
        """Whether the sampler's pick is the argmax of the raw logits (greedy, nothing reshapes them)."""
        return self.greedy and not self.penalized and not self.min_tokens and self.logprobs is None


class InvalidParameter(ValueError):
    """A request parameter with a wrong type or value; `param` names it (the API's error `param`)."""

    def __init__(self, param: str, why: str, value: Any = _UNSET):
        shown = "" if value is _UNSET else f", got {_short(value)}"
        super().__init__(f"{param} {why}{shown}")
        self.param = param


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is(value: Any, kind: type) -> bool:
    """int for integer fields; int or float for numbers; never bool (True is an int in Python)."""
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and math.isfinite(value)


_OPTIONAL = {"seed", "logprobs", "prompt_logprobs"}
# (field, int or float, lowest, highest); top_p and repetition_penalty also exclude 0 (checked after)
_RANGES = [
    ("max_tokens", int, 0, 2**31 - 1),
    ("min_tokens", int, 0, 2**31 - 1),
    ("temperature", float, 0.0, 100.0),
    ("top_p", float, 0.0, 1.0),
    ("top_k", int, -1, 2**31 - 1),
    ("min_p", float, 0.0, 1.0),
    ("repetition_penalty", float, 0.0, MAX_REPETITION_PENALTY),
    ("frequency_penalty", float, -2.0, 2.0),
    ("presence_penalty", float, -2.0, 2.0),
    ("seed", int, -(2**63), 2**64 - 1),
    ("n", int, 1, MAX_N),
    ("logprobs", int, 0, MAX_LOGPROBS),
    ("prompt_logprobs", int, 0, MAX_LOGPROBS),
    ("logprob_start_len", int, 0, 2**31 - 1),
]

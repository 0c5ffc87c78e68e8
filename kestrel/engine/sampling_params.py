"""Per-request sampling settings, validated at the edge (vLLM's names and defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class SamplingParams:
    max_tokens: int = 16
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
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.json_schema, type) and hasattr(self.json_schema, "model_json_schema"):
            self.json_schema = self.json_schema.model_json_schema()  # a pydantic model

    @property
    def constrained(self) -> bool:
        return any(v is not None for v in (self.regex, self.json_schema, self.grammar, self.choices)) or self.json_object

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Raise ValueError naming the offending parameter."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not 0.0 <= self.temperature <= 100.0:
            bad("temperature", "must be in [0, 100]")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", "must be -1 (disabled), 0 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "must be > 0")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "must be in [-2, 2]")
        if not isinstance(self.n, int) or not 1 <= self.n <= 128:
            bad("n", "must be an integer in [1, 128]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", "must be an integer in [0, 20]")
        if self.prompt_logprobs is not None and (not isinstance(self.prompt_logprobs, int)
                                                 or not 0 <= self.prompt_logprobs <= 20):
            bad("prompt_logprobs", "must be an integer in [0, 20]")
        if not isinstance(self.logprob_start_len, int) or self.logprob_start_len < 0:
            bad("logprob_start_len", "must be an integer >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "must be an integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            bad("stop_token_ids", f"must be token ids in [0, {vocab_size})")
        given = [n for n in ("regex", "json_schema", "grammar", "choices") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint, got {', '.join(given)}")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and (not isinstance(getattr(self, name), str) or not getattr(self, name)):
                bad(name, "must be a non-empty string")
        if self.json_schema is not None and not isinstance(self.json_schema, (str, dict)):
            bad("json_schema", "must be a dict, a JSON string or a pydantic model class")
        if self.choices is not None and (not isinstance(self.choices, (list, tuple)) or not self.choices
                                         or any(not isinstance(c, str) or not c for c in self.choices)):
            bad("choices", "must be a non-empty list of non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

"""Request state owned by the scheduler, and the outputs handed to users."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from kestrel.engine.clients import ANONYMOUS
from kestrel.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # top alternatives: token id -> logprob


@dataclass(eq=False)  # identity: the scheduler's lists hold distinct sequences
class Sequence:
    """One generated sequence (a request with n > 1 has n of them, siblings sharing the prompt)."""

    request_id: str
    index: int  # position among the request's n sequences
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    client: str = ANONYMOUS  # who sent it (fair scheduling, per-client metrics)
    priority: int = 0  # lower is served first by the priority and vtc policies
    lora: object = None  # the kestrel.lora.manager.Adapter it runs with; None: the base model
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    # KV state: the first `num_computed` tokens of prompt+output have K/V in the pool.
    num_computed: int = 0
    num_slots: int = 0  # slots written in its table row (num_computed, plus the current step's while it runs)
    row: Optional[int] = None  # row in the req-to-token table while running
    prefix_node: object = None  # locked radix node ending the cached prefix
    prefix_len: int = 0  # tokens from the tree (owned by it); the rest up to num_computed we own
    cached_tokens: int = 0  # prompt tokens served from the cache at first admission
    admitted_once: bool = False
    waits_for_leader: bool = False  # an n > 1 sibling waits until seq 0 has prefilled the prompt
    generator: Optional[torch.Generator] = None
    grammar: object = None  # GrammarState when the output is constrained
    forced_tokens: int = 0  # output tokens appended by jump-forward (no forward step of their own)
    lookahead: object = None  # kestrel.engine.lookahead.LookaheadState when it decodes with lookahead
    pause: object = None  # text -> tool names it calls, or None: its conversation pauses for them (pauses.py)
    resumes: object = None  # the kestrel.engine.pauses.Paused conversation it continues, until admitted
    spec_steps: int = 0  # decode steps that verified a lookahead draft
    spec_tokens: int = 0  # output tokens those steps produced (accepted draft tokens + one each)
    spec_proposed: int = 0  # candidate tokens those steps verified
    # output state
    text: str = ""
    text_mark: int = 0  # len(text) before the last token was appended
    finish_reason: Optional[str] = None  # stop | length | abort | error
    stop_reason: Optional[Union[int, str]] = None  # what stopped it: the stop token's id or the stop string
    error: Optional[str] = None  # what went wrong, when finish_reason is "error"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: dict[int, TokenLogprob] = field(default_factory=dict)  # prompt position -> logprob
    first_admit_time: Optional[float] = None
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    detok: object = None  # incremental detokenizer
    num_preemptions: int = 0
    prompt_charged: int = 0  # prompt tokens and output tokens already charged to the client's service
    outputs_charged: int = 0
    sent: tuple[int, int] = (0, 0)  # (visible text chars, output tokens) already handed out as deltas
    sent_final: bool = False

    @property
    def draft(self):
        """This step's lookahead draft (between scheduling and commit), else None."""
        return self.lookahead.draft if self.lookahead is not None else None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def total_len(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def samples_after(self, end: int) -> bool:
        """Whether a step that computes up to position `end` samples a token for this sequence: it reaches the
        end of what is known, and the request wants tokens (max_tokens 0 is prefill only)."""
        return end == self.total_len and self.params.max_tokens > 0

    @property
    def namespace(self) -> int:
        """Its radix-cache namespace: K/V is only shared between sequences of the same adapter."""
        return self.lora.id if self.lora is not None else 0

    @property
    def pending(self) -> int:
        """Tokens whose K/V still need computing (the last sampled token counts)."""
        return self.total_len - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prompt_logprob_start(self) -> int:
        """First prompt position whose logprob is wanted (position 0 has none)."""
        return max(1, self.params.logprob_start_len)

    def prompt_logprob_list(self) -> Optional[list[Optional[TokenLogprob]]]:
        if self.params.prompt_logprobs is None:
            return None
        return [self.prompt_logprobs.get(i) for i in range(len(self.prompt_ids))]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]
    logprobs: Optional[list[TokenLogprob]] = None
    error: Optional[str] = None  # set when finish_reason is "error": the engine failed on this request
    stop_reason: Optional[Union[int, str]] = None  # the stop token id or stop string that ended it (vLLM's)

    @property
    def output_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestOutput:
    """What `Engine.generate` returns per prompt; the first completion's fields are mirrored on it."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    cached_tokens: int
    finished: bool
    time_to_first_token: Optional[float] = None  # seconds from arrival
    latency: Optional[float] = None
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None  # per prompt token (None where not computed)
    queue_time: Optional[float] = None  # seconds from arrival to first admission
    forced_tokens: int = 0  # output tokens that constrained decoding's jump-forward appended
    spec_steps: int = 0  # lookahead decoding: decode steps that verified a draft (all completions)
    spec_tokens: int = 0  # output tokens those steps gave (one each, plus the accepted draft tokens)
    spec_proposed: int = 0  # draft candidate tokens those steps verified

    @property
    def accepted_draft_tokens(self) -> int:
        return self.spec_tokens - self.spec_steps

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> Optional[str]:
        return self.outputs[0].finish_reason

    @property
    def error(self) -> Optional[str]:
        """Why the engine failed this request (finish_reason "error"), else None."""
        return next((o.error for o in self.outputs if o.error), None)

    @property
    def logprobs(self):
        return self.outputs[0].logprobs

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


def sglang_finish_reason(reason: Optional[str], stop_reason, token_ids: list[int]) -> Optional[dict]:
    """A completion's finish_reason as SGLang's API and language report it: {"type": "stop", "matched": the stop
    string or token (EOS included)}, {"type": "length", "length": tokens} or {"type": "abort", "message"}."""
    if reason is None:
        return None
    if reason == "stop":
        matched = stop_reason if stop_reason is not None else (token_ids[-1] if token_ids else None)
        return {"type": "stop", "matched": matched}
    if reason == "length":
        return {"type": "length", "length": len(token_ids)}
    return {"type": "abort", "message": "aborted" if reason == "abort" else reason}

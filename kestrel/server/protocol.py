"""OpenAI request bodies (as the `openai` client sends them) and their mapping to SamplingParams."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from kestrel.engine.sampling_params import SamplingParams


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 503: "service_unavailable"}.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's calls, sent back in the history
    tool_call_id: Optional[str] = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Parameters shared by chat and completions (OpenAI's plus vLLM's extras)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)  # vLLM's extra: lower is served first (--policy priority,
    # or within a client under vtc)
    response_format: Optional[dict[str, Any]] = None
    # vLLM's structured-output extras
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list[str]] = None
    guided_grammar: Optional[str] = None

    def constraint(self) -> dict[str, Any]:
        """The output constraint as SamplingParams fields (OpenAI's response_format or vLLM's guided_*)."""
        given = {k: v for k, v in (("json_schema", self.guided_json), ("regex", self.guided_regex),
                                   ("choices", self.guided_choice), ("grammar", self.guided_grammar)) if v is not None}
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                given["json_object"] = True
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                    raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                                   "response_format")
                given["json_schema"] = spec["schema"]
            elif kind not in (None, "text"):
                raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                               "response_format")
        if len(given) > 1:
            raise APIError(400, f"give one output constraint, got {sorted(given)}", "response_format")
        return given

    def sampling_params(self, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        opt = lambda v, d: d if v is None else v  # noqa: E731
        params = SamplingParams(
            max_tokens=max_tokens, temperature=opt(self.temperature, 1.0), top_p=opt(self.top_p, 1.0),
            top_k=opt(self.top_k, -1), min_p=opt(self.min_p, 0.0), repetition_penalty=opt(self.repetition_penalty, 1.0),
            frequency_penalty=opt(self.frequency_penalty, 0.0), presence_penalty=opt(self.presence_penalty, 0.0),
            seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
            n=self.n, logprobs=logprobs, **self.constraint())
        return params


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[Any]] = None  # OpenAI's [{"type": "function", "function": {name, description, parameters}}]
    tool_choice: Union[str, dict[str, Any], None] = None  # none | auto (the default with tools) | required | named
    parallel_tool_calls: Optional[bool] = None  # several calls in one reply (default: yes)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16
    echo: bool = False
    logprobs: Optional[int] = None


class GenerateRequest(BaseModel):
    """SGLang's native /generate request: one prompt or a batch (a list of texts or of input_ids lists); the
    other fields are one value for the batch or a list with one per prompt."""

    model_config = ConfigDict(extra="ignore")

    text: Optional[Union[str, list[str]]] = None
    input_ids: Optional[Union[list[int], list[list[int]]]] = None
    sampling_params: Union[dict[str, Any], list[dict[str, Any]]] = Field(default_factory=dict)
    stream: bool = False
    return_logprob: Union[bool, list[bool]] = False  # logprobs of the output, and of the prompt from logprob_start_len
    logprob_start_len: Union[int, list[int]] = -1  # -1: no prompt logprobs (SGLang's default)
    top_logprobs_num: Union[int, list[int]] = 0
    return_text_in_logprobs: bool = False  # each logprob entry's third item: the token's text (else None)
    rid: Optional[Union[str, list[str]]] = None  # the request id (abortable by it; a batch's get -0, -1, ...)
    image_data: Optional[Any] = None  # refused: Kestrel serves text models
    user: Optional[str] = None  # the client, for fair scheduling (as in the OpenAI APIs)
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    lora_path: Optional[str] = None  # SGLang's name for the LoRA adapter (its name, as loaded)


class LoadLoraRequest(BaseModel):
    """vLLM's /v1/load_lora_adapter body."""

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_int_id: Optional[int] = None  # vLLM clients may send it; names identify adapters here


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # with messages: end ready for the assistant's turn (vLLM's default)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


class AbortRequest(BaseModel):
    request_id: Optional[str] = None
    rid: Optional[str] = None  # SGLang's name for it

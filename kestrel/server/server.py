"""What every route shares: validation, admission, the flight of one request through the engine, formatting."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Union

from kestrel.engine.sampling_params import InvalidParameter, SamplingParams
from kestrel.model.loader import chat_template_ids
from kestrel.server.engine_process import EngineClient, EngineDead
from kestrel.server.metrics import Metrics
from kestrel.server.protocol import APIError


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None

    def add(self, delta) -> None:
        """Take in one of the engine's deltas for this completion."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.finish_reason = delta.finish_reason or self.finish_reason
        self.stop_reason = delta.stop_reason if delta.stop_reason is not None else self.stop_reason


def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj)}\n\n"


@dataclass(frozen=True)
class Origin:
    """Who sent a request (fair scheduling, per-client metrics) and how urgent it is."""

    client: Optional[str] = None  # None: the anonymous client
    priority: int = 0


@dataclass
class Result:
    choices: list[Choice]
    prompt_tokens: int
    cached_tokens: int = 0
    prompt_logprobs: Optional[list] = None
    spec: tuple[int, int, int] = (0, 0, 0)  # lookahead: steps with a draft, tokens they gave, tokens drafted
    spec_by_index: dict = field(default_factory=dict)  # the same per completion


class Flight:
    """One request in the engine, from admission to its last delta. `close()` (idempotent) gives back its
    place in the queue limit and aborts it in the engine if it has not finished."""

    def __init__(self, server: "Server", rid: str, ids: list[int], params: SamplingParams, origin: Origin,
                 lora: Optional[str] = None, pause=None):
        self.server, self.rid, self.ids, self.params, self.lora = server, rid, ids, params, lora
        self.start = time.monotonic()
        self.first: Optional[float] = None
        self.done: set[int] = set()
        self.out_tokens, self.cached, self.reason, self.queue_time = 0, 0, None, None
        self.spec_by_index: dict[int, tuple[int, int, int]] = {}
        self._closed = False
        self.response_id = rid
        self._queue = server.client.submit(rid, ids, params, origin.client, origin.priority, lora, pause)

    @property
    def finished(self) -> bool:
        return len(self.done) == self.params.n

    @property
    def spec(self) -> tuple[int, int, int]:
        """Lookahead counts summed over the request's completions."""
        return tuple(sum(v[i] for v in self.spec_by_index.values()) for i in range(3))

    async def deltas(self) -> AsyncIterator:
        """StreamDelta objects until all n completions have finished; engine trouble raises APIError."""
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, EngineDead):
                raise APIError(503, f"engine unavailable: {item}", kind="service_unavailable",
                               headers={"Retry-After": "5"})
            if isinstance(item, Exception):
                raise APIError(400, str(item), getattr(item, "param", None))
            if item.error:
                raise APIError(500, item.error, kind="server_error")
            if self.first is None and item.token_ids:
                self.first = time.monotonic() - self.start
            self.out_tokens += len(item.token_ids)
            self.cached = item.cached_tokens
            self.spec_by_index[item.index] = item.spec
            if item.finished:
                self.done.add(item.index)
                self.reason = item.finish_reason
                self.queue_time = item.queue_time if item.queue_time is not None else self.queue_time
            yield item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        s = self.server
        s.inflight -= 1
        s.client.release(self.rid, abort=not self.finished)
        s.untrack(self)
        if self.finished:
            s.metrics.on_request_done(len(self.ids), self.cached, self.out_tokens, self.first,
                                      time.monotonic() - self.start, self.reason, self.queue_time, self.lora)


class Server:
    def __init__(self, client: EngineClient, served_model_name: str, api_key: Optional[str], max_queued: int,
                 max_client_labels: int = 32):
        from kestrel.model.loader import load_tokenizer

        self.client = client
        self.tokenizer = load_tokenizer(client.info["model_dir"])
        # no token spells more characters than this, so a longer text cannot fit the context
        self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab()) + 1
        self.model_name = served_model_name
        self.api_key = api_key
        self.max_inflight = max_queued
        self.inflight = 0
        self.metrics = Metrics(max_client_labels)
        self.metrics.engine_restarts.set_function(lambda: client.restarts)
        client.add_listener(lambda deltas, load: self.metrics.on_engine_load(load))
        self.created = int(time.time())
        self._groups: dict[str, list[str]] = {}  # response id -> engine request ids (for /abort)

    # ---- validation ---------------------------------------------------------------------
    def resolve_model(self, model: Optional[str], param: str = "model") -> Optional[str]:
        """The LoRA adapter a request's model names (None: the base model), or a 404 in OpenAI's shape."""
        if model in (self.model_name, "default", None):
            return None
        if model in self.client.loras:
            return model
        served = ", ".join(repr(m) for m in [self.model_name, *sorted(self.client.loras)])
        raise APIError(404, f"The model `{model}` does not exist; this server serves {served}", param,
                       kind="invalid_request_error", code="model_not_found")

    @property
    def context_limit(self) -> int:
        return min(self.client.info["context_length"], self.client.info["max_total_tokens"])

    def check_text_size(self, chars: int, param: str) -> None:
        """Reject text that cannot fit the context before spending time tokenizing it."""
        if chars > self.context_limit * self.max_token_chars:
            raise APIError(400, f"the prompt ({chars} characters) is longer than this model's context of "
                                f"{self.context_limit} tokens can hold", param, code="context_length_exceeded")

    def prompt_ids(self, prompt, param: str) -> list[int]:
        if isinstance(prompt, str):
            self.check_text_size(len(prompt), param)
            ids = self.tokenizer(prompt).input_ids
        else:
            ids = list(prompt)
            vocab = self.client.info["vocab_size"]
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param)
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        return ids

    @property
    def template_renders_tools(self) -> bool:
        """Whether the model's chat template has a tools section (else tools go into the system message)."""
        return "tools" in (self.tokenizer.chat_template or "")

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True,
                 tools: Optional[list[dict]] = None) -> list[int]:
        from jinja2 import TemplateError

        if not messages:
            raise APIError(400, "messages must hold at least one message", "messages")
        self.check_text_size(sum(len(m["content"]) for m in messages), "messages")
        try:
            return chat_template_ids(self.tokenizer, messages, add_generation_prompt, tools)
        except (TemplateError, ValueError) as e:
            raise APIError(400, f"the model's chat template rejected these messages: {e}", "messages") from None

    def limits(self, n_prompt: int, max_tokens: Optional[int], param: str, least: int = 1) -> int:
        """The max_tokens to use, or a 400 when the request cannot fit the context or the KV pool. `least`: 0 where
        a prefill-only request is allowed (SGLang's max_new_tokens 0); OpenAI's routes need a token."""
        limit = self.context_limit
        if max_tokens is None:
            max_tokens = limit - n_prompt
            if max_tokens < 1:
                raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context length is {limit}", param,
                               code="context_length_exceeded")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < least:
            raise APIError(400, f"max_tokens must be an integer >= {least}, got {max_tokens!r}", "max_tokens")
        if n_prompt + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the request has {n_prompt} "
                                f"prompt tokens and asks for {max_tokens} more", "max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def validate(self, params: SamplingParams) -> None:
        try:
            params.validate(self.client.info["vocab_size"])
        except InvalidParameter as e:
            raise APIError(400, str(e), e.param) from None

    def origin(self, body, client_header: Optional[str]) -> Origin:
        """The client is the OpenAI `user` field, else the X-Kestrel-Client header, else anonymous."""
        client = getattr(body, "user", None) or client_header or None
        if client is not None and len(client) > 256:
            raise APIError(400, "the client name (user, X-Kestrel-Client) must be at most 256 characters", "user")
        priority = getattr(body, "priority", 0) or 0
        if priority and self.client.info["policy"] not in ("priority", "vtc"):
            raise APIError(400, f"priority needs a server started with --policy priority or vtc; this one uses "
                                f"{self.client.info['policy']!r}", "priority")
        return Origin(client, priority)

    # ---- flights ------------------------------------------------------------------------
    def admit(self) -> None:
        """503 now, before any response body, if the engine is down or the queue is full."""
        if not self.client.alive:
            raise APIError(503, f"engine unavailable ({self.client.status()}): "
                                f"{self.client.failure or 'the engine process exited'}",
                           kind="service_unavailable", headers={"Retry-After": "5"})
        if self.inflight >= self.max_inflight:
            raise APIError(503, "the server is over its queue limit; retry shortly", kind="service_unavailable",
                           headers={"Retry-After": "1"})

    def open(self, ids: list[int], params: SamplingParams, rid: str, origin: Origin = Origin(),
             response_id: Optional[str] = None, lora: Optional[str] = None, pause=None) -> Flight:
        """Admit and submit a request. `rid` is the engine's id; `response_id` the one the client sees
        (POST /abort names it), shared by the prompts of one completions request; `lora` the adapter; `pause`
        the hook that names the tools a reply calls (Engine.add_request)."""
        self.admit()
        try:
            flight = Flight(self, rid, ids, params, origin, lora, pause)
        except EngineDead as e:
            raise APIError(503, f"engine unavailable: {e}", kind="service_unavailable",
                           headers={"Retry-After": "5"}) from None
        self.inflight += 1
        flight.response_id = response_id or rid
        self._groups.setdefault(flight.response_id, []).append(rid)
        return flight

    def open_all(self, requests: list[tuple[list[int], SamplingParams, str, Optional[str]]], origin: Origin,
                 lora: Optional[str] = None) -> list[Flight]:
        """Open one flight per (ids, params, rid, response_id), all or none: a 503 up front if the queue limit
        cannot take them all, and the ones opened are closed if a later one fails."""
        if len(requests) > self.max_inflight - self.inflight:
            self.admit()  # 503 if the engine is down; else the queue limit cannot take them all
            raise APIError(503, "the server is over its queue limit; retry shortly", kind="service_unavailable",
                           headers={"Retry-After": "1"})
        flights: list[Flight] = []
        try:
            for ids, params, rid, response_id in requests:
                flights.append(self.open(ids, params, rid, origin, response_id=response_id, lora=lora))
        except APIError:
            for f in flights:
                f.close()
            raise
        return flights

    def untrack(self, flight: Flight) -> None:
        group = self._groups.get(flight.response_id, [])
        if flight.rid in group:
            group.remove(flight.rid)
        if not group:
            self._groups.pop(flight.response_id, None)

    def abort(self, response_id: str) -> bool:
        rids = self._groups.get(response_id)
        for rid in list(rids or ()):
            self.client.abort(rid)
        return bool(rids)

    async def collect(self, flight: Flight) -> Result:
        result = Result([Choice() for _ in range(flight.params.n)], len(flight.ids))
        try:
            async for d in flight.deltas():
                result.choices[d.index].add(d)
                result.cached_tokens = d.cached_tokens
                if d.prompt_logprobs is not None:
                    result.prompt_logprobs = d.prompt_logprobs
            result.spec, result.spec_by_index = flight.spec, dict(flight.spec_by_index)
        finally:
            flight.close()
        return result

    # ---- formatting ---------------------------------------------------------------------
    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int, spec=(0, 0, 0)) -> dict:
        """OpenAI's usage object. With lookahead decoding on, OpenAI's completion_tokens_details counts draft
        tokens accepted and rejected (as for its Predicted Outputs), and the `lookahead` extension how many
        steps verified a draft and the output tokens each gave on average."""
        out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
        if self.client.info.get("speculative"):
            steps, tokens, proposed = spec
            accepted = tokens - steps
            out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                                "rejected_prediction_tokens": proposed - accepted}
            out["lookahead"] = {"steps": steps,
                                "accepted_tokens_per_step": round(tokens / steps, 3) if steps else None}
        return out

    def chat_logprobs(self, lps: list) -> dict:
        def entry(tid, lp):
            tok = self.tokenizer.decode([tid])
            return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
        return {"content": [dict(entry(x.token_id, x.logprob),
                                 top_logprobs=[entry(t, v) for t, v in x.top.items()]) for x in lps]}

    def completion_logprobs(self, lps: list) -> dict:
        tokens = [self.tokenizer.decode([x.token_id]) for x in lps]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{self.tokenizer.decode([t]): v for t, v in x.top.items()} for x in lps],
                "text_offset": offsets}

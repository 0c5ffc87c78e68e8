"""The OpenAI-compatible API process: validation, tokenization, chat templates, SSE streaming."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kestrel.engine.sampling_params import SamplingParams
from kestrel.model.loader import chat_template_ids
from kestrel.server.engine_process import EngineClient, EngineDead
from kestrel.server.metrics import Metrics
from kestrel.server.protocol import (AbortRequest, APIError, ChatCompletionRequest, CompletionRequest,
                                     DetokenizeRequest, GenerateRequest, TokenizeRequest)

MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: Optional[str] = None


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


class Server:
    def __init__(self, client: EngineClient, served_model_name: str, api_key: Optional[str], max_queued: int,
                 max_client_labels: int = 32):
        from kestrel.model.loader import load_tokenizer

        self.client = client
        self.tokenizer = load_tokenizer(client.info["model_dir"])
        self.model_name = served_model_name
        self.api_key = api_key
        self.max_inflight = max_queued
        self.inflight = 0
        self.metrics = Metrics(max_client_labels)
        client.add_listener(lambda deltas, load: self.metrics.on_engine_load(load))
        self.created = int(time.time())

    # ---- shared steps -------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model not in (self.model_name, "default"):
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", code="model_not_found")

    def prompt_ids(self, prompt, param: str) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt).input_ids
        else:
            ids = list(prompt)
            vocab = self.client.info["vocab_size"]
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"token ids must be in [0, {vocab})", param)
        if not ids:
            raise APIError(400, "the prompt is empty", param)
        return ids

    def limits(self, n_prompt: int, max_tokens: Optional[int], param: str) -> int:
        """The max_tokens to use, or a 400 when the request cannot fit the context or the KV pool."""
        limit = min(self.client.info["context_length"], self.client.info["max_total_tokens"])
        if max_tokens is None:
            max_tokens = limit - n_prompt
            if max_tokens < 1:
                raise APIError(400, f"the prompt has {n_prompt} tokens; this model's context length is {limit}", param)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise APIError(400, f"max_tokens must be an integer >= 1, got {max_tokens}", "max_tokens")
        if n_prompt + max_tokens > limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens; the request has {n_prompt} "
                                f"prompt tokens and asks for {max_tokens} more", "max_tokens",
                           code="context_length_exceeded")
        return max_tokens

    def validate(self, params: SamplingParams) -> None:
        try:
            params.validate(self.client.info["vocab_size"])
        except ValueError as e:
            raise APIError(400, str(e), str(e).split(" ")[0]) from None

    def admit(self) -> None:
        if not self.client.alive:
            raise APIError(503, f"engine unavailable: {self.client.failure or 'the engine process exited'}",
                           kind="service_unavailable")
        if self.inflight >= self.max_inflight:
            raise APIError(503, "the server is over its queue limit; retry shortly", kind="service_unavailable",
                           headers={"Retry-After": "1"})

    def origin(self, body, request: Request) -> Origin:
        """The client is the OpenAI `user` field, else the X-Kestrel-Client header, else anonymous."""
        client = getattr(body, "user", None) or request.headers.get("x-kestrel-client") or None
        priority = getattr(body, "priority", 0) or 0
        if priority and self.client.info["policy"] not in ("priority", "vtc"):
            raise APIError(400, f"priority needs a server started with --policy priority or vtc; this one uses "
                                f"{self.client.info['policy']!r}", "priority")
        return Origin(client, priority)

    async def run(self, ids: list[int], params: SamplingParams, rid: str, origin: Origin = Origin()) -> AsyncIterator:
        """Submit to the engine; yields StreamDelta objects until all n completions have finished.
        `rid` is the response id the client sees, so POST /abort can name it."""
        self.admit()
        self.inflight += 1
        start = time.monotonic()
        first: Optional[float] = None
        done: set[int] = set()
        out_tokens = 0
        cached, reason, queue_time = 0, None, None
        q = self.client.submit(rid, ids, params, origin.client, origin.priority)
        try:
            while len(done) < params.n:
                item = await q.get()
                if isinstance(item, EngineDead):
                    raise APIError(503, f"engine unavailable: {item}", kind="service_unavailable")
                if isinstance(item, Exception):
                    raise APIError(400, str(item), str(item).split(" ")[0])
                if first is None and item.token_ids:
                    first = time.monotonic() - start
                out_tokens += len(item.token_ids)
                cached = item.cached_tokens
                if item.finished:
                    done.add(item.index)
                    reason = item.finish_reason
                    queue_time = item.queue_time if item.queue_time is not None else queue_time
                yield rid, item
        finally:
            self.inflight -= 1
            self.client.release(rid, abort=len(done) < params.n)
            if len(done) == params.n:
                self.metrics.on_request_done(len(ids), cached, out_tokens, first, time.monotonic() - start, reason,
                                             queue_time)

    async def collect(self, ids: list[int], params: SamplingParams, rid: str, origin: Origin = Origin()) -> Result:
        result = Result([Choice() for _ in range(params.n)], len(ids))
        async for _, d in self.run(ids, params, rid, origin):
            c = result.choices[d.index]
            c.text += d.text
            c.token_ids += d.token_ids
            c.logprobs += d.logprobs
            c.finish_reason = d.finish_reason or c.finish_reason
            result.cached_tokens = d.cached_tokens
            if d.prompt_logprobs is not None:
                result.prompt_logprobs = d.prompt_logprobs
        return result

    def usage(self, prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(token_id) or ""

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


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="Kestrel", version="0.1.0")

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        if err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        return JSONResponse(APIError(400, msg, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if server.api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {server.api_key}":
                return JSONResponse(APIError(401, "invalid or missing API key (Authorization: Bearer ...)").body(),
                                    status_code=401)
        if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
            # `curl -d '{...}'` sends form encoding; every body here is JSON, so read it as JSON
            request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [
                (b"content-type", b"application/json")]
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
            return JSONResponse(APIError(413, f"request body over {MAX_BODY_BYTES} bytes").body(), status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if not server.client.alive:
            return JSONResponse({"status": "engine down", "reason": server.client.failure}, status_code=503)
        return {"status": "ok", "engine_pid": server.client.process.pid}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "kestrel",
                                            "max_model_len": server.client.info["context_length"]}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        server.check_model(req.model)
        origin = server.origin(req, request)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        ids = chat_template_ids(server.tokenizer, messages)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        max_tokens = server.limits(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        server.validate(params)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": cid, "created": created, "model": server.model_name}
        if req.stream:
            return StreamingResponse(chat_stream(req, ids, params, head, origin), media_type="text/event-stream")
        r = await server.collect(ids, params, cid, origin)
        choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": server.chat_logprobs(c.logprobs) if req.logprobs else None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(r.choices)]
        n_out = sum(len(c.token_ids) for c in r.choices)
        return dict(head, object="chat.completion", choices=choices,
                    usage=server.usage(r.prompt_tokens, n_out, r.cached_tokens))

    def chat_stream(req, ids, params, head, origin) -> AsyncIterator[str]:
        def render(d):
            out = []
            if d.text or d.logprobs:
                out.append({"index": d.index, "delta": {"content": d.text}, "finish_reason": None,
                            "logprobs": server.chat_logprobs(d.logprobs) if req.logprobs else None})
            if d.finished:
                out.append({"index": d.index, "delta": {}, "logprobs": None, "finish_reason": d.finish_reason})
            return out

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(params.n)]
        return sse_stream(req, ids, params, dict(head, object="chat.completion.chunk"), opening, render, origin)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_model(req.model)
        origin = server.origin(req, request)
        prompts = req.prompt
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "the prompt is empty", "prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports a single prompt", "prompt")
        all_ids = [server.prompt_ids(p, "prompt") for p in prompts]
        jobs = []
        for ids in all_ids:
            max_tokens = server.limits(len(ids), req.max_tokens, "prompt")
            params = req.sampling_params(max_tokens, req.logprobs)
            server.validate(params)
            jobs.append((ids, params))
        created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        head = {"id": cid, "created": created, "model": server.model_name}
        if req.stream:
            return StreamingResponse(completion_stream(req, *jobs[0], head, origin), media_type="text/event-stream")
        results = await asyncio.gather(*(server.collect(ids, p, f"{cid}-{i}" if i else cid, origin)
                                         for i, (ids, p) in enumerate(jobs)))
        choices, n_prompt, n_out, cached = [], 0, 0, 0
        for ids, r in zip(all_ids, results):
            prefix = server.tokenizer.decode(ids) if req.echo else ""
            for c in r.choices:
                choices.append({"index": len(choices), "text": prefix + c.text, "finish_reason": c.finish_reason,
                                "logprobs": server.completion_logprobs(c.logprobs) if req.logprobs is not None else None})
                n_out += len(c.token_ids)
            n_prompt += r.prompt_tokens
            cached += r.cached_tokens
        return dict(head, object="text_completion", choices=choices, usage=server.usage(n_prompt, n_out, cached))

    def completion_stream(req, ids, params, head, origin) -> AsyncIterator[str]:
        def render(d):
            if not (d.text or d.finished):
                return []
            return [{"index": d.index, "text": d.text, "finish_reason": d.finish_reason,
                     "logprobs": server.completion_logprobs(d.logprobs) if req.logprobs is not None else None}]

        echo = server.tokenizer.decode(ids) if req.echo else None
        opening = [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}
                   for i in range(params.n)] if req.echo else []
        return sse_stream(req, ids, params, dict(head, object="text_completion"), opening, render, origin)

    async def sse_stream(req, ids, params, chunk: dict, opening: list, render, origin: Origin) -> AsyncIterator[str]:
        """SSE in OpenAI's shape: opening chunks, rendered deltas, optional usage, then [DONE]."""
        n_out, cached = 0, 0
        try:
            for choice in opening:
                yield sse(dict(chunk, choices=[choice]))
            async for _, d in server.run(ids, params, chunk["id"], origin):
                n_out += len(d.token_ids)
                cached = d.cached_tokens
                for choice in render(d):
                    yield sse(dict(chunk, choices=[choice]))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(dict(chunk, choices=[], usage=server.usage(len(ids), n_out, cached)))
        except APIError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "give exactly one of text or input_ids", "text")
        ids = server.prompt_ids(req.text if req.text is not None else req.input_ids,
                                "text" if req.text is not None else "input_ids")
        sp = dict(req.sampling_params)
        for sglang_name, name in (("max_new_tokens", "max_tokens"), ("ebnf", "grammar")):  # SGLang's names
            if sglang_name in sp:
                sp[name] = sp.pop(sglang_name)
        try:
            params = SamplingParams(**sp)
        except TypeError as e:
            raise APIError(400, f"sampling_params: {e}", "sampling_params") from None
        params.max_tokens = server.limits(len(ids), params.max_tokens, "text")
        if req.return_logprob:
            params.prompt_logprobs = params.logprobs = req.top_logprobs_num
            params.logprob_start_len = req.logprob_start_len
        server.validate(params)
        rid, origin = f"gen-{uuid.uuid4().hex}", server.origin(req, request)
        if req.stream:
            return StreamingResponse(generate_stream(ids, params, rid, origin), media_type="text/event-stream")
        r = await server.collect(ids, params, rid, origin)

        def pairs(lps):  # SGLang's shape: [logprob, token_id, top {token_id: logprob}]
            return [[x.logprob, x.token_id, {str(t): v for t, v in x.top.items()}] for x in lps if x is not None]

        outs = []
        for c in r.choices:
            meta = {"prompt_tokens": r.prompt_tokens, "completion_tokens": len(c.token_ids),
                    "cached_tokens": r.cached_tokens, "finish_reason": c.finish_reason}
            if req.return_logprob:
                meta["input_token_logprobs"] = pairs(r.prompt_logprobs or [])
                meta["output_token_logprobs"] = pairs(c.logprobs)
            outs.append({"text": c.text, "output_ids": c.token_ids, "meta_info": meta})
        return outs[0] if params.n == 1 else outs

    async def generate_stream(ids, params, rid, origin) -> AsyncIterator[str]:
        """SGLang's stream shape: each event carries a completion's text so far and its meta_info."""
        texts, out_ids = [""] * params.n, [[] for _ in range(params.n)]
        try:
            async for _, d in server.run(ids, params, rid, origin):
                texts[d.index] += d.text
                out_ids[d.index] += d.token_ids
                meta = {"prompt_tokens": len(ids), "completion_tokens": len(out_ids[d.index]),
                        "cached_tokens": d.cached_tokens, "finish_reason": d.finish_reason}
                yield sse({"index": d.index, "text": texts[d.index], "output_ids": out_ids[d.index], "meta_info": meta})
        except APIError as e:
            yield sse(e.body())
        yield "data: [DONE]\n\n"

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if req.messages is not None:
            ids = chat_template_ids(server.tokenizer, [{"role": m.role, "content": m.text()} for m in req.messages],
                                    req.add_generation_prompt)
        elif req.prompt is not None:
            ids = server.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        else:
            raise APIError(400, "give prompt or messages", "prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": server.client.info["context_length"]}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        vocab = server.client.info["vocab_size"]
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    @app.post("/abort")
    async def abort(req: AbortRequest):
        server.client.release(req.request_id, abort=True)
        return {"aborted": req.request_id}

    return app

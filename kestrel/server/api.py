"""The OpenAI-compatible routes (and SGLang's native ones) over the shared steps in `server.py`."""
from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from kestrel.server.middleware import Guard
from kestrel.server.engine_process import CallFailed, EngineDead
from kestrel.server.protocol import (AbortRequest, APIError, ChatCompletionRequest, CompletionRequest,
                                     DetokenizeRequest, LoadLoraRequest, TokenizeRequest, UnloadLoraRequest)
from kestrel.server.server import Flight, Server, sse
from kestrel.server.sglang_api import add_sglang_routes
from kestrel.server.tools import ToolStream, called_tools, history, parse_calls, plan_tools
from kestrel.server.tools import finish_reason as tool_finish_reason

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_PROMPTS = 256  # prompts in one /v1/completions request
MAX_SEQUENCES = 256  # completions (prompts x n) in one request


async def started(stream: AsyncIterator[str], flight: Flight) -> StreamingResponse:
    """An SSE response over `stream`, which owns `flight`. The stream is run to its first (empty) yield
    here, so its `finally` (which closes the flight) runs however the response ends, even if the client
    leaves before the first byte is sent."""
    try:
        await stream.__anext__()
    except BaseException:
        flight.close()
        raise
    return StreamingResponse(stream, media_type="text/event-stream")


async def collect(request: Request, flights: list[Flight]) -> list:
    """Results of non-streaming flights. If one fails, the others are aborted; if the client goes away,
    all are aborted (as a stream's would be), so no work is done for nobody."""
    server: Server = request.app.state.server

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for f in flights:
            server.client.abort(f.rid)

    watcher = asyncio.create_task(watch())
    tasks = [asyncio.create_task(server.collect(f)) for f in flights]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:
            t.cancel()
        for t in tasks:
            if t in done and t.exception() is not None:
                raise t.exception()
        return [t.result() for t in tasks]
    finally:
        watcher.cancel()
        for f in flights:
            f.close()


STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def add_pages(app: FastAPI) -> None:
    """The web pages: the playground at /, the arena, the leaderboard (static files; they use the public API)."""
    from fastapi.responses import FileResponse
    from fastapi.staticfiles import StaticFiles

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for path, page in (("/", "index.html"), ("/arena", "arena.html"), ("/leaderboard", "leaderboard.html")):
        app.add_api_route(path, lambda page=page: FileResponse(os.path.join(STATIC, page)), methods=["GET"],
                          include_in_schema=False)


def build_app(server: Server, arena=None) -> FastAPI:
    """The HTTP app; `arena` (an ArenaConfig) adds the arena's API."""
    app = FastAPI(title="Kestrel", version="0.1.0")
    app.state.server = server
    if arena is not None:
        from kestrel.arena.routes import Arena, add_arena_routes
        app.state.arena = Arena(server, arena)
        add_arena_routes(app, app.state.arena)

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

    app.add_middleware(Guard, api_key=server.api_key, max_body_bytes=MAX_BODY_BYTES)
    add_pages(app)

    @app.get("/health")
    async def health():
        c = server.client
        body = {"status": c.status(), **c.health_info(), "restarts": c.restarts}
        if body["status"] != "ok":
            return JSONResponse(dict(body, reason=c.failure), status_code=503, headers={"Retry-After": "5"})
        return body

    @app.get("/v1/models")
    async def models():
        base = {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "kestrel",
                "root": server.client.info["model_dir"], "parent": None,
                "max_model_len": server.client.info["context_length"]}
        # adapters as vLLM lists them: root is the adapter's path, parent the base model
        adapters = [dict(base, id=name, root=path, parent=server.model_name)
                    for name, path in server.client.loras.items()]
        return {"object": "list", "data": [base, *adapters]}

    async def engine_call(coro):
        try:
            return await coro
        except CallFailed as e:
            raise APIError(404 if e.kind == "not_found" else 400, str(e), "lora_name") from None
        except EngineDead as e:
            raise APIError(503, f"engine unavailable: {e}", kind="service_unavailable",
                           headers={"Retry-After": "5"}) from None

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoraRequest):
        """vLLM's route: serve the PEFT adapter at lora_path as lora_name (a model id) from now on."""
        if req.lora_name in (server.model_name, "default"):
            raise APIError(400, f"{req.lora_name!r} names the base model; choose another adapter name", "lora_name")
        if req.lora_name in server.client.loras:
            raise APIError(400, f"The lora adapter '{req.lora_name}' has already been loaded; unload it first",
                           "lora_name")
        server.admit()
        await engine_call(server.client.load_lora(req.lora_name, req.lora_path))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoraRequest):
        """Requests for it are refused from now on; those already running finish with it."""
        if req.lora_name not in server.client.loras:
            raise APIError(404, f"The lora adapter '{req.lora_name}' cannot be found", "lora_name",
                           code="model_not_found")
        server.admit()
        await engine_call(server.client.unload_lora(req.lora_name))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.get("/step_profile")
    async def step_profile():
        """Each engine instance's recent steps, (tokens, logits rows, attention pairs, seconds), with its KV pool
        size, kernel switch and role: what `kestrel plan disaggregation --profile-from URL` fits its cost models
        to."""
        answers = await engine_call(server.client.call_each("step_profile"))
        return {"instances": [dict(profile, instance=name, role=server.client.role_of(name))
                              for name, profile in answers]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        lora = server.resolve_model(req.model)
        origin = server.origin(req, request.headers.get("x-kestrel-client"))
        plan = plan_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        native = plan is not None and server.template_renders_tools
        messages = history(req.messages, plan, server.template_renders_tools)
        ids = server.chat_ids(messages, tools=[{"type": "function", "function": fn} for fn in plan.functions]
                              if native else None)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
        max_tokens = server.limits(len(ids), req.max_completion_tokens or req.max_tokens, "messages")
        params = req.sampling_params(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        if plan is not None:
            if params.constrained and plan.can_call:
                raise APIError(400, "tools cannot be combined with response_format or guided_* (the tools' grammar "
                                    "constrains the reply); with tool_choice none they can", "tools")
            if not params.constrained:
                params.grammar = plan.grammar()
            if not plan.can_call:
                plan = None  # shown in the prompt; the reply is text
        server.validate(params)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"
        head = {"id": cid, "created": created, "model": lora or server.model_name}
        flight = server.open(ids, params, cid, origin, lora=lora, pause=called_tools if plan is not None else None)
        if req.stream:
            return await started(chat_stream(req, flight, head, plan), flight)
        r, = await collect(request, [flight])
        choices = []
        for i, c in enumerate(r.choices):
            calls = parse_calls(c.text) if plan is not None else None
            message = {"role": "assistant", "content": None if calls else c.text}
            if calls:
                message["tool_calls"] = calls
            choices.append({"index": i, "message": message,
                            "logprobs": server.chat_logprobs(c.logprobs) if req.logprobs else None,
                            "finish_reason": tool_finish_reason(bool(calls), c.finish_reason),
                            "stop_reason": c.stop_reason})
        n_out = sum(len(c.token_ids) for c in r.choices)
        return dict(head, object="chat.completion", choices=choices,
                    usage=server.usage(r.prompt_tokens, n_out, r.cached_tokens, r.spec))

    def chat_stream(req, flight: Flight, head, plan) -> AsyncIterator[str]:
        tools = [ToolStream() for _ in range(flight.params.n)] if plan is not None else None

        def render(d):
            out = []
            if tools is not None:  # text deltas once the reply is not a call; each call once complete
                out = [{"index": d.index, "delta": delta, "finish_reason": None, "logprobs": None}
                       for delta in tools[d.index].feed(d.text, d.finished)]
            elif d.text or d.logprobs:
                out.append({"index": d.index, "delta": {"content": d.text}, "finish_reason": None,
                            "logprobs": server.chat_logprobs(d.logprobs) if req.logprobs else None})
            if d.finished:
                called = tools is not None and tools[d.index].calls > 0
                out.append({"index": d.index, "delta": {}, "logprobs": None,
                            "finish_reason": tool_finish_reason(called, d.finish_reason)})
            return out

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                   for i in range(flight.params.n)]
        return sse_stream(req, flight, dict(head, object="chat.completion.chunk"), opening, render)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        lora = server.resolve_model(req.model)
        origin = server.origin(req, request.headers.get("x-kestrel-client"))
        prompts = req.prompt
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"give at most {MAX_PROMPTS} prompts per request", "prompt")
        if req.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports a single prompt", "prompt")
        all_ids = [server.prompt_ids(p, "prompt") for p in prompts]
        jobs = []
        for ids in all_ids:
            max_tokens = server.limits(len(ids), req.max_tokens, "prompt")
            params = req.sampling_params(max_tokens, req.logprobs)
            server.validate(params)
            jobs.append((ids, params))
        if len(jobs) * req.n > MAX_SEQUENCES:
            raise APIError(400, f"prompts x n = {len(jobs) * req.n} completions; at most {MAX_SEQUENCES} per request",
                           "n")
        created, cid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        head = {"id": cid, "created": created, "model": lora or server.model_name}
        flights = server.open_all([(ids, p, f"{cid}-{i}" if i else cid, cid) for i, (ids, p) in enumerate(jobs)],
                                  origin, lora)
        if req.stream:
            return await started(completion_stream(req, flights[0], head), flights[0])
        results = await collect(request, flights)
        choices, n_prompt, n_out, cached, spec = [], 0, 0, 0, (0, 0, 0)
        for ids, r in zip(all_ids, results):
            prefix = server.tokenizer.decode(ids) if req.echo else ""
            for c in r.choices:
                choices.append({"index": len(choices), "text": prefix + c.text, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason,
                                "logprobs": server.completion_logprobs(c.logprobs) if req.logprobs is not None else None})
                n_out += len(c.token_ids)
            n_prompt += r.prompt_tokens
            cached += r.cached_tokens
            spec = tuple(a + b for a, b in zip(spec, r.spec))
        return dict(head, object="text_completion", choices=choices,
                    usage=server.usage(n_prompt, n_out, cached, spec))

    def completion_stream(req, flight: Flight, head) -> AsyncIterator[str]:
        def render(d):
            if not (d.text or d.finished):
                return []
            return [{"index": d.index, "text": d.text, "finish_reason": d.finish_reason,
                     "logprobs": server.completion_logprobs(d.logprobs) if req.logprobs is not None else None}]

        echo = server.tokenizer.decode(flight.ids) if req.echo else None
        opening = [{"index": i, "text": echo, "logprobs": None, "finish_reason": None}
                   for i in range(flight.params.n)] if req.echo else []
        return sse_stream(req, flight, dict(head, object="text_completion"), opening, render)

    async def sse_stream(req, flight: Flight, chunk: dict, opening: list, render) -> AsyncIterator[str]:
        """SSE in OpenAI's shape: opening chunks, rendered deltas, optional usage, then [DONE]."""
        try:
            yield ""  # primed by `started`
            for choice in opening:
                yield sse(dict(chunk, choices=[choice]))
            async for d in flight.deltas():
                for choice in render(d):
                    yield sse(dict(chunk, choices=[choice]))
            if req.stream_options and req.stream_options.include_usage:
                yield sse(dict(chunk, choices=[], usage=server.usage(len(flight.ids), flight.out_tokens,
                                                                     flight.cached, flight.spec)))
        except APIError as e:
            yield sse(e.body())
        finally:
            flight.close()
        yield "data: [DONE]\n\n"

    add_sglang_routes(app, server, started, collect)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        if (req.messages is None) == (req.prompt is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            ids = server.chat_ids([{"role": m.role, "content": m.text()} for m in req.messages],
                                  req.add_generation_prompt)
        else:
            server.check_text_size(len(req.prompt), "prompt")
            ids = server.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": server.client.info["context_length"]}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        vocab = server.client.info["vocab_size"]
        if any(not 0 <= t < vocab for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    @app.post("/abort")
    @app.post("/abort_request")  # SGLang's name
    async def abort(req: AbortRequest):
        rid = req.request_id or req.rid
        if not rid:
            raise APIError(400, "give the request_id (or rid) to abort", "request_id")
        if not server.abort(rid):
            raise APIError(404, f"no request with id {rid!r} is in flight", "request_id")
        return {"aborted": rid}

    return app

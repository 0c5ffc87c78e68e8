"""SGLang's native HTTP API, as the `sglang` frontend (`sgl.RuntimeEndpoint`) and SGLang users' scripts call it:
/generate (one text, a batch of texts or of input_ids, streamed or not), /get_model_info, /server_info and
/flush_cache. Where SGLang and OpenAI differ, these routes answer as SGLang does: `max_new_tokens: 0` is a
prefill-only request, logprobs are `[logprob, token_id, text]` lists, `finish_reason` is an object and a stream
carries each completion's text so far."""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kestrel.engine.request import sglang_finish_reason
from kestrel.engine.sampling_params import SamplingParams
from kestrel.server.protocol import APIError, GenerateRequest
from kestrel.server.server import Choice, Flight, Server, sse

# SGLang's sampling parameter names -> Kestrel's (Kestrel's own names are accepted too)
RENAMED = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "ebnf": "grammar",
           "sampling_seed": "seed"}
# SGLang parameters Kestrel does not implement: refused when set, so a program never silently runs differently
UNSUPPORTED = ("stop_regex", "logit_bias", "custom_params", "structural_tag", "no_stop_trim")
MAX_BATCH = 256  # prompts in one /generate request
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's; an explicit null means up to the context length


def sampling_params(raw: Any, param: str = "sampling_params") -> tuple[SamplingParams, Optional[int]]:
    """SGLang's sampling_params dict as Kestrel's SamplingParams (None values mean "the default"), and the
    max_new_tokens asked for (None: up to the context length)."""
    if not isinstance(raw, dict):
        raise APIError(400, f"{param} must be an object", param)
    sp = {RENAMED.get(k, k): v for k, v in raw.items()}
    max_tokens = sp.pop("max_tokens", DEFAULT_MAX_NEW_TOKENS)
    sp = {k: v for k, v in sp.items() if v is not None}
    for name in UNSUPPORTED:
        if sp.pop(name, False):
            raise APIError(400, f"{param}.{name} is not supported by Kestrel", f"{param}.{name}")
    sp.pop("stream_interval", None)  # every step's delta is sent as it comes
    try:
        return SamplingParams(**sp), max_tokens
    except TypeError as e:
        raise APIError(400, f"{param}: {e}", param) from None


def per_prompt(value, n: int, name: str) -> list:
    """A field SGLang takes either once for the batch or as one value per prompt."""
    if isinstance(value, list):
        if len(value) != n:
            raise APIError(400, f"{name} has {len(value)} entries for {n} prompts", name)
        return value
    return [value] * n


def add_sglang_routes(app: FastAPI, server: Server, started, collect) -> None:
    """Add the routes; `started` and `collect` are the OpenAI routes' helpers for streams and results."""
    from kestrel import __version__

    def token_text(token_id: int) -> str:
        return server.tokenizer.decode([token_id])

    def entry(logprob, token_id: int, with_text: bool) -> list:
        return [logprob, token_id, token_text(token_id) if with_text else None]

    def top(record, with_text: bool) -> Optional[list]:
        return None if record is None else [entry(v, t, with_text) for t, v in record.top.items()]

    def logprob_fields(job: dict, ids: list[int], prompt_lps: Optional[list], output_ids: list[int],
                       output_lps: list) -> dict:
        """input_/output_token_logprobs ([logprob, token_id, text]) and, with top_logprobs_num, their tops."""
        text, start = job["text_in_logprobs"], job["start"]
        fields = {"output_token_logprobs": [entry(r.logprob, t, text) for t, r in zip(output_ids, output_lps)]}
        if job["top"]:
            fields["output_top_logprobs"] = [top(r, text) for r in output_lps]
        if prompt_lps is None and start < len(ids):  # a stream's prompt logprobs come with its last event
            return fields
        prompt_lps = prompt_lps or [None] * len(ids)
        fields["input_token_logprobs"] = [entry(None if r is None else r.logprob, t, text)
                                          for t, r in zip(ids[start:], prompt_lps[start:])]
        if job["top"]:
            fields["input_top_logprobs"] = [top(r, text) for r in prompt_lps[start:]]
        return fields

    def jobs_of(req: GenerateRequest) -> tuple[list[dict], bool]:
        """One job per prompt (its token ids, sampling params and logprob options), and whether it is a batch."""
        if (req.text is None) == (req.input_ids is None):
            raise APIError(400, "give exactly one of text or input_ids", "text")
        if req.image_data is not None:
            raise APIError(400, "image_data is not supported: Kestrel serves text-only models", "image_data")
        if req.text is not None:
            batched, prompts, field = isinstance(req.text, list), req.text, "text"
        else:
            batched = bool(req.input_ids) and isinstance(req.input_ids[0], list)
            prompts, field = req.input_ids, "input_ids"
        prompts = prompts if batched else [prompts]
        if not prompts or len(prompts) > MAX_BATCH:
            raise APIError(400, f"give 1 to {MAX_BATCH} prompts", field)
        n = len(prompts)
        raw_params = per_prompt(req.sampling_params, n, "sampling_params")
        flags = zip(per_prompt(req.return_logprob, n, "return_logprob"),
                    per_prompt(req.logprob_start_len, n, "logprob_start_len"),
                    per_prompt(req.top_logprobs_num, n, "top_logprobs_num"))
        jobs = []
        for prompt, raw, (want, start, k) in zip(prompts, raw_params, flags):
            ids = server.prompt_ids(prompt, field)
            params, max_tokens = sampling_params(raw)
            params.max_tokens = server.limits(len(ids), max_tokens, field, least=0)
            if not isinstance(start, int) or isinstance(start, bool) or start < -1:
                raise APIError(400, f"logprob_start_len must be an integer >= -1, got {start!r}", "logprob_start_len")
            if start == -1:  # SGLang's default: the output's logprobs only. A prefill-only request has no output,
                # so it gets the prompt's (what the frontend's unconditional_likelihood_normalized select reads)
                start = 0 if params.max_tokens == 0 else len(ids)
            start = min(start, len(ids))
            if want:
                params.logprobs = k
                params.prompt_logprobs = k if start < len(ids) else None
                params.logprob_start_len = start
            server.validate(params)
            jobs.append(dict(ids=ids, params=params, logprobs=bool(want), start=start, top=bool(want and k),
                             text_in_logprobs=req.return_text_in_logprobs))
        if sum(j["params"].n for j in jobs) > MAX_BATCH:
            raise APIError(400, f"prompts x n must be at most {MAX_BATCH}", "sampling_params.n")
        return jobs, batched

    def meta(job: dict, rid: str, choice, prompt_lps, cached: int, spec: tuple, started_at: float) -> dict:
        out = {"id": rid, "prompt_tokens": len(job["ids"]), "completion_tokens": len(choice.token_ids),
               "cached_tokens": cached,
               "finish_reason": sglang_finish_reason(choice.finish_reason, choice.stop_reason, choice.token_ids),
               "e2e_latency": time.monotonic() - started_at,
               "spec_verify_ct": spec[0]}  # SGLang's: decode steps that verified a lookahead draft
        if job["logprobs"]:
            out.update(logprob_fields(job, job["ids"], prompt_lps, choice.token_ids, choice.logprobs))
        return out

    @app.post("/generate")
    async def generate(req: GenerateRequest, request: Request):
        started_at = time.monotonic()
        jobs, batched = jobs_of(req)
        lora = server.resolve_model(req.lora_path, "lora_path")
        origin = server.origin(req, request.headers.get("x-kestrel-client"))
        # engine ids are the server's own (a client's rid may repeat one in flight); /abort takes the client's
        rids = per_prompt(req.rid, len(jobs), "rid") if isinstance(req.rid, list) else [req.rid] * len(jobs)
        internal = uuid.uuid4().hex
        flights = server.open_all([(job["ids"], job["params"], f"gen-{internal}-{i}",
                                    str(rid) if rid is not None else internal)
                                   for i, (job, rid) in enumerate(zip(jobs, rids))], origin, lora)
        if req.stream:
            return await started(generate_stream(jobs, flights, started_at), flights[0])
        results = await collect(request, flights)
        outs = []
        for job, flight, r in zip(jobs, flights, results):
            for i, c in enumerate(r.choices):
                outs.append({"text": c.text, "output_ids": c.token_ids,
                             "meta_info": meta(job, flight.response_id, c, r.prompt_logprobs, r.cached_tokens,
                                               r.spec_by_index.get(i, (0, 0, 0)), started_at)})
        return outs if batched or len(outs) > 1 else outs[0]

    async def generate_stream(jobs: list[dict], flights: list[Flight], started_at: float) -> AsyncIterator[str]:
        """SGLang's stream: each event carries one completion's text and output ids so far, its meta_info and
        its `index` (prompt-major over the batch's prompts x n); then [DONE]."""
        offsets = [0]
        for job in jobs:
            offsets.append(offsets[-1] + job["params"].n)
        events: asyncio.Queue = asyncio.Queue()

        async def pump(k: int) -> None:
            try:
                async for d in flights[k].deltas():
                    await events.put((k, d))
            except APIError as e:
                await events.put((k, e))
            finally:
                await events.put((k, None))

        tasks = []
        try:
            yield ""  # primed by `started`
            tasks = [asyncio.create_task(pump(k)) for k in range(len(flights))]
            sofar = {(k, i): Choice() for k, job in enumerate(jobs) for i in range(job["params"].n)}
            open_flights = len(flights)
            while open_flights:
                k, d = await events.get()
                if d is None:
                    open_flights -= 1
                    continue
                if isinstance(d, APIError):
                    yield sse(d.body())
                    continue
                c = sofar[k, d.index]
                c.add(d)
                info = meta(jobs[k], flights[k].response_id, c, d.prompt_logprobs, d.cached_tokens, d.spec, started_at)
                yield sse({"index": offsets[k] + d.index, "text": c.text, "output_ids": c.token_ids,
                           "meta_info": info})
        finally:
            for t in tasks:
                t.cancel()
            for f in flights:
                f.close()
        yield "data: [DONE]\n\n"

    @app.get("/get_model_info")
    async def get_model_info():
        info = server.client.info
        return {"model_path": info["model_dir"], "tokenizer_path": info["model_dir"], "is_generation": True,
                "preferred_sampling_params": None, "weight_version": "default",
                "has_image_understanding": False, "has_audio_understanding": False,
                "served_model_name": server.model_name}

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        info, load = server.client.info, server.client.load
        config = {k: v for k, v in dataclasses.asdict(server.client.config).items()
                  if isinstance(v, (str, int, float, bool, type(None)))}
        return dict(config, version=__version__, model_path=info["model_dir"], served_model_name=server.model_name,
                    max_total_num_tokens=info["max_total_tokens"], context_length=info["context_length"],
                    internal_states=[{"num_running_reqs": load.get("running", 0),
                                      "num_waiting_reqs": load.get("waiting", 0),
                                      "kv_cache_used_tokens": load.get("kv_used", 0)}])

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        """Drop the cached prefixes; refused (400, as SGLang) while requests run."""
        from kestrel.server.engine_process import CallFailed

        server.admit()
        try:
            freed = await server.client.call("flush_cache")
        except CallFailed as e:
            return JSONResponse({"success": False, "message": f"Cache not flushed: {e}"}, status_code=400)
        return JSONResponse({"success": True, "message": f"Cache flushed ({freed} cached tokens freed)."})


"""Where an LLM program's calls run: the in-process Engine, or a Kestrel server over its native /generate.

Both backends expose the same few calls (generate, prompt-logprob scoring, tokenize, chat rendering);
everything above them (roles, select, fork) is shared, so a program gives the same result on either.
"""
from __future__ import annotations

import itertools
import json
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Optional, Union

Prompt = Union[str, list[int]]
SENTINEL = "\u2063KESTREL\u2063"  # text no template changes, to find where a message's content goes


class Backend:
    def generate(self, prompt: Prompt, params: dict, on_text: Optional[Callable[[str], None]] = None,
                 lora: Optional[str] = None) -> dict:
        """Generate for one prompt (with LoRA adapter `lora`, if given); returns {"text", "meta_info"}.
        on_text receives text increments."""
        raise NotImplementedError

    def score(self, prompts: list[list[int]], starts: list[int]) -> list[list[float]]:
        """For each prompt, the log-probabilities of its tokens from position `start` on (one batch)."""
        raise NotImplementedError

    def tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def render_chat(self, messages: list[dict]) -> str:
        """The conversation as the model's chat template writes it (no generation prompt)."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    def flush_cache(self) -> None:
        """Drop the engine's cached prefixes (refused while requests run)."""
        raise NotImplementedError

    def get_server_info(self) -> dict:
        raise NotImplementedError

    # ---- shared logic -------------------------------------------------------------------
    def role_markers(self, role: str, first: bool) -> tuple[str, str]:
        """The text the chat template puts before and after a message's content (`first`: it opens
        the conversation, where templates add a BOS or a default system prompt). Cached on the backend: a
        module-level cache keyed by the backend would keep every backend, and its engine, alive."""
        cache = self.__dict__.setdefault("_role_markers", {})
        if (role, first) not in cache:
            cache[role, first] = _markers(self, role, first)
        return cache[role, first]

    def select(self, text: str, choices: list[str], method=None) -> tuple[int, list[float]]:
        """SGLang's select: score each choice's tokens given the text and pick by `method` (a
        kestrel.lang.choices method; default: the highest mean token log-probability). The shared prefix
        is computed once (then held by the radix cache) and all choices are scored in one batch."""
        from kestrel.lang.choices import token_length_normalized

        method = method or token_length_normalized
        prefix = self.tokenize(text)
        candidates = [self.tokenize(text + c) for c in choices]
        starts = []
        for cand in candidates:  # where the choice's tokens start (a token may straddle the boundary)
            n = 0
            while n < min(len(prefix), len(cand)) and prefix[n] == cand[n]:
                n += 1
            if len(cand) < 2:
                raise ValueError(f"select: {text + choices[len(starts)]!r} is a single token; with no text before "
                                 "the choice there is nothing to score it against")
            starts.append(max(1, min(n, len(cand) - 1)))
        if prefix:
            self.generate(prefix, {"max_tokens": 0})  # one prefill-only pass over the shared prefix
        logprobs = self.score(candidates, starts)
        unconditional = None
        if method.needs_unconditional:  # the choice's tokens alone; the first has no context: 0, as in SGLang
            alone = [cand[start:] for cand, start in zip(candidates, starts)]
            scored = self.score([a for a in alone if len(a) > 1], [1] * sum(len(a) > 1 for a in alone))
            unconditional = [[0.0] + (scored.pop(0) if len(a) > 1 else []) for a in alone]
        return method(logprobs, unconditional)


def _failed(error: BaseException) -> RuntimeError:
    return RuntimeError(f"the in-process engine has failed ({type(error).__name__}: {error}); create a new "
                        "EngineBackend to go on")


def _markers(backend: Backend, role: str, first: bool) -> tuple[str, str]:
    before = [] if first else [{"role": "system", "content": "x"}]
    head = backend.render_chat(before) if before else ""
    full = backend.render_chat(before + [{"role": role, "content": SENTINEL}])
    if not full.startswith(head) or SENTINEL not in full:
        raise ValueError(f"the chat template does not render a {role} message as a suffix of the conversation")
    begin, end = full[len(head):].split(SENTINEL, 1)
    return begin, end


class EngineBackend(Backend):
    """Runs an `Engine` in a background thread (the engine driver loop); calls from any thread are batched
    together. If the engine breaks, every waiting call and every later one raises its error."""

    def __init__(self, engine=None, **engine_kwargs):
        from kestrel.engine.driver import EngineDriver

        if engine is None:
            from kestrel.engine.engine import Engine
            engine = Engine(**engine_kwargs)
        self.engine = engine
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._pending: dict[str, tuple[Future, Optional[Callable]]] = {}
        self._lock = threading.Lock()
        self._failure: Optional[BaseException] = None
        self._ids = itertools.count()
        self._calls: dict[str, Future] = {}
        self._driver = EngineDriver(engine, self._deliver, self._reject, self._respond)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kestrel-lang-engine")
        self._thread.start()

    def _submit(self, prompt: Prompt, params, on_text=None, lora: Optional[str] = None) -> Future:
        from kestrel.engine.driver import Submit

        fut: Future = Future()
        with self._lock:
            if self._failure is not None:
                raise _failed(self._failure)
            rid = f"lang-{next(self._ids)}"
            self._pending[rid] = (fut, on_text)
        self._inbox.put(Submit(rid, prompt, params, lora=lora))
        return fut

    def _loop(self) -> None:
        try:
            self._driver.run(self._inbox)
        except BaseException as e:  # noqa: BLE001 - the driver already failed what it held; fail the rest
            with self._lock:
                self._failure = e
                pending, self._pending = self._pending, {}
                calls, self._calls = self._calls, {}
            for fut in [f for f, _ in pending.values()] + list(calls.values()):
                if not fut.done():
                    fut.set_exception(_failed(e))

    def _take(self, rid: str) -> Optional[Future]:
        with self._lock:
            entry = self._pending.pop(rid, None)
        return entry[0] if entry else None

    def _deliver(self, deltas, finished) -> None:
        from kestrel.engine.driver import Abort

        for d in deltas:
            entry = self._pending.get(d.request_id)
            if entry is None or entry[1] is None or not d.text:
                continue
            try:
                entry[1](d.text)
            except Exception as e:  # noqa: BLE001 - the caller's callback fails its own call only
                fut = self._take(d.request_id)
                if fut is not None:
                    fut.set_exception(e)
                self._inbox.put(Abort(d.request_id))
        for out in finished:
            fut = self._take(out.request_id)
            if fut is None:
                continue
            if out.error:
                fut.set_exception(RuntimeError(out.error))
            else:
                fut.set_result(out)

    def _reject(self, rid: str, error: BaseException) -> None:
        fut = self._take(rid)
        if fut is not None:
            fut.set_exception(error)

    def _respond(self, call_id: str, result, error) -> None:
        fut = self._calls.pop(call_id, None)
        if fut is None:  # failed already with the driver
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def _engine_call(self, method: str, **kwargs):
        """Run an engine management method on the driver's thread, between steps."""
        from kestrel.engine.driver import Call

        fut: Future = Future()
        with self._lock:
            if self._failure is not None or not self._thread.is_alive():
                raise _failed(self._failure or RuntimeError("the backend was shut down"))
            call_id = f"call-{next(self._ids)}"
            self._calls[call_id] = fut
        self._inbox.put(Call(call_id, method, kwargs))
        return fut.result()

    def flush_cache(self) -> None:
        self._engine_call("flush_cache")

    def get_server_info(self) -> dict:
        import dataclasses

        from kestrel import __version__
        return dict(dataclasses.asdict(self.engine.config), version=__version__, placement=self.engine.describe())

    def generate(self, prompt, params, on_text=None, lora=None):
        from kestrel.engine.request import sglang_finish_reason
        from kestrel.engine.sampling_params import SamplingParams

        out = self._submit(prompt, SamplingParams(**params), on_text, lora).result()
        first = out.outputs[0]
        meta = {"prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens,
                "completion_tokens": out.output_tokens, "forced_tokens": out.forced_tokens,
                "finish_reason": sglang_finish_reason(first.finish_reason, first.stop_reason, first.token_ids)}
        if first.logprobs is not None:  # SGLang's shape: [logprob, token_id, text]
            text = self.engine.tokenizer.decode
            meta["output_token_logprobs"] = [[x.logprob, x.token_id, text([x.token_id])] for x in first.logprobs]
        return {"text": out.text, "meta_info": meta}

    def score(self, prompts, starts):
        from kestrel.engine.sampling_params import SamplingParams

        futures = [self._submit(p, SamplingParams(max_tokens=0, prompt_logprobs=0, logprob_start_len=s))
                   for p, s in zip(prompts, starts)]
        return [[x.logprob for x in f.result().prompt_logprobs if x is not None] for f in futures]

    def tokenize(self, text):
        return self.engine.tokenize(text)

    def render_chat(self, messages):
        return self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def shutdown(self):
        from kestrel.engine.driver import Stop

        self._inbox.put(Stop())
        self._thread.join(timeout=30)


class RuntimeEndpoint(Backend):
    """A Kestrel server (`kestrel serve`), through /generate, /tokenize and /detokenize."""

    def __init__(self, base_url: str = "http://127.0.0.1:30000", api_key: Optional[str] = None, timeout: float = 600,
                 chat_template_name: Optional[str] = None):
        """`chat_template_name` is accepted for SGLang programs and not needed: roles are rendered by the
        server's own chat template (the model's)."""
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="kestrel-endpoint")

    def _post(self, path: str, body: dict) -> dict:
        r = self.http.post(path, json=body)
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text
            raise (ValueError if r.status_code == 400 else RuntimeError)(f"{self.base_url}{path}: {message}")
        return r.json()

    @staticmethod
    def _body(prompt: Prompt) -> dict:
        return {"text": prompt} if isinstance(prompt, str) else {"input_ids": list(prompt)}

    def generate(self, prompt, params, on_text=None, lora=None):
        params = dict(params)
        body = dict(self._body(prompt), sampling_params=params)
        if "logprobs" in params:  # the output's logprobs, in meta_info as the server gives them
            body.update(return_logprob=True, top_logprobs_num=params.pop("logprobs"), return_text_in_logprobs=True)
        if lora is not None:
            body["lora_path"] = lora  # SGLang's field
        if on_text is None:
            return self._post("/generate", body)
        last, seen = None, ""
        with self.http.stream("POST", "/generate", json=dict(body, stream=True)) as r:
            if r.status_code != 200:
                r.read()
                raise ValueError(f"{self.base_url}/generate: {r.json()['error']['message']}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise ValueError(f"{self.base_url}/generate: {event['error']['message']}")
                if len(event["text"]) > len(seen):
                    on_text(event["text"][len(seen):])
                    seen = event["text"]
                last = event
        return {"text": last["text"], "meta_info": last["meta_info"]}

    def score(self, prompts, starts):
        def one(ids, start):
            r = self._post("/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 0},
                                         "return_logprob": True, "logprob_start_len": start})
            return [lp for lp, _, _ in r["meta_info"]["input_token_logprobs"] if lp is not None]
        return list(self._pool.map(one, prompts, starts))

    def tokenize(self, text):
        return self._post("/tokenize", {"prompt": text})["tokens"]

    def render_chat(self, messages):
        ids = self._post("/tokenize", {"messages": messages, "add_generation_prompt": False})["tokens"]
        return self._post("/detokenize", {"tokens": ids})["prompt"]

    def flush_cache(self):
        self._post("/flush_cache", {})

    def get_server_info(self):
        r = self.http.get("/server_info")
        r.raise_for_status()
        return r.json()

    def get_model_name(self) -> str:
        return self.http.get("/get_model_info").json()["model_path"]

    def shutdown(self):
        self._pool.shutdown()
        self.http.close()

"""Where an LLM program's calls run: the in-process Engine, or a Kestrel server over its native /generate.

Both backends expose the same few calls (generate, prompt-logprob scoring, tokenize, chat rendering);
everything above them (roles, select, fork) is shared, so a program gives the same result on either.
"""
from __future__ import annotations

import json
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Callable, Optional, Union

Prompt = Union[str, list[int]]
SENTINEL = "\u2063KESTREL\u2063"  # text no template changes, to find where a message's content goes


class Backend:
    def generate(self, prompt: Prompt, params: dict, on_text: Optional[Callable[[str], None]] = None) -> dict:
        """Generate for one prompt; returns {"text", "meta_info"}. on_text receives text increments."""
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

    # ---- shared logic -------------------------------------------------------------------
    def role_markers(self, role: str, first: bool) -> tuple[str, str]:
        """The text the chat template puts before and after a message's content (`first`: it opens
        the conversation, where templates add a BOS or a default system prompt)."""
        return _markers(self, role, first)

    def select(self, text: str, choices: list[str]) -> tuple[int, list[float]]:
        """SGLang's select: each choice's mean token log-probability given the text. The shared prefix
        is computed once (then held by the radix cache) and all choices are scored in one batch."""
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
        self.generate(prefix, {"max_tokens": 1, "temperature": 0.0})  # one pass over the shared prefix
        logprobs = self.score(candidates, starts)
        scores = [sum(lp) / len(lp) for lp in logprobs]
        return max(range(len(choices)), key=lambda i: scores[i]), scores


@lru_cache(maxsize=64)
def _markers(backend: Backend, role: str, first: bool) -> tuple[str, str]:
    before = [] if first else [{"role": "system", "content": "x"}]
    head = backend.render_chat(before) if before else ""
    full = backend.render_chat(before + [{"role": role, "content": SENTINEL}])
    if not full.startswith(head) or SENTINEL not in full:
        raise ValueError(f"the chat template does not render a {role} message as a suffix of the conversation")
    begin, end = full[len(head):].split(SENTINEL, 1)
    return begin, end


class EngineBackend(Backend):
    """Runs an `Engine` in a background thread; calls from any thread are batched together."""

    def __init__(self, engine=None, **engine_kwargs):
        if engine is None:
            from kestrel.engine.engine import Engine
            engine = Engine(**engine_kwargs)
        self.engine = engine
        self._inbox: "queue.SimpleQueue" = queue.SimpleQueue()
        self._pending: dict[str, tuple[Future, Optional[Callable]]] = {}
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kestrel-lang-engine")
        self._thread.start()

    def _submit(self, prompt: Prompt, params, on_text=None) -> Future:
        fut: Future = Future()
        self._inbox.put((prompt, params, fut, on_text))
        return fut

    def _add(self, item) -> None:
        prompt, params, fut, on_text = item
        try:
            rid = self.engine.add_request(prompt, params)
        except (ValueError, TypeError) as e:
            fut.set_exception(e)
            return
        self._pending[rid] = (fut, on_text)

    def _loop(self) -> None:
        from kestrel.decoding.grammar import CompileQueue

        engine = self.engine
        compiling = CompileQueue(engine.grammars)
        while True:
            items = []
            if not engine.has_unfinished():
                try:
                    items.append(self._inbox.get(timeout=0.005 if compiling else None))
                except queue.Empty:
                    pass
            while True:
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item, error in compiling.ready():
                if error is not None:
                    item[2].set_exception(error)
                else:
                    self._add(item)
            for item in items:
                if item is None:
                    compiling.shutdown()
                    return
                if not compiling.hold(item[1], item):
                    self._add(item)
            if not engine.has_unfinished():
                continue
            try:
                touched = engine.step()
            except Exception as e:  # fail every waiting caller rather than hang them
                for fut, _ in self._pending.values():
                    fut.set_exception(e)
                return
            streaming = [r for r in touched if r in self._pending and self._pending[r][1] is not None]
            for d in engine.take_deltas(streaming) if streaming else ():
                if d.text:
                    self._pending[d.request_id][1](d.text)
            for rid in touched:
                if rid in self._pending and engine.get_output(rid).finished:
                    fut, _ = self._pending.pop(rid)
                    fut.set_result(engine.get_output(rid, pop=True))

    def generate(self, prompt, params, on_text=None):
        from kestrel.engine.sampling_params import SamplingParams

        out = self._submit(prompt, SamplingParams(**params), on_text).result()
        return {"text": out.text, "meta_info": {"prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens,
                                                "completion_tokens": out.output_tokens,
                                                "finish_reason": out.finish_reason,
                                                "forced_tokens": out.forced_tokens}}

    def score(self, prompts, starts):
        from kestrel.engine.sampling_params import SamplingParams

        futures = [self._submit(p, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0,
                                                  logprob_start_len=s)) for p, s in zip(prompts, starts)]
        return [[x.logprob for x in f.result().prompt_logprobs if x is not None] for f in futures]

    def tokenize(self, text):
        return self.engine.tokenize(text)

    def render_chat(self, messages):
        return self.engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def shutdown(self):
        self._inbox.put(None)
        self._thread.join(timeout=30)


class RuntimeEndpoint(Backend):
    """A Kestrel server (`kestrel serve`), through /generate, /tokenize and /detokenize."""

    def __init__(self, base_url: str = "http://127.0.0.1:30000", api_key: Optional[str] = None, timeout: float = 600):
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

    def generate(self, prompt, params, on_text=None):
        body = dict(self._body(prompt), sampling_params=params)
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
            r = self._post("/generate", {"input_ids": ids, "sampling_params": {"max_tokens": 1, "temperature": 0.0},
                                         "return_logprob": True, "logprob_start_len": start})
            return [lp for lp, _, _ in r["meta_info"]["input_token_logprobs"]]
        return list(self._pool.map(one, prompts, starts))

    def tokenize(self, text):
        return self._post("/tokenize", {"prompt": text})["tokens"]

    def render_chat(self, messages):
        ids = self._post("/tokenize", {"messages": messages, "add_generation_prompt": False})["tokens"]
        return self._post("/detokenize", {"tokens": ids})["prompt"]

    def shutdown(self):
        self._pool.shutdown()
        self.http.close()

"""Running planned LLM calls: in this process on an Engine, or on any OpenAI-compatible server (kestrel serve
included). Prompts are chat messages (the template filled in, as the user's turn); options are the usual
generation ones. A call that fails gives its error instead of a text: the caller turns it into NULL."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

from kestrel.sql.plan import Task

OPTIONS = ("max_tokens", "temperature", "top_p", "stop", "seed", "choices", "regex", "json_schema")
DEFAULTS = {"max_tokens": 64, "temperature": 0.0}
PROGRESS_FROM = 32  # calls: a progress bar from this many on
BATCH_IN_BATCH_PREFIX = 1  # the scheduler's in_batch_prefix_tokens while a batch of calls runs


class CallError(Exception):
    """Why one call gave no text (its row gets NULL)."""


def parse_options(options: Optional[str], defaults: dict) -> dict:
    """The options of llm_with (a JSON object) over the registered defaults; ValueError says what is wrong."""
    out = dict(defaults)
    if options:
        try:
            given = json.loads(options)
        except json.JSONDecodeError as e:
            raise ValueError(f"llm_with options must be a JSON object: {e}") from None
        if not isinstance(given, dict):
            raise ValueError("llm_with options must be a JSON object")
        given = {k: v for k, v in given.items() if v is not None}  # llm()'s named options that were not given
        unknown = sorted(set(given) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown llm_with option(s) {unknown}; known: {list(OPTIONS)}")
        out.update(given)
    return out


def user_turn_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as the user's turn of the chat template, for planning many prompts at once: the
    template rendered once around a marker and spliced, then one batch encode (Rust, ~50x faster than rendering
    each). Where the splice does not give the template's own text for the first prompt (a template that changes
    the content), each is rendered."""
    from kestrel.model.loader import chat_template_ids

    def rendered(content: str) -> str:
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)

    marker = "\ue000kestrel\ue000"
    around = rendered(marker)
    if texts and around.count(marker) == 1:
        head, tail = around.split(marker)
        full = [head + t + tail for t in texts]
        probe = " \n a probe {} \n "  # whitespace at both ends: templates that trim the content fail the splice
        if rendered(texts[0]) == full[0] and rendered(probe) == head + probe + tail:
            return _encode_by_lines(tokenizer, full)
    return [chat_template_ids(tokenizer, [{"role": "user", "content": t}]) for t in texts]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: no Python per text
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


LINES_FROM = 256  # prompts: from this many, planning encodes their distinct lines rather than every prompt
LINE_CHECKS = 64  # prompts whose encoding by lines is checked against the whole encoding first


def _encode_by_lines(tokenizer, texts: list[str]) -> list[list[int]]:
    """Encodings of many prompts that repeat whole lines (records' `Name: value` lines, shared instructions): each
    distinct line encoded once, and a prompt's tokens the concatenation of its lines'. Byte-level BPE tokenizers
    split words at a newline anyway, so this is the whole encoding; it is used only when a sample of the prompts
    shows so, and planning falls back to encoding every prompt otherwise."""
    if len(texts) < LINES_FROM:
        return _encode(tokenizer, texts)
    split = [t.replace("\n", "\x00\n").split("\x00") if "\x00" not in t else None for t in texts]
    if any(parts is None for parts in split):
        return _encode(tokenizer, texts)
    step = max(1, len(texts) // LINE_CHECKS)
    sample = sorted(set(range(0, len(texts), step)) | set(range(min(LINE_CHECKS, len(texts)))))
    lines = list(dict.fromkeys(p for parts in split for p in parts))
    ids = dict(zip(lines, _encode(tokenizer, lines)))
    joined = [[t for p in parts for t in ids[p]] for parts in split]
    if [joined[i] for i in sample] != _encode(tokenizer, [texts[i] for i in sample]):
        return _encode(tokenizer, texts)
    return joined


class Usage:
    """Prompt tokens the calls run so far had, and how many of them the prefix cache served."""

    prompt_tokens = 0
    cached_tokens = 0
    _lock = threading.Lock()  # the OpenAI runner counts from its worker threads

    def count(self, prompt: int, cached: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.cached_tokens += cached

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class EngineRunner(Usage):
    """Runs calls on an in-process kestrel.Engine."""

    def __init__(self, engine, defaults: Optional[dict] = None):
        self.engine = engine
        self.defaults = dict(DEFAULTS, **(defaults or {}))
        self.cache_tokens = engine.pool.size

    def prompt_ids(self, text: str) -> list[int]:
        return self.engine.apply_chat_template([{"role": "user", "content": text}])

    def planning_ids(self, texts: list[str]) -> list[list[int]]:
        return user_turn_ids(self.engine.tokenizer, texts)

    def run(self, tasks: list[Task], progress: bool = True) -> list[Union[str, CallError]]:
        from kestrel.engine.sampling_params import SamplingParams

        results: list[Union[str, CallError]] = [CallError("not run")] * len(tasks)
        rids = {}
        # a batch job wants throughput, not first-token latency: every prompt that would share tokens with one
        # starting in the same step waits for them to be cached
        scheduler = self.engine.scheduler
        saved, scheduler.in_batch_prefix = scheduler.in_batch_prefix, BATCH_IN_BATCH_PREFIX
        for i, task in enumerate(tasks):  # queued in plan order: the fcfs scheduler admits them in it
            try:
                params = SamplingParams(**parse_options(task.call.options, self.defaults))
                rids[i] = self.engine.add_request(self.prompt_ids(task.text), params)
            except (ValueError, TypeError, LookupError) as e:
                results[i] = CallError(str(e))
        try:
            self.engine.run_until_done(list(rids.values()), progress=progress and len(rids) >= PROGRESS_FROM,
                                       desc="llm() calls")
        finally:
            scheduler.in_batch_prefix = saved
            for i, rid in rids.items():
                if not self.engine.is_finished(rid):
                    self.engine.abort(rid)
                out = self.engine.get_output(rid, pop=True)
                results[i] = CallError(out.error) if out.finish_reason in ("error", "abort") else out.text
                self.count(out.prompt_tokens, out.cached_tokens)
        return results


class OpenAIRunner(Usage):
    """Runs calls on an OpenAI-compatible server's chat completions, `concurrency` at a time in plan order."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, model: str = "default",
                 defaults: Optional[dict] = None, concurrency: int = 16, tokenizer=None):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2)
        self.model = model
        self.defaults = dict(DEFAULTS, **(defaults or {}))
        self.concurrency = concurrency
        self.tokenizer = tokenizer  # for planning; None: the embedded model's
        self.cache_tokens = None

    def planning_ids(self, texts: list[str]) -> list[list[int]]:
        if self.tokenizer is None:  # the server's own tokenizer is not at hand: the embedded model's is a fair guess
            from kestrel.model.loader import load_tokenizer, resolve_model_dir
            self.tokenizer = load_tokenizer(resolve_model_dir(None))
        return user_turn_ids(self.tokenizer, texts)

    def _one(self, task: Task) -> Union[str, CallError]:
        import openai
        try:
            opts = parse_options(task.call.options, self.defaults)
            extra = {}
            for ours, theirs in (("choices", "guided_choice"), ("regex", "guided_regex"), ("json_schema", "guided_json")):
                if opts.get(ours) is not None:
                    extra[theirs] = opts.pop(ours)
            r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": task.text}],
                                                    extra_body=extra or None, **opts)
            details = r.usage.prompt_tokens_details
            self.count(r.usage.prompt_tokens, details.cached_tokens if details else 0)
            return r.choices[0].message.content or ""
        except (ValueError, openai.APIError) as e:
            return CallError(str(e))

    def run(self, tasks: list[Task], progress: bool = True) -> list[Union[str, CallError]]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = pool.map(self._one, tasks)
            if progress and len(tasks) >= PROGRESS_FROM:
                from tqdm import tqdm
                futures = tqdm(futures, total=len(tasks), desc="llm() calls", unit="call")
            return list(futures)

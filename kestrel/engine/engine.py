"""The offline Engine API: load a model, queue requests, step the scheduler, collect outputs."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence as Seq, Union

import torch

from kestrel.cache.kv_pool import KVPool, ReqToTokenTable
from kestrel.cache.radix_cache import RadixCache
from kestrel.cache.swap import SwapStore
from kestrel.config import EngineConfig
from kestrel.decoding.grammar import GrammarCompiler, GrammarSpec
from kestrel.engine.forward_batch import ForwardBatch
from kestrel.engine.lookahead import (LookaheadSizes, LookaheadState, StepCost, calibrate, calibration_sizes,
                                      default_sizes)
from kestrel.engine.output_processor import OutputProcessor
from kestrel.engine.policy import make_policy
from kestrel.engine.handoff import Handoffs
from kestrel.engine.multistep import Bursts
from kestrel.engine.request import CompletionOutput, RequestOutput, Sequence, Status, TokenLogprob
from kestrel.engine.runner import ModelRunner
from kestrel.engine.sampler import Sampler
from kestrel.engine.sampling_params import SamplingParams
from kestrel.engine.scheduler import ScheduledBatch, Scheduler
from kestrel.engine.step_log import StepLog, batch_shape
from kestrel.engine.allocator import tune_allocator
from kestrel.engine.clients import ANONYMOUS
from kestrel.engine.hardware import place
from kestrel import kernels
from kestrel.lora.manager import LoraManager, describe
from kestrel.model.model_config import ModelConfig
from kestrel.model.quant import INT4_KERNELS, int4_kernel
from kestrel.model.loader import (chat_template_ids, load_model, load_tokenizer, resolve_batch_weights,
                                  resolve_model_dir, resolve_quantization)

Prompt = Union[str, list[int]]
log = logging.getLogger("kestrel.engine")
LOOKAHEAD_SCRATCH_ROWS = 256  # draft tokens one step may hold (the table rows that describe what each sees)
CALIBRATION_CONTEXT = 256
CALIBRATION_MAX_TOKENS = 64
PREFILL_SIZED_STEP = 64  # steps of this many tokens or more tell what recomputing a conversation costs per token


@dataclass
class StreamDelta:
    """An increment of one completion since the previous delta."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list
    finished: bool
    finish_reason: Optional[str]
    cached_tokens: int = 0
    prompt_logprobs: Optional[list] = None  # on the final delta of a request that asked for them
    queue_time: Optional[float] = None  # on the final delta
    error: Optional[str] = None  # on the final delta when finish_reason is "error"
    spec: tuple[int, int, int] = (0, 0, 0)  # lookahead so far: (steps with a draft, tokens they gave, drafted)
    stop_reason: Optional[Union[int, str]] = None  # on the final delta: the stop token id or stop string


@dataclass
class EngineStats:
    steps: int = 0
    step_time: float = 0.0  # seconds inside step()
    forward_time: float = 0.0  # seconds inside the model forward (incl. logits)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    forced_tokens: int = 0  # output tokens appended by jump-forward, without a forward step each
    burst_steps: int = 0  # decode steps run inside multi-step bursts (counted in steps too)
    spec_steps: int = 0  # sequence-steps that verified a lookahead draft
    spec_tokens: int = 0  # output tokens those gave (one each plus the accepted draft tokens)
    spec_histogram: dict = field(default_factory=dict)  # tokens a lookahead step gave -> sequence-steps


class Engine:
    """An LLM engine in this process.

    >>> e = Engine()                                    # the embedded SmolLM2-135M-Instruct
    >>> e.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))[0].text
    """

    def __init__(self, model: Optional[str] = None, *, config: Optional[EngineConfig] = None, **kwargs):
        self.config = config or EngineConfig(model=model, **kwargs)
        cfg = self.config
        tune_allocator()
        self.placement = place(cfg.device, cfg.dtype, cfg.num_threads)
        self.device, self.dtype = self.placement.device, self.placement.dtype
        self.model_dir = resolve_model_dir(cfg.model, cfg.cache_dir)
        self.quantization, self.quantization_reason = resolve_quantization(
            cfg.quantization, self.model_dir, cfg.dtype, self.device)
        ops, self.kernels_reason = kernels.resolve(cfg.kernels, self.device, self.dtype,
                                                   ModelConfig.from_dir(self.model_dir).head_dim)
        # int4 on Kestrel's own kernel (AMX tiles, or AVX2), where this CPU runs one: fast up to more rows than
        # PyTorch's, so dense copies start later
        int4 = int4_kernel(ops) if self.quantization == "int4" else ""
        self.dense_copies, self.batch_weights_reason = resolve_batch_weights(
            cfg.batch_weights, self.quantization, self.model_dir, self.dtype, int4)
        self.model = load_model(self.model_dir, self.dtype, self.device, self.quantization, self.dense_copies,
                                ops if int4 else None, int4)
        self.model.kernels = ops
        if self.model.int4_kernel:
            self.kernels_reason += ", " + INT4_KERNELS[self.model.int4_kernel].description
        self.tokenizer = load_tokenizer(self.model_dir)
        mc = self.model.cfg
        self.context_length = min(cfg.context_length or mc.max_position_embeddings, mc.max_position_embeddings)
        self.vocab_size = mc.vocab_size
        per_token = KVPool.bytes_per_token(mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype)
        size = cfg.max_total_tokens or max(2, int(cfg.kv_cache_memory_gb * 2**30) // per_token)
        self.pool = KVPool(size, mc.num_layers, mc.num_kv_heads, mc.head_dim, self.dtype, self.device)
        self.lookahead_sizes: Optional[LookaheadSizes] = None
        if cfg.speculative == "lookahead":
            d = default_sizes(self.device)
            self.lookahead_sizes = LookaheadSizes(
                d.window if cfg.lookahead_window is None else cfg.lookahead_window,
                d.ngram if cfg.lookahead_ngram is None else cfg.lookahead_ngram,
                d.pool if cfg.lookahead_pool is None else cfg.lookahead_pool)
        scratch = LOOKAHEAD_SCRATCH_ROWS if self.lookahead_sizes else 0
        self.table = ReqToTokenTable(cfg.max_running_requests, self.context_length + 1, self.device, scratch)
        self.cache = RadixCache(self.pool, enabled=not cfg.disable_radix_cache)
        self.loras = LoraManager(mc, self.pool, self.dtype, cfg.max_cpu_loras, cfg.max_loras)
        self.loras.on_drop = lambda adapter: self.cache.drop_namespace(adapter.id)
        self.runner = ModelRunner(self.model, self.pool, self.table, self.device, adapters=self.loras)
        self.step_cost = None
        if self.lookahead_sizes is not None:
            self.step_cost = StepCost.flat() if cfg.lookahead_always else self._calibrate()
        swap = (SwapStore(self.pool, int(cfg.swap_space_gb * 2**30), cfg.swap_dir)
                if cfg.pause_policy in ("swap", "auto") and cfg.swap_space_gb > 0 else None)
        self.scheduler = Scheduler(cfg, self.pool, self.table, self.cache, make_policy(cfg), self.device,
                                   adapters=self.loras, step_cost=self.step_cost, swap=swap)
        self.pauses = self.scheduler.pauses
        eos = set(mc.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.sampler = Sampler(self.device, cfg.seed, eos, self.model.kernels)
        self.output = OutputProcessor(self.tokenizer, eos, self.context_length)
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, eos)
        self._requests: dict[str, list[Sequence]] = {}
        self.handoffs = Handoffs(self)  # requests moving to or from other engines
        self._ids = itertools.count()
        self.stats = EngineStats()
        self.step_log = StepLog()
        self.bursts = Bursts(self)
        for name, path in cfg.lora_modules.items():
            self.load_lora(name, path)

    def describe(self) -> str:
        """Where and how this engine computes, and why (the server logs it at start)."""
        batches = f" with {self.batch_weights_reason}" if self.batch_weights_reason else ""
        spec = ""
        if self.lookahead_sizes:
            z = self.lookahead_sizes
            when = ("on every step" if self.config.lookahead_always else
                    f"where it pays; step cost measured: {self.step_cost(4) / self.step_cost(1):.2f}x at 4 tokens, "
                    f"{self.step_cost(16) / self.step_cost(1):.2f}x at 16")
            spec = f", lookahead decoding (W={z.window}, N={z.ngram}, G={z.pool}; {when})"
        burst = ""
        if self.config.num_scheduler_steps > 1 and self.runner.can_burst(1):
            burst = f", greedy decoding in bursts of up to {self.config.num_scheduler_steps} steps"
        return (f"{self.placement.describe()}, weights {self.quantization} ({self.quantization_reason}){batches}, "
                f"{self.kernels_reason}, KV pool {self.pool.size} tokens{spec}{burst}")

    def _calibrate(self) -> StepCost:
        """Time forwards of 1..CALIBRATION_MAX_TOKENS tokens (one row over CALIBRATION_CONTEXT positions of
        scratch K/V) so lookahead's planner knows what extra tokens cost on this machine from the first step;
        each step's own time refines it after. ~1 s on two CPU cores."""
        ctx = min(CALIBRATION_CONTEXT, self.context_length - CALIBRATION_MAX_TOKENS - 1)
        row = self.table.scratch_start

        def measure(t: int) -> float:
            slots = torch.tensor(self.pool.alloc(ctx + t), dtype=torch.int64)
            try:
                self.table.table[row, :ctx + t] = slots.to(self.table.table.device)
                fb = ForwardBatch(
                    input_ids=torch.zeros(t, dtype=torch.int64, device=self.device),
                    positions=torch.arange(ctx, ctx + t, device=self.device),
                    slot_mapping=slots[ctx:].to(self.device), kv_rows=torch.tensor([row], device=self.device),
                    kv_lens=[ctx + t], q_starts=[0, t], num_decode=1 if t == 1 else 0,
                    masks=[] if t == 1 else [None], logit_index=torch.arange(t, device=self.device),
                    logits_in_order=True)
                start = time.perf_counter()
                self.runner.forward(fb)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                return time.perf_counter() - start
            finally:
                self.pool.free(slots)

        return calibrate(measure, calibration_sizes(CALIBRATION_MAX_TOKENS))

    # ---- LoRA adapters ------------------------------------------------------------------
    def load_lora(self, name: str, path: str, weights=None) -> dict:
        """Serve the PEFT LoRA adapter in directory `path` as `name`; returns its description (rank, pool slots
        it takes when in use, ...). Raises AdapterError (a ValueError) when the adapter cannot be served by
        this model, ValueError when the name is taken. `weights`: what `loras.read_async` read already."""
        adapter = self.loras.register(name, path, weights)
        log.info("LoRA adapter %r loaded from %s: rank %d, %d pool slots when in use", name, path, adapter.max_rank,
                 adapter.pages)
        return describe(adapter)

    def unload_lora(self, name: str) -> None:
        """Stop serving `name`: requests naming it are refused from now on; those already queued or running
        finish with it, and its memory is freed when the last one does. Raises UnknownAdapter (LookupError)."""
        self.loras.unregister(name)

    def list_loras(self) -> list[dict]:
        return self.loras.describe()

    def flush_cache(self) -> int:
        """Drop every cached prefix (SGLang's /flush_cache, e.g. between benchmark runs); returns the tokens
        freed. Refused (ValueError) while requests are queued or running, whose prefixes are in use."""
        if self.has_unfinished():
            raise ValueError("the cache is not flushed while requests are running or queued; retry when idle")
        self.pauses.release_all()  # paused conversations' K/V is cache too
        return self.cache.evict(self.cache.evictable_size)

    def kv_accounting(self) -> dict:
        """Where the pool's slots are: free, cached (evictable), holding idle LoRA adapters (evictable too),
        reserved for incoming requests, held by requests."""
        return dict(size=self.pool.size, free=self.pool.num_free, evictable=self.cache.evictable_size,
                    idle_adapters=self.loras.idle_pages(),
                    reserved=self.handoffs.reserved_tokens, suspended=len(self.handoffs.suspended),
                    requests=len(self._requests), running=len(self.scheduler.running),
                    waiting=len(self.scheduler.waiting))

    def client_counters(self) -> dict[str, float]:
        """The fairness policy's per-client counters (VTC; empty for other policies), which order waiting clients."""
        return dict(getattr(self.scheduler.policy, "counters", {}))

    def expire_pauses(self) -> int:
        """Release paused conversations past --pause-timeout (steps do it too; the driver calls it when idle)."""
        return self.pauses.expire()

    # ---- requests -----------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise TypeError("a prompt must be a string or a list of token ids (ints)")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}); got {bad[:5]}")
        return list(prompt)

    def add_request(self, prompt: Prompt, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None, client: Optional[str] = None, priority: int = 0,
                    lora: Optional[str] = None, pause: Optional[Callable[[str], Optional[list[str]]]] = None) -> str:
        """Queue a request; returns its id. Raises ValueError/TypeError for invalid input, UnknownAdapter
        (a LookupError) for an adapter name this engine does not serve.

        `client` names who sent it (the vtc policy shares the engine fairly between clients; default:
        one anonymous client); `priority` orders requests under the priority policy, and within a
        client under vtc (lower first); `lora` names the LoRA adapter to run with (None: the base model).
        `pause(text)` says which tools a reply that stopped on its own calls (None: it calls none): its
        conversation then pauses until a request continuing it arrives (see kestrel/engine/pauses.py)."""
        adapter = self.loras.get(lora) if lora is not None else None
        params = params or SamplingParams()
        params.validate(self.vocab_size)
        if client is not None and (not isinstance(client, str) or not client):
            raise ValueError(f"client must be a non-empty string, got {client!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("prompt is empty: give at least one token")
        total = len(ids) + params.max_tokens
        if total > self.context_length:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
                f"context length of {self.context_length} tokens; shorten the prompt or lower max_tokens"
            )
        if total > self.pool.size:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} can never fit in the KV "
                f"pool of {self.pool.size} tokens; raise max_total_tokens or lower max_tokens"
            )
        if adapter is not None and total + adapter.pages > self.pool.size:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) + the {adapter.pages} pool slots of "
                f"LoRA adapter {lora!r} can never fit in the KV pool of {self.pool.size} tokens; raise "
                f"max_total_tokens or lower max_tokens"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        spec = GrammarSpec.from_params(params)
        # one grammar position per sequence; compiling (cached) raises ValueError for an invalid constraint
        grammars = [self.grammars.state(spec) for _ in range(params.n)] if spec else [None] * params.n
        now = time.monotonic()
        seqs = [Sequence(rid, i, ids, params, arrival_time=now, client=client or ANONYMOUS, priority=priority,
                         lora=adapter, waits_for_leader=i > 0, grammar=grammars[i]) for i in range(params.n)]
        if self.lookahead_sizes is not None:
            for s in seqs:
                s.lookahead = LookaheadState.for_prompt(self.lookahead_sizes, ids)
        if pause is not None and params.n == 1:
            seqs[0].pause = pause
        self._requests[rid] = seqs
        for s in seqs:
            self.scheduler.add(s)
        self.stats.prompt_tokens += len(ids)
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its memory. Returns False if it is unknown or already done."""
        seqs = self._requests.get(request_id)
        if not seqs or all(s.finished for s in seqs):
            return False
        for s in seqs:
            if not s.finished:
                s.finish_reason = s.finish_reason or "abort"
                self.scheduler.abort(s)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def is_finished(self, request_id: str) -> bool:
        """Whether the request is known and all its completions have finished (its output not yet taken)."""
        seqs = self._requests.get(request_id)
        return bool(seqs) and all(s.finished for s in seqs)

    def request_ids(self) -> list[str]:
        """Requests whose output has not been taken yet (running, waiting or finished)."""
        return list(self._requests)

    # ---- the loop -----------------------------------------------------------------------
    def step(self) -> set[str]:
        """Run one scheduling step and forward; returns the ids of requests that progressed (or failed).

        If computing the step raises, the batch is halved until the sequences that make it raise are
        found; only their requests fail (finish_reason "error", KV freed) and the rest of the batch goes on.
        An exception from here means the engine's own state is broken (see `fail_all`)."""
        t0 = time.perf_counter()
        self.step_log.begin(t0)
        batch = self.scheduler.schedule()
        failed = self._fail_unservable()
        if batch.empty:
            return failed
        touched = {s.request_id for s in batch.sequences} | failed
        if self.bursts.run(batch, t0):
            return touched
        shape = batch_shape(batch)
        self._run(batch)
        self.stats.steps += 1
        now = time.perf_counter()
        self.stats.step_time += now - t0
        self.step_log.ran(shape, t0, now, self.has_unfinished())
        if not batch.prefill:
            self.bursts.decode_seconds[len(batch.decode)] = now - t0
        return touched

    def step_profile(self) -> dict:
        """The recent steps' (tokens, logits rows, attention pairs, seconds) and what a cost model fitted to them
        needs to know of this engine (kestrel.cluster.plan.CostModel.from_profile)."""
        return dict(samples=[list(s) for s in self.step_log.samples], kv_tokens=self.pool.size,
                    dense_split=self.model.dense_split)

    def _run(self, batch: ScheduledBatch) -> None:
        batch = batch.unfinished()  # a request may have failed in another part of the batch
        if batch.empty:
            return
        try:
            result = self._compute(batch)
        except Exception as e:  # noqa: BLE001 - isolate whatever it is to the requests that cause it
            seqs = batch.sequences
            if len(seqs) > 1:
                for half in batch.halves():
                    self._run(half)
                return
            log.exception("request %s failed in a step", seqs[0].request_id)
            self._fail_request(seqs[0].request_id, e)  # frees the slots of its unfinished step too
            return
        self._commit(batch, *result)

    def _fail_unservable(self) -> set[str]:
        """Fail the waiting requests whose adapter could not be read from disk again."""
        seqs, self.scheduler.unservable = self.scheduler.unservable, []
        for seq in seqs:
            if not seq.finished:
                self._fail_request(seq.request_id, RuntimeError(seq.lora.error))
        return {seq.request_id for seq in seqs}

    def _compute(self, batch: ScheduledBatch):
        """The forward and sampling of a step; changes nothing but the K/V of the batch's own slots (and the
        sampling generators), so it can run again on part of the batch."""
        plan = self.scheduler.plan(batch)
        t1 = time.perf_counter()
        logits, prompt_logits = self.runner.forward(plan.batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t1
        self.stats.forward_time += elapsed
        if self.step_cost is not None:
            self.step_cost.observe(plan.batch.num_tokens, elapsed)
        if plan.batch.num_tokens >= PREFILL_SIZED_STEP:
            self.pauses.observe_forward(plan.batch.num_tokens, elapsed)
        seqs = plan.sampling
        tokens, logprobs = self.sampler(logits[:len(seqs)], seqs) if seqs else ([], [])
        drafts = [(seq, logits[first:first + seq.draft.num_tokens]) for seq, first in plan.drafts]
        return (seqs, tokens, logprobs, (prompt_logits, plan.prompt_scoring) if prompt_logits is not None else None,
                drafts)

    def _commit(self, batch: ScheduledBatch, seqs, tokens, logprobs, prompt_logits, drafts) -> None:
        self.scheduler.advance(batch)
        self.scheduler.cache_prefilled(batch)
        if prompt_logits is not None:
            self._record_prompt_logprobs(*prompt_logits)
        for seq, _ in batch.prefill:  # prefill-only requests end with their prompt computed (and cached)
            if seq.num_computed == seq.total_len and not seq.samples_after(seq.total_len) and not seq.finished:
                self.output.finish(seq, "length", time.monotonic())
                self.scheduler.finish(seq)
        for seq, token, lp in zip(seqs, tokens, logprobs):
            if seq.finished:  # a sibling's failure failed the whole request
                continue
            try:
                self._append(seq, token, lp)
            except Exception as e:  # noqa: BLE001 - detokenizing or grammar: this request only
                log.exception("request %s failed after sampling", seq.request_id)
                self._fail_request(seq.request_id, e)
        start = time.perf_counter()
        for seq, logits in drafts:
            if seq.finished:
                continue
            try:
                self._verify(seq, logits)
            except Exception as e:  # noqa: BLE001 - as above
                log.exception("request %s failed after sampling", seq.request_id)
                self._fail_request(seq.request_id, e)
        if drafts:  # what drafting costs the host per drafted sequence, for the planner
            host = time.perf_counter() - start + self.scheduler.lookahead_host_time
            self.step_cost.observe_draft(host / len(drafts))

    def _verify(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Accept the longest path of the sequence's lookahead draft that matches what the sampler picks,
        token by token from the root (its pending token's logits), each through _append as in plain decoding
        (stop strings, max_tokens, grammars and their jump-forward all apply), and keep its K/V; then free the
        rest of the draft's slots and move the window on.

        Sampling: speculative sampling's rule for drafts proposed with probability one (the pool's) accepts a
        draft d with probability p(d) and otherwise draws from p without the drafts. Drawing the token as plain
        sampling does (p processed as usual, one uniform from the request's stream) and accepting the child it
        equals realizes exactly that rule, so outputs follow plain sampling's distribution, and a seeded request
        draws the same uniforms and gives the same tokens as without lookahead, whatever was drafted."""
        state = seq.lookahead
        draft, state.draft = state.draft, None
        current = seq.all_ids[-1]
        base = seq.num_computed - 1  # advance() counted the pending token
        p = seq.params
        simple = p.plain_argmax and seq.grammar is None
        argmax = self.sampler.argmax(logits).tolist() if simple or draft.window_levels else None
        window_out = state.window_outputs(draft, argmax) if draft.window_levels else None
        node, produced, rejected = 0, 0, False
        while True:
            children = draft.children.get(node, {})
            if simple:  # what the sampler would pick: the argmax of the raw logits
                token, lp = argmax[node], None
            else:
                tokens, lps = self.sampler(logits[node:node + 1], [seq])
                token, lp = tokens[0], lps[0]
            before = len(seq.output_ids)
            self._append(seq, token, lp)
            produced += 1
            child = children.get(token)
            rejected = bool(children) and child is None
            if (seq.finished or child is None or len(seq.output_ids) != before + 1
                    or seq.output_ids[-1] != token):
                break
            self.scheduler.keep_draft_token(seq, base + child)
            node = child
        if not seq.finished:
            self.scheduler.drop_draft(seq)
        if window_out is not None:
            state.after_step(draft, window_out, current)
        state.record(draft.plan, produced - 1, rejected)
        seq.spec_steps += 1
        seq.spec_tokens += produced
        seq.spec_proposed += draft.proposed
        self.stats.spec_steps += 1
        self.stats.spec_tokens += produced
        self.stats.spec_histogram[produced] = self.stats.spec_histogram.get(produced, 0) + 1

    def _append(self, seq: Sequence, token: int, lp) -> None:
        self.output.append(seq, token, lp)
        self.stats.output_tokens += 1
        if seq.index == 0 and seq.params.n > 1 and len(seq.output_ids) == 1:
            self._release_siblings(seq)
        if seq.grammar is not None and seq.finish_reason is None:
            self._advance_grammar(seq, token)
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def _fail_request(self, request_id: str, error: BaseException) -> None:
        """Finish every sequence of the request with finish_reason "error" and free its memory."""
        message = f"the engine failed on this request: {type(error).__name__}: {error}"[:500]
        now = time.monotonic()
        for seq in self._requests.get(request_id, ()):
            if not seq.finished:
                seq.error = message
                self.output.finish(seq, "error", now)
                self.scheduler.abort(seq)

    def fail_all(self, error: BaseException) -> set[str]:
        """Fail every unfinished request (after an error that leaves the engine's state in doubt);
        returns their ids."""
        failed = {rid for rid, seqs in self._requests.items() if not all(s.finished for s in seqs)}
        for rid in failed:
            try:
                self._fail_request(rid, error)
            except Exception:  # noqa: BLE001 - freeing memory may fail too; the request still ends
                for seq in self._requests[rid]:
                    seq.error = seq.error or str(error)
                    seq.finish_reason = seq.finish_reason or "error"
                    seq.status = Status.FINISHED
        return failed

    def _advance_grammar(self, seq: Sequence, token: int) -> None:
        """Move the sequence's grammar past the sampled token; finish it when only EOS can follow, and
        jump forward over tokens the grammar forces (they join the next step as one multi-token chunk)."""
        g = seq.grammar
        if not g.accept(token):  # cannot happen for a sampled token (the mask allowed it); stop, don't loop
            self.output.finish(seq, "stop", time.monotonic())
            return
        if seq.params.jump_forward and seq.params.logprobs is None:  # forced tokens have no logprobs
            canonical = g.retokenize_boundary(token)
            if canonical is not None:
                self.output.replace_last(seq, canonical)
                self._count_forced(seq, len(canonical) - 1)
                if seq.finish_reason is not None:
                    return
            for t in g.forced_tokens():
                if not g.accept(t):
                    break
                self.output.append(seq, t, None)
                self._count_forced(seq, 1)
                if seq.finish_reason is not None:
                    return
        if g.done and seq.finish_reason is None:
            self.output.finish(seq, "stop", time.monotonic())

    def _count_forced(self, seq: Sequence, n: int) -> None:
        seq.forced_tokens += n
        self.stats.forced_tokens += n
        self.stats.output_tokens += n

    @staticmethod
    def _record_prompt_logprobs(logits: torch.Tensor, rows: list[tuple[Sequence, int]]) -> None:
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([seq.prompt_ids[pos] for seq, pos in rows], device=logits.device)
        chosen = logprobs.gather(1, targets.view(-1, 1)).view(-1).tolist()
        k = max(1, max(seq.params.prompt_logprobs for seq, _ in rows))
        top_vals, top_ids = (t.tolist() for t in logprobs.topk(k, dim=-1))
        for i, (seq, pos) in enumerate(rows):
            n = seq.params.prompt_logprobs
            seq.prompt_logprobs[pos] = TokenLogprob(seq.prompt_ids[pos], chosen[i],
                                                    dict(zip(top_ids[i][:n], top_vals[i][:n])))

    def _release_siblings(self, leader: Sequence) -> None:
        self.scheduler.share_prompt(leader)
        for s in self._requests[leader.request_id][1:]:
            s.waits_for_leader = False

    def run_until_done(self, request_ids: Seq[str], progress: bool = False, desc: str = "generating") -> None:
        pending = set(request_ids)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(pending), desc=desc, unit="req")
        while pending:
            self.step()
            done = {r for r in pending if all(s.finished for s in self._requests[r])}
            if done:
                pending -= done
                if bar:
                    bar.update(len(done))
            if not self.scheduler.has_work() and pending:
                raise RuntimeError(f"engine idle with {len(pending)} unfinished requests")
        if bar:
            bar.close()

    # ---- outputs ------------------------------------------------------------------------
    def get_output(self, request_id: str, pop: bool = False) -> RequestOutput:
        seqs = self._requests.pop(request_id) if pop else self._requests[request_id]
        lead = seqs[0]
        outs = [CompletionOutput(s.index, s.text, list(s.output_ids), s.finish_reason,
                                 list(s.logprobs) if s.params.logprobs is not None else None, s.error, s.stop_reason)
                for s in seqs]
        finished = all(s.finished for s in seqs)
        ttft = lead.first_token_time - lead.arrival_time if lead.first_token_time else None
        end = max((s.finish_time or 0.0) for s in seqs)
        out = RequestOutput(request_id, lead.prompt_ids, outs, lead.cached_tokens, finished, ttft,
                            end - lead.arrival_time if finished and end else None, lead.prompt_logprob_list(),
                            lead.first_admit_time - lead.arrival_time if lead.first_admit_time else None,
                            sum(s.forced_tokens for s in seqs), sum(s.spec_steps for s in seqs),
                            sum(s.spec_tokens for s in seqs), sum(s.spec_proposed for s in seqs))
        if pop:
            self.stats.cached_tokens += lead.cached_tokens
        return out

    # ---- convenience APIs ---------------------------------------------------------------
    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
                 use_tqdm: bool = False, client: Union[str, Seq[str], None] = None,
                 priority: Union[int, Seq[int]] = 0, lora: Union[str, Seq[Optional[str]], None] = None
                 ) -> list[RequestOutput]:
        """Generate for each prompt (strings or token-id lists); outputs in prompt order.
        `client`, `priority` and `lora` (adapter names, None for the base model) are one value for all
        prompts or one per prompt (see add_request)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(sampling_params)} sampling params")
        clients = _per_prompt(client, len(prompts), "client")
        priorities = _per_prompt(priority, len(prompts), "priority")
        loras = _per_prompt(lora, len(prompts), "lora")
        rids = []
        try:
            for p, sp, c, pr, lo in zip(prompts, sampling_params, clients, priorities, loras):
                rids.append(self.add_request(p, sp, client=c, priority=pr, lora=lo))
        except Exception:
            for r in rids:
                self.abort(r)
                self._requests.pop(r, None)
            raise
        self.run_until_done(rids, progress=use_tqdm)
        return [self.get_output(r, pop=True) for r in rids]

    def client_usage(self) -> dict[str, tuple[float, int, int, int]]:
        """Per client: (weighted service received, prompt tokens processed, output tokens, waiting)."""
        return {c: u.snapshot() for c, u in self.scheduler.clients.usage.items()}

    def apply_chat_template(self, conversation: list[dict]) -> list[int]:
        if not conversation:
            raise ValueError("a conversation needs at least one message")
        for m in conversation:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError("each message must be a dict with 'role' and 'content'")
        return chat_template_ids(self.tokenizer, conversation)

    def chat(self, conversations: Union[list[dict], Seq[list[dict]]],
             sampling_params: Union[SamplingParams, Seq[SamplingParams], None] = None,
             use_tqdm: bool = False, client: Union[str, Seq[str], None] = None,
             priority: Union[int, Seq[int]] = 0, lora: Union[str, Seq[Optional[str]], None] = None
             ) -> list[RequestOutput]:
        """Generate replies to chat conversations (lists of {"role", "content"} messages)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self.generate([self.apply_chat_template(c) for c in conversations], sampling_params, use_tqdm,
                             client=client, priority=priority, lora=lora)

    def take_spec_histogram(self) -> dict[int, int]:
        """Lookahead steps by the tokens each gave, since the last call (the server's /metrics histogram)."""
        out, self.stats.spec_histogram = self.stats.spec_histogram, {}
        return out

    def take_deltas(self, request_ids) -> list[StreamDelta]:
        """What each completion of these requests produced since the last call (for streaming)."""
        out = []
        for rid in request_ids:
            for seq in self._requests.get(rid, ()):
                visible = self.output.visible_text(seq)
                sent_text, sent_ids = seq.sent
                if len(visible) > sent_text or len(seq.output_ids) > sent_ids or (seq.finished and not seq.sent_final):
                    out.append(StreamDelta(rid, seq.index, visible[sent_text:], seq.output_ids[sent_ids:],
                                           seq.logprobs[sent_ids:] if seq.params.logprobs is not None else [],
                                           seq.finished, seq.finish_reason, seq.cached_tokens,
                                           seq.prompt_logprob_list() if seq.finished else None,
                                           seq.first_admit_time - seq.arrival_time
                                           if seq.finished and seq.first_admit_time else None, seq.error,
                                           (seq.spec_steps, seq.spec_tokens, seq.spec_proposed), seq.stop_reason))
                    seq.sent = (len(visible), len(seq.output_ids))
                    seq.sent_final = seq.finished
        return out

    def stream(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None,
               lora: Optional[str] = None) -> Iterator[StreamDelta]:
        """Yield text increments of one completion as they are generated (n must be 1)."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("stream() returns one completion; use n=1")
        rid = self.add_request(prompt, params, lora=lora)
        seq = self._requests[rid][0]
        try:
            while not seq.sent_final:
                if not seq.finished:
                    self.step()
                yield from self.take_deltas([rid])
        finally:
            if not seq.finished:
                self.abort(rid)
            self._requests.pop(rid, None)


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {n} prompts but {len(value)} values of {name}")
        return list(value)
    return [value] * n

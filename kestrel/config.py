"""One dataclass of engine settings. CLI flags are generated from its fields."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional, Union

POLICIES = ("fcfs", "lpm", "priority", "vtc")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
BATCH_WEIGHTS = ("auto", "dense", "quantized")
KERNELS = ("auto", "cpp", "torch")
SPECULATIVE = ("none", "lookahead")
PAUSE_POLICIES = ("auto", "keep", "swap", "discard")


@dataclass
class EngineConfig:
    """Settings of one engine instance; keyword arguments of `Engine` map onto these fields."""

    model: Optional[str] = field(default=None, metadata={"help": "HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)"})
    dtype: str = field(default="auto", metadata={"help": "bfloat16 | float32 | float16 | auto (bfloat16 where the CPU has "
                                                            "native bf16 (AMX, AVX512-BF16), else float32; bf16 on GPUs "
                                                            "that support it)"})
    device: str = field(default="auto", metadata={"help": "cpu | cuda | auto"})
    quantization: str = field(default="auto", metadata={"help": "weights: none | int8 | int4 | auto (int4 for a GGUF "
                                                                 "file's Q4_0/Q4_1 layers unless float32 is asked "
                                                                 "for, else none)"})
    batch_weights: str = field(default="auto", metadata={"help": "with quantized weights, what steps of many tokens "
                                                                  "compute with: dense (a copy in the model's dtype "
                                                                  "dequantized from them: the same values, faster "
                                                                  "matmuls from a few rows on; bf16 needs native "
                                                                  "bf16) | quantized | auto (dense where that is fast "
                                                                  "and the copy takes under a quarter of RAM)"})
    kernels: str = field(default="auto", metadata={"help": "cpp | torch | auto (Kestrel's C++ CPU kernels, built for "
                                                          "this CPU at set-up, where they build; PyTorch ops else)"})
    num_threads: Optional[int] = field(default=None, metadata={"help": "CPU threads for the forward (default: the cores "
                                                                         "this process may use)"})
    max_total_tokens: Optional[int] = field(default=None, metadata={"help": "KV-cache pool size in tokens (default: from --kv-cache-memory-gb)"})
    kv_cache_memory_gb: float = field(default=1.0, metadata={"help": "KV-cache memory budget in GiB when --max-total-tokens is not given"})
    max_running_requests: int = field(default=64, metadata={"help": "most requests decoding at once"})
    chunked_prefill_size: int = field(default=1024, metadata={"help": "prefill tokens per step; longer prompts are split into chunks"})
    policy: str = field(default="fcfs", metadata={"help": "scheduling policy: " + " | ".join(POLICIES)})
    vtc_input_weight: float = field(default=1.0, metadata={"help": "vtc: service charged per prompt token processed"})
    vtc_output_weight: float = field(default=2.0, metadata={"help": "vtc: service charged per output token generated"})
    clip_max_new_tokens: int = field(default=4096, metadata={"help": "admission reserves KV for at most this many of a "
                                                                      "request's max_tokens (SGLang's estimate clip)"})
    client_idle_timeout: float = field(default=300.0, metadata={"help": "seconds after which a client with no work "
                                                                         "is forgotten (per-client counters)"})
    max_idle_clients: int = field(default=4096, metadata={"help": "idle clients remembered at most; the least "
                                                                   "recently active are forgotten first"})
    in_batch_prefix_tokens: int = field(default=32, metadata={"help": "a waiting prompt that shares at least this many "
                                                                        "more tokens than the cache holds with a prompt "
                                                                        "admitted in the same step waits one step and "
                                                                        "then reuses them (SGLang's in-batch prefix "
                                                                        "caching); batch jobs (kestrel sql) use 1"})
    disable_radix_cache: bool = field(default=False, metadata={"help": "turn off prefix reuse across requests"})
    seed: int = field(default=0, metadata={"help": "seed of the engine's sampling generator (per-request seeds override it)"})
    context_length: Optional[int] = field(default=None, metadata={"help": "override the model's context length"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "where converted GGUF weights are cached (default ~/.cache/kestrel)"})
    lora_modules: Optional[Union[dict, list]] = field(default=None, metadata={
        "nargs": "+", "help": "LoRA adapters (PEFT directories) to serve, as name=path or vLLM's JSON "
                              "'{\"name\": ..., \"path\": ...}'; clients pick one by its name as the model"})
    max_cpu_loras: Optional[int] = field(default=None, metadata={"help": "idle adapters kept in host memory; beyond "
                                                                          "it they are read from disk again when "
                                                                          "needed (default: all)"})
    max_loras: Optional[int] = field(default=None, metadata={"help": "most adapters resident in the pool at once "
                                                                      "(default: as many as memory holds)"})
    speculative: str = field(default="none", metadata={"help": "none | lookahead (exact parallel decoding: n-grams "
                                                                "from a Jacobi window and the prompt, verified in "
                                                                "the same forward; used on a step only when it is "
                                                                "expected to pay)"})
    num_scheduler_steps: int = field(default=16, metadata={"help": "decode steps one scheduling decision may run in "
                                                                   "one C++ call, when every running sequence "
                                                                   "decodes greedily (no logprobs, penalties, "
                                                                   "grammar, stop strings, adapter or lookahead) and "
                                                                   "nothing waits: the host's per-step work is paid "
                                                                   "once per burst (vLLM's multi-step scheduling). A "
                                                                   "burst lasts ~50 ms at most and ends at a stop "
                                                                   "token; outputs are the same. 1: off"})
    lookahead_window: Optional[int] = field(default=None, metadata={"help": "lookahead: Jacobi window columns W, 0 for "
                                                                             "candidates from the prompt and output "
                                                                             "only (default: 4 on CPU, 15 on GPU)"})
    lookahead_ngram: Optional[int] = field(default=None, metadata={"help": "lookahead: n-gram length N (window levels "
                                                                            "+ 1; candidates are N-1 tokens) "
                                                                            "(default: 5)"})
    lookahead_pool: Optional[int] = field(default=None, metadata={"help": "lookahead: candidates verified per step and "
                                                                           "n-grams kept per first token, G "
                                                                           "(default: 4 on CPU, 15 on GPU)"})
    lookahead_always: bool = field(default=False, metadata={"help": "lookahead: draft on every step as deep as the "
                                                                     "sizes allow (the paper's behaviour), instead "
                                                                     "of only where the measured step cost says it "
                                                                     "pays"})
    pause_policy: str = field(default="auto", metadata={"help": "what happens to the KV of a conversation waiting on "
                                                                 "its tool calls: keep (pinned until it returns) | "
                                                                 "swap (copied to the swap tier; its pool slots are "
                                                                 "ordinary cache) | discard (ordinary cache) | auto "
                                                                 "(pinned while memory is free; when it is needed, "
                                                                 "the conversation expected back last is swapped or "
                                                                 "discarded, whichever costs less)"})
    pause_timeout: float = field(default=300.0, metadata={"help": "seconds after which a paused conversation that has "
                                                                   "not come back is released"})
    swap_space_gb: float = field(default=4.0, metadata={"help": "GiB of the swap tier for paused conversations' KV "
                                                               "(files on disk for a CPU pool, pinned host memory "
                                                               "for a GPU pool); 0 turns it off"})
    swap_dir: Optional[str] = field(default=None, metadata={"help": "where the CPU swap tier's files go (default: "
                                                                     "the system's temporary directory)"})
    enable_lora: bool = field(default=False, metadata={"help": "accepted for vLLM's command lines: adapters are "
                                                                "always enabled"})

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.batch_weights not in BATCH_WEIGHTS:
            raise ValueError(f"batch_weights must be one of {BATCH_WEIGHTS}, got {self.batch_weights!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError(f"dtype must be auto, bfloat16, float32 or float16, got {self.dtype!r}")
        for name in ("max_running_requests", "chunked_prefill_size", "clip_max_new_tokens", "in_batch_prefix_tokens",
                     "num_scheduler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.vtc_input_weight < 0 or self.vtc_output_weight < 0:
            raise ValueError("vtc_input_weight and vtc_output_weight must be >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.client_idle_timeout < 0 or self.max_idle_clients < 0:
            raise ValueError("client_idle_timeout and max_idle_clients must be >= 0")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ValueError(f"max_total_tokens must be >= 2, got {self.max_total_tokens}")
        for name in ("max_cpu_loras", "max_loras"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {SPECULATIVE}, got {self.speculative!r}")
        for name, low in (("lookahead_window", 0), ("lookahead_ngram", 2), ("lookahead_pool", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.pause_policy not in PAUSE_POLICIES:
            raise ValueError(f"pause_policy must be one of {PAUSE_POLICIES}, got {self.pause_policy!r}")
        if self.pause_timeout < 0 or self.swap_space_gb < 0:
            raise ValueError("pause_timeout and swap_space_gb must be >= 0")
        self.lora_modules = parse_lora_modules(self.lora_modules)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def parse_lora_modules(spec) -> dict[str, str]:
    """{name: path} from a dict, or from a list of "name=path" / '{"name": ..., "path": ...}' strings (vLLM's forms)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for entry in ([spec] if isinstance(spec, str) else spec):
            if isinstance(entry, str) and entry.lstrip().startswith("{"):
                try:
                    obj = json.loads(entry)
                    items.append((obj["name"], obj["path"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"lora module {entry!r}: JSON form needs \"name\" and \"path\"") from None
            elif isinstance(entry, str) and "=" in entry:
                items.append(tuple(entry.split("=", 1)))
            else:
                raise ValueError(f"lora module {entry!r}: give name=path")
    out: dict[str, str] = {}
    for name, path in items:
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ValueError(f"lora module {name!r}={path!r}: name and path must be non-empty strings")
        if name in out:
            raise ValueError(f"lora module name {name!r} is given twice")
        out[name] = path
    return out

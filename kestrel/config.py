"""One dataclass of engine settings. CLI flags are generated from its fields."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

POLICIES = ("fcfs", "lpm", "priority", "vtc")
QUANTIZATIONS = ("auto", "none", "int8", "int4")
KERNELS = ("auto", "cpp", "torch")


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
    disable_radix_cache: bool = field(default=False, metadata={"help": "turn off prefix reuse across requests"})
    seed: int = field(default=0, metadata={"help": "seed of the engine's sampling generator (per-request seeds override it)"})
    context_length: Optional[int] = field(default=None, metadata={"help": "override the model's context length"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "where converted GGUF weights are cached (default ~/.cache/kestrel)"})

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise ValueError(f"dtype must be auto, bfloat16, float32 or float16, got {self.dtype!r}")
        for name in ("max_running_requests", "chunked_prefill_size", "clip_max_new_tokens"):
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

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

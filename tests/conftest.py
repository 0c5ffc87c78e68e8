"""Shared fixtures: tiny random-weight models built locally, the embedded model, prompts."""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import pytest
import torch

from tests.lora_utils import copy_tokenizer
from tests.server_utils import ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about kestrels.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers greater than 10.",
    "Translate 'good morning' into Spanish.",
    "What is 17 times 3? Show your working.",
    "Give me a short motivational quote about learning to code, and explain what it means to you in a sentence or two.",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "hi",
    "Write a Python function that returns the square of a number, with a docstring and a type hint, and then explain how to call it.",
    "What are the main differences between a cat and a dog as pets? Answer briefly.",
    "Name a famous bridge.",
]


@pytest.fixture(scope="module", autouse=True)
def _return_freed_memory():
    """Before each module, give the memory that earlier modules' engines freed back to the OS. glibc keeps freed
    heap memory for reuse, and engines of other shapes reuse little of it: without this the pytest process grew
    to ~16 GB over the suite on a 24 GiB machine (malloc_trim took one module's 3.2 GB back to 0.5 GB). Before,
    not after: pytest holds the last test's fixture values until its teardown is over."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if libc and hasattr(ctypes.CDLL(libc), "malloc_trim"):
        ctypes.CDLL(libc).malloc_trim(0)
    yield


@pytest.fixture(scope="session")
def embedded_dir() -> str:
    from kestrel.model.loader import resolve_model_dir
    return resolve_model_dir(None)


@pytest.fixture(scope="session")
def tokenizer(embedded_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="session")
def chat_prompt_ids(tokenizer) -> list[list[int]]:
    out = []
    for q in CHAT_PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def kernel_device(kernels: str) -> str:
    """The device for an engine on `kernels`: the C++ kernels are CPU kernels, so on a GPU machine the tests of
    them run on its CPU (and the others on the GPU)."""
    return "cpu" if kernels == "cpp" else "auto"


def _save_tiny(tmp_root, embedded_dir, name, hf_config) -> str:
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init: peaked logits make greedy ties unlikely
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    path = os.path.join(tmp_root, name)
    model.save_pretrained(path, max_shard_size="2MB")  # sharded on purpose
    copy_tokenizer(embedded_dir, path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_dir) -> str:
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 256})
    return _save_tiny(str(tmp_path_factory.mktemp("models")), embedded_dir, "tiny-llama", cfg)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, embedded_dir) -> str:
    from transformers import Qwen2Config
    cfg = Qwen2Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    return _save_tiny(str(tmp_path_factory.mktemp("models")), embedded_dir, "tiny-qwen2", cfg)


# Servers for the test modules that need only a server to talk to, not one set up their way. Module-scoped: a
# session-wide server stays in memory to the end, and beside the test process's own engines that ran a clean
# run out of memory on a 24 GiB machine (OOM-killed at 73%).
@pytest.fixture(scope="module")
def embedded_server():
    """`kestrel serve` on the embedded model with its default settings and a 16k-token KV pool."""
    srv = ServerProcess("--max-total-tokens", "16384")
    yield srv
    assert srv.stop() == 0, "SIGTERM should shut the server down cleanly"


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_dir):
    """`kestrel serve` on the tiny Llama in float32 (exact against an in-process engine) with an 8k-token KV pool."""
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--max-total-tokens", "8192")
    yield srv
    assert srv.stop() == 0, "SIGTERM should shut the server down cleanly"


def hf_greedy(model_dir: str, prompts: list[list[int]], max_new_tokens: int, dtype=torch.float32,
              stop_at_eos: bool = True) -> list[list[int]]:
    """Reference: HF transformers greedy decoding, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    outs = []
    for ids in prompts:
        with torch.no_grad():
            kwargs = {} if stop_at_eos else {"eos_token_id": None}
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
        outs.append(gen[0, len(ids):].tolist())
    return outs

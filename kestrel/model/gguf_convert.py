"""Turn a GGUF file into a plain Hugging Face model directory, cached on disk.

Dequantization goes through the `gguf` package; the tokenizer is built from the GGUF metadata by
transformers. The result (config.json, float32 safetensors, tokenizer files) is written once per
GGUF file, so later starts load it in seconds, and any HF-compatible tool can read it too.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import numpy as np

CONVERTER_VERSION = 3  # 2: records the layers' quantization types in kestrel.json; 3: checks the tokenizer

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def default_cache_dir() -> str:
    return os.environ.get("KESTREL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kestrel"))


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF's rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, kind: str, cfg: dict) -> np.ndarray:
    """`w` (rows first) of a layer tensor of `kind` with llama.cpp's Q/K permutation undone where it has one
    (a llama model's attn_q and attn_k), as is otherwise."""
    if cfg["model_type"] != "llama" or kind not in ("attn_q", "attn_k"):
        return w
    return _unpermute(w, cfg["num_attention_heads"] if kind == "attn_q" else cfg["num_key_value_heads"])


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    tokens = _field(reader, "tokenizer.ggml.tokens")
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": _field(reader, f"{arch}.vocab_size") or len(tokens),
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": _field(reader, f"{arch}.context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }
    if arch == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    return cfg


def convert_gguf(gguf_path: str, out_dir: str, progress: bool = True) -> None:
    """Write config.json, model.safetensors and tokenizer files for `gguf_path` into `out_dir`."""
    import gguf
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(gguf_path)
    cfg = gguf_config(reader)
    tensors = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", disable=not progress, unit="tensor"):
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif t.name.startswith("blk."):
            _, idx, kind, param = t.name.split(".")
            if kind not in LAYER_NAMES:
                raise ValueError(f"unexpected GGUF tensor {t.name}")
            w = unpermute_qk(w, kind, cfg)
            name = f"model.layers.{idx}.{LAYER_NAMES[kind]}.{param}"
        else:
            continue  # e.g. rope_freqs: derived from the config instead
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    layer_types = sorted({t.tensor_type.name for t in reader.tensors
                          if t.name.startswith("blk.") and t.name.split(".")[2] in LINEAR_KINDS})
    with open(os.path.join(out_dir, "kestrel.json"), "w") as f:
        json.dump({"gguf_file": os.path.abspath(gguf_path), "gguf_layer_types": layer_types}, f, indent=2)
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                              gguf_file=os.path.basename(gguf_path))
    check_tokenizer(tokenizer, cfg)
    tokenizer.save_pretrained(out_dir)


def check_tokenizer(tokenizer, cfg: dict) -> None:
    """Refuse a tokenizer transformers built wrongly from GGUF metadata. transformers 5.17 gave byte-level BPE
    vocabularies (SmolLM2's) a SentencePiece decoder and the wrong EOS: generation would not stop, and the
    grammar engine, which reads each token's bytes through the decoder, would allow the wrong tokens."""
    import transformers

    want = cfg.get("eos_token_id")
    if want is not None and tokenizer.eos_token_id != want:
        raise ValueError(
            f"transformers {transformers.__version__} converted this GGUF file's tokenizer wrongly (EOS token id "
            f"{tokenizer.eos_token_id}, the file says {want}); install transformers>=5.18")


def gguf_origin(model_dir: str) -> dict | None:
    """What a directory converted from GGUF records of its source: `gguf_file` (its path) and
    `gguf_layer_types` (the quantization types of its layers' linear weights); None for other directories."""
    path = os.path.join(model_dir, "kestrel.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def cached_hf_dir(gguf_path: str, cache_dir: str | None = None, progress: bool = True) -> str:
    """The HF directory converted from `gguf_path`, converting on first use."""
    st = os.stat(gguf_path)
    key = f"{os.path.abspath(gguf_path)}:{st.st_size}:{int(st.st_mtime)}:{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    root = os.path.join(cache_dir or default_cache_dir(), "gguf")
    target = os.path.join(root, f"{stem}-{digest}")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    try:
        convert_gguf(gguf_path, tmp, progress=progress)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

"""GGUF's 4-bit blocks read straight into int4 layers, without a detour through float weights.

A Q4_0 block is 32 weights: an fp16 scale d and 16 bytes of 4-bit values (byte j holds weight j in its
low nibble and weight j + 16 in its high one); w = d * (q - 8). Q4_1 adds an fp16 minimum m: w = d * q + m.
Both are the int4 kernel's w = (q - 8) * scale + zero with scale = d and zero = 0 (Q4_0) or m + 8 d (Q4_1).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from kestrel.model.gguf_convert import gguf_config, unpermute_qk
from kestrel.model.quant import INT4_GROUP, Int4Linear

INT4_TYPES = ("Q4_0", "Q4_1")
INT4_CACHE = os.path.join("int4", "blocks.safetensors")  # a subfolder: not one of the model's weight files
LAYER_LINEARS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
                 "down": ("ffn_down",)}


def _blocks(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [N, K] uint8 in 0..15, scale [N, K/32] float32, zero [N, K/32] float32) of a Q4_0/Q4_1 tensor."""
    kind = tensor.tensor_type.name
    raw = np.asarray(tensor.data)
    n = raw.shape[0]
    size = 18 if kind == "Q4_0" else 20
    blocks = raw.reshape(n, -1, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q4_0":
        zero = np.zeros_like(d)
        nibbles = blocks[..., 2:]
    else:
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zero = m + 8 * d
        nibbles = blocks[..., 4:]
    q = np.concatenate((nibbles & 0x0F, nibbles >> 4), axis=-1)  # weights 0..15, then 16..31 of each block
    return q.reshape(n, -1), d, zero


def load_int4_layers(gguf_path: str, cache_dir: Optional[str] = None) -> Optional[dict[int, dict[str, Int4Linear]]]:
    """Each layer's fused linears (qkv, o, gate_up, down) as int4, from a GGUF whose layer weights are all
    Q4_0/Q4_1 blocks of 32; None if the file has other kinds (load those through float instead). With a
    cache_dir, the blocks are kept there once unpacked (int4/blocks.safetensors), so later loads skip the GGUF
    parse (several seconds for a large vocabulary)."""
    cached = os.path.join(cache_dir, INT4_CACHE) if cache_dir else None
    if cached and os.path.exists(cached):
        arrays = _read_cache(cached)
    else:
        arrays = _read_gguf(gguf_path)
        if arrays is not None and cached:
            _write_cache(arrays, cached)
    if arrays is None:
        return None
    return {i: {name: Int4Linear(q, scale, zero, bias, INT4_GROUP) for name, (q, scale, zero, bias) in layer.items()}
            for i, layer in arrays.items()}


Arrays = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]]


def _read_gguf(gguf_path: str) -> Optional[Arrays]:
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    cfg = gguf_config(reader)
    by_name = {t.name: t for t in reader.tensors}
    layers: Arrays = {}
    for i in range(cfg["num_hidden_layers"]):
        layers[i] = {}
        for fused, parts in LAYER_LINEARS.items():
            qs, scales, zeros, biases = [], [], [], []
            for part in parts:
                t = by_name.get(f"blk.{i}.{part}.weight")
                if t is None or t.tensor_type.name not in INT4_TYPES:
                    return None
                q, scale, zero = (unpermute_qk(a, part, cfg) for a in _blocks(t))  # rows, as the float conversion
                qs.append(q), scales.append(scale), zeros.append(zero)
                bias = by_name.get(f"blk.{i}.{part}.bias")
                biases.append(None if bias is None else gguf.quants.dequantize(bias.data, bias.tensor_type))
            q = torch.from_numpy(np.concatenate(qs))
            if q.shape[0] % 16:
                return None
            bias = None if biases[0] is None else torch.from_numpy(np.concatenate(biases).astype(np.float32))
            layers[i][fused] = (q, torch.from_numpy(np.concatenate(scales)), torch.from_numpy(np.concatenate(zeros)),
                                bias)
    return layers


def _write_cache(arrays: Arrays, path: str) -> None:
    from safetensors.torch import save_file

    flat = {}
    for i, layer in arrays.items():
        for name, (q, scale, zero, bias) in layer.items():
            key = f"{i}.{name}"
            flat[key + ".q"] = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # two weights per byte
            flat[key + ".scale"], flat[key + ".zero"] = scale.contiguous(), zero.contiguous()
            if bias is not None:
                flat[key + ".bias"] = bias
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(flat, tmp)
    os.replace(tmp, path)


def _read_cache(path: str) -> Arrays:
    from safetensors.torch import load_file

    flat = load_file(path)
    layers: Arrays = {}
    for key in flat:
        if not key.endswith(".q"):
            continue
        i, name = key[:-2].split(".", 1)
        packed = flat[key]
        q = torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], -1)
        prefix = key[:-2]
        layers.setdefault(int(i), {})[name] = (q, flat[prefix + ".scale"], flat[prefix + ".zero"],
                                               flat.get(prefix + ".bias"))
    return layers

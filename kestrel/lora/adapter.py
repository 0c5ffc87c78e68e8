"""LoRA adapters in PEFT's format: read, validate against the base model, and describe their layout.

A PEFT adapter directory holds `adapter_config.json` (parsed by PEFT's own `LoraConfig`) and
`adapter_model.safetensors` (or the older `adapter_model.bin`) with tensors named like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ([r, in]) and `...lora_B.weight`
([out, r]). The adapted projection computes W x + scale * B A x, scale = lora_alpha / r (rsLoRA:
lora_alpha / sqrt(r)), with r and alpha per module when rank_pattern / alpha_pattern say so.

Everything that can be wrong with an adapter is found here, at load time: a missing file, an
option Kestrel does not compute (DoRA, trained biases, modules_to_save), a module that is not one of
the seven projections, or shapes that do not fit the base model.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from kestrel.model.model_config import ModelConfig

# The projections an adapter may target, in the order they are laid out in the pool, with the fused
# linear ("site") each one is part of.
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SITES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot be served by this model; the message says what to fix."""


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """Per target: (in features, out features, offset of its output within its fused site)."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return {"q_proj": (h, q, 0), "k_proj": (h, kv, q), "v_proj": (h, kv, q + kv), "o_proj": (q, h, 0),
            "gate_proj": (h, inter, 0), "up_proj": (h, inter, inter), "down_proj": (inter, h, 0)}


@dataclass
class LoraWeights:
    """An adapter's low-rank factors, by (layer, target): A [r, in], B [out, r] with the scale folded in."""

    name: str
    path: str
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.modules.values()), default=0)

    @property
    def num_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.modules.values())

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())

    def delta(self, layer: int, target: str) -> torch.Tensor | None:
        """The dense weight update scale * B @ A of one module (merging it into W gives the reference)."""
        ab = self.modules.get((layer, target))
        return None if ab is None else ab[1].float() @ ab[0].float()


def _read_config(path: str):
    from peft import LoraConfig  # PEFT parses and validates its own config format

    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise AdapterError(f"{path!r} is not a PEFT adapter directory: adapter_config.json is missing")
    with open(config_file) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{config_file}: not valid JSON ({e})") from None
    if raw.get("peft_type", "LORA").upper() != "LORA":
        raise AdapterError(f"{path!r} is a {raw.get('peft_type')} adapter; Kestrel serves LoRA adapters")
    try:
        config = LoraConfig.from_pretrained(path)
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{config_file}: {e}") from None
    unsupported = []
    if getattr(config, "use_dora", False):
        unsupported.append("use_dora (DoRA)")
    if getattr(config, "bias", "none") != "none" or getattr(config, "lora_bias", False):
        unsupported.append(f"bias={config.bias!r} (trained biases)")
    if getattr(config, "modules_to_save", None):
        unsupported.append(f"modules_to_save={config.modules_to_save}")
    if getattr(config, "fan_in_fan_out", False):
        unsupported.append("fan_in_fan_out (GPT-2 style Conv1D weights)")
    if unsupported:
        raise AdapterError(f"adapter {path!r} uses {', '.join(unsupported)}, which Kestrel does not serve")
    return config


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    st, pt = os.path.join(path, "adapter_model.safetensors"), os.path.join(path, "adapter_model.bin")
    if os.path.isfile(st):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"{st}: cannot be read ({e})") from None
    if os.path.isfile(pt):
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
            raise AdapterError(f"{pt}: cannot be read ({e})") from None
    raise AdapterError(f"{path!r} holds no adapter weights: adapter_model.safetensors is missing")


def load_adapter(name: str, path: str, cfg: ModelConfig, dtype: torch.dtype) -> LoraWeights:
    """Read and check a PEFT LoRA adapter for a model of config `cfg`; factors come back in `dtype`."""
    from peft.utils.other import get_pattern_key

    if not os.path.isdir(path):
        raise AdapterError(f"LoRA adapter {name!r}: {path!r} is not a directory")
    config = _read_config(path)
    tensors = _read_tensors(path)
    shapes = target_shapes(cfg)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} is not a LoRA factor of a decoder projection "
                               f"(Kestrel adapts {', '.join(TARGETS)})")
        layer, target, which = int(m.group(1)), m.group(2), m.group(3)
        if target not in shapes:
            raise AdapterError(f"adapter {name!r} targets {target!r}, which Kestrel cannot adapt; supported "
                               f"target modules: {', '.join(TARGETS)}")
        if not 0 <= layer < cfg.num_layers:
            raise AdapterError(f"adapter {name!r} adapts layer {layer}; the base model has {cfg.num_layers} layers")
        pairs.setdefault((layer, target), {})[which] = t
    if not pairs:
        raise AdapterError(f"adapter {name!r} ({path}) holds no LoRA weights")
    out = LoraWeights(name, path)
    for (layer, target), ab in sorted(pairs.items(), key=lambda kv: (kv[0][0], TARGETS.index(kv[0][1]))):
        where = f"adapter {name!r}, layer {layer} {target}"
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{where}: lora_{'B' if 'A' in ab else 'A'} is missing")
        a, b = ab["A"], ab["B"]
        fan_in, fan_out, _ = shapes[target]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a low-rank "
                               f"pair [r, in] / [out, r]")
        if a.shape[1] != fan_in or b.shape[0] != fan_out:
            raise AdapterError(f"{where}: factors {tuple(a.shape)} / {tuple(b.shape)} do not fit the base model's "
                               f"{fan_out} x {fan_in} weight (an adapter for another model?)")
        module = f"model.layers.{layer}.{'self_attn' if target in SITES['qkv'] + ('o_proj',) else 'mlp'}.{target}"
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        r = a.shape[0]
        if r != rank:
            raise AdapterError(f"{where}: the weights have rank {r} but adapter_config.json says r={rank}")
        scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        out.modules[(layer, target)] = (a.to(dtype).contiguous(), (b.float() * scale).to(dtype).contiguous())
    return out

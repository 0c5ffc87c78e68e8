"""The Llama family (Llama 2/3, SmolLM2, TinyLlama, Mistral) and Qwen2, as one model.

Differences are configuration: Qwen2 adds q/k/v biases; Llama 3 scales RoPE frequencies.
Q/K/V and gate/up projections are fused so a layer is a handful of large ops.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kestrel.model.attention import AttentionMetadata, kernel_attention, paged_attention
from kestrel.model.linear import Linear, can_prepack
from kestrel.model.model_config import ModelConfig
from kestrel.huge_pages import into_huge_pages
from kestrel.model.quant import COMPUTE, INT4_KERNELS, Int4Linear, Int8Linear, QuantLinear, quantize


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind != "default":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")
    return inv_freq


# a quantized model with dense copies uses its quantized weights up to this many rows (freeze). Measured on Zen 4
# (one row at context 300, logits of every row): int4 9.3/11.1/12.6 ms at 2/3/4 rows against dense bf16 16.9/15.2/15.6;
# from 5 rows dense wins (16.2 against 21.8). Lookahead decoding's small token trees live in this range.
QUANTIZED_MAX_ROWS = 4
# ... and with float32 copies (CPUs without native bf16, where float32 is the fast dense path). Measured on a Xeon
# without native bf16 (benchmarks/bench_dense_rows.py; decode steps at context 300, ms): int4 46.0/66.2/86.6/169.9
# at 16/24/32/64 rows against dense float32 56.3/68.3/79.9/134.8; a 512-token prefill runs 2x faster dense.
QUANTIZED_MAX_ROWS_F32 = 24
# ... and with int4 on the AMX tile kernel (kestrel/kernels/int4_tiles.cpp), which expands each weight once per step
# for all rows. Measured on a 2-core AMX Xeon (benchmarks/bench_dense_rows.py, decode steps at context 300, ms): tiles
# 7.4/12.6/16.7/23.7/36.9/52.7/67.2 at 1/4/8/16/32/48/64 rows against dense bf16 17.4/20.2/22.5/27.3/41.5/54.1/65.0
TILES_MAX_ROWS = 48
# ... and with int4 on the AVX2 kernel (same file; float32 copies). Measured on a 2-core Xeon restricted to AVX2
# (benchmarks/bench_dense_rows.py, decode steps at context 300, ms): 9.4/32.7/61.0/86.6/114.2/167.0/225.3 at
# 1/8/16/24/32/48/64 rows against dense float32 24.3/62.4/85.1/107.6/120.9/147.0/186.6
VECTOR_MAX_ROWS = 32

# an int8 head's logits of up to this many rows come from Kestrel's int8 kernel (kestrel/kernels/cpu_kernels.cpp),
# more from PyTorch's. Measured on a 2-core AMX Xeon, SmolLM2-135M's head (ms, PyTorch's against Kestrel's, which
# widens each weight once for up to four rows): 0.94/0.55, 1.14/0.66, 1.60/0.94, 3.24/1.96, 9.68/5.73 at 1/2/4/8/24
# rows; restricted to AVX2: 1.17/0.63, 1.44/0.91, 2.30/1.78, 4.76/3.31, 13.87/10.12. 24 rows: a float32 model's
# int8 head serves up to that many (QUANTIZED_MAX_ROWS_F32)
INT8_KERNEL_ROWS = 24


def quantized_max_rows(dtype: torch.dtype, int4_kernel: str = "") -> int:
    """Steps of up to this many tokens run on a quantized model's quantized weights, longer ones on its dense copies
    (`int4_kernel`: which of Kestrel's int4 kernels runs its int4 linears, kestrel.model.quant.int4_kernel)."""
    if int4_kernel == "amx":
        return TILES_MAX_ROWS
    if int4_kernel == "avx2":
        return VECTOR_MAX_ROWS
    return QUANTIZED_MAX_ROWS_F32 if dtype == torch.float32 else QUANTIZED_MAX_ROWS


def _no_adapter(layer: int, site: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
        self.input_norm = nn.Parameter(torch.ones(h))
        self.qkv = nn.Parameter(torch.empty(qkv_out, h))
        self.qkv_bias = nn.Parameter(torch.zeros(qkv_out)) if cfg.qkv_bias else None
        self.o = nn.Parameter(torch.empty(h, cfg.num_heads * d))
        self.post_norm = nn.Parameter(torch.ones(h))
        self.gate_up = nn.Parameter(torch.empty(2 * cfg.intermediate_size, h))
        self.down = nn.Parameter(torch.empty(h, cfg.intermediate_size))
        self.fast: tuple | None = None  # qkv, o, gate_up, down: Linear or QuantLinear, set by freeze()
        self.dense: tuple | None = None  # a quantized layer's dense copies, for steps of many tokens (freeze)

    def linears(self, dense: bool = False) -> tuple[Linear, Linear, Linear, Linear]:
        """The layer's linears; `dense`: its dense copies where it has them (LlamaForCausalLM.dense_step)."""
        if dense and self.dense is not None:
            return self.dense
        if self.fast is None:
            return (Linear(self.qkv, self.qkv_bias, False), Linear(self.o, None, False),
                    Linear(self.gate_up, None, False), Linear(self.down, None, False))
        return self.fast


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.inv_freq = rope_inv_freq(cfg)  # float32, deliberately not a buffer: .to(bf16) must not round it
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lm_head: Linear | None = None
        self._lm_head_small: Int8Linear | None = None  # a quantized model's int8 head, for a row or two (freeze)
        self.dense_above = QUANTIZED_MAX_ROWS  # steps of more tokens run on the dense copies (freeze)
        self.head_small_rows = QUANTIZED_MAX_ROWS  # logits of up to this many rows come from the int8 head (freeze)
        self.int4_kernel = ""  # Kestrel's kernel that runs the int4 linears: amx | avx2 (freeze)
        self.kernels = None  # the C++ CPU kernels module (kestrel.kernels), or None: PyTorch ops alone
        self._layer_specs: tuple | None = None  # the layers as decoder_layers() takes them (see layer_specs)
        self._stack: tuple | None = None  # (the KV caches, the kernels' DecoderStack over them): decoder_stack()

    @torch.no_grad()
    def freeze(self, quantization: str = "none", prebuilt: dict[int, dict] | None = None,
               dense_copies: bool = False, tiles=None, tiles_kernel: str = "amx") -> None:
        """Prepare for inference after loading: pre-pack weights where that is exact and faster, or quantize
        them (int8 | int4). The output head of a quantized model is int8; where oneDNN's bf16 path exists
        (native-bf16 CPUs) a dense packed copy serves logits of more than QUANTIZED_MAX_ROWS rows (measured on
        Zen 4: int8 ~7% faster at batch-1 decode, where bytes read decide; the dense copy 2x faster at 4 rows and
        4x at 16, where int8's compute does). With `dense_copies` the layers' linears get the same treatment:
        steps of more than `quantized_max_rows` tokens run on copies in the model's dtype dequantized from the
        quantized weights (bf16 on native-bf16 CPUs: oneDNN's bf16 matmul is 2-2.5x faster than the int4 kernel
        from 8 rows on, while up to four rows read a quarter of the bytes with int4; float32 elsewhere), and so do
        the logits. `prebuilt` holds layers' linears already
        quantized (read straight from a GGUF file), by layer index and name. `tiles`: the C++ kernels module, whose
        int4 kernel `tiles_kernel` (amx | avx2: quant.int4_kernel) then runs the int4 linears (Int4Linear.to_tiles),
        and steps of up to `quantized_max_rows` tokens on them.

        Packed or quantized weights replace the dense ones (the embedding stays dense for lookups), so the
        model's weights cannot be reloaded afterwards.
        """
        packable = can_prepack(self.embed)
        pack = quantization == "none" and packable
        self.dense_above = self.head_small_rows = quantized_max_rows(self.embed.dtype)
        self.int4_kernel = ""
        self._layer_specs = self._stack = None
        names = ("qkv", "o", "gate_up", "down")
        for i, layer in enumerate(self.layers):
            ready = (prebuilt or {}).get(i, {})
            fast = []
            for name in names:
                bias = layer.qkv_bias if name == "qkv" else None
                if name in ready:
                    fast.append(ready[name])
                elif quantization == "none":
                    fast.append(Linear(getattr(layer, name), bias, pack))
                else:
                    fast.append(quantize(getattr(layer, name), bias, quantization))
            layer.fast = tuple(fast)
            if dense_copies and quantization != "none":  # before the tiles: they read the codes as built
                dt = self.embed.dtype
                layer.dense = tuple(Linear(f.dequantize(dt), f.bias, packable) for f in fast)
            if tiles is not None:
                for f in fast:
                    if isinstance(f, Int4Linear):
                        f.to_tiles(tiles, tiles_kernel)
                        self.int4_kernel = tiles_kernel
            for f in fast:
                if isinstance(f, Int4Linear):
                    f.release_source()
            for name in names:
                if pack or quantization != "none" or name in ready:
                    getattr(layer, name).data = torch.empty(0, dtype=self.embed.dtype)
        if self.int4_kernel:
            self.dense_above = quantized_max_rows(self.embed.dtype, self.int4_kernel)
        head = self.embed if self.lm_head is None else self.lm_head
        self._lm_head_small = None
        if quantization == "none":
            self._lm_head = Linear(head, None, pack)
        elif packable or dense_copies:  # the head has the embedding's dtype
            self._lm_head = Linear(head, None, packable)
            self._lm_head_small = Int8Linear.from_float(head)
        else:
            self._lm_head = Int8Linear.from_float(head)
        if quantization != "none" and self.lm_head is not None:
            self.lm_head.data = torch.empty(0, dtype=self.embed.dtype)
        if quantization != "none" and self.embed.device.type == "cpu":
            self._streamed_into_huge_pages()

    def _streamed_into_huge_pages(self) -> None:
        """Move what a decode step reads of the quantized linears and the int8 head into huge pages (see
        kestrel.huge_pages)."""
        linears = [f for layer in self.layers for f in layer.fast if isinstance(f, QuantLinear)]
        linears += [h for h in (self._lm_head_small, self._lm_head) if isinstance(h, QuantLinear)]
        slots = [(lin, name) for lin in linears for name in lin.streamed()]
        values = [getattr(lin, name) for lin, name in slots]
        flat = [t for v in values for t in (v if isinstance(v, tuple) else (v,))]
        copies = into_huge_pages(flat)
        if copies is None:
            return
        it = iter(copies)
        for (lin, name), v in zip(slots, values):
            setattr(lin, name, tuple(next(it) for _ in v) if isinstance(v, tuple) else next(it))

    def rope_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for every position, computed in float32 as HF does, then cast to the model dtype."""
        if self._rope_cache is None:
            pos = torch.arange(self.cfg.max_position_embeddings, dtype=torch.float32)
            freqs = torch.outer(pos, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            dev, dt = self.embed.device, self.embed.dtype
            self._rope_cache = (emb.cos().to(dev, dt), emb.sin().to(dev, dt))
        return self._rope_cache

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        lora=None,
    ) -> torch.Tensor:
        """Hidden states after the final norm, [T, hidden]. `lora` (a kestrel.lora.batch.LoraBatch) adds each
        token's adapter's low-rank update to the output of every linear it adapts."""
        if self.kernels is not None:
            return self._forward_kernels(input_ids, positions, meta, kv_caches, lora)
        adapt = lora.apply if lora is not None else _no_adapter
        cfg = self.cfg
        nh, nkv, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        num_tokens = input_ids.shape[0]
        cos_table, sin_table = self.rope_tables()
        cos = cos_table[positions].unsqueeze(1)
        sin = sin_table[positions].unsqueeze(1)
        half = d // 2
        hidden = F.embedding(input_ids, self.embed)
        norm_shape = (cfg.hidden_size,)
        dense = self.dense_step(num_tokens)
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            qkv_proj, o_proj, gate_up_proj, down_proj = layer.linears(dense)
            x = F.rms_norm(hidden, norm_shape, layer.input_norm, eps)
            qkv = adapt(i, "qkv", x, qkv_proj(x))
            qk = qkv[:, : (nh + nkv) * d].view(num_tokens, nh + nkv, d)
            # rotate_half in one cat: (-x2, x1)
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rotated * sin
            v = qkv[:, (nh + nkv) * d:].view(num_tokens, nkv, d)
            attn = paged_attention(qk[:, :nh], qk[:, nh:], v, k_cache, v_cache, meta)
            hidden = hidden + adapt(i, "o", attn, o_proj(attn))
            x = F.rms_norm(hidden, norm_shape, layer.post_norm, eps)
            gate, up = adapt(i, "gate_up", x, gate_up_proj(x)).chunk(2, dim=-1)
            act = F.silu(gate) * up
            hidden = hidden + adapt(i, "down", act, down_proj(act))
        return F.rms_norm(hidden, norm_shape, self.norm, eps)

    def layer_specs(self) -> tuple | None:
        """The layers' weights flattened for the C++ decoder_layers(): norms, linear kinds (0 dense, 1 int8,
        2 int4, 3 int4 on AMX tiles, 4 int4 in the tile layout on AVX2), int4 group sizes, tensors. None when a
        linear is one it cannot call (oneDNN-packed bf16)."""
        if self._layer_specs is None:
            norms, kinds, groups, tensors = [], [], [], []
            for layer in self.layers:
                norms += [layer.input_norm, layer.post_norm]
                for lin in layer.linears():
                    if isinstance(lin, Linear):
                        if lin.packed:
                            self._layer_specs = ()
                            return None
                        kinds.append(0); groups.append(0); tensors.append([lin.weight])
                    elif lin.kind == "int8":
                        kinds.append(1); groups.append(0); tensors.append([lin.q, lin.scale])
                    elif lin.tiles is not None:
                        kinds.append(INT4_KERNELS[lin.tiles_kernel].spec_kind)
                        groups.append(lin.group); tensors.append(list(lin.tiles))
                    else:
                        kinds.append(2); groups.append(lin.group); tensors.append([lin.packed, lin.scales_zeros])
                    if lin.bias is not None:
                        tensors[-1].append(lin.bias)
            self._layer_specs = (norms, kinds, groups, tensors)
        return self._layer_specs or None

    def decoder_stack(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        """The kernels' DecoderStack of the layers (layer_specs) over these KV caches, built once for them."""
        if self._stack is None or self._stack[0] is not kv_caches:
            norms, kinds, groups, tensors = self.layer_specs()
            self._stack = (kv_caches, self.kernels.DecoderStack(norms, self.norm, kinds, groups, tensors,
                                                                [k for k, _ in kv_caches], [v for _, v in kv_caches]))
        return self._stack[1]

    def _forward_kernels(self, input_ids, positions, meta, kv_caches, lora=None) -> torch.Tensor:
        """forward() with the small ops fused in C++: residual add + RMSNorm, RoPE + K/V store, SiLU * up, and
        attention reading K/V in place. The same math as forward(), rounded the same way, in ~8 ops a layer.
        When the table serves every token's attention (decode steps), all layers run in one C++ call."""
        cfg, ops = self.cfg, self.kernels
        nh, nkv, eps = cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps
        num_tokens = input_ids.shape[0]
        cos_table, sin_table = self.rope_tables()
        hidden = ops.embed_rows(self.embed, input_ids)
        # the quantized weights as the C++ loop takes them, unless this step runs on dense copies
        dense = self.dense_step(num_tokens)
        specs = None if dense else self.layer_specs()
        # the table serves every token (no row left to SDPA): the layers in one C++ call
        if specs is not None and meta.token_rows is not None and not meta.multi:
            lora_tokens, lora_addresses = (lora.token_adapter, lora.addresses) if lora is not None else (None, None)
            return ops.decoder_layers(self.decoder_stack(kv_caches), hidden, positions, cos_table, sin_table,
                                      meta.slot_mapping, meta.table, meta.token_rows, meta.token_lens, nh, nkv, eps,
                                      lora_tokens, lora_addresses)
        adapt = lora.apply if lora is not None else _no_adapter
        delta = None
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            qkv_proj, o_proj, gate_up_proj, down_proj = layer.linears(dense)
            x = ops.add_rms_norm(hidden, delta, layer.input_norm, eps)
            qkv = adapt(i, "qkv", x, qkv_proj(x).contiguous())
            q = ops.rope_store(qkv, positions, cos_table, sin_table, k_cache, v_cache, meta.slot_mapping, nh, nkv)
            attn = kernel_attention(q, k_cache, v_cache, meta, ops)
            x = ops.add_rms_norm(hidden, adapt(i, "o", attn, o_proj(attn)), layer.post_norm, eps)
            act = ops.silu_mul(adapt(i, "gate_up", x, gate_up_proj(x)))
            delta = adapt(i, "down", act, down_proj(act))
        return ops.add_rms_norm(hidden, delta, self.norm, eps)

    @property
    def dense_split(self) -> int:
        """Steps of more tokens than this run on the layers' dense copies (a quantized model's); 0: it has none."""
        return self.dense_above if self.layers[0].dense is not None else 0

    def dense_step(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens runs on the layers' dense copies."""
        return 0 < self.dense_split < num_tokens

    def _head_for(self, rows: int):
        small = self._lm_head_small is not None and rows <= self.head_small_rows
        return self._lm_head_small if small else self._lm_head

    def burst_head(self, rows: int) -> Optional[list[torch.Tensor]]:
        """The head as the kernels' decode_burst takes it for `rows` rows, computing what logits() does: [int8 q,
        scale] (int8_rows_mm) or [dense weight]; None where no burst can run (PyTorch ops alone, a step on the
        layers' dense copies, a layer or head the C++ loop does not call)."""
        if self.kernels is None or self.dense_step(rows) or self.layer_specs() is None:
            return None
        head = self._head_for(rows)
        if head is None:
            return [self.embed if self.lm_head is None else self.lm_head]
        if rows <= INT8_KERNEL_ROWS and isinstance(head, Int8Linear):
            return [head.q, head.scale]
        if isinstance(head, Linear) and not head.packed and head.bias is None:
            return [head.weight]
        return None

    @torch.inference_mode()
    def decode_burst(self, head: list[torch.Tensor], input_ids: torch.Tensor, positions: torch.Tensor, meta,
                     kv_caches, slots: torch.Tensor, stop_ids: torch.Tensor, max_seconds: float) -> torch.Tensor:
        """Greedy decode steps in one C++ call (kernels' decode_burst): from one-token rows described by `meta`
        (their table rows and lengths), each row's argmax fed back at the next position into slots[step, row].
        Stops after slots.shape[0] steps, a step that picks one of `stop_ids`, or the first step that ends past
        `max_seconds`; returns the picks [steps, rows]."""
        cfg = self.cfg
        cos_table, sin_table = self.rope_tables()
        return self.kernels.decode_burst(self.decoder_stack(kv_caches), self.embed, head, input_ids, positions,
                                         cos_table, sin_table, slots, meta.table, meta.token_rows, meta.token_lens,
                                         cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, stop_ids, max_seconds)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits for the given hidden rows."""
        rows = hidden.shape[0]
        head = self._head_for(rows)
        if head is None:
            return F.linear(hidden, self.embed if self.lm_head is None else self.lm_head).float()
        if rows <= INT8_KERNEL_ROWS and isinstance(head, Int8Linear) and self.kernels is not None:
            x = hidden if hidden.dtype == COMPUTE else hidden.to(COMPUTE)
            return self.kernels.int8_rows_mm(x, head.q, head.scale, float_out=True)
        return head(hidden).float()

    @torch.no_grad()
    def load_hf_weights(self, weights: Iterable[tuple[str, torch.Tensor]], skip_linears: bool = False) -> None:
        """Load tensors named as in Hugging Face checkpoints, fusing q/k/v and gate/up. With skip_linears the
        layers' linear weights are not expected (they arrive quantized from elsewhere)."""
        cfg = self.cfg
        d = cfg.head_dim
        q_rows, kv_rows, inter = cfg.num_heads * d, cfg.num_kv_heads * d, cfg.intermediate_size
        offsets = {"q_proj": (0, q_rows), "k_proj": (q_rows, kv_rows), "v_proj": (q_rows + kv_rows, kv_rows)}
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("model."):
                name = name[len("model."):]
            if "rotary_emb" in name:
                continue
            if name == "embed_tokens.weight":
                self.embed.copy_(tensor); loaded.add("embed")
            elif name == "norm.weight":
                self.norm.copy_(tensor); loaded.add("norm")
            elif name == "lm_head.weight":
                if self.lm_head is not None:
                    self.lm_head.copy_(tensor); loaded.add("lm_head")
            elif name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                layer = self.layers[int(idx)]
                module, param = rest.rsplit(".", 1)
                leaf = module.split(".")[-1]
                key = f"{idx}.{leaf}.{param}"
                if leaf in offsets:
                    start, size = offsets[leaf]
                    target = layer.qkv if param == "weight" else layer.qkv_bias
                    if target is None:
                        raise ValueError(f"checkpoint has {name} but the config declares no q/k/v bias")
                    target[start:start + size].copy_(tensor)
                elif leaf in ("gate_proj", "up_proj"):
                    start = 0 if leaf == "gate_proj" else inter
                    layer.gate_up[start:start + inter].copy_(tensor)
                elif leaf == "o_proj":
                    layer.o.copy_(tensor)
                elif leaf == "down_proj":
                    layer.down.copy_(tensor)
                elif leaf == "input_layernorm":
                    layer.input_norm.copy_(tensor)
                elif leaf == "post_attention_layernorm":
                    layer.post_norm.copy_(tensor)
                else:
                    raise ValueError(f"unexpected weight {name}")
                loaded.add(key)
            else:
                raise ValueError(f"unexpected weight {name}")
        expected = {"embed", "norm"} | ({"lm_head"} if self.lm_head is not None else set())
        per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        if not skip_linears:
            per_layer += ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                          "up_proj.weight", "down_proj.weight"]
        if cfg.qkv_bias:
            per_layer += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
        expected |= {f"{i}.{p}" for i in range(cfg.num_layers) for p in per_layer}
        missing = expected - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:5]}")

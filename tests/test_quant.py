"""Weight-only quantization: each kernel against its own dequantized-float reference, GGUF's 4-bit blocks
read straight in against the float conversion, and a quantized engine against the same engine running the
dequantized weights densely."""
from __future__ import annotations

import os

import pytest
import torch

from kestrel import Engine, SamplingParams
from kestrel.model.linear import Linear
from kestrel.model.quant import INT4_KERNELS, Int4Linear, Int8Linear, QuantLinear, int4_kernel


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_its_dequantized_weights(kind, dtype):
    torch.manual_seed(0)
    w, bias = torch.randn(96, 128), torch.randn(96)
    lin = kind.from_float(w, bias)
    assert (lin.dequantize() - w).abs().mean() < (0.1 if kind is Int4Linear else 0.01)  # a sane quantization
    for rows in (1, 7, 64):  # the decode and prefill shapes
        x = torch.randn(rows, 128, dtype=dtype)
        y = lin(x)
        assert y.dtype == dtype
        ref = x.to(torch.bfloat16).float() @ lin.dequantize().t() + bias.to(torch.bfloat16).float()
        # the kernels take bf16 activations and give bf16 outputs: one bf16 rounding of the result
        assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_int4_dequantize_equals_the_kernels_own_float32_path(embedded_dir):
    """dequantize() reads the codes through the kernel's fast bf16 path and applies scales itself: bit-identical to
    the kernel's (slow) float32 path, on random weights and on GGUF Q4_1 blocks loaded straight in."""
    from kestrel.model.gguf_blocks import load_int4_layers
    from kestrel.model.loader import gguf_origin

    torch.manual_seed(0)
    lins = [Int4Linear.from_float(torch.randn(96, 128) * s) for s in (0.02, 1.0, 300.0)]
    layers = load_int4_layers(gguf_origin(embedded_dir)["gguf_file"], cache_dir=embedded_dir)
    lins += [layers[3]["qkv"], layers[3]["down"]]
    for lin in lins:
        assert torch.equal(lin.dequantize(torch.float32), lin.kernel_dequantize())
        assert torch.equal(lin.dequantize(torch.bfloat16), lin.kernel_dequantize().to(torch.bfloat16))


def tiles_here() -> bool:
    """Whether this CPU runs the int4 AMX tile kernel (AMX-BF16)."""
    from kestrel import kernels

    ops = kernels.load()
    return ops is not None and ops.int4_tiles_available()


# each of Kestrel's int4 kernels: whether it runs here, what its error names when it does not
AVAILABILITY = {"amx": ("int4_tiles_available", "AMX"), "avx2": ("int4_vector_available", "AVX2")}


@pytest.mark.parametrize("kernel", ["amx", "avx2"])
def test_int4_in_the_tile_layout_matches_its_dequantized_weights(embedded_dir, kernel):
    """The tile layout holds the same codes and weights as PyTorch's packing (random and GGUF Q4_1 weights), and each
    kernel on it (AMX tiles; AVX2) computes x W^T to one bf16 rounding at every row count (each of the AVX2 kernel's
    blocks of 1-4 rows), agreeing with PyTorch's int4 kernel on all but a few elements (summation order); the AVX2
    kernel's rows do not depend on each other. On CPUs without it the kernel says so, and engines do not pick it."""
    from kestrel import kernels
    from kestrel.model.gguf_blocks import load_int4_layers
    from kestrel.model.loader import gguf_origin

    ops = kernels.load()
    available, name = AVAILABILITY[kernel]
    mm = getattr(ops, INT4_KERNELS[kernel].entry)
    if not getattr(ops, available)():
        with pytest.raises(RuntimeError, match=name):
            mm(torch.randn(2, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 4, 64, dtype=torch.uint8),
               torch.zeros(1, 2, 2, 16, dtype=torch.bfloat16))
        assert int4_kernel(ops) != kernel
        return
    torch.manual_seed(0)
    layers = load_int4_layers(gguf_origin(embedded_dir)["gguf_file"], cache_dir=embedded_dir)
    pairs = [(Int4Linear.from_float(w, b), Int4Linear.from_float(w, b))
             for w, b in ((torch.randn(96, 128), torch.randn(96)), (torch.randn(160, 1536) * 0.02, None))]
    pairs.append((layers[3]["gate_up"], load_int4_layers(gguf_origin(embedded_dir)["gguf_file"],
                                                         cache_dir=embedded_dir)[3]["gate_up"]))
    for torch_kernel, tiled in pairs:
        source = torch_kernel.codes()  # the codes as constructed
        torch_kernel.release_source()  # from here on read back from PyTorch's packing
        assert torch.equal(torch_kernel.codes(), source)
        tiled.to_tiles(ops, kernel)
        assert tiled.packed is None and tiled.tiles is not None and tiled.tiles_kernel == kernel
        assert torch.equal(tiled.codes(), torch_kernel.codes())
        assert torch.equal(tiled.dequantize(), torch_kernel.dequantize())
        w = tiled.dequantize()
        bias = 0 if tiled.bias is None else tiled.bias.float()
        for rows in (1, 2, 3, 4, 7, 16, 17, 40, 100):
            x = torch.randn(rows, w.shape[1], dtype=torch.bfloat16)
            y = tiled(x)
            ref = x.float() @ w.t() + bias
            assert y.dtype == torch.bfloat16 and y.shape == ref.shape
            assert torch.allclose(y.float(), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
            assert (y == torch_kernel(x)).float().mean() > 0.99
            if kernel == "avx2":  # a row's result is the same whatever rows share its call (lookahead's exactness)
                assert all(torch.equal(tiled(x[i:i + 1])[0], y[i]) for i in range(min(rows, 9)))
    with pytest.raises(RuntimeError, match="inputs"):
        mm(torch.randn(2, 64, dtype=torch.bfloat16), *pairs[0][1].tiles)
    with pytest.raises(RuntimeError, match="bf16"):
        mm(torch.randn(2, 128), *pairs[0][1].tiles)
    with pytest.raises(ValueError, match="unknown int4 kernel"):
        Int4Linear.from_float(torch.randn(16, 32)).to_tiles(ops, "avx9")


def test_int8_with_inputs_not_a_multiple_of_32():
    """PyTorch's int8 kernel reads past rows of such lengths (it crashed the process): these take a plain matmul."""
    lin = Int8Linear.from_float(torch.randn(24, 100))
    x = torch.randn(3, 100)
    ref = x.to(torch.bfloat16).float() @ lin.dequantize().t()
    assert torch.allclose(lin(x), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())


def test_int4_needs_rows_in_sixteens():
    with pytest.raises(ValueError, match="divisible by 16"):
        Int4Linear.from_float(torch.randn(24, 64))


def test_gguf_blocks_load_straight_into_int4(embedded_dir):
    """The int4 layers read from the embedded GGUF file (Q4_1) hold the very weights the float conversion
    (which matches transformers' GGUF reader) holds, up to the kernel's bf16 scale and zero."""
    from safetensors import safe_open

    from kestrel.model.gguf_blocks import load_int4_layers
    from kestrel.model.loader import embedded_model_path

    layers = load_int4_layers(embedded_model_path())  # straight from the file, not the cache
    assert layers is not None and len(layers) == 30
    cached = load_int4_layers(embedded_model_path(), cache_dir=embedded_dir)  # written once, then read
    with safe_open(os.path.join(embedded_dir, "model.safetensors"), framework="pt") as f:
        for i in (0, 17, 29):
            p = f"model.layers.{i}."
            qkv = torch.cat([f.get_tensor(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            gate_up = torch.cat([f.get_tensor(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
            for name, ref in (("qkv", qkv), ("o", f.get_tensor(p + "self_attn.o_proj.weight")),
                              ("gate_up", gate_up), ("down", f.get_tensor(p + "mlp.down_proj.weight"))):
                got = layers[i][name].dequantize()
                scale = ref.abs().amax(dim=1, keepdim=True)
                assert ((got - ref).abs() / scale).max() < 0.02, (i, name)  # bf16 rounding of scale and zero
                assert torch.equal(got, cached[i][name].dequantize()), (i, name)


def _dequantized_copy(engine: Engine) -> Engine:
    """The same engine with every quantized linear replaced by a dense one holding its dequantized weights."""
    model = engine.model
    for layer in model.layers:
        layer.fast = tuple(Linear(f.dequantize().to(torch.bfloat16), f.bias, False) if isinstance(f, QuantLinear)
                           else f for f in layer.fast)
    if isinstance(model._lm_head, QuantLinear):
        model._lm_head = Linear(model._lm_head.dequantize().to(torch.bfloat16), None, False)
    if model._lm_head_small is not None:
        model._lm_head_small = Linear(model._lm_head_small.dequantize().to(torch.bfloat16), None, False)
    return engine


@pytest.mark.parametrize("quantization", ["int8", "int4", "int4-avx2"])
def test_quantized_engine_matches_its_dequantized_reference(chat_prompt_ids, quantization, monkeypatch):
    """Teacher-forced along the quantized engine's own greedy output, the dense engine running the dequantized
    weights gives nearly the same log-probabilities and next-token choices. Both score through the same prefill
    path, so what differs is the quantized kernels against dense bf16 matmuls on the same weights: bf16 rounding
    (measured: mean |dlogprob| ~0.035, max ~0.5, top-1 agreement ~0.97); a wrong kernel is off by nats.
    int4-avx2: the engine runs Kestrel's AVX2 int4 kernel, which AVX2-only CPUs pick, wherever this runs."""
    import kestrel.engine.engine as engine_module

    avx2 = quantization == "int4-avx2"
    if avx2:
        quantization = "int4"
        monkeypatch.setattr(engine_module, "int4_kernel", lambda ops: "avx2")
    params = SamplingParams(max_tokens=24, temperature=0.0)
    quantized = Engine(dtype="bfloat16", quantization=quantization, batch_weights="quantized", device="cpu")
    assert quantized.quantization == quantization
    if avx2:
        assert "int4 on Kestrel's AVX2 kernel" in quantized.describe()
        assert quantized.model.layers[0].fast[0].tiles_kernel == "avx2" and quantized.model.layer_specs() is not None
    outs = quantized.generate(chat_prompt_ids[:6], params)
    seqs = [o.prompt_token_ids + o.token_ids for o in outs]
    score = [SamplingParams(max_tokens=1, prompt_logprobs=1, logprob_start_len=len(o.prompt_token_ids)) for o in outs]
    mine = quantized.generate(seqs, score)
    reference = _dequantized_copy(Engine(dtype="bfloat16", quantization=quantization,
                                         batch_weights="quantized", device="cpu")).generate(seqs, score)
    errors, agree = [], []
    for a, b, o in zip(mine, reference, outs):
        for pos in range(len(o.prompt_token_ids), len(a.prompt_token_ids)):
            ref, got = b.prompt_logprobs[pos], a.prompt_logprobs[pos]
            errors.append(abs(got.logprob - ref.logprob))
            agree.append(next(iter(ref.top)) == next(iter(got.top)))
    assert sum(errors) / len(errors) < 0.05, sum(errors) / len(errors)
    assert max(errors) < 1.0, max(errors)
    assert sum(agree) / len(agree) >= 0.9, sum(agree) / len(agree)


def test_auto_quantization(embedded_dir):
    from kestrel.model.loader import resolve_quantization

    e = Engine(max_total_tokens=256, device="cpu")  # the embedded model is a GGUF file of Q4_1 layers
    assert e.quantization == "int4" and "Q4_1" in e.quantization_reason
    assert Engine(max_total_tokens=256, dtype="float32", device="cpu").quantization == "none"  # exact float32 asked for
    # on a GPU the CPU's int4 kernels cannot run: auto serves the dequantized weights
    assert resolve_quantization("auto", embedded_dir, "auto", torch.device("cuda"))[0] == "none"
    out = e.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out.output_tokens == 4


def test_dense_copies_for_many_token_steps_hold_the_quantized_values(chat_prompt_ids):
    """batch_weights: a bf16 model's steps of more than four tokens run on bf16 copies dequantized from the int4
    weights where the CPU has native bf16 (else quantized weights throughout, and asking for copies is an error)."""
    from kestrel.engine.hardware import cpu_bf16_units
    from kestrel.model.linear import can_prepack

    if not (cpu_bf16_units() and can_prepack(torch.empty(0, dtype=torch.bfloat16))):  # no fast bf16 matmul here
        with pytest.raises(ValueError, match="native bf16"):
            Engine(dtype="bfloat16", batch_weights="dense", device="cpu")
        assert all(layer.dense is None for layer in Engine(dtype="bfloat16", device="cpu").model.layers)
        return
    hybrid = Engine(dtype="bfloat16", device="cpu")  # auto: copies on this CPU
    assert_dense_copies_hold_the_quantized_values(hybrid, chat_prompt_ids, torch.bfloat16)


def test_float32_dense_copies_for_many_token_steps(chat_prompt_ids):
    """float32 matmuls are fast on every CPU: a float32 model on int4 weights keeps float32 copies for steps of many
    tokens (prefill, large batches) wherever it runs."""
    from kestrel import kernels
    from kestrel.model.llama import QUANTIZED_MAX_ROWS_F32, TILES_MAX_ROWS, VECTOR_MAX_ROWS

    hybrid = Engine(dtype="float32", quantization="int4", device="cpu")
    rows = {"amx": TILES_MAX_ROWS, "avx2": VECTOR_MAX_ROWS, "": QUANTIZED_MAX_ROWS_F32}[int4_kernel(kernels.load())]
    assert f"dense float32 copies for steps of more than {rows} tokens" in hybrid.describe()
    assert hybrid.model.dense_above == rows
    assert_dense_copies_hold_the_quantized_values(hybrid, chat_prompt_ids, torch.float32)
    assert all(layer.dense is None for layer in Engine(dtype="float32", quantization="int4", device="cpu",
                                                        batch_weights="quantized").model.layers)


def assert_dense_copies_hold_the_quantized_values(hybrid, chat_prompt_ids, dtype) -> None:
    import torch.nn.functional as F

    name = "bf16" if dtype == torch.bfloat16 else "float32"
    assert hybrid.quantization == "int4" and f"dense {name} copies" in hybrid.describe()
    x = torch.randn(8, hybrid.model.cfg.hidden_size, dtype=dtype)
    layer = hybrid.model.layers[5]
    for quantized, dense in zip(layer.fast[:1] + layer.fast[2:3], layer.dense[:1] + layer.dense[2:3]):
        assert torch.equal(dense(x), F.linear(x, quantized.dequantize().to(dtype), quantized.bias))
    # teacher-forced scoring (prefill: the dense copies) against the quantized kernels' scoring
    outs = hybrid.generate(chat_prompt_ids[:4], SamplingParams(max_tokens=16, temperature=0.0))
    seqs = [o.prompt_token_ids + o.token_ids for o in outs]
    score = [SamplingParams(max_tokens=1, prompt_logprobs=1, logprob_start_len=len(o.prompt_token_ids)) for o in outs]
    dense = hybrid.generate(seqs, score)
    quantized = Engine(dtype=str(dtype).removeprefix("torch."), quantization="int4",
                       batch_weights="quantized").generate(seqs, score)
    errors = [abs(a.logprob - b.logprob) for d, q, o in zip(dense, quantized, outs)
              for a, b in zip(d.prompt_logprobs[len(o.prompt_token_ids):], q.prompt_logprobs[len(o.prompt_token_ids):])]
    assert sum(errors) / len(errors) < 0.05 and max(errors) < 1.0, (sum(errors) / len(errors), max(errors))


def _vm_flags(address: int) -> list[str]:
    """The kernel's flags of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise LookupError(hex(address))


def test_streamed_weights_move_into_huge_pages():
    """What a quantized decode step streams (int4 layer weights, the int8 head) sits side by side in one mapping
    advised MADV_HUGEPAGE (kestrel.huge_pages), equal to what it replaced; the engine computes on it (the
    exactness tests above run on such engines)."""
    import mmap

    from kestrel.huge_pages import HUGE_PAGE, into_huge_pages

    originals = [torch.randn(3, 5), torch.randint(0, 255, (1000,), dtype=torch.uint8), torch.randn(7, 64).bfloat16(),
                 torch.empty(0)]
    copies = into_huge_pages(originals)
    assert hasattr(mmap, "MADV_HUGEPAGE") == (copies is not None)
    if copies is None:  # no such advice on this OS: the weights stay where they are
        return
    assert all(torch.equal(c, o) and c.dtype == o.dtype and c.is_contiguous() for c, o in zip(copies, originals))
    assert copies[0].data_ptr() % HUGE_PAGE == 0 and copies[1].data_ptr() - copies[0].data_ptr() == 64
    assert "hg" in _vm_flags(copies[0].data_ptr())
    copies[0] += 1
    assert not torch.equal(copies[0], originals[0])  # copies, not views of the originals
    with pytest.raises(ValueError, match="contiguous"):
        into_huge_pages([torch.randn(4, 4).t()])

    e = Engine(max_total_tokens=256, device="cpu")  # int4 layers from the embedded GGUF file, an int8 head
    model = e.model
    linears = [f for layer in model.layers for f in layer.fast] + [model._lm_head_small or model._lm_head]
    assert all(isinstance(lin, QuantLinear) for lin in linears)
    tensors = [t for lin in linears for name in lin.streamed()
               for t in (getattr(lin, name) if isinstance(getattr(lin, name), tuple) else (getattr(lin, name),))]
    starts = sorted(t.data_ptr() for t in tensors)
    size = sum(t.numel() * t.element_size() for t in tensors)
    assert starts[0] % HUGE_PAGE == 0 and starts[-1] - starts[0] < size + 64 * len(tensors)  # side by side
    assert "hg" in _vm_flags(starts[0]) and "hg" in _vm_flags(starts[-1])
    out = e.generate(["The capital of France is"], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out.output_tokens == 4

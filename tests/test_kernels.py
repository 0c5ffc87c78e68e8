"""The C++ CPU kernels against the PyTorch ops they replace, and the engine on them against the engine on
PyTorch ops alone (HF parity on the kernel path is test_parity's: `kernels="auto"` is the default)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kestrel import Engine, SamplingParams, kernels
from kestrel.model.attention import causal_mask

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    assert module is not None, f"the set-up should have built the C++ kernels: {kernels.error()}"
    return module


def _close(got, ref, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == ref.dtype
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(ops, dtype):
    torch.manual_seed(0)
    hidden, delta, w = torch.randn(5, 96, dtype=dtype), torch.randn(5, 96, dtype=dtype), torch.rand(96, dtype=dtype)
    ref_hidden = hidden + delta
    # transformers' LlamaRMSNorm: normalise in float32, round to the dtype, then scale by the weight
    h32 = ref_hidden.float()
    ref = w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    got = ops.add_rms_norm(hidden, delta, w, 1e-5)
    assert torch.equal(hidden, ref_hidden)  # the residual is updated in place
    _close(got, ref, dtype)
    _close(ops.add_rms_norm(hidden, None, w, 1e-5), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(ops, dtype):
    torch.manual_seed(1)
    gate_up = torch.randn(7, 2 * 80, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    _close(ops.silu_mul(gate_up), F.silu(gate) * up, dtype)
    # the full vectors (the first 32 of a row, with 8 or 16 lanes) and the row's tail (a part of one) give the same
    # values, bit for bit
    gate_up = torch.randn(3, 2 * 35, dtype=dtype) * 6
    gate_up[:, 32:35], gate_up[:, 67:70] = gate_up[:, :3], gate_up[:, 35:38]
    gate_up[0, :3] = torch.tensor([float("nan"), 100.0, -100.0])
    gate_up[0, 32:35] = gate_up[0, :3]
    out = ops.silu_mul(gate_up)
    assert torch.equal(out[:, 32:35].nan_to_num(7.0), out[:, :3].nan_to_num(7.0)) and out[0, 0].isnan()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store(ops, dtype):
    torch.manual_seed(2)
    nh, nkv, d, tokens = 6, 2, 16, 5
    qkv = torch.randn(tokens, (nh + 2 * nkv) * d, dtype=dtype)
    positions = torch.tensor([0, 3, 9, 10, 2])
    slots = torch.tensor([4, 1, 7, 2, 9])
    angles = torch.outer(torch.arange(16.0), 1.0 / 100 ** (torch.arange(0, d, 2) / d))
    cos, sin = torch.cat((angles, angles), -1).cos().to(dtype), torch.cat((angles, angles), -1).sin().to(dtype)
    k_cache, v_cache = torch.zeros(12, nkv, d, dtype=dtype), torch.zeros(12, nkv, d, dtype=dtype)
    qk = qkv[:, :(nh + nkv) * d].view(tokens, nh + nkv, d)
    rotated = torch.cat((-qk[..., d // 2:], qk[..., :d // 2]), dim=-1)
    ref = qk * cos[positions].unsqueeze(1) + rotated * sin[positions].unsqueeze(1)
    v = qkv[:, (nh + nkv) * d:].view(tokens, nkv, d).clone()
    q = ops.rope_store(qkv, positions, cos, sin, k_cache, v_cache, slots, nh, nkv)
    assert q.data_ptr() == qkv.data_ptr() and q.shape == (tokens, nh, d)  # rotated in place
    _close(q, ref[:, :nh], dtype)
    _close(k_cache[slots], ref[:, nh:], dtype)
    assert torch.equal(v_cache[slots], v)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


def test_rope_store_reads_a_bf16_qkv_into_float32_caches_as_if_widened(ops):
    """A quantized matmul's bf16 qkv with float32 caches: the rotated q comes back as a new float32 tensor and the
    caches hold exactly what widening qkv to float32 first and rotating in place gives."""
    torch.manual_seed(4)
    nh, nkv, d, tokens = 6, 2, 64, 3
    qkv = torch.randn(tokens, (nh + 2 * nkv) * d).bfloat16()
    positions, slots = torch.tensor([5, 0, 17]), torch.tensor([2, 8, 5])
    angles = torch.outer(torch.arange(32.0), 1.0 / 100 ** (torch.arange(0, d, 2) / d))
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    caches = [torch.zeros(10, nkv, d) for _ in range(4)]
    widened, original = qkv.float(), qkv.clone()
    want_q = ops.rope_store(widened, positions, cos, sin, caches[0], caches[1], slots, nh, nkv)
    got_q = ops.rope_store(qkv, positions, cos, sin, caches[2], caches[3], slots, nh, nkv)
    assert got_q.dtype == torch.float32 and got_q.shape == (tokens, nh, d)
    assert torch.equal(qkv, original)  # the bf16 qkv itself is left as it was
    assert torch.equal(got_q, want_q)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    assert caches[2][slots].abs().sum() > 0
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.rope_store(qkv, positions, cos.bfloat16(), sin, caches[2], caches[3], slots, nh, nkv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nh,nkv,d", [(8, 2, 32), (9, 3, 64), (4, 1, 80), (4, 2, 128)])
def test_paged_attention_matches_sdpa_on_gathered_kv(ops, dtype, nh, nkv, d):
    """Decode tokens of very different lengths (1 position, part of a tile, several partitions when few tokens
    share the call) and a causal chunk, each reading its own scattered slots, against SDPA over K/V gathered per row. Head sizes: the
    compiled-in ones (64, 128) and any other multiple of 16."""
    torch.manual_seed(3)
    slots = 3000
    k_cache, v_cache = torch.randn(slots, nkv, d, dtype=dtype), torch.randn(slots, nkv, d, dtype=dtype)
    table = torch.stack([torch.randperm(slots - 1)[:2500] + 1 for _ in range(4)])
    chunk_row, chunk_kv, chunk_q = 3, 40, 6  # a 6-token chunk whose last token sees 40 positions
    rows = torch.tensor([0, 1, 2, 1] + [chunk_row] * chunk_q)
    lens = torch.tensor([1, 300, 2500, 17] + list(range(chunk_kv - chunk_q + 1, chunk_kv + 1)))
    qkv = torch.randn(len(rows), (nh + 2 * nkv) * d, dtype=dtype)
    q = qkv.view(len(rows), nh + 2 * nkv, d)[:, :nh]  # strided rows, as the model hands it over
    got = ops.paged_attention(q, k_cache, v_cache, table, rows, lens, d ** -0.5)
    ref = []
    for b in range(4):
        idx = table[rows[b], :lens[b]]
        kk, vv = k_cache[idx].transpose(0, 1), v_cache[idx].transpose(0, 1)
        ref.append(F.scaled_dot_product_attention(q[b].unsqueeze(1), kk, vv, enable_gqa=True).reshape(-1))
    idx = table[chunk_row, :chunk_kv]
    kk, vv = k_cache[idx].transpose(0, 1), v_cache[idx].transpose(0, 1)
    o = F.scaled_dot_product_attention(q[4:].transpose(0, 1), kk, vv, attn_mask=causal_mask(chunk_q, chunk_kv, "cpu"),
                                       enable_gqa=True)
    ref = torch.cat([torch.stack(ref), o.transpose(0, 1).reshape(chunk_q, -1)])
    _close(got, ref, dtype)
    # the decode tokens alone: few enough that their contexts are split into partitions, merged afterwards
    _close(ops.paged_attention(q[:3], k_cache, v_cache, table, rows[:3], lens[:3], d ** -0.5), ref[:3], dtype)


def test_argmax_rows_matches_torch_argmax(ops):
    g = torch.Generator().manual_seed(1)
    for vocab in (1, 15, 16, 49152, 50001):
        logits = torch.randn(5, vocab, generator=g)
        assert torch.equal(ops.argmax_rows(logits), logits.argmax(dim=-1)), vocab
    logits = torch.randn(4, 1000, generator=g)
    logits[0, [3, 700]] = 9.0  # ties: the first
    logits[1, 999] = 9.0  # in the tail past the last full vector
    logits[2, [5, 600]] = float("nan")  # NaN above everything, as torch
    logits[3] = float("-inf")
    assert torch.equal(ops.argmax_rows(logits), logits.argmax(dim=-1))
    assert torch.equal(ops.argmax_rows(logits[:, :999]), logits[:, :999].argmax(dim=-1))  # strided rows
    # one row (a batch-1 step): its columns are split between the threads, and the parts' picks combined
    for where, value in (([100, 40000], 9.0), ([45000, 46000], 9.0), ([30000, 2], float("nan")),
                         ([49151], 9.0), ([0], float("-inf"))):
        row = torch.randn(1, 49152, generator=g)
        row[0, where] = value
        assert torch.equal(ops.argmax_rows(row), row.argmax(dim=-1)), (where, value)
        assert torch.equal(ops.argmax_rows(row[:, :49001]), row[:, :49001].argmax(dim=-1)), (where, value)
    assert ops.argmax_rows(torch.full((1, 49152), float("-inf"))).item() == 0
    with pytest.raises(RuntimeError, match="float32"):
        ops.argmax_rows(logits.to(torch.bfloat16))


def test_embed_rows_are_the_embedding_lookup(ops):
    """A step's embedding rows, copied by the kernel: exactly F.embedding's, repeated ids included; an id outside
    the vocabulary is an error that names it."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        table = torch.randn(1000, 96, generator=g).to(dtype)
        ids = torch.tensor([0, 999, 5, 5, 123])
        assert torch.equal(ops.embed_rows(table, ids), torch.nn.functional.embedding(ids, table))
        assert ops.embed_rows(table, ids[:0]).shape == (0, 96)
    with pytest.raises(RuntimeError, match="1000 is outside the vocabulary"):
        ops.embed_rows(table, torch.tensor([3, 1000]))


def test_int8_rows_mm_matches_its_dequantized_weights(ops):
    """The int8 head's kernel: x q^T * scale rounded once to bf16, agreeing with PyTorch's int8 kernel on nearly
    every element (the sums run in another order), each row the same whatever rows run beside it. Shapes: the
    embedded model's head, and ones with a partial last block of outputs and inputs past the last full vector
    (PyTorch's kernel crashes on inputs that are not a multiple of 32: there only the reference)."""
    from kestrel.model.quant import Int8Linear

    g = torch.Generator().manual_seed(0)
    for n, k in ((49152, 576), (37, 96), (16, 64), (37, 100), (3, 7)):
        lin = Int8Linear.from_float(torch.randn(n, k, generator=g) * 0.05)
        x = torch.randn(5, k, generator=g).to(torch.bfloat16)
        y = ops.int8_rows_mm(x, lin.q, lin.scale)
        ref = x.float() @ lin.dequantize().t()
        assert y.dtype == torch.bfloat16 and y.shape == (5, n)
        torch.testing.assert_close(y.float(), ref, rtol=2 ** -8, atol=1e-5 * ref.abs().max().item())
        if k % 32 == 0:
            assert (y == lin(x)).float().mean() > 0.99, (n, k)
        for m in range(5):
            assert torch.equal(ops.int8_rows_mm(x[m:m + 1], lin.q, lin.scale), y[m:m + 1])
        assert torch.equal(ops.int8_rows_mm(x, lin.q, lin.scale, float_out=True), y.float())
    with pytest.raises(RuntimeError, match="bf16"):
        ops.int8_rows_mm(x.float(), lin.q, lin.scale)
    with pytest.raises(RuntimeError, match="inputs"):
        ops.int8_rows_mm(x[:, :5], lin.q, lin.scale)


def test_quantized_head_logits_of_a_few_rows_come_from_the_int8_kernel(tiny_llama_dir):
    """A quantized model's logits for a step of up to INT8_KERNEL_ROWS rows (batch-1 decode, small batches, lookahead
    trees): the int8 kernel's, x times the int8 head's own dequantized weights to bf16 rounding, each row the same
    alone as beside the others."""
    from kestrel.model.llama import INT8_KERNEL_ROWS

    engine = Engine(tiny_llama_dir, dtype="float32", quantization="int4", kernels="cpp", device="cpu")
    model, ops = engine.model, engine.model.kernels
    head = model._lm_head_small
    hidden = torch.randn(INT8_KERNEL_ROWS, model.cfg.hidden_size)
    logits = model.logits(hidden)
    x = hidden.to(torch.bfloat16)
    assert torch.equal(logits, ops.int8_rows_mm(x, head.q, head.scale).float())
    ref = x.float() @ head.dequantize().t()
    torch.testing.assert_close(logits, ref, rtol=2 ** -8, atol=1e-5 * ref.abs().max().item())
    for m in range(INT8_KERNEL_ROWS):
        assert torch.equal(model.logits(hidden[m:m + 1]), logits[m:m + 1])


def test_kernels_reject_bad_input_with_a_clear_error(ops):
    q = torch.randn(2, 4, 16)
    cache = torch.randn(10, 2, 16)
    table, one_row = torch.zeros(2, 10, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="one row and one length per query token"):
        ops.paged_attention(q, cache, cache, table, one_row, torch.ones(2, dtype=torch.int64), 1.0)
    with pytest.raises(RuntimeError, match="head size must be a multiple of 16"):
        ops.paged_attention(torch.randn(2, 4, 8), cache[..., :8].contiguous(), cache[..., :8].contiguous(), table,
                            one_row.repeat(2), torch.ones(2, dtype=torch.int64), 1.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.add_rms_norm(torch.randn(2, 8), None, torch.ones(8, dtype=torch.bfloat16), 1e-5)
    with pytest.raises(ValueError, match="kernels must be"):
        Engine(kernels="fast")


def test_engine_on_kernels_equals_engine_on_torch_ops(tiny_llama_dir):
    """float32 greedy, prefill chunks of several lengths (SDPA rows and kernel rows), decode of mixed lengths,
    a shared prefix (the kernel through the table; cascade decode on PyTorch ops), n > 1: token-identical with the
    kernels and without them."""
    prompts = [[5 + (i * 7 + j * 13) % 900 for j in range(n)] for i, n in enumerate((1, 9, 40, 130, 70))]
    shared = [[17] * 64 + [20 + i] for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    outs = {}
    for which in ("cpp", "torch"):
        engine = Engine(tiny_llama_dir, dtype="float32", kernels=which, device="cpu", chunked_prefill_size=48)
        assert (engine.model.kernels is not None) == (which == "cpp")
        got = [o.token_ids for o in engine.generate(prompts + shared, params)]
        got += [o.token_ids for o in engine.generate([prompts[2]], SamplingParams(max_tokens=8, n=3, temperature=0.0))]
        outs[which] = got
        assert (engine.runner.shared_prefix_steps > 0) == (which == "torch")
    assert outs["cpp"] == outs["torch"]


@pytest.mark.parametrize("dtype,quantization", [("float32", "int8"), ("float32", "int4"), ("float32", "none"),
                                                ("bfloat16", "int4")])
def test_decoder_layers_in_one_call_equal_the_layer_by_layer_ops(tiny_llama_dir, dtype, quantization):
    """decoder_layers() against the same step composed of the single kernels and the model's linears, to the bit.
    With a float32 model on quantized (bf16-activation) matmuls the one call reads and writes bf16 around them
    instead of converting; the layer-by-layer ops convert, and the results must not differ."""
    engine = Engine(tiny_llama_dir, dtype=dtype, quantization=quantization, batch_weights="quantized",
                    kernels="cpp", device="cpu")
    model, ops, cfg = engine.model, engine.model.kernels, engine.model.cfg
    nh, nkv, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    g = torch.Generator().manual_seed(0)
    dt = model.embed.dtype
    lens = torch.tensor([7, 40, 130])  # one decode token per row; its own K/V is stored in the step
    table = torch.randperm(400, generator=g)[:3 * 130].view(3, 130).contiguous()
    rows, positions = torch.arange(3), lens - 1
    slots = table[rows, positions].contiguous()
    caches = [(torch.randn(400, nkv, d, generator=g).to(dt), torch.randn(400, nkv, d, generator=g).to(dt))
              for _ in model.layers]
    hidden = torch.randn(3, cfg.hidden_size, generator=g).to(dt)
    cos, sin = model.rope_tables()
    one = [(k.clone(), v.clone()) for k, v in caches]
    got = ops.decoder_layers(model.decoder_stack(one), hidden.clone(), positions, cos, sin, slots, table, rows, lens,
                             nh, nkv, eps, None, None)
    h, delta = hidden.clone(), None
    for layer, (k, v) in zip(model.layers, caches):
        qkv_proj, o_proj, gate_up_proj, down_proj = layer.linears()
        x = ops.add_rms_norm(h, delta, layer.input_norm, eps)
        qkv = qkv_proj(x).contiguous()
        ops.rope_store(qkv, positions, cos, sin, k, v, slots, nh, nkv)
        attn = ops.paged_attention(qkv.view(3, nh + 2 * nkv, d)[:, :nh], k, v, table, rows, lens, d ** -0.5)
        x = ops.add_rms_norm(h, o_proj(attn), layer.post_norm, eps)
        delta = down_proj(ops.silu_mul(gate_up_proj(x)))
    want = ops.add_rms_norm(h, delta, model.norm, eps)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(one, caches))


def test_head_sizes_the_attention_kernel_cannot_take_fall_back_to_torch_ops():
    cpu = torch.device("cpu")
    module, reason = kernels.resolve("auto", cpu, torch.float32, head_dim=72)
    assert module is None and "head size 72" in reason
    assert kernels.resolve("auto", cpu, torch.float32, head_dim=80)[0] is not None
    with pytest.raises(ValueError, match="multiples of 16"):
        kernels.resolve("cpp", cpu, torch.float32, head_dim=72)


@pytest.mark.parametrize("burst", [1, 16], ids=["plain-steps", "bursts"])
def test_decode_steps_leave_the_gil_to_other_threads(embedded_dir, burst):
    """While the engine decodes, the process's other threads (a Ray actor's calls, the stream's delivery) run:
    the C++ decode loops release the GIL. Holding it, a thread would wait out each whole step."""
    import threading
    import time

    engine = Engine(num_threads=1, num_scheduler_steps=burst)
    # 16 rows at a context of 400: one shared 390-token prefix, computed once (the decode steps read it per row)
    prefix = [(7 * i) % 20000 + 100 for i in range(390)]
    prompts = [prefix + [(31 * r + 7 * i) % 20000 + 100 for i in range(10)] for r in range(16)]
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=400, temperature=0, ignore_eos=True))
    while engine.scheduler.waiting or any(not s.output_ids for s in engine.scheduler.running):
        engine.step()  # prefills first: the count below is over decode steps
    ticks: list[float] = []
    done = threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0002)  # releases the GIL, then needs it back

    ticker = threading.Thread(target=tick)
    ticker.start()
    time.sleep(0.01)
    begin, steps = time.perf_counter(), 0
    while time.perf_counter() - begin < 1.0:
        engine.step()
        steps += 1
    end = time.perf_counter()
    done.set()
    ticker.join()
    inside = [t for t in ticks if begin <= t <= end]
    gap = max(b - a for a, b in zip(inside, inside[1:]))
    per_step = (end - begin) / steps
    assert per_step > 0.01, per_step  # steps long enough that holding the GIL through one would show
    # one step's kernels take most of its time: with the GIL held there, gaps come close to a whole step
    assert gap < per_step / 3, (gap, per_step, len(inside))

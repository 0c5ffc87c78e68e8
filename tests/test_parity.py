"""Greedy output is token-identical to HF transformers, under every scheduling path (float32)."""
from __future__ import annotations

import random

import pytest

from kestrel import Engine, SamplingParams
from tests.conftest import hf_greedy, kernel_device

MAX_NEW = 32


def _random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 120))] for _ in range(n)]


def _kestrel(model_dir, prompts, **kwargs):
    engine = Engine(model_dir, dtype="float32", **kwargs)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    outs = engine.generate(prompts, params)
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
@pytest.mark.parametrize("which, seed", [("tiny_llama_dir", 11), ("tiny_qwen2_dir", 12)])
def test_tiny_models_match_hf(request, which, seed, kernels):
    model_dir = request.getfixturevalue(which)
    prompts = _random_prompts(8, seed=seed)
    ref = hf_greedy(model_dir, prompts, MAX_NEW, stop_at_eos=True)
    got, _ = _kestrel(model_dir, prompts, chunked_prefill_size=32, kernels=kernels, device=kernel_device(kernels))
    assert got == ref


@pytest.fixture(scope="module")
def smollm_reference(embedded_dir, chat_prompt_ids):
    return hf_greedy(embedded_dir, chat_prompt_ids, MAX_NEW)


ENGINE_VARIANTS = {
    "radix-on": dict(),
    "radix-off": dict(disable_radix_cache=True),
    "small-chunks": dict(chunked_prefill_size=16),
    "tiny-pool": dict(max_total_tokens=200, chunked_prefill_size=64),
    "lpm": dict(policy="lpm", max_running_requests=3),
    "torch-ops": dict(kernels="torch"),  # the path without the C++ kernels (the others run on them)
}


@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_embedded_model_matches_hf(variant, embedded_dir, chat_prompt_ids, smollm_reference):
    """All prompts submitted together (different lengths), under each scheduling/memory regime."""
    # Run the batch twice in one engine so the second pass exercises prefix hits from the first.
    engine = Engine(dtype="float32", **ENGINE_VARIANTS[variant])
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    for _ in range(2):
        outs = engine.generate(chat_prompt_ids, params)
        assert [o.token_ids for o in outs] == smollm_reference
    if variant == "tiny-pool":
        assert engine.scheduler.num_retractions > 0, "the pool was meant to force preemption"
    if variant == "small-chunks":
        assert max(len(p) for p in chat_prompt_ids) > 16 * 2
    if variant == "radix-on":
        assert all(o.cached_tokens >= len(o.prompt_token_ids) - 1 for o in outs)
    if variant == "radix-off":
        assert all(o.cached_tokens == 0 for o in outs)
    # everything finished: no slot is owned by a request any more
    assert engine.pool.num_free + engine.cache.evictable_size == engine.pool.size


# Measured on AMD EPYC (Zen 4) through both of oneDNN's bf16 paths: native AVX512-BF16, and the AVX2 path
# (ONEDNN_MAX_CPU_ISA=AVX2, as on CPUs without bf16 units): see the closing note of the hardening issue.
BF16_MEAN_ABS_LOGPROB_ERROR = 0.08
BF16_TOP1_AGREEMENT = 0.9


def test_bf16_stays_close_to_the_float32_reference(embedded_dir, chat_prompt_ids, smollm_reference):
    """bf16 rounding differs between any two implementations and between CPU kinds, so free-running greedy
    sequences drift apart. Teacher-forced along HF's float32 greedy continuations, bf16 must give those
    tokens nearly the same log-probabilities and mostly pick them as its own top choice."""
    import torch
    from transformers import AutoModelForCausalLM
    seqs = [p + r for p, r in zip(chat_prompt_ids, smollm_reference)]
    hf = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    engine = Engine(dtype="bfloat16")
    outs = engine.generate(seqs, [SamplingParams(max_tokens=1, prompt_logprobs=1, logprob_start_len=len(p))
                                  for p in chat_prompt_ids])
    errors, agree = [], []
    for prompt, seq, out in zip(chat_prompt_ids, seqs, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), -1)
        for pos in range(len(prompt), len(seq)):
            got = out.prompt_logprobs[pos]
            assert got.token_id == seq[pos]
            errors.append(abs(got.logprob - ref[pos - 1, seq[pos]].item()))
            agree.append(next(iter(got.top)) == seq[pos])
    mean_error, agreement = sum(errors) / len(errors), sum(agree) / len(agree)
    print(f"\nbf16 vs float32 reference over {len(errors)} positions: mean |logprob error| {mean_error:.4f}, "
          f"max {max(errors):.3f}, top-1 agreement {agreement:.3f}")
    assert mean_error < BF16_MEAN_ABS_LOGPROB_ERROR
    assert agreement >= BF16_TOP1_AGREEMENT


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_shared_prefix_decode_matches_hf(embedded_dir, tokenizer, kernels):
    """Rows sharing a long cached prefix, read through the table by the C++ kernel, or by the cascade-attention
    decode path on PyTorch ops: still token-identical."""
    system = ("You are Kestrel's test assistant. Answer in plain English, briefly and precisely, and never "
              "use lists unless asked. Facts matter more than style; when unsure, say so. ") * 3
    questions = ["What is a kestrel?", "Name two planets.", "What is 3+4?", "Say hello in French.",
                 "What colour is the sky?", "Who wrote Hamlet?"]
    prompts = []
    for q in questions:
        ids = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    ref = hf_greedy(embedded_dir, prompts, MAX_NEW)
    engine = Engine(dtype="float32", kernels=kernels)
    engine.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))  # cache the system prompt
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    assert [o.token_ids for o in outs] == ref
    assert all(o.cached_tokens > 100 for o in outs)  # the rows read the system prompt's cached slots
    assert (engine.runner.shared_prefix_steps > 0) == (kernels == "torch")


def test_prompt_logprobs_match_hf(tiny_llama_dir):
    """Logprobs of given prompt tokens (what `select` scores continuations with), also after a cached prefix."""
    import torch
    from transformers import AutoModelForCausalLM
    prompt = _random_prompts(1, seed=3)[0] + list(range(100, 140))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    expected = ref.gather(1, torch.tensor(prompt[1:]).view(-1, 1)).view(-1).tolist()
    engine = Engine(tiny_llama_dir, dtype="float32", chunked_prefill_size=16)
    out = engine.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    assert out.prompt_logprobs[0] is None
    assert [x.logprob for x in out.prompt_logprobs[1:]] == pytest.approx(expected, abs=1e-4)
    assert all(len(x.top) == 2 for x in out.prompt_logprobs[1:])
    # the prefix is cached now; asking from position 30 on still computes what is needed
    start = 30
    again = engine.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0, logprob_start_len=start))[0]
    assert again.cached_tokens == start - 1
    assert all(x is None for x in again.prompt_logprobs[:start])
    assert [x.logprob for x in again.prompt_logprobs[start:]] == pytest.approx(expected[start - 1:], abs=1e-4)

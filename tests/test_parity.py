"""Greedy output is token-identical to HF transformers, under every scheduling path (float32)."""
from __future__ import annotations

import random

import pytest

from kestrel import Engine, SamplingParams
from tests.conftest import hf_greedy

MAX_NEW = 32


def _random_prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(1, 120))] for _ in range(n)]


def _kestrel(model_dir, prompts, **kwargs):
    engine = Engine(model_dir, dtype="float32", **kwargs)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    outs = engine.generate(prompts, params)
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize("which", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_tiny_models_match_hf(request, which):
    model_dir = request.getfixturevalue(which)
    prompts = _random_prompts(8, seed=hash(which) % 1000)
    ref = hf_greedy(model_dir, prompts, MAX_NEW, stop_at_eos=True)
    got, _ = _kestrel(model_dir, prompts, chunked_prefill_size=32)
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


def test_bf16_agreement_with_hf_bf16(embedded_dir, chat_prompt_ids):
    """bf16 rounding differs between any two implementations; most greedy sequences still agree."""
    import torch
    ref = hf_greedy(embedded_dir, chat_prompt_ids, MAX_NEW, dtype=torch.bfloat16)
    engine = Engine()  # bfloat16 is the CPU default
    got = [o.token_ids for o in engine.generate(chat_prompt_ids, SamplingParams(max_tokens=MAX_NEW, temperature=0))]
    same = sum(a == b for a, b in zip(got, ref))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) for a, b in zip(got, ref)]
    print(f"\nbf16: {same}/{len(ref)} sequences identical to HF bf16; mean common prefix {sum(prefix)/len(prefix):.1f}"
          f"/{MAX_NEW} tokens")
    assert same >= len(ref) // 2


def test_shared_prefix_decode_matches_hf(embedded_dir, tokenizer):
    """Rows sharing a long cached prefix take the cascade-attention decode path; still token-identical."""
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
    engine = Engine(dtype="float32")
    engine.generate(prompts[:1], SamplingParams(max_tokens=1, temperature=0))  # cache the system prompt
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0))
    assert [o.token_ids for o in outs] == ref
    assert engine.runner.shared_prefix_steps > 0, "the cascade path was meant to run"


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

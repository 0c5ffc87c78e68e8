"""Engine benchmarks on the embedded model; each figure is a ratio measured within this one run.

    .venv/bin/python benchmarks/bench_engine.py                 # all sections
    .venv/bin/python benchmarks/bench_engine.py --only batch    # batch | shared | decode1
    .venv/bin/python benchmarks/bench_engine.py --vllm-python /path/to/vllm/venv/bin/python

Sections:
  batch    32 prompts of ~200 tokens -> 128 tokens each, greedy, ignore_eos: Kestrel vs HF `generate`
  shared   32 requests sharing a ~1000-token system prompt, 64 tokens each: radix cache on vs off
  decode1  batch-1 decode: time per step split into model forward vs everything else
Writes benchmarks/results/engine.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, run_for_result, save_results  # noqa: E402
from benchmarks.workloads import random_batch, shared_prefix_batch  # noqa: E402
from kestrel import Engine, SamplingParams  # noqa: E402


def kestrel_run(prompts, max_tokens, **engine_kwargs) -> dict:
    engine = Engine(**engine_kwargs)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0))  # warm-up
    engine.cache.evict(engine.cache.evictable_size)  # start cold
    engine.stats.__init__()
    t = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - t
    out_tokens = sum(o.output_tokens for o in outs)
    prompt_tokens = sum(o.prompt_tokens for o in outs)
    cached = sum(o.cached_tokens for o in outs)
    return dict(wall_s=wall, output_tokens=out_tokens, output_tok_s=out_tokens / wall,
                prompt_tokens=prompt_tokens, cached_tokens=cached, hit_rate=cached / prompt_tokens,
                steps=engine.stats.steps)


def hf_run(model_dir, prompts, max_tokens) -> dict:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:2, -8:], attention_mask=mask[:2, -8:], max_new_tokens=4, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kw)
        wall = time.perf_counter() - t
    n = (out.shape[1] - width) * out.shape[0]
    return dict(wall_s=wall, output_tokens=n, output_tok_s=n / wall)


def vllm_run(python: str, prompts, max_tokens, prefix_caching: bool, model_dir: str) -> dict | None:
    """Run the same batch through vLLM's offline LLM.generate in its own environment."""
    script = f"""
import json, sys, time
from vllm import LLM, SamplingParams, TokensPrompt
prompts = json.load(sys.stdin)
llm = LLM(model={model_dir!r}, dtype="bfloat16", enable_prefix_caching={prefix_caching}, max_model_len=2048)
sp = SamplingParams(max_tokens={max_tokens}, temperature=0.0, ignore_eos=True)
llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts[:2]], SamplingParams(max_tokens=4), use_tqdm=False)
llm.reset_prefix_cache()
t = time.perf_counter()
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
wall = time.perf_counter() - t
n = sum(len(o.outputs[0].token_ids) for o in outs)
print("RESULT" + json.dumps(dict(wall_s=wall, output_tokens=n, output_tok_s=n / wall)))
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
    return run_for_result(python, script, env, stdin=json.dumps(prompts))


def versus_vllm(section: dict, rows: list, python: str, prompts, max_tokens, prefix_caching, model_dir, ours) -> None:
    """Run the peer on the same prompts; the ratio is Kestrel's throughput over vLLM's (same tokens)."""
    v = vllm_run(python, prompts, max_tokens, prefix_caching, model_dir)
    if v:
        section["vllm"] = v
        section["ratio_vs_vllm"] = ours["output_tok_s"] / v["output_tok_s"]
        label = "vLLM" + (" + prefix caching" if prefix_caching else "")
        rows.append(("", "", f"{label} {v['output_tok_s']:.0f} tok/s ({v['wall_s']:.1f}s)",
                     f"{section['ratio_vs_vllm']:.2f}x"))


def decode1(max_tokens: int = 128) -> dict:
    engine = Engine()
    prompt = random_batch(engine.tokenizer, 1, 200)[0]
    engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))
    rid = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    engine.step()  # prefill (cached) + first token
    forward = model_only = 0.0
    steps = 0
    runner = engine.runner
    original = runner.model.forward
    inner = {"t": 0.0}

    def timed_forward(*a, **k):  # the model's own forward, excluding batch preparation
        t0 = time.perf_counter()
        out = original(*a, **k)
        inner["t"] += time.perf_counter() - t0
        return out

    runner.model.forward = timed_forward
    t = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    wall = time.perf_counter() - t
    runner.model.forward = original
    model_only = inner["t"]
    engine.get_output(rid, pop=True)
    return dict(steps=steps, tok_s=steps / wall, step_ms=wall / steps * 1e3, model_forward_ms=model_only / steps * 1e3,
                overhead_pct=100 * (1 - model_only / wall))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="batch,shared,decode1")
    ap.add_argument("--vllm-python", help="python of an environment with vLLM installed, to run the peer")
    ap.add_argument("--output", default=os.path.join(RESULTS, "engine.json"))
    args = ap.parse_args()
    sections = set(args.only.split(","))
    probe = Engine(max_total_tokens=64)
    tok, model_dir = probe.tokenizer, probe.model_dir
    del probe
    results: dict = {"torch_threads": torch.get_num_threads()}
    rows = []
    if "batch" in sections:
        prompts = random_batch(tok, 32, 200)
        k = kestrel_run(prompts, 128)
        h = hf_run(model_dir, prompts, 128)
        results["batch"] = dict(kestrel=k, hf=h, ratio_vs_hf=k["output_tok_s"] / h["output_tok_s"])
        rows.append(("batch 32x200->128", f"kestrel {k['output_tok_s']:.0f} tok/s", f"HF {h['output_tok_s']:.0f} tok/s",
                     f"{k['output_tok_s'] / h['output_tok_s']:.2f}x"))
        if args.vllm_python:
            versus_vllm(results["batch"], rows, args.vllm_python, prompts, 128, False, model_dir, k)
    if "shared" in sections:
        prompts = shared_prefix_batch(tok, 32, 1000, 40)
        on = kestrel_run(prompts, 64)
        off = kestrel_run(prompts, 64, disable_radix_cache=True)
        results["shared"] = dict(radix_on=on, radix_off=off, ratio=off["wall_s"] / on["wall_s"])
        rows.append(("shared-prefix 32x(1000+40)->64", f"radix on {on['wall_s']:.1f}s (hit {on['hit_rate']:.0%})",
                     f"off {off['wall_s']:.1f}s", f"{off['wall_s'] / on['wall_s']:.2f}x"))
        if args.vllm_python:
            versus_vllm(results["shared"], rows, args.vllm_python, prompts, 64, True, model_dir, on)
    if "decode1" in sections:
        d = decode1()
        results["decode1"] = d
        rows.append(("batch-1 decode", f"{d['tok_s']:.1f} tok/s, {d['step_ms']:.1f} ms/step",
                     f"model forward {d['model_forward_ms']:.1f} ms", f"overhead {d['overhead_pct']:.1f}%"))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    save_results(results, args.output)


if __name__ == "__main__":
    main()

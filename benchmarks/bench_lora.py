"""Many LoRA adapters on one engine: S-LoRA's benchmark, scaled to this machine.

    .venv/bin/python benchmarks/bench_lora.py                       # N = 8, 64, 512 adapters; PEFT baseline
    .venv/bin/python benchmarks/bench_lora.py --vllm                # also vLLM-cpu --enable-lora over HTTP
    .venv/bin/python benchmarks/bench_lora.py --adapters 8 --requests 48 --quick

The embedded model with N random adapters of rank 8 on q/k/v/o (S-LoRA's targets); each request's
adapter is drawn from a power law (alpha 1), requests arrive as a Poisson process. Compared on the
same arrivals, in one run (ratios are what to read; the machine's speed drifts between runs):
  - Kestrel, mixed batches: one forward serves every adapter in the batch;
  - Kestrel, separate batches: a batch only ever holds one adapter's requests (what an engine per adapter,
    or one adapter slot, does): the oldest waiting request's adapter runs next with all its waiting requests;
  - Kestrel, base model: the same requests without adapters (the cost of LoRA itself);
  - PEFT with adapter switching: transformers + PEFT, per group of requests of one adapter: load, merge,
    generate the group as one padded batch, unmerge (offline, no arrival gaps: generous to it);
  - with --vllm, Kestrel's server and vLLM-cpu's (--enable-lora) under `kestrel bench` with the same
    adapter mix, for the largest N each accepts.
Writes benchmarks/results/lora.json and prints a table with the memory per adapter.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RESULTS, cpu_name, save_results, serve_process, stop_process  # noqa: E402
from benchmarks.workloads import random_batch  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapters(model_dir: str, n: int, rank: int, root: str) -> list[str]:
    """n PEFT adapter directories with random factors (B scaled so the model still writes text). The first is
    made by PEFT itself; the others reuse its config and tensor names with fresh random values."""
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(root, exist_ok=True)
    template = os.path.join(root, "a0")
    if not os.path.exists(os.path.join(template, "adapter_model.safetensors")):
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from lora_utils import make_adapter
        make_adapter(model_dir, template, rank, TARGETS, seed=0, b_scale=0.2)
    names = load_file(os.path.join(template, "adapter_model.safetensors"))
    with open(os.path.join(template, "adapter_config.json")) as f:
        config = f.read()
    paths = [template]
    g = torch.Generator().manual_seed(1)
    for i in range(1, n):
        path = os.path.join(root, f"a{i}")
        paths.append(path)
        if os.path.exists(os.path.join(path, "adapter_model.safetensors")):
            continue
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            f.write(config)
        fresh = {}
        for key, t in names.items():
            bound = (1 / t.shape[1] ** 0.5) * (0.2 if "lora_B" in key else 1.0)
            fresh[key] = (torch.rand(t.shape, generator=g) * 2 - 1) * bound
        save_file(fresh, os.path.join(path, "adapter_model.safetensors"))
    return paths


def workload(tokenizer, n_requests: int, n_adapters: int, rate: float, prompt_len: int, seed: int = 0):
    """(arrival time, prompt ids, adapter index) per request: Poisson arrivals, power-law adapter choice."""
    rng = random.Random(seed)
    prompts = random_batch(tokenizer, n_requests, prompt_len, seed)
    weights = [(i + 1) ** -1.0 for i in range(n_adapters)]
    adapters = rng.choices(range(n_adapters), weights, k=n_requests)
    t, out = 0.0, []
    for p, a in zip(prompts, adapters):
        out.append((t, p, a))
        t += rng.expovariate(rate)
    return out


def run_engine(engine, reqs, names, output_len: int, separate: bool = False) -> dict:
    """Feed requests to an in-process engine at their arrival times; output tokens/s over the makespan.
    separate: only one adapter's requests run at a time (all its waiting ones, oldest adapter first)."""
    from kestrel import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    engine.cache.evict(engine.cache.evictable_size)
    pending = list(reqs)
    waiting: list = []
    running: dict[str, float] = {}
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    while pending or waiting or running:
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            waiting.append(pending.pop(0))
        if separate:
            if not running and waiting:
                adapter = waiting[0][2]
                group = [r for r in waiting if r[2] == adapter]
                waiting = [r for r in waiting if r[2] != adapter]
                for arrival, p, a in group:
                    running[engine.add_request(p, params, lora=names[a])] = arrival
        else:
            for arrival, p, a in waiting:
                running[engine.add_request(p, params, lora=names[a])] = arrival
            waiting = []
        if not running:
            time.sleep(max(0.0, min(0.01, pending[0][0] - now)) if pending else 0)
            continue
        engine.step()
        for rid in [r for r in running if engine.is_finished(r)]:
            out = engine.get_output(rid, pop=True)
            tokens += out.output_tokens
            latencies.append(time.perf_counter() - t0 - running.pop(rid))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"throughput": tokens / wall, "wall_s": wall, "mean_latency_s": sum(latencies) / len(latencies),
            "p90_latency_s": latencies[int(0.9 * (len(latencies) - 1))]}


def run_peft(model_dir: str, paths: list[str], reqs, output_len: int, dtype) -> dict:
    """transformers + PEFT: per group of one adapter's requests (in arrival order), load + merge the adapter,
    generate the group as one left-padded batch, unmerge and delete it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, paths[0], adapter_name="warm")
    groups: list[tuple[int, list]] = []
    for _, p, a in reqs:
        if groups and groups[-1][0] == a:
            groups[-1][1].append(p)
        else:
            groups.append((a, [p]))
    tokens = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for a, prompts in groups:
            name = f"a{a}"
            model.load_adapter(paths[a], adapter_name=name)
            model.set_adapter(name)
            model.merge_adapter()
            batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
            out = model.generate(**batch, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            tokens += (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
            model.unmerge_adapter()
            model.set_adapter("warm")
            model.delete_adapter(name)
    wall = time.perf_counter() - t0
    return {"throughput": tokens / wall, "wall_s": wall, "requests": len(reqs), "groups": len(groups)}


def http_bench(port: int, names: list[str], args, tag: str) -> dict:
    import subprocess
    path = os.path.join(RESULTS, f"lora-http-{tag}.json")
    subprocess.run([os.path.join(ROOT, ".venv/bin/kestrel"), "bench", "--base-url", f"http://127.0.0.1:{port}",
                    "--workload", "random", "--num-requests", str(args.requests), "--request-rate", str(args.rate),
                    "--input-len", str(args.prompt_len), "--output-len", str(args.output_len),
                    "--lora-models", *names, "--output", path], check=True, capture_output=True)
    with open(path) as f:
        data = json.load(f)
    return {"throughput": data["output_token_throughput"], "completed": data["completed"],
            "requests": data["requests"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, nargs="+", default=[8, 64, 512])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--rate", type=float, default=8.0, help="requests/s (Poisson); above capacity = saturated")
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--peft-requests", type=int, default=24, help="requests the (slow) PEFT baseline runs")
    ap.add_argument("--adapter-dir", default=os.path.expanduser("~/.cache/kestrel-bench/lora-adapters"))
    ap.add_argument("--vllm", action="store_true", help="also serve through HTTP: Kestrel's and vLLM-cpu's servers")
    ap.add_argument("--peers-home", default=os.environ.get("PEERS_HOME", os.path.expanduser("~/.cache/kestrel-peers")))
    ap.add_argument("--port", type=int, default=30123)
    ap.add_argument("--quick", action="store_true", help="skip the PEFT baseline")
    args = ap.parse_args()

    from kestrel import Engine
    from kestrel.model.loader import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(None)
    tokenizer = load_tokenizer(model_dir)
    results = {"cpu": cpu_name(), "args": vars(args), "runs": {}}
    paths = make_adapters(model_dir, max(args.adapters), args.rank, os.path.join(args.adapter_dir, f"r{args.rank}"))
    print(f"== {cpu_name()}; {len(paths)} adapters of rank {args.rank} on {TARGETS}", flush=True)

    base_engine = Engine()
    reqs_none = workload(tokenizer, args.requests, 1, args.rate, args.prompt_len)
    results["runs"]["base (no adapters)"] = run_engine(base_engine, reqs_none, [None], args.output_len)
    print(f"== base: {results['runs']['base (no adapters)']}", flush=True)
    for n in args.adapters:
        modules = {f"a{i}": paths[i] for i in range(n)}
        t = time.perf_counter()
        engine = Engine(lora_modules=modules)
        load_s = time.perf_counter() - t
        names = list(modules)
        reqs = workload(tokenizer, args.requests, n, args.rate, args.prompt_len)
        mixed = run_engine(engine, reqs, names, args.output_len)
        sep = run_engine(engine, reqs, names, args.output_len, separate=True)
        a = next(iter(engine.loras.by_name.values()))
        mem = {"host_bytes_per_adapter": a.host_bytes, "pool_slots_per_adapter": a.pages,
               "pool_bytes_per_adapter": a.pages * engine.pool.caches[0][0][0].nbytes * 2 * len(engine.pool.caches),
               "pool_slots": engine.pool.size, "adapters_fit_in_pool": engine.pool.size // a.pages,
               "distinct_adapters_used": len({r[2] for r in reqs}), "engine_start_s": load_s,
               "loads": sum(x.loads for x in engine.loras.by_name.values()),
               "evictions": sum(x.evictions for x in engine.loras.by_name.values())}
        results["runs"][f"N={n} mixed"] = mixed
        results["runs"][f"N={n} separate"] = sep
        results["runs"][f"N={n} memory"] = mem
        print(f"== N={n}: mixed {mixed['throughput']:.1f} tok/s, separate {sep['throughput']:.1f} tok/s; {mem}",
              flush=True)
        del engine
    if not args.quick:
        n = max(args.adapters)
        reqs = workload(tokenizer, args.requests, n, args.rate, args.prompt_len)[:args.peft_requests]
        results["runs"][f"N={n} PEFT switching"] = run_peft(model_dir, paths, reqs, args.output_len, base_engine.dtype)
        sub = {f"a{i}": paths[i] for i in range(n)}
        engine = Engine(lora_modules=sub)
        results["runs"][f"N={n} mixed, same {len(reqs)} requests"] = run_engine(engine, reqs, list(sub),
                                                                               args.output_len)
        print(f"== PEFT: {results['runs'][f'N={n} PEFT switching']}", flush=True)
        del engine
    if args.vllm:
        http = results["runs"].setdefault("http", {})
        vllm_python = os.path.join(args.peers_home, "vllm", "bin", "python")
        env = dict(os.environ)
        for n in args.adapters:
            names = [f"a{i}" for i in range(n)]
            mods = [f"{name}={paths[i]}" for i, name in enumerate(names)]
            kestrel = serve_process([os.path.join(ROOT, ".venv/bin/kestrel"), "serve", "--port", str(args.port),
                                     "--lora-modules", *mods], args.port, env)
            try:
                http[f"kestrel N={n}"] = http_bench(args.port, names, args, f"kestrel-{n}")
            finally:
                stop_process(kestrel)
            print(f"== kestrel server N={n}: {http[f'kestrel N={n}']}", flush=True)
            if not os.path.exists(vllm_python):
                continue
            try:
                vllm = serve_process([vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                                      "--served-model-name", "default", "--port", str(args.port), "--dtype",
                                      "bfloat16", "--max-model-len", "2048", "--enable-lora", "--max-lora-rank",
                                      str(args.rank), "--max-loras", str(min(n, 32)), "--max-cpu-loras", str(n),
                                      "--lora-modules", *mods], args.port, dict(env, VLLM_CPU_KVCACHE_SPACE="2"))
            except RuntimeError as e:
                http[f"vLLM N={n}"] = {"error": str(e)}
                print(f"== vLLM N={n}: {e}", flush=True)
                continue
            try:
                http[f"vLLM N={n}"] = http_bench(args.port, names, args, f"vllm-{n}")
            finally:
                stop_process(vllm)
            print(f"== vLLM N={n}: {http[f'vLLM N={n}']}", flush=True)

    runs = results["runs"]
    base = runs["base (no adapters)"]["throughput"]
    print(f"\nCPU: {results['cpu']}; {args.requests} requests, ~{args.prompt_len} -> {args.output_len} tokens, "
          f"Poisson {args.rate}/s, adapters rank {args.rank} drawn from a power law")
    print(f"{'run':34s} {'tok/s':>8s} {'vs separate':>12s} {'vs base':>8s}")
    for n in args.adapters:
        m, s = runs[f"N={n} mixed"]["throughput"], runs[f"N={n} separate"]["throughput"]
        print(f"{f'N={n} mixed':34s} {m:8.1f} {m / s:11.2f}x {m / base:7.2f}x")
        print(f"{f'N={n} separate':34s} {s:8.1f} {'':12s} {s / base:7.2f}x")
    print(f"{'base (no adapters)':34s} {base:8.1f}")
    if not args.quick:
        n = max(args.adapters)
        peft = runs[f"N={n} PEFT switching"]["throughput"]
        same = runs[f"N={n} mixed, same {args.peft_requests} requests"]["throughput"]
        print(f"PEFT switching, N={n}, {args.peft_requests} requests: {peft:.1f} tok/s; Kestrel mixed on the same "
              f"requests {same:.1f} tok/s: {same / peft:.1f}x")
    for key, val in runs.get("http", {}).items():
        print(f"HTTP {key}: {val}")
    for n in args.adapters:
        print(f"memory N={n}: {runs[f'N={n} memory']}")
    save_results(results, os.path.join(RESULTS, "lora.json"))


if __name__ == "__main__":
    main()

"""The speed table: Kestrel against llama.cpp and vLLM's CPU build on this machine, in one run.

    .venv/bin/python benchmarks/bench_speed.py                     # peers from $PEERS_HOME (~/.cache/kestrel-peers)
    .venv/bin/python benchmarks/bench_speed.py --skip-serving      # engine figures only (a few minutes)

Figures (embedded SmolLM2-135M-Instruct, its GGUF file for llama.cpp, its converted weights for vLLM):
- batch-1 decode tok/s: llama-bench tg128; Kestrel one request, 128 tokens;
- prefill tok/s: llama-bench pp512 and pp200; Kestrel one 512-token prompt;
- decode tok/s at contexts of 512, 2k and 8k tokens (Kestrel, with and without its C++ kernels);
- share of a batch-1 decode step (per token) spent outside the matmul kernels, outside the matmuls and attention
  (whose q.k and p.v are the model's other matmuls), and outside the model's forward call (scheduling, tensor
  building, sampling): medians of nine rounds. Where the head runs on the int8 kernel (the default engines), the
  kernels' own clock (kestrel.kernels' kernel_clock) times them in the same window as the wall time; elsewhere the
  profiler does, in a window just after (and outside_model_share_bound sets them against the profiled window's own
  wall time, the profiler's cost counted as outside: an upper bound free of the drift between the two windows);
- serving, `kestrel bench` against each server, N requests at --concurrency streams: random 200 -> 64 and
  shared-prefix 4 x 512 + 32 -> 64, output tok/s.
Writes benchmarks/results/speed.json and speed.png. Peers are run when their builds are present
(../shared/peers/build-llama-cpp.sh, ../shared/peers/install-vllm-cpu.sh). Nothing else should run meanwhile.
Where llama.cpp's default weight repacking crashes (its AMX kernels die with SIGILL or SIGSEGV on some KVM guests
with AMX), its figures come from `--repack 0` / `--no-repack` and are labelled so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import (RESULTS, cpu_name, exit_status, llama_bench, run_for_result, save_results,  # noqa: E402
                               serve_process, stop_process)

KESTREL_CONFIGS = {  # label -> Engine keyword arguments
    "kestrel default": {},
    "kestrel default, quantized batches": {"batch_weights": "quantized"},
    "kestrel default, PyTorch ops only": {"kernels": "torch"},
    "kestrel unquantized": {"quantization": "none"},
    "kestrel float32 unquantized": {"dtype": "float32", "quantization": "none"},
}
# attention's own matmuls (q.k and p.v) and softmax: the C++ kernel, or SDPA's CPU kernel on PyTorch ops alone
ATTENTION_OPS = ("kestrel::paged_attention", "aten::_scaled_dot_product_flash_attention_for_cpu")
MATMUL_OPS = ("aten::_weight_int4pack_mm_for_cpu", "kestrel::int4_tiles_mm", "kestrel::int4_vector_mm",
              "aten::_weight_int8pack_mm",
              "kestrel::int8_rows_mm", "mkldnn::_linear_pointwise",
              "aten::addmm", "aten::mm", "aten::linear", "aten::matmul")

ENGINE = """
import json, statistics, sys, time
sys.path.insert(0, {root!r})
import torch
from benchmarks.common import batch1_speed
from kestrel import Engine, SamplingParams
e = Engine(**{kwargs!r})
greedy = lambda n, **kw: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)
fresh = lambda: e.cache.evict(e.cache.evictable_size)
ids = [100 + (i * 37) % 40000 for i in range(9000)]  # a fixed token sequence, never a cache hit by accident
decode, prefill = batch1_speed(e, ids, 128, 512)
at_context = {{}}
for ctx in {contexts!r}:
    fresh(); prompt = ids[:ctx]
    e.generate([prompt], greedy(1))  # cached: the timed run below prefills one token, then decodes
    t = time.perf_counter(); e.generate([prompt], greedy(1)); one = time.perf_counter() - t
    t = time.perf_counter(); e.generate([prompt], greedy(33)); many = time.perf_counter() - t
    at_context[ctx] = 32 / (many - one)
# a batch-1 decode step (a token: multi-step bursts run several in one call): its wall time, the time in the
# forward call, and in matmuls and attention. Where the engine's head runs on the int8 kernel, the kernels' own clock
# counts the latter in the same window as the wall time (the profiler's cost per op would count as outside it);
# otherwise the profiler does, in a window of its own just after: nine rounds of each, each round's shares from its
# own pair, medians reported (the machine's speed drifts by the minute: one wall time against one profile taken a
# minute apart once gave 26% for ~10%)
fresh(); rid = e.add_request(ids[:64], greedy(3000)); seq = e._requests[rid][0]
for _ in range(10): e.step()

def tokens(n):
    n0, f0, t = len(seq.output_ids), e.stats.forward_time, time.perf_counter()
    while len(seq.output_ids) < n0 + n: e.step()
    return time.perf_counter() - t, len(seq.output_ids) - n0, e.stats.forward_time - f0

head = e.model.burst_head(1)
clock = e.model.kernels.kernel_clock if head is not None and len(head) == 2 else None
from torch.profiler import profile, ProfilerActivity
rounds = []
for _ in range(9):
    if clock is not None:
        clock(True)
        wall, n, forward = tokens(64)
        mm, attention = (ns / 1e6 / n for ns in clock(False))
        profiled = None
    else:
        wall, n, forward = tokens(64)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            profiled, pn, _ = tokens(64)
        self_ms = dict((a.key, a.self_cpu_time_total / 1e3 / pn) for a in prof.key_averages())
        mm, attention = (sum(self_ms.get(k, 0.0) for k in ops) for ops in ({matmul_ops!r}, {attention_ops!r}))
        profiled /= pn
    wall, forward = wall / n, forward / n
    r = dict(step_ms=wall * 1e3, matmul_ms=mm, attention_ms=attention, forward_ms=forward * 1e3,
             outside_matmul_share=1 - mm / (wall * 1e3), outside_model_share=1 - (mm + attention) / (wall * 1e3),
             host_share=1 - forward / wall)
    if profiled is not None:  # the same steps' wall time, the profiler's own cost included: a bound without the drift
        r.update(profiled_step_ms=profiled * 1e3, outside_model_share_bound=1 - (mm + attention) / (profiled * 1e3))
    rounds.append(r)
step = dict((k, statistics.median(r[k] for r in rounds)) for k in rounds[0])
print("RESULT" + json.dumps(dict(describe=e.describe(), decode_tok_s=decode, prefill512_tok_s=prefill,
    decode_at_context=at_context, **step, share_from="kernel clock" if clock else "profiler",
    outside_model_shares=[r["outside_model_share"] for r in rounds])))
"""


def kestrel_engine(args) -> dict:
    rows = {}
    for label, kwargs in KESTREL_CONFIGS.items():
        contexts = [512, 2048, 8000] if "float32" not in label else []
        code = ENGINE.format(root=ROOT, kwargs=kwargs, contexts=contexts, matmul_ops=MATMUL_OPS,
                             attention_ops=ATTENTION_OPS)
        print(f"== {label}", flush=True)
        rows[label] = run_for_result(sys.executable, code, dict(os.environ, HF_HUB_OFFLINE="1"))
        print(f"   {rows[label]}", flush=True)
    return rows


def serving(name: str, cmd: list[str], env: dict, port: int, args) -> dict | None:
    try:
        proc = serve_process(cmd, port, env)
    except RuntimeError as e:
        print(f"== {name}: {e}")
        return None
    res = {}
    try:
        for workload, extra in (("random", ["--input-len", "200"]),
                                ("shared-prefix", ["--num-groups", "4", "--system-prompt-len", "512",
                                                   "--question-len", "32"])):
            path = os.path.join(RESULTS, f"speed-serving-{name.replace(' ', '_')}-{workload}.json")
            run = subprocess.run([os.path.join(ROOT, ".venv/bin/kestrel"), "bench", "--base-url",
                                  f"http://127.0.0.1:{port}", "--workload", workload, "--num-requests",
                                  str(args.num_requests), "--request-rate", "inf", "--max-concurrency",
                                  str(args.concurrency), "--output-len", "64", *extra, "--output", path],
                                 capture_output=True, text=True)
            if run.returncode and proc.poll() is not None:  # the server itself crashed: no figures from it
                print(f"== {name}: the server died ({exit_status(proc.returncode)}) during {workload}", flush=True)
                return None
            if run.returncode:  # say why and go on with the other servers
                print(f"== {name} {workload}: kestrel bench failed ({run.returncode}):\n{run.stdout[-1500:]}"
                      f"{run.stderr[-1500:]}", flush=True)
                continue
            with open(path) as f:
                data = json.load(f)
            res[workload] = data["output_token_throughput"]
            print(f"== {name} {workload}: {res[workload]:.1f} output tok/s ({data.get('completed')} completed)",
                  flush=True)
    finally:
        stop_process(proc)
    return res


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(k, v) for k, v in results["table"].items() if v]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (figure, values) in zip(axes if len(panels) > 1 else [axes], panels):
        names = list(values)
        ax.barh(names, [values[n] for n in names], color="#3b7dd8")
        ax.set_title(figure, fontsize=9)
        ax.tick_params(labelsize=7)
        for i, n in enumerate(names):
            ax.text(values[n], i, f" {values[n]:.0f}", va="center", fontsize=7)
    fig.suptitle(f"tok/s on {results['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers-home", default=os.environ.get("PEERS_HOME", os.path.expanduser("~/.cache/kestrel-peers")))
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--skip-serving", action="store_true")
    ap.add_argument("--skip-engine", action="store_true", help="serving figures only")
    ap.add_argument("--port", type=int, default=30611)
    ap.add_argument("--output", default=os.path.join(RESULTS, "speed.json"))
    args = ap.parse_args()
    from kestrel.engine.hardware import place
    from kestrel.model.loader import embedded_model_path, resolve_model_dir

    threads = place("cpu", "auto", None).threads
    gguf, model_dir = embedded_model_path(), resolve_model_dir(None)
    results = {"cpu": cpu_name(), "threads": threads, "command": " ".join(sys.argv),
               "kestrel": {} if args.skip_engine else kestrel_engine(args)}
    llama_bin = os.path.join(args.peers_home, "llama.cpp", "bin")
    results["llama_bench"] = None if args.skip_engine else llama_bench(llama_bin, gguf, threads)
    if results["llama_bench"] is not None:
        print(f"== llama-bench: {results['llama_bench']}", flush=True)
    serve = {}
    if not args.skip_serving:
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        for label, extra in (("kestrel default", []), ("kestrel quantized batches", ["--batch-weights", "quantized"]),
                             ("kestrel unquantized", ["--quantization", "none"])):
            serve[label] = serving(label, [os.path.join(ROOT, ".venv/bin/kestrel"), "serve", "--port", str(args.port),
                                           *extra], env, args.port, args)
        if os.path.exists(os.path.join(llama_bin, "llama-server")):
            cmd = [os.path.join(llama_bin, "llama-server"), "-m", gguf, "--port", str(args.port), "-t", str(threads),
                   "-np", str(args.concurrency), "-c", str(args.concurrency * 1024), "--alias", "default"]
            llama_env = dict(env, LD_LIBRARY_PATH=llama_bin)
            serve["llama-server"] = serving("llama-server", cmd, llama_env, args.port, args)
            if serve["llama-server"] is None:  # its repacked (AMX) batch path crashes on some KVM guests
                del serve["llama-server"]
                serve["llama-server --no-repack"] = serving("llama-server --no-repack", cmd + ["--no-repack"],
                                                            llama_env, args.port, args)
        vllm_python = os.path.join(args.peers_home, "vllm", "bin", "python")
        if os.path.exists(vllm_python):
            for dtype in ("float32", "bfloat16"):
                serve[f"vLLM-cpu {dtype}"] = serving(f"vLLM-cpu {dtype}", [
                    vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                    "--served-model-name", "default", "--port", str(args.port), "--dtype", dtype,
                    "--max-model-len", "2048", "--enable-prefix-caching"],
                    dict(env, VLLM_CPU_KVCACHE_SPACE="2"), args.port, args)
    results["serving"] = serve
    k = results["kestrel"]
    lb = results["llama_bench"] or {}

    def llama(test: str) -> str:  # a figure's name, saying where llama.cpp ran without its default repacking
        return f"llama.cpp {test}" + (" --repack 0" if test in lb.get("without_repack", []) else "")

    table = {
        "batch-1 decode tok/s": {**{n: r["decode_tok_s"] for n, r in k.items() if r},
                                 **({llama("tg128"): lb["tg128"]} if "tg128" in lb else {})},
        "prefill tok/s": {**{n + " (512)": r["prefill512_tok_s"] for n, r in k.items() if r},
                          **{llama(p): lb[p] for p in ("pp200", "pp512") if p in lb}},
        "serving random 200->64": {n: r["random"] for n, r in serve.items() if r},
        "serving shared-prefix 4x512+32->64": {n: r["shared-prefix"] for n, r in serve.items() if r},
    }
    results["table"] = table
    best = max((r["decode_tok_s"] for r in k.values() if r), default=None)
    ratios = {}
    if best and "tg128" in lb:
        ratios[f"batch-1 decode vs {llama('tg128')}"] = best / lb["tg128"]
    prefill = max((r["prefill512_tok_s"] for r in k.values() if r), default=None)
    if prefill and "pp512" in lb:
        ratios[f"prefill vs {llama('pp512')}"] = prefill / lb["pp512"]
    for label in ("kestrel default", "kestrel quantized batches", "kestrel unquantized"):
        mine = serve.get(label) or {}
        for peer in [p for p in serve if not p.startswith("kestrel") and serve[p]]:
            for w in ("random", "shared-prefix"):
                if w in mine and w in serve[peer]:
                    ratios[f"serving {w}: {label} vs {peer}"] = mine[w] / serve[peer][w]
    results["ratios"] = ratios
    print(f"\nCPU: {results['cpu']}, {threads} threads")
    for figure, values in table.items():
        print(f"{figure}:")
        for n, v in values.items():
            print(f"  {n:48s} {v:8.1f}")
    for n, r in k.items():
        if r:
            print(f"{n}: outside matmuls {r['outside_matmul_share']:.1%}, outside matmuls and attention "
                  f"{r['outside_model_share']:.1%}, outside the forward "
                  f"{r['host_share']:.0%} of a {r['step_ms']:.2f} ms step ({r.get('share_from', 'profiler')}); decode at "
                  + ", ".join(f"{c}: {v:.1f}" for c, v in r.get("decode_at_context", {}).items()))
    for n, v in ratios.items():
        print(f"  {n}: {v:.2f}x")
    save_results(results, args.output)
    plot(results, os.path.splitext(args.output)[0] + ".png")


if __name__ == "__main__":
    main()

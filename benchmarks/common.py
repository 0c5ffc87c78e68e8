"""What the benchmark scripts share: where results go, and running a measurement in another process."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Optional

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_name() -> str:
    """This machine's CPU as lscpu names it, with the ISA features the kernels care about, and its core count."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    flags = next((line for line in out.splitlines() if line.startswith("Flags")), "")
    kinds = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "avx2") if f" {f}" in flags]
    return f"{name} ({', '.join(kinds)}), {os.cpu_count()} cores"


def batch1_speed(engine, prompt: list[int], decode_tokens: int = 128, prefill_tokens: int = 512) -> tuple[float, float]:
    """(decode tok/s, prefill tok/s) of one request at a time: `decode_tokens` greedy tokens after the first 16
    of `prompt`, and a prefill of its first `prefill_tokens`; each after a warm-up, from an empty prefix cache."""
    import time

    from kestrel import SamplingParams

    def greedy(n):
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    def fresh():
        engine.cache.evict(engine.cache.evictable_size)

    fresh(); engine.generate([prompt[:16]], greedy(8)); fresh()  # noqa: E702 - warm-up
    t = time.perf_counter()
    out = engine.generate([prompt[:16]], greedy(decode_tokens))[0]
    decode = out.output_tokens / (time.perf_counter() - t)
    fresh()
    t = time.perf_counter()
    engine.generate([prompt[:prefill_tokens]], greedy(1))
    prefill = prefill_tokens / (time.perf_counter() - t)
    fresh()
    return decode, prefill


def save_results(data, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"wrote {path}")


def run_for_result(python: str, code: str, env: Optional[dict] = None, stdin: Optional[str] = None) -> Optional[dict]:
    """Run `code` with `python`; it prints one line "RESULT" + JSON. None (and its stderr shown) if it fails."""
    proc = subprocess.run([python, "-c", code], input=stdin, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[6:])
    print("run failed:\n" + proc.stderr[-3000:], file=sys.stderr)
    return None


def exit_status(code: int) -> str:
    """A return code as a person reads it: a negative one is the signal that killed the program (a peer built with
    -march=native can die of SIGILL where the VM advertises instructions it does not run, e.g. AMX)."""
    if code >= 0:
        return str(code)
    import signal
    try:
        return f"{code} ({signal.Signals(-code).name})"
    except ValueError:
        return str(code)


def llama_bench(bin_dir: str, gguf: str, threads: int, prompts: str = "200,512",
                repetitions: Optional[int] = None) -> Optional[dict]:
    """llama.cpp's own figures for `gguf` from the llama-bench in `bin_dir`: tok/s by test ("pp200", "tg128"...),
    prefills of each length in `prompts` ("0": none) and a 128-token decode; None where there is no build or
    every test fails (it says why).

    Each test runs on its own, first with llama.cpp's default weight repacking. Where that crashes (its AMX
    repacked path dies with SIGILL on some KVM guests) the test is run again with `--repack 0`, and its name is
    listed under "without_repack" so that the figure is never mistaken for the default build's."""
    exe = os.path.join(bin_dir, "llama-bench")
    if not os.path.exists(exe):
        return None
    tests = [["-p", p, "-n", "0"] for p in prompts.split(",") if p != "0"] + [["-p", "0", "-n", "128"]]
    res: dict = {}
    for test in tests:
        for repack in ([], ["--repack", "0"]):
            cmd = [exe, "-m", gguf, "-t", str(threads), *test, "-o", "json", *repack]
            if repetitions is not None:
                cmd += ["-r", str(repetitions)]
            out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, LD_LIBRARY_PATH=bin_dir))
            if out.returncode:
                print(f"llama-bench {' '.join(test + repack)} failed ({exit_status(out.returncode)}):",
                      out.stderr[-600:])
                continue
            for r in json.loads(out.stdout):
                key = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
                res[key] = r["avg_ts"]
                if repack:
                    res.setdefault("without_repack", []).append(key)
            break
    return res or None


def serve_process(cmd: list[str], port: int, env: dict, timeout: float = 600,
                  log: Optional[str] = None) -> subprocess.Popen:
    """Start a server (its own process group) and wait until its /health answers 200; its output goes to `log`
    (appended) if given, else nowhere."""
    with open(log, "a") if log else contextlib.nullcontext(subprocess.DEVNULL) as out:  # the child keeps its copy
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    import httpx
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {exit_status(proc.returncode)}"
                               + (f"; its output is in {log}" if log else ""))
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    stop_process(proc)
    raise RuntimeError(f"{cmd[0]} did not become healthy in {timeout} s")


def stop_process(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)

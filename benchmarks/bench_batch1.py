"""Batch-1 decode against llama.cpp, alternated: Kestrel's default engine (one request, 128 greedy tokens) and
llama-bench tg128 on the same GGUF file, in turns, so that both see the same minutes of a machine whose speed
drifts (bench_speed.py measures each once, minutes apart: 0.93x there where alternating gave 1.18x).

    .venv/bin/python benchmarks/bench_batch1.py [--rounds 6]     # llama.cpp from $PEERS_HOME (~/.cache/kestrel-peers)

Reports each round's tok/s and ratio, and the median of the ratios. Nothing else should run meanwhile.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RESULTS, batch1_speed, cpu_name, llama_bench, save_results  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--peers-home", default=os.environ.get("PEERS_HOME", os.path.expanduser("~/.cache/kestrel-peers")))
    ap.add_argument("--output", default=os.path.join(RESULTS, "batch1.json"))
    args = ap.parse_args()
    import torch

    from kestrel import Engine
    from kestrel.model.loader import embedded_model_path

    bin_dir = os.path.join(args.peers_home, "llama.cpp", "bin")
    if not os.path.exists(os.path.join(bin_dir, "llama-bench")):
        sys.exit(f"no llama-bench in {bin_dir}: build it with ../shared/peers/build-llama-cpp.sh or set PEERS_HOME")
    threads = torch.get_num_threads()
    engine = Engine()
    print(f"{cpu_name()}, {threads} threads\n{engine.describe()}")
    ids = [100 + (i * 37) % 40000 for i in range(600)]  # a fixed token sequence, never a cache hit by accident
    rounds = []
    for _ in range(args.rounds):
        kestrel = batch1_speed(engine, ids, 128, 512)[0]
        figures = llama_bench(bin_dir, embedded_model_path(), threads, prompts="0", repetitions=3)
        if figures is None:
            sys.exit("llama-bench failed (above)")
        llama = figures["tg128"]
        rounds.append(dict(kestrel=kestrel, llama_cpp=llama, ratio=kestrel / llama))
        print(f"kestrel {kestrel:6.1f} tok/s   llama.cpp {llama:6.1f} tok/s   ratio {kestrel / llama:.2f}", flush=True)
    ratio = statistics.median(r["ratio"] for r in rounds)
    print(f"batch-1 decode vs llama.cpp tg128: {ratio:.2f}x (median of {len(rounds)} rounds)")
    save_results(dict(cpu=cpu_name(), threads=threads, describe=engine.describe(), rounds=rounds, ratio=ratio),
                 args.output)


if __name__ == "__main__":
    main()

"""Lookahead decoding against plain decoding and prompt lookup alone, on the embedded model, in one run.

    .venv/bin/python benchmarks/bench_lookahead.py [--max-tokens 160] [--concurrent 16] [--rounds 5] [--dtype auto] [--quick]

Three engines with the default weights (the best quantization for the CPU): plain decoding, lookahead
(`speculative="lookahead"`, default sizes) and prompt lookup alone (`lookahead_window=0`: candidates from the
prompt's and output's own n-grams, no Jacobi window: what vLLM and SGLang ship as n-gram speculation). Batch 1:
every prompt on every engine in turn, `--rounds` times, the fastest kept (greedy: with --dtype float32 the outputs
must be identical, the `identical` column checks it; in bf16 batch shapes change rounding and outputs may part), wall
clock per output token while decoding (first token to last) and tokens per decode step (hardware-free). Then
3 x `--concurrent` requests (the prompts repeated) served with `--concurrent` in flight: the median over
`--rounds` alternating rounds of each engine's output tokens per second over
plain decoding's in the same round. Results go to benchmarks/results/lookahead.json.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, cpu_name, save_results  # noqa: E402

ZEN = inspect.cleandoc("""
    Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
    Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
    Readability counts. Special cases aren't special enough to break the rules. Although practicality beats
    purity. Errors should never pass silently. Unless explicitly silenced. In the face of ambiguity, refuse the
    temptation to guess. There should be one-- and preferably only one --obvious way to do it.""")


def prompts(tok) -> list[tuple[str, str, list[int]]]:
    """(kind, name, token ids): code-like, chat, and prompts that copy from their input."""
    import json.encoder as source_module

    from kestrel.model.loader import chat_template_ids

    def chat(text):
        return chat_template_ids(tok, [{"role": "user", "content": text}])

    source = inspect.getsource(source_module)
    cut = source.index("def py_encode_basestring")  # continue a real file from the middle of its helpers
    return [
        ("code", "write a function", chat("Write a Python function merge_intervals(intervals) that merges "
                                          "overlapping intervals. Include type hints and a docstring.")),
        ("code", "write a class", chat("Write a Python class Stack with methods push, pop, peek and is_empty.")),
        ("code", "continue a file", tok(source[:cut + 200]).input_ids),
        ("chat", "sleep tips", chat("Give me three tips for sleeping better.")),
        ("chat", "hash tables", chat("Explain what a hash table is to a beginner.")),
        ("copy", "extract lines", chat(f"Here is a text:\n\n{ZEN}\n\nList every sentence of the text that contains "
                                       f"the word 'better', exactly as written, one per line.")),
        ("copy", "fix spelling", chat("Rewrite this paragraph with the spelling fixed, changing nothing else:\n\n"
                                      "The rivver flowed slowly thru the vallley, and the old mill stood besside it. "
                                      "Every morning the miller opened the dorrs, looked at the watter, and "
                                      "started the great wheel turning. The villagers brought there grain from "
                                      "miles arround.")),
    ]


def sustained(engine, prompts_ids: list[list[int]], params, concurrency: int) -> float:
    """Output tokens per second serving `prompts_ids` with `concurrency` requests in flight, a new one admitted
    as each finishes (as `kestrel bench --max-concurrency` loads a server): a request that finishes sooner frees
    its place, which a closed batch, waiting for its slowest request, would not show."""
    queue, live, tokens = list(prompts_ids), set(), 0
    start = time.perf_counter()
    while queue or live:
        while queue and len(live) < concurrency:
            live.add(engine.add_request(queue.pop(0), params))
        engine.step()
        for rid in [r for r in live if engine.is_finished(r)]:
            tokens += engine.get_output(rid, pop=True).output_tokens
            live.remove(rid)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (batch 1: each engine keeps its "
                                                            "fastest; concurrent: the median ratio)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quick", action="store_true", help="one prompt per kind, 64 tokens")
    args = ap.parse_args()
    from kestrel import Engine, SamplingParams
    from kestrel.model.loader import load_tokenizer, resolve_model_dir

    tok = load_tokenizer(resolve_model_dir(None))
    cases = prompts(tok)
    if args.quick:
        seen: set[str] = set()
        cases = [c for c in cases if not (c[0] in seen or seen.add(c[0]))]
        args.max_tokens = 64
    engines = {"plain": Engine(dtype=args.dtype), "lookahead": Engine(dtype=args.dtype, speculative="lookahead"),
               "prompt lookup": Engine(dtype=args.dtype, speculative="lookahead", lookahead_window=0)}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    results: dict = {"cpu": cpu_name(), "describe": {k: e.describe() for k, e in engines.items()},
                     "max_tokens": args.max_tokens, "batch1": [], "concurrent": {}}
    for e in engines.values():  # warm-up
        e.generate(cases[0][2][:32], SamplingParams(max_tokens=8, temperature=0.0))
    print(f"# {results['cpu']}\n# {results['describe']['lookahead']}")
    print(f"{'kind':5} {'prompt':18} {'plain tok/s':>11} " + " ".join(f"{k + ' x':>16} {'tok/step':>8}"
                                                                        for k in list(engines)[1:]) + "  identical")
    for kind, name, ids in cases:
        row: dict = {"kind": kind, "prompt": name}
        outs = {}
        for _ in range(args.rounds):  # engines alternate; each keeps its fastest round (noise only slows)
            for label, e in engines.items():
                e.cache.evict(e.cache.evictable_size)  # every engine starts from an empty prefix cache
                out = e.generate(ids, params)[0]
                # decoding only (first token to last): outputs of different lengths compare per token, and the
                # prefill, the same for all, would otherwise weigh on short ones
                seconds = out.latency - out.time_to_first_token
                if label in row and row[label]["seconds"] / row[label]["tokens"] <= seconds / out.output_tokens:
                    continue
                outs[label] = out.token_ids
                steps = out.spec_steps + (out.output_tokens - out.spec_tokens - out.forced_tokens)
                row[label] = {"seconds": seconds, "tokens": out.output_tokens - 1,
                              "tok_per_s": (out.output_tokens - 1) / seconds,
                              "tokens_per_step": out.output_tokens / max(1, steps), "lookahead_steps": out.spec_steps}
        row["identical"] = all(v == outs["plain"] for v in outs.values())
        base = row["plain"]["tok_per_s"]  # per token: bf16 outputs may differ in length between engines
        for label in list(engines)[1:]:
            row[label]["speedup"] = row[label]["tok_per_s"] / base
        results["batch1"].append(row)
        print(f"{kind:5} {name:18} {row['plain']['tok_per_s']:11.1f} " + " ".join(
            f"{row[k]['speedup']:16.2f} {row[k]['tokens_per_step']:8.2f}" for k in list(engines)[1:])
            + f"  {row['identical']}")
    for kind in ("code", "chat", "copy"):
        rows = [r for r in results["batch1"] if r["kind"] == kind]
        def per_token(label):
            return sum(r[label]["seconds"] for r in rows) / sum(r[label]["tokens"] for r in rows)
        summary = {label: per_token("plain") / per_token(label) for label in list(engines)[1:]}
        results.setdefault("by_kind", {})[kind] = summary
        print(f"{kind}: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()) + " (decode time per token, all prompts)")
    batch = [cases[i % len(cases)][2] for i in range(3 * args.concurrent)]
    ratios: dict[str, list[float]] = {label: [] for label in engines}
    for _ in range(args.rounds):  # engines alternate; ratios are taken within a round (the machine drifts)
        rates = {}
        for label, e in engines.items():
            e.cache.evict(e.cache.evictable_size)
            rates[label] = sustained(e, batch, params, args.concurrent)
        for label in engines:
            ratios[label].append(rates[label] / rates["plain"])
        results["concurrent"].setdefault("rounds", []).append(rates)
    median = {label: sorted(r)[len(r) // 2] for label, r in ratios.items()}
    results["concurrent"]["median_ratio"] = median
    print(f"{args.concurrent} concurrent ({len(batch)} requests), median of {args.rounds} rounds' ratios to plain: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in median.items() if k != "plain")
          + f" (plain {sorted(r['plain'] for r in results['concurrent']['rounds'])[args.rounds // 2]:.0f} tok/s)")
    save_results(results, os.path.join(RESULTS, "lookahead.json"))
    print(json.dumps(results["by_kind"]))


if __name__ == "__main__":
    main()

"""Weight-only quantization on the embedded model: quality and speed of none / int8 / int4.

Quality is measured on a fixed English text that ships with every Python (the help topics in
`pydoc_data/topics.py`): perplexity over its first tokens, and teacher-forced top-1 agreement with the
unquantized float32 model (at each position, does the quantized model predict the same next token?).
Speed: batch-1 decode (one request, 128 tokens) and a 512-token prefill.

    .venv/bin/python benchmarks/bench_quant.py        # prints a table, writes benchmarks/results/quant.json

Each row runs in its own process, one after another; ratios are within one run.
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.common import RESULTS, cpu_name, run_for_result, save_results  # noqa: E402

ONE = """
import json, math, sys
sys.path.insert(0, {root!r})
from benchmarks.bench_quant import text_windows
from benchmarks.common import batch1_speed
from kestrel import Engine, SamplingParams
e = Engine(dtype={dtype!r}, quantization={quant!r}, batch_weights="quantized")  # the quantized kernels at every size
windows = text_windows(e.tokenizer, {windows}, {window})
outs = e.generate(windows, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
nll, top1 = 0.0, []
for o in outs:
    for tl in o.prompt_logprobs[1:]:
        nll -= tl.logprob
        top1.append(max(tl.top, key=tl.top.get))
n = len(top1)
decode, prefill = batch1_speed(e, windows[0], {decode}, {prefill})
print("RESULT" + json.dumps(dict(quantization=e.quantization, dtype=str(e.dtype).replace("torch.", ""),
    perplexity=math.exp(nll / n), tokens=n, top1=top1, prefill_tok_s=prefill, decode_tok_s=decode)))
"""


def text_windows(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` consecutive windows of `length` tokens from the start of pydoc_data's topics text."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[: count * length * 8])
    if len(ids) < count * length:
        raise ValueError("the text is shorter than the windows asked for")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--output", default=os.path.join(RESULTS, "quant.json"))
    args = ap.parse_args()
    cpu = cpu_name()
    configs = [("float32", "none"), ("auto", "none"), ("auto", "int8"), ("auto", "int4")]
    rows = []
    for dtype, quant in configs:
        code = ONE.format(root=ROOT, dtype=dtype, quant=quant, windows=args.windows, window=args.window,
                          prefill=args.prefill, decode=args.decode)
        r = run_for_result(sys.executable, code, dict(os.environ, HF_HUB_OFFLINE="1"))
        if r is None:
            raise SystemExit(f"the {dtype}/{quant} run failed")
        rows.append(r)
    ref = rows[0]["top1"]
    print(f"CPU: {cpu}; {rows[0]['tokens']} tokens of pydoc_data topics text, embedded model")
    print(f"  {'weights':8s} {'dtype':9s} {'perplexity':>10s} {'top-1 agree':>11s} {'decode tok/s':>12s} "
          f"{'prefill tok/s':>13s}")
    for r in rows:
        top1 = r.pop("top1")
        r["top1_agreement"] = sum(a == b for a, b in zip(top1, ref)) / len(ref)
        print(f"  {r['quantization']:8s} {r['dtype']:9s} {r['perplexity']:10.3f} {r['top1_agreement']:11.3f} "
              f"{r['decode_tok_s']:12.1f} {r['prefill_tok_s']:13.1f}")
    save_results({"cpu": cpu, "text": "pydoc_data.topics", "rows": rows}, args.output)


if __name__ == "__main__":
    main()

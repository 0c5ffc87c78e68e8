"""How many calls should a vote make? Vote and filter-vote on generated sums, with the embedded model.

    .venv/bin/python benchmarks/compound_vote.py --quick     # 8 questions, ~15 s on 2 CPU cores
    .venv/bin/python benchmarks/compound_vote.py             # 60 questions, ~70 s

1. single calls: `--samples` sampled answers to each of `--queries` questions "What is a + b?" (half with
   one-digit terms, half with two-digit ones, so the set mixes easy and hard queries);
2. estimate_calls fits the easy/hard model to them and picks the number of calls K;
3. for each K in --calls, one vote and one filter-vote (an LLM judge asks the model whether the answer is
   correct) per question: their observed accuracy against the prediction.
Writes benchmarks/results/compound_vote.json.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kestrel as kl  # noqa: E402
from benchmarks.common import RESULTS, save_results  # noqa: E402
from kestrel.lang.compound import estimate_calls, vote  # noqa: E402


def questions(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(lo, hi), rng.randint(lo, hi)) for lo, hi in ((1, 9), (12, 99)) * (n // 2 + 1)][:n]


def parse(text: str) -> Optional[int]:
    digits = text.strip().rstrip(".")
    return int(digits) if digits.isdigit() else None


def answer(a: int, b: int, temperature: float):
    # the model's own habit is "a + b = c.": start its reply that way, then sample the number (the optional
    # full stop lets it end the number where it wants to rather than add digits)
    return kl.assistant(f"{a} + {b} = ", kl.gen("answer", regex=r"[0-9]{1,3}\.?", max_tokens=5,
                                                temperature=temperature))


def judge(fork, _answer) -> bool:
    """Filter-Vote's filter: the model itself says whether its answer is right."""
    fork += kl.user("Is that answer correct? Reply yes or no.")
    fork += kl.assistant(kl.select("ok", ["yes", "no"]))
    return fork["ok"] == "yes"


@kl.function
def once(s, a, b, temperature):
    s += kl.user(f"What is {a} + {b}?")
    s += answer(a, b, temperature)


@kl.function
def voted(s, a, b, temperature, k, filtered, out, i):
    s += kl.user(f"What is {a} + {b}?")
    out[i] = vote(s, answer(a, b, temperature), k, key=parse, judge=judge if filtered else None)


def accuracy_of_votes(backend, qs, temperature: float, k: int, filtered: bool) -> float:
    out: dict = {}
    voted.run_batch([dict(a=a, b=b, temperature=temperature, k=k, filtered=filtered, out=out, i=i)
                     for i, (a, b) in enumerate(qs)], backend=backend, progress_bar=True)
    return sum(out[i].answer == a + b for i, (a, b) in enumerate(qs)) / len(qs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 questions, 5 samples, K in 1,3,5")
    ap.add_argument("--queries", type=int, default=60, help="labeled questions")
    ap.add_argument("--samples", type=int, default=9, help="single-call answers per question (at least 3)")
    ap.add_argument("--calls", default="1,3,5,9", help="K values to measure vote and filter-vote at")
    ap.add_argument("--max-calls", type=int, default=32, help="largest K estimate_calls may pick")
    ap.add_argument("--tolerance", type=float, default=0.005,
                    help="pick the fewest calls predicted within this of the best accuracy")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--seed", type=int, default=0, help="which questions")
    args = ap.parse_args()
    if args.quick:
        args.queries, args.samples, args.calls = 8, 5, "1,3,5"
    calls = [int(k) for k in args.calls.split(",")]
    start = time.perf_counter()
    backend = kl.EngineBackend()  # the embedded model
    qs = questions(args.queries, args.seed)

    states = once.run_batch([dict(a=a, b=b, temperature=args.temperature) for a, b in qs for _ in range(args.samples)],
                            backend=backend, progress_bar=True)
    samples = [[parse(st["answer"]) for st in states[i * args.samples:(i + 1) * args.samples]] for i in range(len(qs))]
    labels = [a + b for a, b in qs]
    est = estimate_calls(samples, labels, max_calls=args.max_calls, tolerance=args.tolerance)
    top = max(est.predicted, key=est.predicted.__getitem__)
    print(f"single calls: {sum(x == y for q, y in zip(samples, labels) for x in q) / (len(qs) * args.samples):.2f} "
          f"right; fitted alpha={est.alpha:.2f} easy, p_easy={est.p_easy:.2f}, p_hard={est.p_hard:.2f} "
          f"(fit error {est.fit_error:.3f})\npredicted best: K = {top} ({est.predicted[top]:.3f}); "
          f"chosen K = {est.best_calls} ({est.predicted[est.best_calls]:.3f}, within {args.tolerance} of it)")

    rows = []
    for k in calls:
        row = dict(k=k, predicted=est.predicted.get(k), from_samples=est.observed.get(k),
                   vote=accuracy_of_votes(backend, qs, args.temperature, k, filtered=False),
                   filter_vote=accuracy_of_votes(backend, qs, args.temperature, k, filtered=True))
        rows.append(row)
    fmt = lambda v: "   -" if v is None else f"{v:4.2f}"  # noqa: E731
    print(f"\n{'K':>3}  predicted  from samples  vote  filter-vote   ({len(qs)} questions: a standard error "
          f"of about {0.5 / len(qs) ** 0.5:.2f})")
    for r in rows:
        print(f"{r['k']:>3}  {fmt(r['predicted']):>9}  {fmt(r['from_samples']):>12}  {fmt(r['vote'])}  "
              f"{fmt(r['filter_vote']):>11}")
    wall = time.perf_counter() - start
    print(f"\n{wall:.0f} s in all")
    backend.shutdown()
    save_results(dict(args=vars(args), best_calls=est.best_calls, alpha=est.alpha, p_easy=est.p_easy,
                      p_hard=est.p_hard, fit_error=est.fit_error, predicted=est.predicted, observed=est.observed,
                      rows=rows, wall_s=wall), os.path.join(RESULTS, "compound_vote.json"))


if __name__ == "__main__":
    main()

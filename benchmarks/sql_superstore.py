"""llm() over a real table: the paper's query types on Superstore's orders, per plan (LLM-SQL).

    .venv/bin/pip install bokeh_sampledata                  # the data (9,994 orders), not a Kestrel dependency
    .venv/bin/python benchmarks/sql_superstore.py [--rows 600] [--quick]

Queries, on the first --rows orders of bokeh_sampledata's SampleSuperstore.csv.gz, with the embedded model:
  classify   a choice per order from its sub-category and category (filter/classify);
  summary    a short note from six fields (multi-field summary);
  aggregate  a yes/no per order, counted by answer (aggregation over an LLM column).
Each runs under three plans: rows in the table's order, sorted (grouped by the template's fields in order, what the
greedy group recursion reduces to when the template pins the field order), and sorted with dedup. The KV pool is
scaled with --rows so that it holds the same share of the prompts as the default pool (46,603 tokens) would for
the whole table: on a real table the prompts far outgrow the cache, and that is where order matters. Reports per
run: calls, prompt tokens, tokens computed, the predicted and measured prefix hit rates, and job time; and the
time of --explain on all 9,994 rows. The engine is warmed up first, and starts each run with an empty cache.
Writes benchmarks/results/sql_superstore.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, cpu_name, save_results  # noqa: E402

CHOICE = json.dumps({"choices": ["durable", "consumable"], "max_tokens": 4})
YESNO = json.dumps({"choices": ["yes", "no"], "max_tokens": 2})
QUERIES = {
    "classify": f"""SELECT llm_with('{CHOICE}', 'Is a product of the {{sub}} kind, in the {{cat}} category, durable or
        consumable? Answer with one word.', "Sub-Category", Category) AS kind FROM orders""",
    "summary": """SELECT llm('Write one short sentence for our records about this order. Segment: {seg}. Region:
        {region}. State: {state}. City: {city}. Ship mode: {mode}. Item: {sub}.', Segment, Region, State, City,
        "Ship Mode", "Sub-Category") AS note FROM orders""",
    "aggregate": f"""SELECT answer, count(*) AS orders FROM (SELECT llm_with('{YESNO}', 'Would a customer of the
        {{seg}} segment in the {{region}} region, who bought {{sub}} with a discount of {{discount}}, buy again? Answer
        yes or no.', Segment, Region, "Sub-Category", Discount) AS answer FROM orders) GROUP BY answer ORDER BY answer""",
}


def superstore() -> str:
    from bokeh_sampledata import package_path
    return package_path("SampleSuperstore.csv.gz")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--max-total-tokens", type=int, default=None, help="KV pool (default: 46603 x rows / 9994)")
    p.add_argument("--queries", default=",".join(QUERIES))
    p.add_argument("--quick", action="store_true", help="200 rows")
    args = p.parse_args()
    import duckdb

    import kestrel.sql as ks
    from kestrel import Engine

    if args.quick:
        args.rows = 200
    plans = [("original", False), ("sorted", False), ("sorted", True)]
    pool = args.max_total_tokens or max(2048, 46603 * args.rows // 9994)
    engine = Engine(max_total_tokens=pool)
    from kestrel import SamplingParams
    engine.generate([list(range(1000 + i, 1064 + i)) for i in range(64)],  # warm-up: a full batch's first steps
                    SamplingParams(max_tokens=16, ignore_eos=True))
    print(f"{cpu_name()}; {engine.describe()}; {args.rows} rows")
    con = duckdb.connect()
    con.execute(f"CREATE TABLE all_orders AS SELECT * FROM read_csv('{superstore()}')")
    con.execute(f"CREATE TABLE orders AS SELECT * FROM all_orders LIMIT {args.rows}")
    rows = []
    for name in args.queries.split(","):
        query = QUERIES[name]
        for order, dedup in plans:
            engine.flush_cache()
            session = ks.register(con, engine=engine, dedup=dedup, order=order, max_tokens=16)
            plan = ks.explain(con, query)
            start = time.perf_counter()
            result = ks.sql(con, query).fetchall()
            seconds = time.perf_counter() - start
            row = {"query": name, "order": order, "dedup": dedup, "rows": plan.rows, "calls": session.calls_run,
                   "prompt_tokens": session.runner.prompt_tokens, "computed_tokens":
                   session.runner.prompt_tokens - session.runner.cached_tokens,
                   "predicted_hit_rate": plan.predicted_hit_rate, "measured_hit_rate": session.runner.hit_rate,
                   "seconds": seconds, "null_rows": sum(r[-1] is None for r in result)}
            rows.append(row)
            print(f"{name:9s} {order:8s} dedup={'on ' if dedup else 'off'} calls {row['calls']:5d}  prompt tokens "
                  f"{row['prompt_tokens']:7d}  computed {row['computed_tokens']:6d}  hit rate predicted "
                  f"{row['predicted_hit_rate']:.1%} measured {row['measured_hit_rate']:.1%}  {seconds:6.1f} s", flush=True)
    # planning on the whole table
    con.execute("CREATE OR REPLACE TABLE orders AS SELECT * FROM all_orders")
    ks.register(con, engine=engine)
    explain = {}
    for name in args.queries.split(","):
        start = time.perf_counter()
        plan = ks.explain(con, QUERIES[name])
        explain[name] = {"rows": plan.rows, "seconds_total": time.perf_counter() - start,
                         "seconds_planning": plan.seconds, "predicted_hit_rate": plan.predicted_hit_rate}
        print(f"--explain {name} on {plan.rows} rows: {explain[name]['seconds_total']:.2f} s (planning "
              f"{plan.seconds:.2f} s), predicted hit rate {plan.predicted_hit_rate:.1%}")
    speedups = {}
    for name in args.queries.split(","):
        by = {(r["order"], r["dedup"]): r["seconds"] for r in rows if r["query"] == name}
        if ("original", False) in by and ("sorted", True) in by:
            speedups[name] = by[("original", False)] / by[("sorted", True)]
    print("job time, original order without dedup / sorted with dedup:", {k: round(v, 2) for k, v in speedups.items()})
    save_results({"cpu": cpu_name(), "engine": engine.describe(), "rows": args.rows, "pool_tokens": pool, "runs": rows, "explain": explain,
                  "speedups": speedups}, os.path.join(RESULTS, "sql_superstore.json"))


if __name__ == "__main__":
    main()

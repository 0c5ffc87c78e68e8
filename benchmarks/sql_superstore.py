"""llm() over real tables: the paper's query types on Superstore's orders and the Titanic's passengers, per plan
(LLM-SQL).

    .venv/bin/pip install bokeh_sampledata                  # the data, not a Kestrel dependency
    .venv/bin/python benchmarks/sql_superstore.py [--rows 600] [--quick]

Tables from bokeh_sampledata: the first --rows of SampleSuperstore.csv.gz (9,994 order lines) and of
titanic_all.csv (1,313 passengers), and a profile per state (one sentence of the state's averages and most
ordered sub-categories, computed in SQL from all orders) joined to the orders as context. Each prompt is an
instruction and a record of fields, {A, B, ...}, in the order a user would write them:
  filter     orders the model calls unusual for their state (yes/no), item fields then the state's profile;
  classify   what to do with each item in its state (one of three), item fields then the state's profile;
  aggregate  each order's return risk (low/medium/high) counted by answer, the columns in the table's order;
  summary    a short note per order from six of its columns;
  titanic    whether each passenger survived (yes/no), name first.
Plans: the query's row order with the fields as written; rows sorted by the fields as written; GGR (rows grouped
and each record's fields ordered per row, with the functional dependencies found in the data); GGR with dedup.
The KV pool is scaled with --rows so that it holds the same share of the prompts as the default pool (46,603
tokens) would for the whole table: on a real table the prompts far outgrow the cache, and that is where order
matters. Reports per run: calls, prompt tokens, tokens computed, the predicted and measured prefix hit rates, job
time, and how many answers differ from the first plan's (reordering a record's fields changes the prompt); and
the time of --explain on all 9,994 orders. The engine is warmed up first, and starts each run with an empty cache.
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

COLUMNS = ["Ship Mode", "Segment", "Country", "City", "State", "Postal Code", "Region", "Category", "Sub-Category",
           "Sales", "Quantity", "Discount", "Profit"]
# one sentence per state from all its orders: the context a user joins in so the model can judge an order
PROFILES = """CREATE OR REPLACE TABLE profiles AS
  WITH counts AS (SELECT State, "Sub-Category" AS sub, count(*) AS n FROM all_orders GROUP BY ALL),
  ranked AS (SELECT *, row_number() OVER (PARTITION BY State ORDER BY n DESC, sub) AS r FROM counts),
  top AS (SELECT State, string_agg(sub, ', ' ORDER BY r) AS subs FROM ranked WHERE r <= 3 GROUP BY State)
  SELECT State, 'Orders from ' || State || ' (' || any_value(Region) || ' region) average $' || round(avg(Sales), 2)
    || ' in sales and $' || round(avg(Profit), 2) || ' in profit, with a ' || round(100 * avg(Discount))
    || '% discount on average; ' || round(100 * avg(CASE WHEN Profit < 0 THEN 1 ELSE 0 END))
    || '% of them lose money. Most ordered: ' || any_value(top.subs) || '.' AS "State profile"
  FROM all_orders JOIN top USING (State) GROUP BY State"""


def _llm(instruction: str, columns: list[str], options: str) -> str:
    record = "{" + ", ".join(columns) + "}"
    args = ", ".join(f'"{c}"' for c in columns)
    return f"llm('{instruction}\n{record}', {args}, {options})"


QUERIES = {
    "filter": "SELECT count(*) AS unusual FROM orders JOIN profiles USING (State) WHERE " + _llm(
        "Is this sale unusual for its state? Answer yes or no.",
        ["Sub-Category", "Sales", "Discount", "Profit", "State profile"], "choices := ['yes', 'no']") + " = 'yes'",
    "classify": "SELECT " + _llm(
        "Should we stock more, the same, or less of this item in this state?",
        ["Category", "Sub-Category", "Quantity", "Sales", "State", "State profile"],
        "choices := ['more', 'same', 'less']") + " AS stock FROM orders JOIN profiles USING (State)",
    "aggregate": "SELECT risk, count(*) AS orders FROM (SELECT " + _llm(
        "How likely is this order to be returned: low, medium or high?", COLUMNS,
        "choices := ['low', 'medium', 'high']") + " AS risk FROM orders) GROUP BY risk ORDER BY risk",
    "summary": "SELECT " + _llm("Write one short sentence about this order for our records.",
                                ["Ship Mode", "Segment", "City", "State", "Region", "Sub-Category"],
                                "max_tokens := 16") + " AS note FROM orders",
    "titanic": "SELECT " + _llm("Did this passenger survive the sinking? Answer yes or no.",
                                ["name", "class", "age", "sex"], "choices := ['yes', 'no']") + " AS survived FROM titanic",
}
PLANS = [("original", False, False), ("sorted", False, False), ("ggr", True, False), ("ggr", True, True)]


def sample(name: str) -> str:
    from bokeh_sampledata import package_path
    return package_path(name)


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
    pool = args.max_total_tokens or max(2048, 46603 * args.rows // 9994)
    engine = Engine(max_total_tokens=pool)
    from kestrel import SamplingParams
    engine.generate([list(range(1000 + i, 1064 + i)) for i in range(64)],  # warm-up: a full batch's first steps
                    SamplingParams(max_tokens=16, ignore_eos=True))
    print(f"{cpu_name()}; {engine.describe()}; {args.rows} rows; KV pool {pool} tokens")
    con = duckdb.connect()
    con.execute(f"CREATE TABLE all_orders AS SELECT * FROM read_csv('{sample('SampleSuperstore.csv.gz')}')")
    con.execute(f"CREATE TABLE orders AS SELECT * FROM all_orders LIMIT {args.rows}")
    con.execute(PROFILES)
    con.execute(f"CREATE TABLE titanic AS SELECT * FROM read_csv('{sample('titanic_all.csv')}') LIMIT {args.rows}")
    rows = []
    for name in args.queries.split(","):
        query = QUERIES[name]
        answers = {}
        for order, reorder, dedup in PLANS:
            engine.flush_cache()
            session = ks.register(con, engine=engine, dedup=dedup, order=order, reorder_fields=reorder, max_tokens=16)
            plan = ks.explain(con, query)
            start = time.perf_counter()
            result = ks.sql(con, query).fetchall()
            seconds = time.perf_counter() - start
            # each row's answer, by its call (the query's output may be an aggregate of them)
            answers[(order, reorder, dedup)] = {c.values: session.results.get(c) for c in session.results}
            base = answers[PLANS[0]]
            row = {"query": name, "order": order, "reorder_fields": reorder, "dedup": dedup, "rows": plan.rows,
                   "calls": session.calls_run, "prompt_tokens": session.runner.prompt_tokens,
                   "computed_tokens": session.runner.prompt_tokens - session.runner.cached_tokens,
                   "predicted_hit_rate": plan.predicted_hit_rate, "measured_hit_rate": session.runner.hit_rate,
                   "seconds": seconds, "result": [list(r) for r in result][:5],
                   "answers_changed": sum(base.get(k) != v for k, v in answers[(order, reorder, dedup)].items())}
            rows.append(row)
            label = f"{order}{'+fields' if reorder else ''}{'+dedup' if dedup else ''}"
            print(f"{name:9s} {label:20s} calls {row['calls']:5d}  prompt tokens {row['prompt_tokens']:7d}  computed "
                  f"{row['computed_tokens']:6d}  hit rate predicted {row['predicted_hit_rate']:.1%} measured "
                  f"{row['measured_hit_rate']:.1%}  {seconds:6.1f} s  answers changed {row['answers_changed']}",
                  flush=True)
    # planning on the whole table
    con.execute("CREATE OR REPLACE TABLE orders AS SELECT * FROM all_orders")
    con.execute(f"CREATE OR REPLACE TABLE titanic AS SELECT * FROM read_csv('{sample('titanic_all.csv')}')")
    ks.register(con, engine=engine)  # GGR with dedup, the defaults
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
        by = {(r["order"], r["reorder_fields"], r["dedup"]): r["seconds"] for r in rows if r["query"] == name}
        speedups[name] = {"sorted": by[PLANS[0]] / by[PLANS[1]], "ggr": by[PLANS[0]] / by[PLANS[2]],
                          "ggr+dedup": by[PLANS[0]] / by[PLANS[3]]}
    print("job time, original plan / each plan:", json.dumps({k: {p: round(x, 2) for p, x in v.items()}
                                                              for k, v in speedups.items()}))
    save_results({"cpu": cpu_name(), "engine": engine.describe(), "rows": args.rows, "pool_tokens": pool, "runs": rows, "explain": explain,
                  "speedups": speedups}, os.path.join(RESULTS, "sql_superstore.json"))


if __name__ == "__main__":
    main()

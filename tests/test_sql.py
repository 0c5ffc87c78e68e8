"""llm() inside DuckDB queries: results equal the naive one-prompt-per-row run in the original order whatever the
plan; deduplication and ordering; the plan's predicted prefix hit rate against the measured one; NULL for a row
whose call fails; CSV, Parquet, Arrow, pandas and polars tables; the OpenAI-server path against `kestrel serve`."""
from __future__ import annotations

import json

import duckdb
import pytest

import kestrel.sql as ks
from kestrel import Engine, SamplingParams
from kestrel.sql.plan import Call, plan_calls, predict_hits
from tests.server_utils import ServerProcess

MAX_TOKENS = 5
QUERY = ("SELECT i, llm('Classify this catalogue item. Category: {c}. Product: {p}.', cat, product) AS kind "
         "FROM items ORDER BY i")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return Engine(tiny_llama_dir, dtype="float32")


def _items(con, n: int = 48) -> None:
    con.execute(f"""CREATE OR REPLACE TABLE items AS SELECT i,
        ['mug', 'pen', 'a kettle with a long name', 'tea'][i % 4 + 1] AS product,
        ['kitchen', 'office supplies', 'garden'][i % 3 + 1] AS cat,
        ['aisle one, top shelf', 'aisle two', 'back room', 'aisle one, bottom shelf'][i % 4 + 1] AS shelf
        FROM range({n}) r(i)""")


def _naive(engine, prompts: list[str]) -> list[str]:
    """One prompt per row, in the original order, each on its own."""
    out = []
    for prompt in prompts:
        ids = engine.apply_chat_template([{"role": "user", "content": prompt}])
        out.append(engine.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0].text)
    return out


def _filled(template: str, rows: list[tuple]) -> list[str]:
    """Each row's prompt with the fields in the order the template writes them."""
    return [ks.parse(template).render([str(v) for v in values]) for values in rows]


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("order", ["ggr", "sorted", "original"])
def test_results_equal_the_naive_run_whatever_the_plan(engine, dedup, order):
    con = duckdb.connect()
    _items(con)
    rows = con.execute("SELECT cat, product FROM items ORDER BY i").fetchall()
    want = _naive(engine, _filled("Classify this catalogue item. Category: {c}. Product: {p}.", rows))
    engine.flush_cache()
    session = ks.register(con, engine=engine, max_tokens=MAX_TOKENS, dedup=dedup, order=order, progress=False)
    got = ks.sql(con, QUERY).fetchall()
    assert [r[0] for r in got] == list(range(48)) and [r[1] for r in got] == want
    assert session.calls_run == (12 if dedup else 48)  # 3 categories x 4 products, or one per row
    # plain con.sql plans each chunk DuckDB hands over: the same results
    fresh = ks.register(con, engine=engine, max_tokens=MAX_TOKENS, dedup=dedup, order=order, progress=False)
    assert [r[1] for r in con.sql(QUERY).fetchall()] == want and fresh.calls_run == session.calls_run


def test_the_plan_predicts_the_measured_hit_rate(engine):
    con = duckdb.connect()
    _items(con, 64)
    engine.flush_cache()
    session = ks.register(con, engine=engine, max_tokens=MAX_TOKENS, progress=False)
    plan = ks.explain(con, QUERY)
    assert plan.rows == 64 and len(plan.run) == 12 and session.calls_run == 0  # explain runs nothing
    text = plan.describe()
    assert "distinct prompts: 12" in text and "predicted prefix hit rate" in text
    ks.sql(con, QUERY).fetchall()
    assert 0.3 < plan.predicted_hit_rate < 1
    assert abs(session.runner.hit_rate - plan.predicted_hit_rate) < 0.05


def test_planner_orders_groups_and_predicts_from_a_token_trie():
    calls = [Call("{a}{b}", None, (a, b)) for a, b in [("x", "1"), ("y", "1"), ("x", "2"), ("x", "1"), ("y", "2")]]

    def tokenize(texts):
        return [[0] + [ord(ch) for ch in t] for t in texts]
    for order in ("sorted", "ggr"):
        plan = plan_calls(calls, tokenize, dedup=True, order=order)
        # both put each value of the first field together (ggr's groups go by score, here in first-met order)
        assert [t.call.values for t in plan.run] == [("x", "1"), ("x", "2"), ("y", "1"), ("y", "2")], order
        assert [t.text for t in plan.run] == ["x1", "x2", "y1", "y2"]
        # hits: x2 shares [0, x]; y1 shares [0]; y2 shares [0, y] -> 2 + 1 + 2 of 12 tokens; 1 + 2 + 1 + 1 distinct
        assert (plan.predicted_hit_tokens, plan.prompt_tokens) == (5, 12)
    assert predict_hits([[1, 2, 3], [1, 2, 3]]) == (2, 6, 3)  # a prompt's last token is always computed
    kept = plan_calls(calls, tokenize, dedup=False, order="original")
    assert [t.call for t in kept.run] == calls
    with pytest.raises(ValueError, match="order must be"):
        plan_calls(calls, tokenize, order="random")


RECORD = "Where does this item go? Answer with the shelf.\n{product, cat, shelf}"


def test_record_fields_reordered_per_row_answer_as_their_prompts_do(engine):
    """A record's fields are ordered per row for sharing; each row's result is the naive run of the prompt the plan
    gave it, and with reordering off, of the template's own order."""
    con = duckdb.connect()
    _items(con, 24)
    query = f"SELECT i, llm('{RECORD}', product, cat, shelf) FROM items ORDER BY i"
    rows = con.execute("SELECT product, cat, shelf FROM items ORDER BY i").fetchall()
    plans = {}
    for reorder in (True, False):
        engine.flush_cache()
        session = ks.register(con, engine=engine, max_tokens=MAX_TOKENS, reorder_fields=reorder, progress=False)
        plan = plans[reorder] = ks.explain(con, query)
        prompt = {t.call.values: t.text for t in plan.run}
        got = [r[1] for r in ks.sql(con, query).fetchall()]
        assert session.calls_run == 12
        assert got == _naive(engine, [prompt[r] for r in rows])
        if not reorder:
            assert [prompt[r] for r in rows] == _filled(RECORD, rows)
    # product and shelf determine each other: the planner finds it, groups the rows by product and puts the shelf
    # next to it, ahead of the category the template lists second (which differs inside each group)
    assert "product -> shelf" in plans[True].describe() and "shelf -> product" in plans[True].describe()
    assert all(t.text.split("\n")[-1].startswith("cat: ") for t in plans[True].run)
    assert plans[True].predicted_hit_tokens > plans[False].predicted_hit_tokens


def test_choices_and_json_schema_give_typed_values(engine):
    con = duckdb.connect()
    _items(con, 8)
    session = ks.register(con, engine=engine, max_tokens=48, progress=False)
    rel = ks.sql(con, "SELECT llm('Is {p} durable?', product, choices := ['durable', 'consumable']) AS k FROM items")
    assert rel.types == [duckdb.sqltype("VARCHAR")]
    assert {k for (k,) in rel.fetchall()} <= {"durable", "consumable"}
    schema = json.dumps({"type": "object", "properties": {
        "durable": {"type": "boolean"}, "grade": {"type": "integer", "minimum": 1, "maximum": 5},
        "sizes": {"type": "array", "items": {"enum": ["S", "M"]}, "maxItems": 2}},
        "required": ["durable", "grade", "sizes"], "additionalProperties": False})
    rel = ks.sql(con, f"SELECT i, llm('Rate {{p}}', product, json_schema := '{schema}') AS r FROM items ORDER BY i")
    assert str(rel.types[1]) == "STRUCT(durable BOOLEAN, grade BIGINT, sizes VARCHAR[])"
    for _, r in rel.fetchall():
        assert isinstance(r["durable"], bool) and 1 <= r["grade"] <= 5 and set(r["sizes"]) <= {"S", "M"}
    # fields of the STRUCT are SQL values: filter and aggregate on them
    n = ks.sql(con, f"SELECT count(*) FROM items WHERE llm('Rate {{p}}', product, json_schema := '{schema}').grade >= 1")
    assert n.fetchall() == [(8,)]
    # a reply cut short is not JSON: NULL, and the error says why
    cut = ks.sql(con, f"SELECT llm('Rate {{p}}', product, json_schema := '{schema}', max_tokens := 3) FROM items")
    assert {r for (r,) in cut.fetchall()} == {None}
    assert any("not valid JSON" in e for e in session.errors.values())


def test_planning_tokenizes_like_the_chat_template(engine):
    from kestrel.sql.runner import user_turn_ids
    texts = ["Classify: mug", " padded \n", "unicode: café ☕ 東京", "", "{braces} and <|im_end|>"]
    want = [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    assert user_turn_ids(engine.tokenizer, texts) == want
    assert user_turn_ids(engine.tokenizer, texts[1:]) == want[1:]
    # many prompts are encoded by their distinct lines; where lines do not split cleanly (blank lines, trailing
    # spaces), by whole prompts: the same ids either way
    for shape in ("Rate:\nname: item {i}\ncity: {c}", "Rate:\n\n  name: item {i} \n\ncity: {c}\n"):
        many = [shape.format(i=i, c="ab"[i % 2]) for i in range(300)]
        assert user_turn_ids(engine.tokenizer, many) == [
            engine.apply_chat_template([{"role": "user", "content": t}]) for t in many], shape


def test_options_nulls_and_failures(engine, caplog):
    con = duckdb.connect()
    _items(con, 8)
    ks.register(con, engine=engine, max_tokens=MAX_TOKENS, progress=False)
    options = json.dumps({"choices": ["durable", "consumable"]})
    kinds = con.sql(f"SELECT llm_with('{options}', 'Is {{p}} durable or consumable?', product) FROM items").fetchall()
    assert {k for (k,) in kinds} <= {"durable", "consumable"}
    # a NULL field gives NULL (SQL's rule); a call that cannot run gives NULL and the query goes on
    rows = con.sql("""SELECT i, llm('About {p}', CASE WHEN i = 1 THEN NULL ELSE product END) AS a,
                             llm_with(CASE WHEN i = 2 THEN '{"max_tokens": 5000}' ELSE NULL END, 'About {p}', product) AS b
                      FROM items ORDER BY i""").fetchall()
    assert rows[1][1] is None and rows[2][2] is None
    assert all(r[1] is not None for r in rows if r[0] != 1) and all(r[2] is not None for r in rows if r[0] != 2)
    session = ks.register(con, engine=engine, max_tokens=MAX_TOKENS, progress=False)
    assert con.sql("SELECT llm('{a} and {b}', product) FROM items LIMIT 1").fetchall() == [(None,)]
    assert any("2 field(s)" in e for e in session.errors.values())
    assert con.sql("SELECT llm_with('not json', 'x {p}', product) FROM items LIMIT 1").fetchall() == [(None,)]
    assert any("must be a JSON object" in e for e in session.errors.values())


def test_real_tables_csv_parquet_arrow_pandas_polars(engine, tmp_path):
    import pandas as pd
    import polars as pl
    import pyarrow as pa

    con = duckdb.connect()
    _items(con, 6)
    csv, parquet = tmp_path / "items.csv", tmp_path / "items.parquet"
    con.execute(f"COPY items TO '{csv}' (HEADER)")
    con.execute(f"COPY items TO '{parquet}' (FORMAT parquet)")
    ks.register(con, engine=engine, max_tokens=MAX_TOKENS, progress=False)
    want = ks.sql(con, "SELECT llm('Name {p}', product) FROM items ORDER BY i").fetchall()
    frame = con.execute("SELECT * FROM items ORDER BY i").df()
    arrow_items = pa.Table.from_pandas(frame)  # noqa: F841 - found by DuckDB's replacement scan
    pandas_items = frame  # noqa: F841
    polars_items = pl.from_pandas(frame)  # noqa: F841
    assert isinstance(frame, pd.DataFrame)
    for source in (f"'{csv}'", f"'{parquet}'", f"read_csv('{csv}')", "arrow_items", "pandas_items", "polars_items"):
        assert ks.sql(con, f"SELECT llm('Name {{p}}', product) FROM {source} ORDER BY i").fetchall() == want, source


def test_openai_server_path_gives_the_engine_results(engine, tiny_llama_dir):
    server = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32")
    try:
        con = duckdb.connect()
        _items(con, 24)
        session = ks.register(con, base_url=server.url + "/v1", max_tokens=MAX_TOKENS, progress=False)
        got = ks.sql(con, QUERY).fetchall()
        assert session.calls_run == 12 and session.runner.prompt_tokens > 0
    finally:
        assert server.stop() == 0
    ks.register(con, engine=engine, max_tokens=MAX_TOKENS, progress=False)
    assert ks.sql(con, QUERY).fetchall() == got


def test_cli_explains_and_runs_a_query_on_a_csv(tiny_llama_dir, tmp_path):
    import subprocess
    import sys

    csv = tmp_path / "items.csv"
    con = duckdb.connect()
    _items(con, 12)
    con.execute(f"COPY items TO '{csv}' (HEADER)")
    query = f"SELECT i, llm('Shelve:\n{{product, cat, shelf}}', product, cat, shelf) AS where_to FROM '{csv}' ORDER BY i"
    base = [sys.executable, "-m", "kestrel.cli", "sql", query, "--model", tiny_llama_dir, "--dtype", "float32",
            "--max-tokens", "3"]
    out = subprocess.run(base + ["--explain"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rows: 12" in out.stdout and "order: ggr, record fields reordered" in out.stdout
    assert "product -> shelf" in out.stdout
    out = subprocess.run(base + ["--format", "jsonl", "--keep-field-order", "--order", "sorted"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["i"] for r in rows] == list(range(12)) and all(isinstance(r["where_to"], str) for r in rows)
    bad = subprocess.run(base + ["--fd", "product"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--fd takes" in bad.stderr

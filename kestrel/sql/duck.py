"""llm() in DuckDB: a vectorized (Arrow) UDF behind macros that take the template and its columns.

DuckDB hands a UDF at most 2048 rows per call and has no Python table functions, so a query's rows can be planned
together only by running it more than once. `sql(con, query)` does that: a collecting pass records every call the
query makes (answering none), the calls are planned together (deduplicated, ordered for the prefix cache) and run,
and the query runs again answering from the results, in its own row order. Nested calls (llm of llm, filters on an
llm column) take one more collecting pass per level. Plain `con.sql(...)` works too: then each chunk of up to 2048
rows is planned and run on its own.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Optional

from kestrel.sql.plan import FDs, Call, Plan, check_order, plan_calls
from kestrel.sql.runner import OPTIONS, CallError, EngineRunner, OpenAIRunner
from kestrel.sql.template import parse

MAX_FIELDS = 16  # columns one llm() call may take
ABSENT = "\ue001"  # llm()'s default for a field column not given (a private-use character no table holds)
MAX_PASSES = 8  # collecting passes of sql(): nesting levels of llm() calls
UDF = "_kestrel_llm"
log = logging.getLogger("kestrel.sql")


@dataclass
class Session:
    """The llm() function registered on one DuckDB connection: its runner, its results, and its plans."""

    runner: object
    dedup: bool = True
    order: str = "ggr"
    reorder_fields: bool = True
    fds: FDs = "discover"
    progress: bool = True
    results: dict = field(default_factory=dict)  # Call -> its value as JSON text (a string, or a json_schema
    # call's object), or None for a failed call
    errors: dict = field(default_factory=dict)  # Call -> why it gave NULL
    collecting: bool = False
    missing: dict = field(default_factory=dict)  # call -> rows a collecting pass met it in (first met first)
    calls_run: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, options, templates, values) -> list[Optional[str]]:
        """One chunk of the UDF: each row's value as JSON text (None: NULL)."""
        calls: list[Optional[Call]] = []
        for o, t, v in zip(options, templates, values):
            while v and v[-1] == ABSENT:  # llm()'s field columns that were not given
                v = v[:-1]
            # SQL's rule: a NULL template or field makes the result NULL (and a call nested in a collecting pass
            # answers NULL until its inner call has run)
            calls.append(None if t is None or v is None or any(x is None for x in v) else Call(t, o, tuple(v)))
        with self.lock:
            todo = [c for c in calls if c is not None and c not in self.results]  # one per row: dedup is the plan's
            if todo and self.collecting:
                for c in todo:
                    self.missing[c] = self.missing.get(c, 0) + 1
            elif todo:
                self.execute(todo)
            return [None if c is None else self.results.get(c) for c in calls]

    def plan(self, calls: list[Call]) -> Plan:
        problem: dict[tuple, Optional[str]] = {}  # (template, fields given) -> why they do not fit, or None
        for c in dict.fromkeys(calls):  # a template that does not fit its values is this call's error, not the plan's
            key = (c.template, len(c.values))
            if key not in problem:
                try:
                    parse(c.template).check(len(c.values))
                    problem[key] = None
                except ValueError as e:
                    problem[key] = str(e)
            if problem[key] is not None:
                self.results[c], self.errors[c] = None, problem[key]
        return plan_calls([c for c in calls if problem[(c.template, len(c.values))] is None], self.runner.planning_ids,
                          self.dedup, self.order, self.reorder_fields, self.fds, self.runner.cache_tokens)

    def execute(self, calls: list[Call]) -> Plan:
        plan = self.plan(calls)
        outputs = self.runner.run(plan.run, self.progress)
        self.calls_run += len(plan.run)
        failed = 0
        for task, out in zip(plan.run, outputs):
            if not isinstance(out, CallError):
                out = _as_json(out, _wants_json(task.call.options))
            if isinstance(out, CallError):
                self.results[task.call], self.errors[task.call] = None, str(out)
                failed += 1
            else:
                self.results[task.call] = out
        if failed:
            first = next(iter(self.errors.values()))
            log.warning("llm(): %d call(s) failed and gave NULL; the first: %s", failed, first)
        return plan


@functools.lru_cache(maxsize=256)
def _wants_json(options: Optional[str]) -> bool:
    try:
        return bool(options) and json.loads(options).get("json_schema") is not None
    except (ValueError, AttributeError):
        return False


def _as_json(text: str, is_json: bool):
    """A call's value as JSON text for the query: a json_schema call's own output (when it parses: a reply cut
    short by max_tokens does not), any other the string."""
    if not is_json:
        return json.dumps(text)
    try:
        json.loads(text)
    except ValueError:
        return CallError(f"the reply is not valid JSON (cut short by max_tokens?): {text[:80]!r}")
    return text


_sessions: dict[int, Session] = {}


def register(con, engine=None, *, base_url: Optional[str] = None, api_key: Optional[str] = None,
             model: str = "default", dedup: bool = True, order: str = "ggr", reorder_fields: bool = True,
             fds: FDs = "discover", progress: bool = True, **defaults) -> Session:
    """Make `llm(template, col, ..., option := value)` and `llm_with(options_json, template, col, ...)` callable
    in `con`'s SQL.

    Calls run on `engine` (a kestrel.Engine in this process) or on the OpenAI-compatible server at `base_url`.
    `defaults` are generation options for every call (max_tokens, temperature, ...; greedy and 64 tokens unless
    given); llm()'s named options and llm_with's JSON object override them per call and may add choices, regex or
    json_schema (llm() then returns a STRUCT). The optimisations switch for comparison: `dedup`, `order`
    ("original", "sorted" or "ggr"), `reorder_fields` (the fields of a template's records), `fds`
    ("discover", declared (determinant, dependent) name pairs, or None)."""
    import duckdb
    import pyarrow as pa

    if (engine is None) == (base_url is None):
        raise ValueError("give either engine= (a kestrel.Engine) or base_url= (an OpenAI-compatible server)")
    check_order(order)
    runner = EngineRunner(engine, defaults) if engine is not None else OpenAIRunner(base_url, api_key, model, defaults)
    session = Session(runner, dedup, order, reorder_fields, fds, progress)

    def udf(options, templates, values):
        out = session.answer(options.to_pylist(), templates.to_pylist(), values.to_pylist())
        return pa.array(out, type=pa.string())

    text = duckdb.sqltype("VARCHAR")
    try:
        con.remove_function(UDF)
    except Exception:  # noqa: BLE001 - not registered yet (DuckDB raises its own InvalidInputException)
        pass
    con.create_function(UDF, udf, [text, text, duckdb.list_type(text)], text, type="arrow", null_handling="special")
    # sql() runs the user's query from inside this package: DuckDB must look for pandas, polars and Arrow tables
    # named in it in the caller's frames too, not only in the frame that executes it
    con.execute("SET python_scan_all_frames = true")
    for statement in _macros():
        con.execute(statement)
    _sessions[id(con)] = session
    return session


def _macros() -> list[str]:
    """The SQL side of llm(): one macro each for llm and llm_with, whose field columns default to ABSENT (DuckDB
    macros cannot overload on arity once parameters have defaults), and the macros that turn a JSON Schema into
    the structure from_json() types its value with (objects and arrays nested two deep; deeper values stay JSON).
    The macros use json_extract, not ->: inside a function that takes lambdas DuckDB reads -> as one."""
    fields = ", ".join(f"a{i} := '{ABSENT}'" for i in range(1, MAX_FIELDS + 1))
    values = "[" + ", ".join(f"a{i}::VARCHAR" for i in range(1, MAX_FIELDS + 1)) + "]"
    named = ", ".join(f"{o} := NULL" for o in OPTIONS)
    options = "json_object(" + ", ".join(f"'{o}', {o}" + ("::JSON" if o == "json_schema" else "") for o in OPTIONS) + ")"
    as_text = "'\"VARCHAR\"'"
    out = ["""CREATE OR REPLACE TEMP MACRO _kestrel_type0(s) AS CASE json_extract_string(s, '$.type') WHEN 'string' THEN '"VARCHAR"'
        WHEN 'integer' THEN '"BIGINT"' WHEN 'number' THEN '"DOUBLE"' WHEN 'boolean' THEN '"BOOLEAN"'
        ELSE CASE WHEN json_exists(s, '$.enum') THEN '"VARCHAR"' ELSE '"JSON"' END END"""]
    for level in (1, 2):
        inner = f"_kestrel_type{level - 1}"
        out.append(f"""CREATE OR REPLACE TEMP MACRO _kestrel_type{level}(s) AS CASE
            WHEN json_extract_string(s, '$.type') = 'array' AND json_exists(s, '$.items')
                THEN '[' || {inner}(json_extract(s, '$.items')) || ']'
            WHEN json_extract_string(s, '$.type') = 'object' AND json_exists(s, '$.properties') THEN '{{' || array_to_string(list_transform(
                map_entries(from_json(json_extract(s, '$.properties'), '"MAP(VARCHAR, JSON)"')),
                lambda p: to_json(p.key) || ':' || {inner}(p.value)), ',') || '}}'
            ELSE _kestrel_type0(s) END""")
    out.append(f"""CREATE OR REPLACE TEMP MACRO llm(t, {fields}, {named}) AS from_json({UDF}({options}::VARCHAR, t,
        {values}), CASE WHEN json_schema IS NULL THEN {as_text} ELSE _kestrel_type2(json_schema::JSON) END)""")
    out.append(f"""CREATE OR REPLACE TEMP MACRO llm_with(o, t, {fields}) AS from_json({UDF}(o, t, {values}),
        {as_text})""")
    return out


def session_of(con) -> Session:
    s = _sessions.get(id(con))
    if s is None:
        raise ValueError("llm() is not registered on this connection: call kestrel.sql.register(con, ...) first")
    return s


def _collect(con, session: Session, query: str) -> list[Call]:
    """Run `query` once without answering new calls (in a transaction rolled back, so statements that write
    leave nothing); returns the calls it met that have no result yet, one per row, in the order met."""
    session.collecting, session.missing = True, {}
    try:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(query).fetchall()
        finally:
            con.execute("ROLLBACK")
    finally:
        session.collecting = False
    return [c for c, rows in session.missing.items() for _ in range(rows)]


def sql(con, query: str):
    """Run `query` with its llm() calls planned together: returns the DuckDB relation of its result, which answers
    every call from the results of the planned runs (and keeps the query's own row order)."""
    session = session_of(con)
    for _ in range(MAX_PASSES):
        todo = _collect(con, session, query)
        if not todo:
            break
        session.execute(todo)
    return con.sql(query)


def explain(con, query: str) -> Plan:
    """The plan of the query's llm() calls, without running them: rows, distinct prompts, order, predicted prefix
    hit rate. Only the first level of nested calls is known before running (their inputs are the inner results)."""
    session = session_of(con)
    return session.plan(_collect(con, session, query))


__all__ = ["register", "sql", "explain", "Session"]

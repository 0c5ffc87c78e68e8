"""LLM calls inside SQL over real tables (DuckDB), batched through the engine and planned for the prefix cache.

    import duckdb, kestrel, kestrel.sql as ks
    con = duckdb.connect()
    ks.register(con, engine=kestrel.Engine())          # or base_url="http://host:30000/v1"
    ks.sql(con, "SELECT llm('Is {Product} durable? Answer yes or no.', Product) FROM 'orders.csv'").show()
"""
from kestrel.sql.duck import Session, explain, register, sql
from kestrel.sql.ggr import discover_fds, ggr
from kestrel.sql.plan import Call, Plan, Task, plan_calls, predict_hits
from kestrel.sql.template import Template, fields, parse

__all__ = ["register", "sql", "explain", "Session", "Call", "Plan", "Task", "plan_calls", "predict_hits", "ggr",
           "discover_fds", "Template", "parse", "fields"]

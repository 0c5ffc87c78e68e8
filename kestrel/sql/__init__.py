"""LLM calls inside SQL over real tables (DuckDB), batched through the engine and planned for the prefix cache.

    import duckdb, kestrel, kestrel.sql as ks
    con = duckdb.connect()
    ks.register(con, engine=kestrel.Engine())          # or base_url="http://host:30000/v1"
    ks.sql(con, "SELECT llm('Is {Product} durable? Answer yes or no.', Product) FROM 'orders.csv'").show()
"""
from kestrel.sql.duck import Session, explain, register, sql
from kestrel.sql.plan import Call, Plan, plan_calls, predict_hits
from kestrel.sql.runner import fields, render

__all__ = ["register", "sql", "explain", "Session", "Call", "Plan", "plan_calls", "predict_hits", "fields", "render"]

"""Arena battles, their conversations and votes, in SQLite.

One file under the data directory, in WAL mode (readers never wait for the writer). One connection writes, behind
a lock: SQLite allows one writer at a time anyway, and a single one makes "one vote per battle" a plain
conditional UPDATE. Exports and imports the battle log in the format Chatbot Arena publishes.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from typing import Iterable, Optional

from kestrel.arena.ratings import WINNERS, Battle
from kestrel.server.protocol import APIError

SCHEMA = """
CREATE TABLE IF NOT EXISTS battles (
    id TEXT PRIMARY KEY,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    judge TEXT,                      -- who voted (a client label), as in Chatbot Arena's logs
    created REAL NOT NULL,
    winner TEXT,                     -- NULL until voted
    voted REAL,
    turns INTEGER NOT NULL DEFAULT 0,
    conversation_a TEXT NOT NULL DEFAULT '[]',
    conversation_b TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS battles_voted ON battles (voted);
"""


class ArenaError(APIError):
    """An arena request that cannot be done: the server answers it with OpenAI's error body and this status."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message, kind={409: "conflict_error", 429: "rate_limit_error"}.get(status))


def read_battle_log(lines: Iterable[str]) -> list[dict]:
    """The battles of a battle log (JSON lines with model_a, model_b and winner, ours or Chatbot Arena's), checked;
    ValueError names the first bad line."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            Battle(r["model_a"], r["model_b"], r["winner"])  # validates
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"line {n}: {e} (each line is a JSON object with model_a, model_b and winner)") from None
        out.append(r)
    return out


class ArenaStore:
    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> int:
        with self._lock:
            return self._db.execute(sql, args).rowcount

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            cur = self._db.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def create(self, model_a: str, model_b: str) -> str:
        battle = uuid.uuid4().hex
        self._write("INSERT INTO battles (id, model_a, model_b, created) VALUES (?, ?, ?, ?)",
                    (battle, model_a, model_b, time.time()))
        return battle

    def get(self, battle: str) -> dict:
        rows = self._read("SELECT * FROM battles WHERE id = ?", (battle,))
        if not rows:
            raise ArenaError(404, f"no battle {battle!r}: start one with POST /arena/api/battles")
        return rows[0]

    def open(self, battle: str) -> dict:
        """The battle, if it still takes turns (not voted yet)."""
        row = self.get(battle)
        if row["winner"] is not None:
            raise ArenaError(409, "this battle is over (voted): start a new one")
        return row

    def record_turn(self, battle: str, side: str, conversation: list[dict]) -> None:
        """The side's conversation so far (its messages and the reply just given)."""
        column = {"a": "conversation_a", "b": "conversation_b"}[side]
        turns = sum(m.get("role") == "user" for m in conversation)
        changed = self._write(f"UPDATE battles SET {column} = ?, turns = max(turns, ?) WHERE id = ? AND winner IS NULL",
                              (json.dumps(conversation), turns, battle))
        if not changed:
            self.open(battle)  # says why: unknown (404) or voted (409)

    def vote(self, battle: str, winner: str, judge: str) -> dict:
        """Record the vote (once per battle); returns the battle with the names."""
        if winner not in WINNERS:
            raise ArenaError(400, f"winner must be one of {list(WINNERS)}, got {winner!r}")
        changed = self._write("UPDATE battles SET winner = ?, voted = ?, judge = ? "
                              "WHERE id = ? AND winner IS NULL AND turns > 0", (winner, time.time(), judge, battle))
        if not changed:
            row = self.get(battle)
            if row["winner"] is not None:
                raise ArenaError(409, "this battle has its vote already: one vote per battle")
            raise ArenaError(400, "ask both models something before voting")
        return self.get(battle)

    def battles(self) -> list[Battle]:
        return [Battle(r["model_a"], r["model_b"], r["winner"]) for r in
                self._read("SELECT model_a, model_b, winner FROM battles WHERE winner IS NOT NULL ORDER BY voted")]

    def count(self) -> int:
        return self._read("SELECT count(*) AS n FROM battles WHERE winner IS NOT NULL")[0]["n"]

    def export(self) -> Iterable[str]:
        """The voted battles as JSON lines in Chatbot Arena's battle-log format."""
        for r in self._read("SELECT * FROM battles WHERE winner IS NOT NULL ORDER BY voted"):
            yield json.dumps({"question_id": r["id"], "model_a": r["model_a"], "model_b": r["model_b"],
                              "winner": r["winner"], "judge": r["judge"], "turn": r["turns"], "anony": True,
                              "tstamp": r["voted"], "conversation_a": json.loads(r["conversation_a"]),
                              "conversation_b": json.loads(r["conversation_b"])}) + "\n"

    def import_log(self, lines: Iterable[str]) -> int:
        """Add battles from a battle log (ours or Chatbot Arena's); returns how many were new."""
        try:
            battles = read_battle_log(lines)
        except ValueError as e:
            raise ArenaError(400, f"battle log {e}") from None
        rows = []
        for r in battles:
            stamp = float(r.get("tstamp") or time.time())
            rows.append((str(r.get("question_id") or uuid.uuid4().hex), r["model_a"], r["model_b"], r.get("judge"),
                         stamp, r["winner"], stamp, int(r.get("turn") or 1),
                         json.dumps(r.get("conversation_a") or []), json.dumps(r.get("conversation_b") or [])))
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO battles (id, model_a, model_b, judge, created, winner, voted, "
                                 "turns, conversation_a, conversation_b) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self._db.execute("COMMIT")
            return self._db.total_changes - before


def default_path(data_dir: Optional[str] = None) -> str:
    base = data_dir or os.environ.get("KESTREL_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".local", "share",
                                                                         "kestrel")
    return os.path.join(base, "arena.sqlite")

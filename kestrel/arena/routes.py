"""The arena's HTTP API, mounted on `kestrel serve` under /arena/api.

    POST /arena/api/battles                    a battle between two models drawn by the sampling rule (names hidden)
    POST /arena/api/battles/{id}/chat          {"side": "a"|"b", "messages": [...], sampling...}: the side's reply,
                                               streamed as server-sent events without the model's name
    POST /arena/api/battles/{id}/vote          {"winner": "model_a"|"model_b"|"tie"|"tie (bothbad)"}: the names
    GET  /arena/api/leaderboard                Bradley–Terry ratings, intervals, ranks, win rates, online Elo
    GET  /arena/api/leaderboard.svg            the ratings and intervals as a plot
    GET  /arena/api/battles.jsonl              the battle log (Chatbot Arena's format); POST it back to import

Models are the server's own (its base model and LoRA adapters, asked through this server's OpenAI API) and the
`--arena-endpoint name=URL` servers. A client (by address) may start `rate_limit` battles and cast as many votes a
minute.
"""
from __future__ import annotations

import asyncio
import collections
import json
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from fastapi import Request  # at module level: FastAPI resolves the routes' (string) annotations here
from fastapi.responses import Response, StreamingResponse

from kestrel.arena.ratings import draw_pair, leaderboard
from kestrel.arena.store import ArenaError, ArenaStore
from kestrel.server.server import sse

CHAT_OPTIONS = ("temperature", "top_p", "max_tokens", "stop", "seed")


@dataclass
class ArenaConfig:
    store_path: str
    self_url: str  # this server's OpenAI API, for its own models
    api_key: Optional[str] = None
    endpoints: dict = field(default_factory=dict)  # name -> base URL of another OpenAI-compatible server
    sampling: str = "uniform"  # or "active"
    rate_limit: int = 30  # battles (and votes) per client per minute
    bootstrap_rounds: int = 100


class RateLimit:
    def __init__(self, per_minute: int):
        self.per_minute = per_minute
        self.seen: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def check(self, client: str, what: str) -> None:
        now, q = time.monotonic(), self.seen[f"{what}:{client}"]
        while q and now - q[0] > 60:
            q.popleft()
        if len(q) >= self.per_minute:
            raise ArenaError(429, f"too many {what} from this client: at most {self.per_minute} a minute")
        q.append(now)


class Arena:
    def __init__(self, server, config: ArenaConfig):
        self.server = server
        self.config = config
        self.store = ArenaStore(config.store_path)
        self.limit = RateLimit(config.rate_limit)
        self.rng = np.random.default_rng()
        self._board = (-1, None)  # (votes it was computed from, Leaderboard)
        self._upstream_model: dict[str, str] = {}

    def models(self) -> list[str]:
        own = [self.server.model_name] + sorted(self.server.client.loras)
        return own + [m for m in self.config.endpoints if m not in own]

    def new_battle(self, client: str) -> dict:
        self.limit.check(client, "battles")
        try:
            a, b = draw_pair(self.models(), self.store.battles(), self.config.sampling, self.rng)
        except ValueError as e:  # fewer than two models
            raise ArenaError(400, str(e)) from None
        return {"battle_id": self.store.create(a, b)}

    def vote(self, battle: str, winner: str, client: str) -> dict:
        self.limit.check(client, "votes")
        row = self.store.vote(battle, winner, client)
        return {"battle_id": battle, "winner": winner, "model_a": row["model_a"], "model_b": row["model_b"]}

    def board(self):
        """(votes, their Leaderboard or None before the first)."""
        n = self.store.count()
        if self._board[0] != n:  # recomputed when votes arrive (the bootstrap takes a moment)
            self._board = (n, leaderboard(self.store.battles(), rounds=self.config.bootstrap_rounds) if n else None)
        return self._board

    async def _upstream(self, client, model: str) -> tuple[str, dict, str]:
        """(chat completions URL, headers, the model id to ask for) for one of the arena's models."""
        if model in self.config.endpoints:
            base, headers = self.config.endpoints[model].rstrip("/"), {}
            if model not in self._upstream_model:  # ask the server which model it serves
                try:
                    listed = (await client.get(f"{base}/models", timeout=10)).json()["data"]
                    self._upstream_model[model] = listed[0]["id"]
                except Exception:  # noqa: BLE001 - an endpoint without /models: ask for the name given
                    self._upstream_model[model] = model
            return f"{base}/chat/completions", headers, self._upstream_model[model]
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        return f"{self.config.self_url.rstrip('/')}/chat/completions", headers, model

    async def chat(self, battle: str, body: dict):
        """The side's reply to its conversation, as server-sent events: {"delta"} pieces, then {"done"} with the
        reply's tokens, TTFT and cached prompt tokens; the conversation is stored when the reply ends."""
        import httpx

        side = body.get("side")
        if side not in ("a", "b"):
            raise ArenaError(400, "side must be 'a' or 'b'")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "user":
            raise ArenaError(400, "messages must be a list of chat messages ending with the user's")
        row = self.store.open(battle)
        model = row["model_a" if side == "a" else "model_b"]
        request = {k: body[k] for k in CHAT_OPTIONS if body.get(k) is not None}
        request.update(messages=messages, stream=True, stream_options={"include_usage": True})
        start, first, text, usage = time.monotonic(), None, [], {}
        async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
            url, headers, upstream = await self._upstream(client, model)
            async with client.stream("POST", url, json=dict(request, model=upstream), headers=headers) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")[:300]
                    yield sse({"error": f"the model's server answered {resp.status_code}: {detail}"})
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices", []):
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            first = first if first is not None else time.monotonic() - start
                            text.append(piece)
                            yield sse({"delta": piece})
        reply = "".join(text)
        self.store.record_turn(battle, side, messages + [{"role": "assistant", "content": reply}])
        details = usage.get("prompt_tokens_details") or {}
        seconds = time.monotonic() - start
        tokens = usage.get("completion_tokens", 0)
        yield sse({"done": True, "tokens": tokens, "ttft": first, "seconds": seconds,
                      "tokens_per_second": tokens / (seconds - (first or 0)) if tokens and seconds > (first or 0) else None,
                      "cached_tokens": details.get("cached_tokens", 0)})


def add_arena_routes(app, arena: Arena) -> None:
    def who(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise ArenaError(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ArenaError(400, "the body must be a JSON object")
        return body

    @app.get("/arena/api/models")
    async def arena_models():
        return {"models": arena.models(), "sampling": arena.config.sampling}

    @app.post("/arena/api/battles")
    async def new_battle(request: Request):
        return await asyncio.to_thread(arena.new_battle, who(request))

    @app.post("/arena/api/battles/{battle}/chat")
    async def battle_chat(battle: str, request: Request):
        stream = arena.chat(battle, await body_of(request))
        first = await stream.__anext__()  # errors before the stream starts are HTTP errors

        async def events():
            yield first
            try:
                async for event in stream:
                    yield event
            except ArenaError as e:
                yield sse({"error": str(e)})
            except Exception as e:  # noqa: BLE001 - the model's server went away mid-reply
                yield sse({"error": f"the reply broke off: {e}"})
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/arena/api/battles/{battle}/vote")
    async def battle_vote(battle: str, request: Request):
        body = await body_of(request)
        return await asyncio.to_thread(arena.vote, battle, body.get("winner"), who(request))

    @app.get("/arena/api/leaderboard")
    async def arena_leaderboard():
        votes, board = await asyncio.to_thread(arena.board)
        if board is None:
            return {"leaderboard": [], "win_rate": {}, "votes": 0}
        return dict(board.to_json(), votes=votes)

    @app.get("/arena/api/leaderboard.svg")
    async def arena_plot():
        _, board = await asyncio.to_thread(arena.board)
        if board is None:
            raise ArenaError(404, "no votes yet")
        return Response(await asyncio.to_thread(board.plot, "svg"), media_type="image/svg+xml")

    @app.get("/arena/api/battles.jsonl")
    async def arena_export():
        return Response("".join(arena.store.export()), media_type="application/x-ndjson")

    @app.post("/arena/api/battles.jsonl")
    async def arena_import(request: Request):
        text = (await request.body()).decode()
        return {"imported": await asyncio.to_thread(arena.store.import_log, text.splitlines())}

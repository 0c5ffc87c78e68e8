"""The arena through `kestrel serve`: battles between the served model and its adapters, both sides streaming
with the names hidden, one vote per battle, names after the vote, 50 concurrent voters without a lost vote, the
battle log exported and imported back, rate limits, errors in OpenAI's shape, and the leaderboard."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from kestrel.arena.ratings import Battle
from kestrel.arena.store import ArenaStore
from tests.lora_utils import make_adapter
from tests.server_utils import ServerProcess

KEY = "arena-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("arena")
    adapters = {name: make_adapter(tiny_llama_dir, str(root / name), 4, ["q_proj", "v_proj"], seed=i)
                for i, name in enumerate(["terse", "chatty"])}
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--max-total-tokens", "4096",
                        "--api-key", KEY, "--data-dir", str(root / "data"), "--arena-rate-limit", "200",
                        "--lora-modules", *(f"{n}={d}" for n, d in adapters.items()),
                        headers={"Authorization": f"Bearer {KEY}"})
    srv.data_dir = root / "data"
    yield srv
    assert srv.stop() == 0


def _client(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    with _client(server) as c:
        yield c


def _chat(http, battle: str, side: str, messages: list[dict]) -> tuple[str, dict]:
    text, done = [], None
    with http.stream("POST", f"/arena/api/battles/{battle}/chat",
                     json={"side": side, "messages": messages, "max_tokens": 6, "temperature": 0}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                assert "model" not in event  # the name stays hidden
                if "delta" in event:
                    text.append(event["delta"])
                if event.get("done"):
                    done = event
    assert done is not None
    return "".join(text), done


def _battle(http) -> str:
    r = http.post("/arena/api/battles", json={})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"battle_id"}  # no names before the vote
    return r.json()["battle_id"]


def test_a_battle_streams_both_sides_over_two_turns_then_reveals_on_the_vote(http):
    assert http.get("/arena/api/models").json()["models"] == ["default", "chatty", "terse"]
    battle = _battle(http)
    history = {"a": [{"role": "user", "content": "Name a colour."}], "b": [{"role": "user", "content": "Name a colour."}]}
    with ThreadPoolExecutor(2) as pool:  # both sides at once, as the page does
        first = dict(zip("ab", pool.map(lambda s: _chat(http, battle, s, history[s]), "ab")))
    for side in "ab":
        text, done = first[side]
        assert done["tokens"] >= 1 and done["ttft"] is not None and done["cached_tokens"] >= 0
        history[side] += [{"role": "assistant", "content": text}, {"role": "user", "content": "Another."}]
        _chat(http, battle, side, history[side])  # a second turn before voting
    vote = http.post(f"/arena/api/battles/{battle}/vote", json={"winner": "model_b"})
    assert vote.status_code == 200, vote.text
    names = vote.json()
    assert names["model_a"] != names["model_b"] and {names["model_a"], names["model_b"]} <= {"default", "chatty", "terse"}
    again = http.post(f"/arena/api/battles/{battle}/vote", json={"winner": "model_a"})
    assert again.status_code == 409 and "one vote per battle" in again.json()["error"]["message"]
    late = http.post(f"/arena/api/battles/{battle}/chat", json={"side": "a", "messages": history["a"]})
    assert late.status_code == 409
    log = [json.loads(line) for line in http.get("/arena/api/battles.jsonl").text.splitlines()]
    mine = next(r for r in log if r["question_id"] == battle)
    assert mine["winner"] == "model_b" and mine["turn"] == 2 and mine["model_a"] == names["model_a"]
    assert [m["role"] for m in mine["conversation_a"]] == ["user", "assistant", "user", "assistant"]


def test_bad_requests_get_clear_errors(http, server):
    battle = _battle(http)
    for body, status, words in [({"winner": "draw"}, 400, "winner must be"), ({"winner": "tie"}, 400, "before voting")]:
        r = http.post(f"/arena/api/battles/{battle}/vote", json=body)
        assert r.status_code == status and words in r.json()["error"]["message"]
    r = http.post(f"/arena/api/battles/{battle}/chat", json={"side": "c", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "side" in r.json()["error"]["message"]
    r = http.post(f"/arena/api/battles/{battle}/chat", json={"side": "a", "messages": []})
    assert r.status_code == 400
    assert http.post("/arena/api/battles/nope/vote", json={"winner": "tie"}).status_code == 404
    assert httpx.post(server.url + "/arena/api/battles", json={}).status_code == 401  # the API key guards the arena


def test_fifty_concurrent_voters_lose_no_vote(http, server):
    store = ArenaStore(str(server.data_dir / "arena.sqlite"))
    battles = [store.create("default", "terse") for _ in range(50)]
    for b in battles:  # a turn each (the store's own writer: the server's connection is another)
        store.record_turn(b, "a", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}])
    before = store.count()

    def vote(k: int):
        # a client per voter, as 50 browsers would be: httpcore 1.0.9's shared pool can close a connection that
        # another thread has just been given once more than 20 are open (EBADF on its read)
        winner = ["model_a", "model_b", "tie", "tie (bothbad)"][k % 4]
        with _client(server) as voter:
            first = voter.post(f"/arena/api/battles/{battles[k]}/vote", json={"winner": winner}).status_code
            second = voter.post(f"/arena/api/battles/{battles[k]}/vote", json={"winner": winner}).status_code
        return first, second
    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(vote, range(50)))
    assert codes == [(200, 409)] * 50
    assert store.count() == before + 50
    board = http.get("/arena/api/leaderboard").json()
    assert "leaderboard" in board, board
    assert board["votes"] == store.count() and {r["model"] for r in board["leaderboard"]} >= {"default", "terse"}
    plot = http.get("/arena/api/leaderboard.svg")
    assert plot.status_code == 200 and plot.text.lstrip().startswith("<?xml") and "<svg" in plot.text
    store.close()


def test_battle_log_round_trip(http, tmp_path):
    exported = http.get("/arena/api/battles.jsonl").text
    assert exported
    copy = ArenaStore(str(tmp_path / "copy.sqlite"))
    assert copy.import_log(exported.splitlines()) == len(exported.splitlines())
    assert "".join(copy.export()) == exported  # the same log back, line for line
    assert copy.import_log(exported.splitlines()) == 0  # importing twice adds nothing
    posted = http.post("/arena/api/battles.jsonl", content=exported)
    assert posted.status_code == 200 and posted.json() == {"imported": 0}
    bad = http.post("/arena/api/battles.jsonl", content='{"model_a": "x", "model_b": "y", "winner": "draw"}\n')
    assert bad.status_code == 400 and "line 1" in bad.json()["error"]["message"]
    assert copy.battles()[0] == Battle(**{k: json.loads(exported.splitlines()[0])[k]
                                          for k in ("model_a", "model_b", "winner")})


def test_rate_limit_per_client(tmp_path, tiny_llama_dir):
    srv = ServerProcess("--model", tiny_llama_dir, "--dtype", "float32", "--data-dir", str(tmp_path),
                        "--arena-rate-limit", "3", "--arena-endpoint", "mirror=http://127.0.0.1:1/v1")
    try:
        codes = [httpx.post(srv.url + "/arena/api/battles", json={}).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        # an endpoint that does not answer: the side's stream says so, the server goes on
        store = ArenaStore(str(tmp_path / "arena.sqlite"))
        battle = store.create("mirror", "default")
        r = httpx.post(srv.url + f"/arena/api/battles/{battle}/chat",
                       json={"side": "a", "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
        assert "error" in r.text
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        assert srv.stop() == 0

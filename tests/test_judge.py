"""The LLM judge end to end on the embedded model: two sampling settings answer three questions (one of two
turns, two with references), the judge grades each answer and compares them in both orders, the summary adds
up, and its verdicts on arena battles are scored against the human votes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kestrel.arena.judge import QUESTIONS, Model, agreement_rates, load_questions

MODELS = "default@temperature=0:max_tokens=40,default@temperature=1.3:seed=7:max_tokens=40"


@pytest.fixture(scope="module")
def server(embedded_server):
    return embedded_server


def _judge(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kestrel.cli", "judge", "--base-url", server.url + "/v1",
                           "--explanation-chars", "120", *args], capture_output=True, text=True, timeout=900)


def test_shipped_questions_cover_the_categories():
    questions = load_questions(QUESTIONS)
    assert len(questions) >= 20
    assert {"writing", "reasoning", "math", "coding", "extraction"} <= {q["category"] for q in questions}
    assert sum("reference" in q for q in questions) >= 10 and any(len(q["turns"]) == 2 for q in questions)
    assert Model.parse("default@temperature=0.5:top_p=0.9").settings == (("temperature", 0.5), ("top_p", 0.9))
    with pytest.raises(ValueError, match="settings are key=value"):
        Model.parse("default@temp=1")


def test_judge_grades_and_compares_two_sampling_settings(server, tmp_path):
    picked = [q for q in load_questions(QUESTIONS) if q["id"] in (2, 10, 16)]  # two turns; math; code output
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in picked))
    out = tmp_path / "judgments.jsonl"
    run = _judge(server, "--questions", str(questions), "--models", MODELS, "--mode", "both", "--output", str(out))
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in (tmp_path / "judgments.answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and all(len(a["answers"]) == len(next(q for q in picked if q["id"] == a["question_id"])
                                                             ["turns"]) for a in answers)
    judgments = [json.loads(line) for line in out.read_text().splitlines()]
    single = [j for j in judgments if j["mode"] == "single"]
    pairs = [j for j in judgments if j["mode"] == "pairwise"]
    assert len(single) == 6 and all(1 <= j["score"] <= 10 and "Rating: [[" in j["judgment"] for j in single)
    assert len(pairs) == 3 and all(j["verdict_ab"] in ("model_a", "model_b", "tie") for j in pairs)
    for j in pairs:  # a verdict that flips with the order is a tie
        assert j["winner"] == (j["verdict_ab"] if j["verdict_ab"] == j["verdict_ba"] else "tie")
    summary = json.loads((tmp_path / "judgments.summary.json").read_text())
    assert summary == json.loads(run.stdout)
    labels = MODELS.split(",")
    assert set(summary["single"]) == set(labels)
    assert all(1 <= summary["single"][m]["mean"] <= 10 for m in labels)
    rates = [summary["pairwise"][m]["all"]["win_rate"] for m in labels]
    assert sum(rates) == pytest.approx(1.0) and summary["pairwise"][labels[0]]["all"]["win"] == \
        summary["pairwise"][labels[1]]["all"]["loss"]

    # agreement with human votes on arena battles built from these answers
    by = {(a["model"], a["question_id"]): a["answers"] for a in answers}
    battles = []
    for k, q in enumerate(picked):
        convo = {m: [x for t, a in zip(q["turns"], by[(m, q["id"])]) for x in
                     ({"role": "user", "content": t}, {"role": "assistant", "content": a})] for m in labels}
        battles.append({"question_id": f"b{k}", "model_a": labels[0], "model_b": labels[1],
                        "winner": ["model_a", "model_b", "tie"][k], "conversation_a": convo[labels[0]],
                        "conversation_b": convo[labels[1]]})
    log = tmp_path / "battles.jsonl"
    log.write_text("".join(json.dumps(b) + "\n" for b in battles))
    run = _judge(server, "--battles", str(log), "--output", str(tmp_path / "agree.jsonl"))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    judged = [json.loads(line) for line in (tmp_path / "agree.jsonl").read_text().splitlines()]
    assert result["battles"] == 3 and len(judged) == 3
    assert result == agreement_rates(judged)  # the rates are those of the judgments written


def test_agreement_rates_by_hand_and_bad_flags(server, tmp_path):
    judged = [{"winner": "model_a", "human": "model_a"}, {"winner": "tie", "human": "tie (bothbad)"},
              {"winner": "model_b", "human": "model_a"}, {"winner": "tie", "human": "model_b"}]
    assert agreement_rates(judged) == {"battles": 4, "agreement": 0.5, "decided": 2, "agreement_without_ties": 0.5}
    run = _judge(server, "--models", "default", "--mode", "pairwise", "--output", str(tmp_path / "x.jsonl"))
    assert run.returncode == 2 and "two models" in run.stderr
    run = _judge(server, "--models", "default@warmth=3,default", "--output", str(tmp_path / "x.jsonl"))
    assert run.returncode == 2 and "settings are key=value" in run.stderr

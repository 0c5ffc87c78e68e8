"""An LLM as the judge, MT-bench style: answers to a question set from each model, graded 1-10 one answer at a
time, or compared in pairs in both orders (a verdict that flips with the order is a tie), summaries per model and
category, and the judge's agreement with human votes from the arena.

Models and the judge are names on an OpenAI-compatible server (`kestrel serve` by default), optionally with
sampling settings: `default@temperature=0.8:top_p=0.9`. The judge's replies are held to their verdict format by a
regex (`guided_regex`, which Kestrel and vLLM accept), so every judgment parses.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

QUESTIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "questions.jsonl")
SETTINGS = {"temperature": float, "top_p": float, "max_tokens": int, "seed": int}
SINGLE_VERDICT = r"Rating: \[\[(10|[1-9])\]\]"
PAIR_VERDICT = r"\[\[(A|B|C)\]\]"


@dataclass(frozen=True)
class Model:
    """A model on the server and the sampling settings it answers with; `label` names it in results."""

    label: str
    name: str
    settings: tuple

    @staticmethod
    def parse(spec: str) -> "Model":
        name, _, opts = spec.strip().partition("@")
        settings = {}
        for item in filter(None, opts.split(":")):
            key, sep, value = item.partition("=")
            if not sep or key not in SETTINGS:
                raise ValueError(f"model {spec!r}: settings are key=value among {list(SETTINGS)}, joined by "
                                 f"':', e.g. default@temperature=0.8:top_p=0.9")
            settings[key] = SETTINGS[key](value)
        if not name:
            raise ValueError(f"model {spec!r} has no name")
        return Model(spec.strip(), name, tuple(sorted(settings.items())))


def load_questions(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                if not isinstance(q.get("turns"), list) or not q["turns"] or "id" not in q:
                    raise ValueError("needs id and a non-empty list of turns")
            except ValueError as e:
                raise ValueError(f"{path} line {n}: {e} (a question is {{id, category, turns, reference?}})") \
                    from None
            q.setdefault("category", "general")
            out.append(q)
    if not out:
        raise ValueError(f"{path} holds no questions")
    return out


def _transcript(question: dict, answers: list[str], label: str = "Assistant") -> str:
    parts = []
    for k, (turn, answer) in enumerate(zip(question["turns"], answers), 1):
        parts.append(f"### User (turn {k}):\n{turn}\n\n### {label} (turn {k}):\n{answer}")
    return "\n\n".join(parts)


def _reference(question: dict) -> str:
    ref = question.get("reference")
    if not ref:
        return ""
    return "A reference answer for each turn, to check correctness against:\n" + "\n".join(
        f"Turn {k}: {r}" for k, r in enumerate(ref, 1)) + "\n\n"


def single_prompt(question: dict, answers: list[str]) -> str:
    return ("You are an impartial judge. Rate how well the assistant answered the user in the conversation below: "
            "helpfulness, correctness, relevance, depth and clarity; where a reference answer is given, a wrong "
            "answer scores low however well written. Explain briefly, then give the rating from 1 to 10 in "
            "exactly this form: Rating: [[5]]\n\n" + _reference(question) + _transcript(question, answers))


def pair_prompt(question: dict, first: list[str], second: list[str]) -> str:
    return ("You are an impartial judge. Two assistants, A and B, answered the same user; compare their answers: "
            "helpfulness, correctness, relevance, depth and clarity, with correctness against the reference "
            "answer where one is given. Do not let the order of the answers, their length or the assistants' "
            "names sway you. Explain briefly, then give your verdict in exactly this form: [[A]] if A is better, "
            "[[B]] if B is better, [[C]] for a tie.\n\n" + _reference(question)
            + _transcript(question, first, "Assistant A") + "\n\n" + _transcript(question, second, "Assistant B"))


class Judge:
    def __init__(self, base_url: str, api_key: Optional[str], judge: str, constrain: bool = True,
                 concurrency: int = 8, explanation_chars: int = 400):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=2)
        self.judge = Model.parse(judge)
        self.constrain = constrain
        self.concurrency = concurrency
        self.explanation_chars = explanation_chars

    def _ask(self, model: Model, messages: list[dict], regex: Optional[str] = None, max_tokens: int = 512) -> str:
        settings = dict(model.settings)
        settings.setdefault("max_tokens", max_tokens)
        settings.setdefault("temperature", 0.0)
        extra = {"guided_regex": regex} if regex and self.constrain else None
        r = self.client.chat.completions.create(model=model.name, messages=messages, extra_body=extra, **settings)
        return r.choices[0].message.content or ""

    def _map(self, fn, items: list, desc: str, progress: bool) -> list:
        with ThreadPoolExecutor(self.concurrency) as pool:
            it = pool.map(fn, items)
            if progress:
                from tqdm import tqdm
                it = tqdm(it, total=len(items), desc=desc, unit="call")
            return list(it)

    def answers(self, models: list[Model], questions: list[dict], progress: bool = True) -> dict:
        """{(model label, question id): [answer per turn]}, each turn answered with the conversation so far."""
        def converse(job):
            model, q = job
            messages, out = [], []
            for turn in q["turns"]:
                messages.append({"role": "user", "content": turn})
                out.append(self._ask(model, messages))
                messages.append({"role": "assistant", "content": out[-1]})
            return (model.label, q["id"]), out
        return dict(self._map(converse, [(m, q) for m in models for q in questions], "answers", progress))

    def _verdict(self, prompt: str, verdict: str) -> tuple[Optional[str], str]:
        """(the verdict, the judge's whole reply): a short explanation without brackets, then the verdict."""
        regex = r"[^\[\]]{0,%d}" % self.explanation_chars + verdict
        # a token spells one character or more: this many always reach the verdict
        text = self._ask(self.judge, [{"role": "user", "content": prompt}], regex,
                         max_tokens=self.explanation_chars + 24)
        found = re.findall(verdict, text)
        return (found[-1] if found else None), text

    def grade(self, models: list[Model], questions: list[dict], answers: dict, progress: bool = True) -> list[dict]:
        def one(job):
            model, q = job
            score, text = self._verdict(single_prompt(q, answers[(model.label, q["id"])]), SINGLE_VERDICT)
            return {"question_id": q["id"], "category": q["category"], "model": model.label,
                    "score": int(score) if score else None, "judgment": text, "judge": self.judge.label}
        return self._map(one, [(m, q) for m in models for q in questions], "grading", progress)

    def compare(self, models: list[Model], questions: list[dict], answers: dict, progress: bool = True) -> list[dict]:
        pairs = [(a, b) for k, a in enumerate(models) for b in models[k + 1:]]

        def one(job):
            (a, b), q = job
            x, y = answers[(a.label, q["id"])], answers[(b.label, q["id"])]
            return _pair_record(q, a.label, b.label, self._verdict(pair_prompt(q, x, y), PAIR_VERDICT),
                                self._verdict(pair_prompt(q, y, x), PAIR_VERDICT), self.judge.label)
        return self._map(one, [(p, q) for p in pairs for q in questions], "comparing", progress)

    def agreement(self, battles: list[dict], progress: bool = True) -> dict:
        """The judge's verdicts on arena battles (their conversations) against the human votes."""
        def one(b):
            q = {"turns": [m["content"] for m in b["conversation_a"] if m["role"] == "user"]}
            x = [m["content"] for m in b["conversation_a"] if m["role"] == "assistant"]
            y = [m["content"] for m in b["conversation_b"] if m["role"] == "assistant"]
            record = _pair_record(q, b["model_a"], b["model_b"], self._verdict(pair_prompt(q, x, y), PAIR_VERDICT),
                                  self._verdict(pair_prompt(q, y, x), PAIR_VERDICT), self.judge.label)
            return dict(record, question_id=b.get("question_id"), human=b["winner"])
        usable = [b for b in battles if b.get("conversation_a") and b.get("conversation_b")]
        judged = self._map(one, usable, "judging battles", progress)
        return dict(agreement_rates(judged), judgments=judged)


def _pair_record(q: dict, a: str, b: str, ab: tuple, ba: tuple, judge: str) -> dict:
    """Both orders: A/B as given, then swapped; a verdict that does not survive the swap is a tie."""
    first = {"A": "model_a", "B": "model_b", "C": "tie"}.get(ab[0])
    second = {"A": "model_b", "B": "model_a", "C": "tie"}.get(ba[0])  # swapped: A is model_b
    winner = first if first == second and first is not None else "tie"
    return {"question_id": q.get("id"), "category": q.get("category"), "model_a": a, "model_b": b,
            "verdict_ab": first, "verdict_ba": second, "winner": winner, "judgment_ab": ab[1],
            "judgment_ba": ba[1], "judge": judge}


def agreement_rates(judged: list[dict]) -> dict:
    """Share of battles where judge and human agree: over all (a tie is its own verdict, "tie (bothbad)" counts as
    a tie), and over those where neither called a tie (MT-bench reports both)."""
    def norm(w):
        return "tie" if w and w.startswith("tie") else w
    both = [(norm(j["winner"]), norm(j["human"])) for j in judged]
    decided = [(x, y) for x, y in both if x != "tie" and y != "tie"]
    return {"battles": len(both), "agreement": sum(x == y for x, y in both) / len(both) if both else None,
            "decided": len(decided),
            "agreement_without_ties": sum(x == y for x, y in decided) / len(decided) if decided else None}


def summarize(single: list[dict], pairwise: list[dict]) -> dict:
    """Mean score per model and per model and category; wins, losses and ties per model and category."""
    out: dict = {}
    if single:
        scores, by_cat = defaultdict(list), defaultdict(lambda: defaultdict(list))
        for j in single:
            if j["score"] is not None:
                scores[j["model"]].append(j["score"])
                by_cat[j["model"]][j["category"]].append(j["score"])
        out["single"] = {m: {"mean": sum(s) / len(s), "graded": len(s),
                             "by_category": {c: sum(v) / len(v) for c, v in sorted(by_cat[m].items())}}
                         for m, s in scores.items()}
    if pairwise:
        tally = defaultdict(lambda: defaultdict(lambda: {"win": 0, "loss": 0, "tie": 0}))
        for j in pairwise:
            for side, other in (("model_a", "model_b"), ("model_b", "model_a")):
                result = "tie" if j["winner"] == "tie" else ("win" if j["winner"] == side else "loss")
                for key in ("all", j["category"]):
                    tally[j[side]][key][result] += 1
        out["pairwise"] = {m: {c: dict(t, win_rate=(t["win"] + 0.5 * t["tie"]) / max(1, sum(t.values())))
                               for c, t in cats.items()} for m, cats in tally.items()}
    return out

"""Example LLM programs, used by the language tests and benchmarks/bench_lang.py."""
from __future__ import annotations

from pydantic import BaseModel

import kestrel as kl

FEW_SHOT = [
    ("The battery died after two days and support never answered.", "negative"),
    ("Setup took a minute and the picture is gorgeous.", "positive"),
    ("It works, I guess. Nothing special either way.", "neutral"),
    ("Absolutely love it, best purchase this year!", "positive"),
    ("The strap broke in a week; I want a refund.", "negative"),
    ("Arrived on time. Does what the box says.", "neutral"),
]
FEW_SHOT_PREFIX = ("You label product reviews as positive, negative or neutral, then explain briefly.\n\n"
                   + "".join(f"Review: {t}\nLabel: {label}\n\n" for t, label in FEW_SHOT))


class Facts(BaseModel):
    product: str
    rating: int


@kl.function
def review(s, text, temperature=0.0):
    s += kl.system("You are a careful reviewer.")
    s += kl.user("Review:\n" + text)
    s += kl.assistant(kl.gen("summary", max_tokens=48, stop="\n", temperature=temperature))
    s += kl.user("Is the tone positive or negative?")
    s += kl.assistant(kl.select("tone", choices=["positive", "negative"]))
    s += kl.user("Give the key facts as JSON.")
    s += kl.assistant(kl.gen("facts", max_tokens=64, json_schema=Facts, temperature=temperature))


@kl.function
def brainstorm(s, topic, temperature=0.8):
    s += kl.user(f"Three angles on {topic}, then pick the best.")
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += kl.assistant(kl.gen("idea", max_tokens=32, temperature=temperature, seed=i))
    s += kl.user("Ideas:\n" + "\n".join(f"Idea {i + 1}: {f['idea']}" for i, f in enumerate(forks)))
    s += kl.assistant(kl.gen("best", regex=r"Idea [1-3]", temperature=0.0))


@kl.function
def classify(s, text):
    """A few-shot classifier: plain text (no roles), the label picked with select."""
    s += FEW_SHOT_PREFIX + f"Review: {text}\nLabel: "
    s += kl.select("label", choices=["positive", "negative", "neutral"])


@kl.function
def chat(s, turns, max_tokens=32):
    """A multi-turn chat: each user turn gets a generated reply in the same conversation."""
    for i, question in enumerate(turns):
        s += kl.user(question)
        s += kl.assistant(kl.gen(f"answer_{i}", max_tokens=max_tokens, temperature=0.0))


@kl.function
def tree_of_thought(s, question, branches=2):
    """Fork candidate approaches, expand each, let select judge each one, keep the best."""
    s += kl.system("Think step by step.")
    s += kl.user(question)
    forks = s.fork(branches)
    for i, f in enumerate(forks):
        f += kl.assistant(f"Approach {i + 1}: ", kl.gen("plan", max_tokens=24, temperature=0.0, stop="\n"))
        f += kl.user("Is this approach sound?")
        f += kl.assistant(kl.select("verdict", choices=["yes", "no"]))
    best = max(range(branches), key=lambda i: forks[i].get_meta_info("verdict")["normalized_prompt_logprobs"][0])
    s += kl.assistant(f"Best approach: {best + 1}. ", kl.gen("answer", max_tokens=24, temperature=0.0))


@kl.function
def fork_heavy(s, text):
    """The benchmark's program: a long few-shot prefix, three forks, and a select."""
    s += FEW_SHOT_PREFIX + f"Review: {text}\n"
    forks = s.fork(3)
    for i, f in enumerate(forks):
        f += f"Reason {i + 1}:" + kl.gen("reason", max_tokens=12, temperature=0.0, stop="\n")
    s += "Label: "
    s += kl.select("label", choices=["positive", "negative", "neutral"])

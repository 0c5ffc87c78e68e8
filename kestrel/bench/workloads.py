"""Benchmark workloads as chat or text requests any OpenAI-compatible server accepts.

Lengths are in words (about 1.3 tokens each for English BPE vocabularies); the report uses the token
counts the server returns in `usage`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact river engine falcon kestrel window garden library music "
         "theory paper system question answer model network market history science ocean city bridge").split()


@dataclass
class BenchRequest:
    messages: list[dict]
    max_tokens: int
    conversation: Optional[int] = None  # multi-turn: which conversation, turns must run in order
    turn: int = 0
    followups: list[str] = field(default_factory=list)
    model: Optional[str] = None  # the model (e.g. a LoRA adapter) this request names, if not the run's default


def interarrival(rng: random.Random, rate: float, burstiness: float = 1.0) -> float:
    """Seconds to the next request at `rate` per second: gamma-distributed gaps of shape `burstiness` (vLLM's
    benchmark flag: 1 is Poisson; below 1 requests come in bursts with long quiet spells between, at the same
    mean rate; above 1 more evenly)."""
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if burstiness == 1.0:
        return rng.expovariate(rate)  # the same distribution; keeps the gaps earlier runs drew from a seed
    return rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, n)))


def random_workload(num: int, input_len: int, output_len: int, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest([{"role": "user", "content": _words(rng, int(input_len / 1.3))}], output_len)
            for _ in range(num)]


def shared_prefix_workload(num_groups: int, prompts_per_group: int, system_len: int, question_len: int,
                           output_len: int, seed: int = 0) -> list[BenchRequest]:
    rng = random.Random(seed)
    out = []
    for g in range(num_groups):
        system = f"Group {g}. " + _words(rng, int(system_len / 1.3))
        for _ in range(prompts_per_group):
            out.append(BenchRequest([{"role": "system", "content": system},
                                     {"role": "user", "content": _words(rng, int(question_len / 1.3))}], output_len))
    rng.shuffle(out)
    return out


def multi_turn_workload(num_conversations: int, turns: int, turn_len: int, output_len: int,
                        seed: int = 0) -> list[BenchRequest]:
    """Each conversation's first turn; later turns are sent after the previous reply arrives."""
    rng = random.Random(seed)
    return [BenchRequest([{"role": "user", "content": _words(rng, int(turn_len / 1.3))}], output_len, conversation=c,
                         followups=[_words(rng, int(turn_len / 1.3)) for _ in range(turns - 1)])
            for c in range(num_conversations)]


def assign_models(requests: list[BenchRequest], models: list[str], alpha: float, seed: int = 0) -> None:
    """Give each request one of `models`, drawn from a power law (S-LoRA's setup): the i-th model is picked
    with probability proportional to (i + 1) ** -alpha (alpha 0: uniform)."""
    rng = random.Random(seed + 1)
    weights = [(i + 1) ** -alpha for i in range(len(models))]
    for req, model in zip(requests, rng.choices(models, weights, k=len(requests))):
        req.model = model

"""Deterministic benchmark workloads as token-id lists (shared by Kestrel's and peers' scripts)."""
from __future__ import annotations

import random

WORDS = ("the of and to in is was for on that with as by at from his her an were which are this be "
         "river mountain engine cache token falcon kestrel window garden library music theory paper "
         "quickly slowly carefully system question answer model network market history science ocean "
         "city bridge winter summer morning evening light shadow number letter story").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _ids_of_length(tokenizer, rng: random.Random, n_tokens: int) -> list[int]:
    ids = tokenizer(_text(rng, n_tokens * 2)).input_ids
    return ids[:n_tokens]


def random_batch(tokenizer, num: int = 32, prompt_len: int = 200, seed: int = 0) -> list[list[int]]:
    """`num` prompts of about `prompt_len` tokens (lengths vary by +-10%)."""
    rng = random.Random(seed)
    return [_ids_of_length(tokenizer, rng, rng.randint(int(prompt_len * 0.9), int(prompt_len * 1.1)))
            for _ in range(num)]


def shared_prefix_batch(tokenizer, num: int = 32, system_len: int = 1000, question_len: int = 40,
                        seed: int = 0) -> list[list[int]]:
    """`num` chat prompts sharing one ~system_len-token system prompt, each with its own question."""
    rng = random.Random(seed)
    system = tokenizer.decode(_ids_of_length(tokenizer, rng, system_len))
    out = []
    for i in range(num):
        question = f"Question {i}: " + tokenizer.decode(_ids_of_length(tokenizer, rng, question_len - 4))
        ids = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                             {"role": "user", "content": question}],
                                            add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out

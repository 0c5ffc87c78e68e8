"""Incremental detokenization around multi-byte characters split across tokens."""
from __future__ import annotations

import pytest

from kestrel import SamplingParams
from kestrel.engine.output_processor import OutputProcessor
from kestrel.engine.request import Sequence

TEXT = '{"name": ")olicy 如", "city": "東京", "age": 5} — ok'


@pytest.fixture(scope="module")
def processor(tokenizer):
    return OutputProcessor(tokenizer, eos_token_ids=set(), context_length=4096)


def _seq(prompt_ids):
    return Sequence("r", 0, list(prompt_ids), SamplingParams(max_tokens=1000))


def test_text_matches_decode_whatever_the_split(processor, tokenizer):
    ids = tokenizer(TEXT).input_ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids), "the text must split characters across tokens"
    prompt = tokenizer("Answer:").input_ids
    seq = _seq(prompt)
    for t in ids:
        processor.append(seq, t, None)
    assert seq.text == TEXT


@pytest.mark.parametrize("at", range(1, 20))
def test_replacing_the_last_token_keeps_the_text(processor, tokenizer, at):
    """Jump-forward replaces the last sampled token; redoing it at any position (also inside a character)
    must not repeat or lose text."""
    ids = tokenizer(TEXT).input_ids
    seq = _seq(tokenizer("Answer:").input_ids)
    for t in ids[:at]:
        processor.append(seq, t, None)
    processor.replace_last(seq, [ids[at - 1]])
    for t in ids[at:]:
        processor.append(seq, t, None)
    assert seq.text == TEXT


def test_prompt_ending_inside_a_character(processor, tokenizer):
    ids = tokenizer(TEXT).input_ids
    cut = next(i for i, t in enumerate(ids) if tokenizer.decode(ids[:i + 1]).endswith("\ufffd")) + 1
    seq = _seq(ids[:cut])  # a token-id prompt that stops halfway through a character
    for t in ids[cut:]:
        processor.append(seq, t, None)
    assert not seq.text.startswith(tokenizer.decode(ids[: cut - 1]))  # the prompt is not repeated
    assert seq.text.endswith(tokenizer.decode(ids[cut:]).lstrip("\ufffd"))


@pytest.mark.parametrize("reply", ["riepig-11", " ok", "東京"])
def test_a_prompt_character_the_output_does_not_finish_stays_out_of_the_text(processor, tokenizer, reply):
    """A token-id prompt may end inside a character that the output never finishes (random ids, or a cut):
    those bytes are the prompt's, and the output's text is exactly what its own tokens spell (a regex-constrained
    reply of ASCII letters must not start with a replacement character)."""
    ids = tokenizer(TEXT).input_ids
    for cut in [i + 1 for i in range(len(ids)) if tokenizer.decode(ids[:i + 1]).endswith("\ufffd")]:
        seq = _seq(ids[:cut])
        for t in tokenizer(reply, add_special_tokens=False).input_ids:
            processor.append(seq, t, None)
        assert seq.text == reply, (cut, seq.text)
        # the same after jump-forward redoes the first token, and on an engine the request migrated to
        seq2 = _seq(ids[:cut])
        out = tokenizer(reply, add_special_tokens=False).input_ids
        processor.append(seq2, out[0], None)
        processor.replace_last(seq2, out[:1])
        for t in out[1:]:
            processor.append(seq2, t, None)
        assert seq2.text == reply, (cut, seq2.text)

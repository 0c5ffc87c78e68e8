"""Turns sampled tokens into text and decides when a sequence stops."""
from __future__ import annotations

import time
from typing import Optional

from tokenizers.decoders import DecodeStream

from kestrel.engine.request import Sequence, TokenLogprob

DETOK_CONTEXT = 6  # prompt tokens fed to the stream decoder so the first output token decodes in context


class TextStream:
    """A DecodeStream whose first piece loses `skip` = (text, n): that text and then up to n replacement
    characters, what a prompt's trailing tokens ending inside an unfinished character decode to (_decoder)."""

    __slots__ = ("stream", "skip")

    def __init__(self, stream: DecodeStream, skip: Optional[tuple[str, int]]):
        self.stream, self.skip = stream, skip

    def step(self, backend, token: int) -> Optional[str]:
        piece = self.stream.step(backend, token)
        if piece and self.skip is not None:
            head, n = self.skip
            self.skip = None
            if piece.startswith(head):
                piece = piece[len(head):]
                m = 0
                while m < n and m < len(piece) and piece[m] == "\ufffd":
                    m += 1
                piece = piece[m:]
        return piece


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: set[int], context_length: int):
        self.backend = tokenizer._tokenizer  # the Rust tokenizer, for fast incremental decoding
        self.eos_token_ids = eos_token_ids
        self.context_length = context_length

    def append(self, seq: Sequence, token: int, logprob: Optional[TokenLogprob]) -> None:
        """Add a sampled token: update text, logprobs, and finish_reason if the sequence is done."""
        p = seq.params
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.text_mark = len(seq.text)
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        if seq.detok is None:
            seq.detok = self._decoder(seq.prompt_ids, p.skip_special_tokens, output_from=len(seq.prompt_ids))
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            seq.stop_reason = token if token in p.stop_token_ids else None  # EOS: None, as vLLM reports it
            self.finish(seq, "stop", now)
            return
        piece = seq.detok.step(self.backend, token)
        if piece:
            old_len = len(seq.text)
            seq.text += piece
            if p.stop:
                longest = max(len(s) for s in p.stop)
                start = max(0, old_len - longest + 1)
                hits = [(i, s) for i, s in ((seq.text.find(s, start), s) for s in p.stop) if i >= 0]
                if hits:
                    at, seq.stop_reason = min(hits)
                    seq.text = seq.text[:at]
                    self.finish(seq, "stop", now)
                    return
        if len(seq.output_ids) >= p.max_tokens or seq.total_len >= self.context_length:
            self.finish(seq, "length", now)

    def replace_last(self, seq: Sequence, tokens: list[int]) -> None:
        """Swap the last output token for `tokens` that spell the same text and more (jump-forward's
        retokenized boundary); the last token has not been through a forward step yet."""
        seq.output_ids.pop()
        seq.text = seq.text[: seq.text_mark]
        seq.detok = self.resume_decoder(seq)
        for t in tokens:
            self.append(seq, t, None)
            if seq.finish_reason is not None:
                return

    def resume_decoder(self, seq: Sequence) -> "TextStream":
        """A decoder positioned after the sequence's output so far (after a replaced token, or on the engine a
        request migrated to). A prompt's unfinished character is still dropped if no text has come yet."""
        context = seq.prompt_ids[-DETOK_CONTEXT:]
        stream = self._decoder(context + seq.output_ids, seq.params.skip_special_tokens, output_from=len(context))
        if seq.text:
            stream.skip = None
        return stream

    def _decoder(self, ids: list[int], skip_special_tokens: bool, output_from: int) -> "TextStream":
        """A stream decoder positioned after `ids` (output tokens from `output_from` on), whose text has been
        emitted. Trailing tokens that end inside a multi-byte character have not produced text yet; they are fed
        again, so the character comes out whole once it completes. (A DecodeStream started on an incomplete
        character returns its whole context again with the next piece.) Such tokens of the prompt's own, when the
        output does not finish their character, are prompt text: their text is dropped from the first piece."""
        k = len(ids)
        decode = lambda a, b: self.backend.decode(ids[max(0, a):b], skip_special_tokens=skip_special_tokens)  # noqa: E731
        while k > 0 and len(ids) - k < 4 and decode(k - DETOK_CONTEXT, k).endswith("\ufffd"):
            k -= 1
        stream = DecodeStream(ids=ids[max(0, k - DETOK_CONTEXT):k], skip_special_tokens=skip_special_tokens)
        for t in ids[k:]:
            stream.step(self.backend, t)
        skip = None
        if k < output_from:  # the prompt's pending tokens alone: complete text, then replacement characters
            pending = decode(k - DETOK_CONTEXT, output_from)[len(decode(k - DETOK_CONTEXT, k)):]
            head = pending.rstrip("\ufffd")
            skip = (head, len(pending) - len(head))
        return TextStream(stream, skip)

    @staticmethod
    def finish(seq: Sequence, reason: str, now: float) -> None:
        seq.finish_reason = reason
        seq.finish_time = now

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """Text safe to stream: while running, hold back a tail that could still become a stop string."""
        if seq.finish_reason is not None or not seq.params.stop:
            return seq.text
        hold = max(len(s) for s in seq.params.stop) - 1
        return seq.text[: max(0, len(seq.text) - hold)]  # (a text shorter than the hold shows nothing yet)

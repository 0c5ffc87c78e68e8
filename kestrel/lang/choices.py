"""How `select` picks among its choices (SGLang's `choices_method`): each method turns the choices' token
log-probabilities (given the text so far) into a pick. Pass one as `select(..., choices_method=...)`."""
from __future__ import annotations

from typing import Optional


class ChoicesMethod:
    """Picks a choice from `logprobs[i]`, the log-probabilities of choice i's tokens given the text; methods that
    set `needs_unconditional` also get each choice's tokens scored with no text before them."""

    needs_unconditional = False

    def __call__(self, logprobs: list[list[float]],
                 unconditional: Optional[list[list[float]]] = None) -> tuple[int, list[float]]:
        """(index of the pick, a score per choice)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return type(self).__name__


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


class TokenLengthNormalized(ChoicesMethod):
    """The highest mean token log-probability (the default)."""

    def __call__(self, logprobs, unconditional=None):
        scores = [_mean(lp) for lp in logprobs]
        return max(range(len(scores)), key=scores.__getitem__), scores


class GreedyTokenSelection(ChoicesMethod):
    """Token by token from the first: keep the choices whose token is the likeliest at that position, until one
    is left. A choice that ran out of tokens continues at its mean, so a prefix of a longer choice competes."""

    def __call__(self, logprobs, unconditional=None):
        width = max(len(lp) for lp in logprobs)
        rows = [lp + [_mean(lp)] * (width - len(lp)) for lp in logprobs]
        alive = list(range(len(rows)))
        for j in range(width):
            best = max(rows[i][j] for i in alive)
            alive = [i for i in alive if rows[i][j] == best]
            if len(alive) == 1:
                break
        return alive[0], [_mean(lp) for lp in logprobs]


class UnconditionalLikelihoodNormalized(ChoicesMethod):
    """The highest mean of log p(token | text) - log p(token | the choice's own earlier tokens): how much the
    text raises each choice over its prior likelihood, so common short words do not win by default."""

    needs_unconditional = True

    def __call__(self, logprobs, unconditional=None):
        if unconditional is None:
            raise ValueError("unconditional_likelihood_normalized needs the choices' unconditional logprobs")
        scores = [_mean([c - u for c, u in zip(cond, uncond)]) for cond, uncond in zip(logprobs, unconditional)]
        return max(range(len(scores)), key=scores.__getitem__), scores


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()

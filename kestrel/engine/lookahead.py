"""Lookahead decoding (Fu et al., 2024): exact parallel decoding without a draft model.

Each step of a sequence that decodes with lookahead runs one multi-token row: its pending token, a Jacobi
window of future guesses (W columns over N-1 levels) and a token tree of candidate n-grams from the
sequence's n-gram pool that start with the pending token. The window's outputs feed the pool; the tree is
verified against the model's own choices (the sampler's, so penalties, constraints and sampling all apply)
and the longest matching path is accepted. Accepted tokens keep the K/V the tree computed for them.

Layout of a row (index 0 is the pending token, at the sequence's next position p):
- window level 0: W-1 guesses for positions p+1..p+W-1 (the pending token is its column 0);
- window level l (1..N-2): W guesses, column j at position p+j+l. The token sees the pending token, level 0's
  columns up to j and its own column's levels 1..l (one Jacobi trajectory);
- the candidate trie: each node sees the pending token and its ancestors (candidates sharing a prefix share
  its nodes).
The mask is `Draft.mask` over the row's own tokens; every token also sees the sequence's cached context.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

WINDOW_PLAN, LOOKUP_PLAN, SINGLE_PLAN = "window", "lookup", "single"
PLANS = (SINGLE_PLAN, LOOKUP_PLAN, WINDOW_PLAN)  # cheapest first
# chance a draft token is accepted, assumed before any evidence: low, so that where tokens cost something (a CPU)
# a request drafts only once its shadows (what it would have drafted, checked against what came) show its text
# is predictable; where they are nearly free (a GPU at small batches) it pays from the first step
PRIOR_ACCEPT = 0.25
EMA = 0.15  # weight of one verified (or shadow-checked) draft token in a plan's acceptance estimate
MIN_GAIN = 1.03  # a plan must promise at least 3% more tokens per second than the one it displaces


@dataclass(frozen=True)
class LookaheadSizes:
    """W (window columns), N (n-gram length: window levels + 1, candidate length + 1), G (candidates per step
    and pool entries per key)."""

    window: int
    ngram: int
    pool: int

    def __post_init__(self) -> None:
        if self.window < 0 or self.ngram < 2 or self.pool < 1:
            raise ValueError(f"lookahead sizes need window >= 0, ngram >= 2, pool >= 1; got window={self.window}, "
                             f"ngram={self.ngram}, pool={self.pool}")

    @property
    def window_tokens(self) -> int:
        """Row tokens the full window adds (level 0 has W-1, the others W)."""
        return 0 if self.window < 1 or self.ngram < 3 else self.window - 1 + self.window * (self.ngram - 2)


def default_sizes(device: torch.device) -> LookaheadSizes:
    """GPUs have idle FLOPs at small batches: the paper's sizes for 7B models. A CPU is compute-bound after a few
    tokens (one SmolLM2-135M row: 4 tokens cost 1.8x one on Zen 4, 8 tokens 3x), so a narrow window; the planner
    still decides per step whether any of it pays."""
    if device.type == "cuda":
        return LookaheadSizes(window=15, ngram=5, pool=15)
    return LookaheadSizes(window=4, ngram=5, pool=4)


class NgramPool:
    """n-grams seen so far, keyed by their first token: at most `limit` continuations per key, the least
    recently seen dropped first (the reference implementation's LRU policy)."""

    def __init__(self, n: int, limit: int):
        self.n = n
        self.limit = limit
        self.map: dict[int, list[tuple[int, ...]]] = {}

    def add(self, key: int, rest: tuple[int, ...]) -> None:
        entries = self.map.setdefault(key, [])
        if rest in entries:
            entries.remove(rest)
        elif len(entries) >= self.limit:
            entries.pop(0)
        entries.append(rest)

    def add_from(self, tokens: list[int], start: int) -> None:
        """Every n-gram of `tokens` that begins at or after `start`."""
        n = self.n
        for i in range(max(0, start), len(tokens) - n + 1):
            self.add(tokens[i], tuple(tokens[i + 1:i + n]))

    def candidates(self, key: int) -> list[tuple[int, ...]]:
        """Continuations of `key`, most recently seen first."""
        return self.map.get(key, [])[::-1]


@dataclass
class Draft:
    """One step's row after the pending token: `tokens[i]` at position p + `depth[i]`; `mask` [T, T] over the
    whole row (pending token first). Trie nodes follow the window; `children[i]` maps a token to the trie node
    that continues node i with it (i = 0: the pending token)."""

    tokens: list[int]
    depth: list[int]
    mask: torch.Tensor
    children: dict[int, dict[int, int]]
    plan: str
    window_levels: int = 0  # levels of the window in the row (0: no window)
    window_width: int = 0
    proposed: int = 0  # trie tokens (candidate tokens verified)

    @property
    def num_tokens(self) -> int:
        """Row length, the pending token included."""
        return len(self.tokens) + 1


@dataclass
class Proposal:
    """What a plan could put in a sequence's row: window tokens (token, depth, row tokens seen) and the
    candidate trie (token, depth, parent trie node or -1 for the pending token); the planner picks how deep
    the trie goes."""

    plan: str
    window: list[tuple[int, int, list[int]]]
    window_levels: int
    window_width: int
    trie: list[tuple[int, int, int]]
    widths: list[int]  # trie nodes at depth 1, 2, ...

    def draft(self, depth: int) -> Draft:
        tokens = [t for t, _, _ in self.window]
        depths = [d for _, d, _ in self.window]
        seen = [s for _, _, s in self.window]
        children: dict[int, dict[int, int]] = {0: {}}
        index_of: dict[int, int] = {}  # trie node -> row index
        for node, (tok, d, parent) in enumerate(self.trie):
            if d > depth:
                continue
            index = len(tokens) + 1
            index_of[node] = index
            up = 0 if parent < 0 else index_of[parent]
            children[up][tok] = index
            children[index] = {}
            tokens.append(tok)
            depths.append(d)
            seen.append((seen[up - 1] if up else [0]) + [index])
        t = len(tokens) + 1
        rows, cols = [0], [0]
        for i, visible in enumerate(seen, start=1):
            rows.extend([i] * len(visible))
            cols.extend(visible)
        mask = torch.zeros(t, t, dtype=torch.bool)
        mask[rows, cols] = True
        return Draft(tokens, depths, mask, children, self.plan, self.window_levels, self.window_width,
                     len(tokens) - len(self.window))


@dataclass
class LookaheadState:
    """One sequence's lookahead state: its n-gram pool, its Jacobi window, and how often each plan's draft
    tokens have been accepted."""

    sizes: LookaheadSizes
    pool: NgramPool
    levels: list[list[int]] = field(default_factory=list)  # window levels (level 0 without the pending token)
    learned: int = 0  # all_ids up to here have given their n-grams to the pool
    accept: dict[str, float] = field(default_factory=lambda: {SINGLE_PLAN: PRIOR_ACCEPT, LOOKUP_PLAN: PRIOR_ACCEPT})
    draft: Optional[Draft] = None  # this step's draft, between scheduling and commit
    # a step that drafted nothing leaves what it would have drafted (index of its pending token in prompt +
    # output, the candidates then); the tokens that follow tell whether they would have been accepted, so the
    # estimates keep tracking the text while lookahead is off (no drafts is no evidence otherwise)
    shadow: Optional[tuple[int, list[tuple[int, ...]]]] = None

    @classmethod
    def for_prompt(cls, sizes: LookaheadSizes, prompt: list[int]) -> "LookaheadState":
        state = cls(sizes, NgramPool(sizes.ngram, sizes.pool))
        state.learn(prompt, [])
        if sizes.window_tokens:
            # the window starts as guesses copied from the prompt (as the reference does), seeded by the prompt
            # so a request reproduces itself; level 0 is longer by N-2, trimmed while the levels fill
            rng = random.Random(len(prompt) * 1000003 + prompt[-1])
            state.levels = [[rng.choice(prompt) for _ in range(sizes.window - 1 + sizes.ngram - 2)]]
        return state

    def learn(self, prompt: list[int], output: list[int]) -> None:
        """Add the n-grams that tokens generated since the last call complete (the request's own output repeats
        itself), reading only the tail of prompt + output."""
        start = max(0, self.learned - self.sizes.ngram + 1)
        tail = (prompt[start:] + output) if start < len(prompt) else output[start - len(prompt):]
        self.pool.add_from(tail, 0)
        self.learned = len(prompt) + len(output)

    def record(self, plan: str, accepted: int, rejected: bool) -> None:
        """Under `plan`, `accepted` draft tokens matched and then one was rejected (`rejected`) or the draft ran
        out. Each verified token moves the plan's acceptance estimate. The window plan verifies the same
        candidates as the lookup plan and shares its estimate."""
        plan = LOOKUP_PLAN if plan == WINDOW_PLAN else plan
        a = self.accept[plan]
        for hit in [1.0] * accepted + [0.0] * rejected:
            a += EMA * (hit - a)
        self.accept[plan] = a

    def leave_shadow(self, prompt: list[int], output: list[int]) -> None:
        """This step drafts nothing: remember what would have been drafted (unless an earlier shadow waits)."""
        if self.shadow is None:
            current = output[-1] if output else prompt[-1]
            cands = self.pool.candidates(current)[:self.sizes.pool]
            if cands:
                self.shadow = (len(prompt) + len(output) - 1, cands)

    def check_shadow(self, prompt: list[int], output: list[int]) -> None:
        """Score the shadow against the tokens that followed it, once they tell (a candidate token differs, or a
        whole candidate matched)."""
        if self.shadow is None:
            return
        at, cands = self.shadow
        start = at + 1 - len(prompt)
        actual = output[start:] if start >= 0 else prompt[at + 1:] + output
        if not actual:
            return

        def matched(cand):
            return next((i for i, (c, t) in enumerate(zip(cand, actual)) if c != t), min(len(cand), len(actual)))
        outcomes = []
        for plan, group in ((SINGLE_PLAN, cands[:1]), (LOOKUP_PLAN, cands)):
            m, full = max(matched(c) for c in group), max(len(c) for c in group)
            if m == len(actual) < full:
                return  # a candidate still matches everything generated since: wait for more
            outcomes.append((plan, m, m < full))
        for plan, m, rejected in outcomes:
            self.record(plan, m, rejected)
        self.shadow = None

    def propose(self, plan: str, current: int, pos_room: int, out_room: int) -> Optional[Proposal]:
        """What `plan` could draft after pending token `current`, or None if nothing. `pos_room`: how far past
        the pending token positions may go (the context's end); `out_room`: output tokens the sequence may still
        add after the next one (max_tokens)."""
        window: list[tuple[int, int, list[int]]] = []
        levels = self.levels if plan == WINDOW_PLAN else []
        width = 0
        if levels:
            # all levels have the same number of columns (W once filled, more while filling)
            width = min([len(levels[0]) + 1] + [len(lv) for lv in levels[1:]])
            if width + len(levels) - 2 > pos_room or out_room < self.sizes.ngram - 1:
                levels, width = [], 0
        if levels:
            level0 = [1 + j for j in range(width - 1)]  # row index of level 0's column j+1
            for j in range(width - 1):
                window.append((levels[0][j], j + 1, [0] + level0[:j + 1]))
            below = {j: [0] + level0[:j] for j in range(width)}  # what column j of the level below sees
            for lv in range(1, len(levels)):
                for j in range(width):
                    seen = below[j] + [len(window) + 1]
                    window.append((levels[lv][j], j + lv, seen))
                    below[j] = seen
        trie: list[tuple[int, int, int]] = []
        widths: list[int] = []
        nodes: dict[tuple[int, int], int] = {}  # (parent, token) -> trie node
        limit = 1 if plan == SINGLE_PLAN else self.sizes.pool
        max_depth = min(self.sizes.ngram - 1, pos_room, out_room)
        for cand in self.pool.candidates(current)[:limit]:
            parent = -1
            for d, tok in enumerate(cand[:max_depth], start=1):
                node = nodes.get((parent, tok))
                if node is None:
                    node = nodes[(parent, tok)] = len(trie)
                    trie.append((tok, d, parent))
                    if len(widths) < d:
                        widths.append(0)
                    widths[d - 1] += 1
                parent = node
        if not window and not trie:
            return None
        return Proposal(plan, window, len(levels), width, trie, widths)

    def after_step(self, draft: Draft, window_out: list[int], current: int) -> None:
        """Move the window on one position from the outputs of its last level (argmax of each column), and
        give the pool the n-grams its columns completed (as the reference does, one position a step)."""
        if not draft.window_levels:
            return
        n, levels = self.sizes.ngram, self.levels
        if len(levels) == n - 1:  # full: every column completes an n-gram; each level moves up one
            for j in range(draft.window_width):
                key = current if j == 0 else levels[0][j - 1]
                self.pool.add(key, tuple(levels[lv][j] for lv in range(1, n - 1)) + (window_out[j],))
            self.levels = [levels[1][1:]] + levels[2:] + [window_out]
        else:  # filling: every level moves one position on (losing a column) and the new level joins
            self.levels = [lv[1:] for lv in levels] + [window_out[1:]]

    def window_outputs(self, draft: Draft, argmax: list[int]) -> list[int]:
        """The argmax of the window's last level, column by column (row argmax given pending token first)."""
        w = draft.window_width
        if draft.window_levels == 1:
            return argmax[:w]  # the pending token and level 0
        start = 1 + (w - 1) + w * (draft.window_levels - 2)
        return argmax[start:start + w]


class StepCost:
    """Forward time by tokens in the step: measured by a calibration run at start, then refined by every step.
    Between sizes it interpolates linearly, beyond the largest it grows in proportion. It need not grow with
    tokens: float32 matmuls of 2-4 rows cost more than of 5-8 on Zen 4."""

    def __init__(self) -> None:
        self.seconds: dict[int, float] = {}
        self.frozen = False
        self.per_draft = 0.0  # host time a drafted sequence adds to a step (planning it, verifying it): EMA

    def observe_draft(self, seconds: float) -> None:
        if not self.frozen:
            self.per_draft += 0.1 * (seconds - self.per_draft)

    @classmethod
    def flat(cls) -> "StepCost":
        """Every step size costs the same, whatever is observed: drafts are always as deep as they go."""
        cost = cls()
        cost.seconds = {1: 1.0, 1 << 20: 1.0}
        cost.frozen = True
        return cost

    def observe(self, tokens: int, seconds: float, weight: float = 0.05) -> None:
        """A step of `tokens` took `seconds`. weight 1: a calibration point. Else the measured sizes around
        `tokens` move towards what the step says (each by its share of the interpolation), so real steps (many
        rows, longer contexts than the calibration's one row) correct every region of the curve they touch,
        drafted steps included."""
        if self.frozen:
            return
        if weight >= 1.0 or not self.seconds:
            self.seconds[tokens] = seconds
            return
        ratio = seconds / self(tokens)
        known = self.seconds.keys()
        lo = max((k for k in known if k <= tokens), default=None)
        hi = min((k for k in known if k >= tokens), default=None)
        if lo is None or hi is None or lo == hi:
            shares = [(lo if hi is None else hi, 1.0)]
        else:
            f = (tokens - lo) / (hi - lo)
            shares = [(lo, 1 - f), (hi, f)]
        for k, share in shares:
            self.seconds[k] *= 1 + weight * share * (ratio - 1)

    def __call__(self, tokens: int) -> float:
        known = self.seconds.keys()
        if not known:
            return float(tokens)  # no measurement: every token costs the same (lookahead never pays)
        lo = max((k for k in known if k <= tokens), default=None)
        hi = min((k for k in known if k > tokens), default=None)
        if lo is None:
            return self.seconds[hi]
        if hi is None:
            return self.seconds[lo] * tokens / lo
        f = (tokens - lo) / (hi - lo)
        return self.seconds[lo] * (1 - f) + self.seconds[hi] * f


def could_pay(options: list[LookaheadState], base_tokens: int, num_decode: int, cost: "StepCost") -> bool:
    """Whether any draft could pay this step, before building one: k draft tokens win at most k times the best
    acceptance estimate, so if no k does better than plain decoding by MIN_GAIN at its measured cost, none
    will (a compute-bound step skips lookahead's per-sequence work)."""
    best = max(max(s.accept.values()) for s in options)
    plain = num_decode / cost(base_tokens) * MIN_GAIN
    most = sum(s.sizes.window_tokens + s.sizes.pool * (s.sizes.ngram - 1) for s in options)
    k = 1
    while k <= most:
        if (num_decode + k * best) / (cost(base_tokens + k) + cost.per_draft) > plain:
            return True
        k = k + 1 if k < 8 else k * 2
    return False


def choose_plan(options: list[tuple[LookaheadState, dict[str, Proposal]]], base_tokens: int, num_decode: int,
                cost: "StepCost") -> tuple[Optional[str], list[int]]:
    """Which plan the step's lookahead sequences use and how deep each one's candidates go: (None, []) for
    plain decoding.

    A step of `base_tokens` tokens yields `num_decode` output tokens. Under a plan with acceptance estimate a,
    a sequence's trie level d (w tokens) adds a^d expected tokens (all d levels must match). Levels are bought
    best value per token first, and the prefix that maximizes expected output tokens per second of step time
    (`cost`: the forward's, measured, plus the host time each drafted sequence adds) is kept if it beats plain decoding by MIN_GAIN and the cheaper plans. On a compute-bound step (a big
    batch, a prefill chunk) every token costs nearly its full price, no level pays and lookahead is off; where
    a step is bound by reading weights extra tokens are nearly free and deep drafts pay. The window adds a
    fixed block of tokens per sequence for n-grams it finds later: it is taken when its rate is within
    MIN_GAIN of the best: it verifies the lookup plan's candidates with the same estimate, so that happens
    only when its tokens are nearly free (as the paper's GPUs have them), never on a CPU's compute-bound step."""
    best_plan, best_depths = None, []
    best_rate = num_decode / cost(base_tokens)
    for plan in PLANS:
        fixed = 0
        steps = []  # (value per token, seq, depth, tokens, expected tokens)
        for i, (state, proposals) in enumerate(options):
            prop = proposals.get(plan)
            if prop is None:
                continue
            fixed += len(prop.window)
            a, envelope = state.accept[LOOKUP_PLAN if plan == WINDOW_PLAN else plan], float("inf")
            for d, w in enumerate(prop.widths, start=1):
                envelope = min(envelope, a ** d / w)  # non-increasing: a sequence's levels come in order
                steps.append((envelope, -d, i, w, a ** d))
        if plan == WINDOW_PLAN and not fixed:
            continue
        steps.sort(reverse=True)
        depths = [0] * len(options)
        tokens, gain = base_tokens + fixed, 0.0
        host = cost.per_draft * sum(1 for _, p in options if p.get(plan) is not None and p[plan].window)
        plan_rate, plan_depths = num_decode / (cost(tokens) + host), list(depths)
        for _, neg_d, i, w, expected in steps:
            tokens += w
            gain += expected
            if not depths[i] and not options[i][1][plan].window:
                host += cost.per_draft  # this sequence is drafted from here on
            depths[i] = -neg_d
            rate = (num_decode + gain) / (cost(tokens) + host)
            if rate > plan_rate:
                plan_rate, plan_depths = rate, list(depths)
        if not fixed and not any(plan_depths):
            continue
        if plan == WINDOW_PLAN:
            better = plan_rate * MIN_GAIN >= best_rate  # the window's n-grams are worth a little
        else:
            better = plan_rate > best_rate * (MIN_GAIN if best_plan is None else 1.0)
        if better:
            best_plan, best_depths, best_rate = plan, plan_depths, max(plan_rate, best_rate)
    return best_plan, best_depths


def calibrate(measure, sizes: list[int]) -> StepCost:
    """A StepCost from `measure(tokens) -> seconds` at these step sizes: the fastest of three after a warm-up
    (the first call of a shape builds its kernels; noise only ever adds time)."""
    cost = StepCost()
    for t in sizes:
        measure(t)
        cost.observe(t, min(measure(t) for _ in range(3)), weight=1.0)
    return cost


def calibration_sizes(max_tokens: int) -> list[int]:
    out = [1, 2, 3, 4, 5, 6, 8]
    t = 12
    while t < max_tokens:
        out.append(t)
        t = int(math.ceil(t * 1.5))
    out.append(max_tokens)
    return sorted(set(out))

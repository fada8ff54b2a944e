"""How many tokens the draft proposes per round (the lookahead gamma).

* constant: always ``k``;
* adaptive: Hugging Face's "heuristic" schedule, ``gamma <- gamma + 2`` after a round whose
  drafts were all accepted, ``gamma <- max(1, gamma - 1)`` otherwise, capped at a maximum;
* confidence: up to the maximum, but drafting stops after a token whose draft probability is
  below a threshold (HF ``assistant_confidence_threshold``, llama.cpp ``--draft-p-min``).

One schedule object per sequence, so concurrent requests do not steer each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.generation.config import GenerationConfig


@dataclass
class Lookahead:
    gamma: int
    kind: str = "constant"
    maximum: int = 16
    min_confidence: float = 0.0  # confidence schedule only

    @classmethod
    def from_config(cls, cfg: GenerationConfig, has_draft: bool) -> Lookahead:
        k = cfg.num_speculative_tokens if has_draft else 0
        if k == 0:
            return cls(0)
        if cfg.schedule == "confidence":
            return cls(
                cfg.max_speculative_tokens,
                "confidence",
                cfg.max_speculative_tokens,
                cfg.confidence_threshold,
            )
        return cls(min(k, cfg.max_speculative_tokens), cfg.schedule, cfg.max_speculative_tokens)

    def update(self, drafted: int, accepted: int) -> None:
        if self.kind != "adaptive" or drafted == 0:
            return
        if accepted == drafted:
            self.gamma = min(self.maximum, self.gamma + 2)
        else:
            self.gamma = max(1, self.gamma - 1)


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens one round emits with ``gamma`` drafts at per-token acceptance ``alpha``:
    ``(1 - alpha^(gamma+1)) / (1 - alpha)`` (Leviathan et al. 2023)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


class SpeculationPolicy:
    """The batch-wide cap on draft tokens per round, chosen every round for throughput.

    With ``B`` sequences in the batch, ``g`` drafts each and acceptance ``alpha``, a round
    emits ``B * expected_tokens(alpha, g)`` tokens and takes ``g * t_draft(B) +
    t_target(B, g + 1) + overhead(B)`` seconds (``t_target(B, w)``: one target forward of
    ``B`` rows of ``w`` new tokens; ``overhead``: the rest of a round, verification, sampling
    and handing the tokens to the requests, which fewer, longer rounds pay less often).
    The cap is the ``g`` in ``0 .. maximum`` with the most tokens per
    second; the times are measured, not assumed (on a CPU scoring ``g + 1`` positions costs
    clearly more than scoring one, ``../shared/reference/speculative.md``), so the cap falls
    as the batch grows and the target turns compute-bound, down to no speculation at all.

    Times: :meth:`calibrate` measures a grid of batch sizes (powers of two) and widths at
    load, and every real forward updates its cell (exponential average, weight ``decay``);
    a batch size between two measured ones is interpolated. ``alpha`` is the maximum-
    likelihood per-token acceptance of recent rounds (accepted / (accepted + rejections)),
    from a prior of ``prior_alpha`` worth ``prior_weight`` draft tokens. When the cap has
    been 0 for ``explore_every`` rounds, one round drafts in full so ``alpha`` stays current.
    """

    def __init__(
        self,
        maximum: int,
        prior_alpha: float = 0.6,
        prior_weight: float = 20.0,
        decay: float = 0.1,
        explore_every: int = 64,
    ) -> None:
        self.maximum = maximum
        self.decay = decay
        self.explore_every = explore_every
        self.successes = prior_alpha * prior_weight
        self.trials = prior_weight
        self.prior_weight = prior_weight
        self.target_s: dict[tuple[int, int], float] = {}
        self.draft_s: dict[int, float] = {}
        self.overhead_s: dict[int, float] = {}
        self.zero_rounds = 0
        self.last: dict[str, float] = {}  # the last decision's inputs (metrics, logs)

    @property
    def alpha(self) -> float:
        return self.successes / self.trials

    def observe_acceptance(self, drafted: int, accepted: int) -> None:
        trials = accepted + (1 if accepted < drafted else 0)
        # a window of about 200 draft tokens: old evidence fades
        keep = 1.0 - trials / 200.0
        self.successes = self.successes * keep + accepted
        self.trials = max(self.trials * keep + trials, 1e-9)

    def observe_target(self, batch: int, width: int, seconds: float) -> None:
        self._update(self.target_s, (batch, width), seconds)

    def observe_draft(self, batch: int, seconds: float) -> None:
        self._update(self.draft_s, batch, seconds)

    def observe_overhead(self, batch: int, seconds: float) -> None:
        self._update(self.overhead_s, batch, max(0.0, seconds))

    def _update(self, table: dict, key: object, seconds: float) -> None:  # type: ignore[type-arg]
        old = table.get(key)
        table[key] = seconds if old is None else old + self.decay * (seconds - old)

    def t_target(self, batch: int, width: int) -> float | None:
        """Seconds of one target forward of ``batch`` rows x ``width`` tokens: measured, or
        interpolated across the widths measured at each batch size, then across the batch
        sizes. In that order: the load-time grid measures every batch size at the same widths,
        and a width measured later at one batch size only (a live round) must not stand in
        for that width at every other batch size."""
        if (batch, width) in self.target_s:
            return self.target_s[(batch, width)]
        at = {b: self._across_widths(b, width) for b in sorted({b for b, _ in self.target_s})}
        known = [b for b, t in at.items() if t is not None]
        return _interpolate(known, lambda b: at[b] or 0.0, batch)

    def _across_widths(self, batch: int, width: int) -> float | None:
        """``batch`` rows x ``width`` tokens from the widths measured at ``batch`` (None
        outside them: no guess)."""
        widths = sorted(w for b, w in self.target_s if b == batch)
        below = [w for w in widths if w <= width]
        above = [w for w in widths if w >= width]
        if not below or not above:
            return None
        lo, hi = below[-1], above[0]
        t_lo, t_hi = self.target_s[(batch, lo)], self.target_s[(batch, hi)]
        return t_lo if hi == lo else t_lo + (t_hi - t_lo) * (width - lo) / (hi - lo)

    def t_draft(self, batch: int) -> float | None:
        if batch in self.draft_s:
            return self.draft_s[batch]
        return _interpolate(sorted(self.draft_s), self.draft_s.__getitem__, batch)

    def cap(self, batch: int) -> int:
        """The number of draft tokens per sequence that maximises tokens per second."""
        alpha = self.alpha
        best, best_rate = 0, 0.0
        for g in range(self.maximum + 1):
            t = self.t_target(batch, g + 1)
            d = self.t_draft(batch) if g else 0.0
            if t is None or d is None:
                if g == 0:
                    return self.maximum  # nothing measured yet: leave each schedule alone
                continue
            rest = self.overhead_s.get(batch)
            if rest is None:
                rest = _interpolate(sorted(self.overhead_s), self.overhead_s.__getitem__, batch)
            rate = batch * expected_tokens(alpha, g) / (g * d + t + (rest or 0.0))
            if rate > best_rate:
                best, best_rate = g, rate
        self.zero_rounds = self.zero_rounds + 1 if best == 0 else 0
        if best == 0 and self.zero_rounds >= self.explore_every:
            self.zero_rounds = 0
            best = self.maximum
        self.last = {"batch": batch, "alpha": alpha, "cap": best, "tokens_per_s": best_rate}
        return best


def _interpolate(sizes: list[int], value: Callable[[int], float], x: int) -> float | None:
    """Linear interpolation of ``value`` over the measured ``sizes`` at ``x`` (clamped)."""
    if not sizes:
        return None
    if x <= sizes[0]:
        return value(sizes[0])
    if x >= sizes[-1]:
        # beyond the largest measured batch: grow in proportion to the rows
        return value(sizes[-1]) * x / sizes[-1]
    hi = next(i for i, s in enumerate(sizes) if s >= x)
    a, b = sizes[hi - 1], sizes[hi]
    return value(a) + (value(b) - value(a)) * (x - a) / (b - a)

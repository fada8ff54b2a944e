"""Sequential attack detection over a stream of answers, with anytime-valid false-alarm control.

A provider that tampers with a share of its answers (or with one client's answers only) cannot
be caught on one answer, but over a stream it can, with a false-alarm rate that holds however
long the monitor watches. The pieces, each from the literature:

1. **Calibration-conditional conformal p-values.** Each answer's per-answer score (the
   detector's, or KL(service || verifier)) is ranked against ``n`` clean calibration scores:
   ``K`` = how many calibration scores are at least as large. The plain conformal p-value
   ``(K + 1) / (n + 1)`` is uniform only on average over calibration draws; for one fixed
   calibration it can be anti-conservative in the tail, and a product of e-values over
   thousands of answers would drift up. So the p-value is ``b[K]``, where ``b[k - 1]`` bounds
   the tail mass above the ``k``-th largest calibration score for every ``k`` at once with
   probability ``1 - delta`` over the calibration draw (that mass is Beta(k, n + 1 - k); a
   union bound over ``k``). On that event the p-values are super-uniform, conditionally on
   the calibration (Bates, Candes, Lei, Romano and Sesia, "Testing for outliers with
   conformal p-values", Ann. Statist. 2023, section 3).
2. **E-values.** ``e = 1 - eps + eps * f(p)`` with a p-to-e calibrator ``f`` (Vovk and
   Wang, "E-values: calibration, combination and applications", Ann. Statist. 2021): any
   decreasing ``f`` with integral 1 over [0, 1] has expectation at most 1 for a super-uniform
   ``p``. Two kinds are mixed: the power calibrator ``kappa * p ** (kappa - 1)``, and the
   threshold calibrator ``1{p <= c} / c`` ("the answer is as suspicious as the most
   suspicious calibration scores"), which bets everything on the tail where a confident
   detector puts tampered answers; ``c`` is the smallest p-value the calibration can give
   (and 4x it). ``eps`` is the share of answers the alternative supposes tampered.
3. **An e-detector.** Per component (score, tail, ``eps``) the Shiryaev-Roberts statistic
   ``R_t = (1 + R_{t-1}) * e_t`` (Shin, Ramdas and Rinaldo, "E-detectors: a nonparametric
   framework for sequential change detection", 2022); the monitor's statistic is their
   average over components (a mixture over tamper rates and tails, so no rate has to be
   guessed). Under clean answers ``M_t - t`` is a supermartingale, so alarming at
   ``M_t >= 1 / alpha`` gives an average run length to a false alarm of at least
   ``1 / alpha`` answers (on the calibration events: probability ``1 - delta`` for each
   watched tail of each score, so ``1 - 3 delta`` for the alarm's three). Unlike a
   test from the start of the stream, it detects tampering that begins late.

Both tails of a score can be watched: a stream whose answers agree with the verifier *more*
closely than the honest service ever does (the verifier itself served as the answer) is a
substitution too.

Everything here is arithmetic on small arrays, so the SDK can recompute a statistic from the
signed parts of an incident bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import stats

__all__ = [
    "ScoreCalibration",
    "SequentialDetector",
    "StreamState",
    "calibrate_scores",
]

Tail = Literal["upper", "lower"]
DEFAULT_RATES = (1.0, 0.2, 0.05, 0.01)


@dataclass(frozen=True)
class ScoreCalibration:
    """One score's clean calibration: the sorted scores and the p-value of each rank."""

    scores: np.ndarray  # [n] clean calibration scores, ascending
    p_values: np.ndarray  # [n + 1]: the p-value of an answer with K calibration scores >= it
    delta: float  # the calibration event's failure probability

    @property
    def n(self) -> int:
        return len(self.scores)

    def p(self, scores: np.ndarray, tail: Tail = "upper") -> np.ndarray:
        """The p-value of each score ([m] -> [m]) for large (``upper``) or small (``lower``)
        scores being the suspicious ones. Ties count against the answer (conservative); a
        score that is not a number is no evidence (p = 1: searchsorted would rank NaN above
        every calibration score, the strongest evidence there is)."""
        s = np.asarray(scores, dtype=np.float64)
        if tail == "upper":  # K = #{calibration >= s}
            k = self.n - np.searchsorted(self.scores, s, side="left")
        else:  # K = #{calibration <= s}
            k = np.searchsorted(self.scores, s, side="right")
        p: np.ndarray = np.where(np.isnan(s), 1.0, self.p_values[k])
        return p


def calibrate_scores(scores: np.ndarray, delta: float = 1e-5) -> ScoreCalibration:
    """The calibration of one score from ``n`` clean scores; ``delta`` is the probability that
    the calibration draw is unlucky enough to void the guarantee (see the module docstring).
    """
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if len(s) < 10 or not np.isfinite(s).all():
        raise ValueError(f"calibration needs at least 10 finite clean scores, got {len(s)}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    n = len(s)
    k = np.arange(1, n + 1)
    # b[k - 1] >= the tail mass above the k-th largest score, for all k, w.p. >= 1 - delta
    bound = stats.beta.isf(delta / n, k, n + 1 - k)
    bound = np.maximum.accumulate(np.minimum(bound, 1.0))  # monotone in k
    p_values = np.concatenate([bound, [1.0]])  # K = 0..n -> p = b[K] (K = n: 1)
    return ScoreCalibration(s, p_values, delta)


@dataclass
class StreamState:
    """One stream's monitor state (a model's answers, or one API key's): small and fixed-size
    whatever the stream's length, so it persists and many keys fit in bounded memory."""

    r: np.ndarray  # [components] Shiryaev-Roberts statistics
    answers: int = 0
    alarm: bool = False
    alarm_at: int | None = None  # the answer count when the alarm first fired
    peak: float = 0.0  # the largest statistic seen since the last reset
    last: float = 0.0  # the statistic now (kept by update: no mean over components to read it)


@dataclass(frozen=True)
class _Component:
    score: str
    tail: Tail
    rate: float
    calibrator: str  # "power", or "tail<m>": the threshold at m x the smallest p-value


@dataclass
class SequentialDetector:
    """The mixture e-detector over the named scores' tails and the tamper rates ``rates``.

    ``tails`` names, per score, which tails are suspicious (e.g. the detector score:
    ``("upper",)``; KL(service || verifier): ``("upper", "lower")``).
    """

    calibrations: Mapping[str, ScoreCalibration]
    tails: Mapping[str, Sequence[Tail]]
    alpha: float = 1e-5
    rates: Sequence[float] = DEFAULT_RATES
    kappa: float = 0.2
    tail_multiples: Sequence[int] = (1, 4)
    components: list[_Component] = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if not 0 < self.kappa < 1:
            raise ValueError(f"kappa must be in (0, 1), got {self.kappa}")
        if not self.rates or any(not 0 < r <= 1 for r in self.rates):
            raise ValueError(f"tamper rates must be in (0, 1], got {list(self.rates)}")
        unknown = set(self.tails) - set(self.calibrations)
        if unknown:
            raise ValueError(f"tails for uncalibrated scores {sorted(unknown)}")
        calibrators = ["power", *(f"tail{m}" for m in self.tail_multiples)]
        self.components = [
            _Component(score, tail, rate, calibrator)
            for score, tails in self.tails.items()
            for tail in tails
            for rate in self.rates
            for calibrator in calibrators
        ]
        # the distinct (score, tail, calibrator) columns, and each component's column and rate:
        # e-values of a batch of answers are one broadcast over these
        self._columns = list(
            dict.fromkeys((c.score, c.tail, c.calibrator) for c in self.components)
        )
        self._column_of = np.array(
            [self._columns.index((c.score, c.tail, c.calibrator)) for c in self.components]
        )
        self._rates = np.array([c.rate for c in self.components])
        # per column: its (score, tail) pair, whether it is the power calibrator, and the tail
        # calibrator's cut (the calibrations are fixed): one broadcast per batch of answers
        self._pairs = list(dict.fromkeys((score, tail) for score, tail, _ in self._columns))
        self._pair_of = np.array([self._pairs.index((s, t)) for s, t, _ in self._columns])
        self._power = np.array([c == "power" for _, _, c in self._columns])
        self._cut = np.array(
            [
                1.0
                if c == "power"
                else min(1.0, int(c.removeprefix("tail")) * self.calibrations[s].p_values[0])
                for s, _, c in self._columns
            ]
        )

    @property
    def threshold(self) -> float:
        return 1.0 / self.alpha

    def new_state(self) -> StreamState:
        return StreamState(np.zeros(len(self.components)))

    def e_values(self, scores: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each answer's e-value per component ([m answers, components])."""
        n_answers = {len(np.atleast_1d(v)) for v in scores.values()}
        if len(n_answers) != 1:
            raise ValueError(f"every score needs one value per answer, got lengths {n_answers}")
        missing = {c.score for c in self.components} - set(scores)
        if missing:
            raise ValueError(f"missing scores {sorted(missing)}")
        p = np.stack(
            [self.calibrations[s].p(np.atleast_1d(scores[s]), t) for s, t in self._pairs], axis=1
        )[:, self._pair_of]  # [m, columns]: each column's p-values
        # calibrators: power kappa * p^(kappa - 1), or tail 1{p <= cut} / cut
        columns = np.where(
            self._power, self.kappa * p ** (self.kappa - 1.0), (p <= self._cut) / self._cut
        )
        f = columns[:, self._column_of]  # [m, components]
        e: np.ndarray = 1.0 - self._rates + self._rates * f
        return e

    def statistic(self, state: StreamState) -> float:
        """The mixture statistic: the components' average."""
        return float(state.r.mean())

    def update(
        self,
        state: StreamState,
        scores: Mapping[str, np.ndarray],
        e_values: np.ndarray | None = None,
    ) -> list[float]:
        """Feed answers in order (in place); returns the statistic after each answer. The
        alarm latches until :meth:`reset`. ``e_values``: the answers' :meth:`e_values`, when
        the caller feeds the same answers to several streams."""
        trajectory = []
        for row in self.e_values(scores) if e_values is None else e_values:
            # Shiryaev-Roberts, capped far above any threshold so it never overflows
            state.r = np.minimum((1.0 + state.r) * row, 1e300)
            state.answers += 1
            m = float(state.r.mean())
            state.last = m
            state.peak = max(state.peak, m)
            if m >= self.threshold and not state.alarm:
                state.alarm, state.alarm_at = True, state.answers
            trajectory.append(m)
        return trajectory

    def run_lengths(self, streams: Mapping[str, np.ndarray]) -> np.ndarray:
        """Simulation: answers until the alarm for each of ``S`` streams of ``T`` answers
        (each score ``[S, T]``), all streams stepped together; ``T + 1`` where it never fired.
        The same arithmetic as :meth:`update`."""
        first = next(iter(streams.values()))
        n_streams, length = np.shape(first)
        r = np.zeros((n_streams, len(self.components)))
        out = np.full(n_streams, length + 1)
        live = np.ones(n_streams, dtype=bool)
        block = max(1, 65536 // max(1, n_streams))  # e-values a block of steps at a time
        for start in range(0, length, block):
            stop = min(length, start + block)
            chunk = {k: np.asarray(v)[:, start:stop].reshape(-1) for k, v in streams.items()}
            e = self.e_values(chunk).reshape(n_streams, stop - start, -1)  # [S, t, components]
            for i in range(stop - start):
                r = np.minimum((1.0 + r) * e[:, i], 1e300)
                fired = live & (r.mean(axis=1) >= self.threshold)
                out[fired] = start + i + 1
                live &= ~fired
            if not live.any():
                break
        return out

    def reset(self, state: StreamState) -> None:
        """After an investigation: the statistic starts over (the guarantee restarts too)."""
        state.r = np.zeros(len(self.components))
        state.alarm, state.alarm_at, state.peak, state.last = False, None, 0.0, 0.0

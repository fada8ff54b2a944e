"""The windowed model-substitution test (shared by the evaluation and the gateway)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

__all__ = ["EPS", "WindowResult", "WindowTest", "kl_divergence", "window_test"]

EPS = 1e-7  # the probability floor of verifier.features, so both compute the same KL


@dataclass(frozen=True)
class WindowResult:
    statistic: float  # P(window score > clean score), from Mann-Whitney U; 0.5 when honest
    p_value: float  # two-sided
    flagged: bool
    # which way a flagged window leans: "more" disagreement with the verifier than the honest
    # service shows (a cheaper substitute), or "less" (answers that copy the verifier)
    direction: Literal["more", "less"] | None = None


class WindowTest:
    """The two-sided Mann-Whitney U test of windows against one fixed reference, prepared once.

    Per window it gives the same statistic and p-value as ``scipy.stats.mannwhitneyu(window,
    reference, alternative="two-sided")`` (the asymptotic method with its tie and continuity
    corrections, which scipy uses for every window and reference of more than 8 scores), in
    O(m log n) for m window scores against n reference scores instead of ranking all m + n
    every time: the reference is sorted once, and each window score is placed in it by binary
    search. Windows or references of at most 8 scores, and scores that are not numbers, go to
    scipy itself (its exact method, its NaN handling).
    """

    def __init__(self, reference: np.ndarray) -> None:
        r = np.asarray(reference, dtype=np.float64).ravel()
        if r.size == 0:
            raise ValueError("window test needs scores in the window and the reference")
        self.reference = r
        self._sorted = np.sort(r)
        self._scipy_only = r.size <= 8 or not bool(np.isfinite(r).all())
        _, counts = np.unique(self._sorted, return_counts=True)
        c = counts.astype(np.float64)
        self._ref_ties = float(np.sum(c**3 - c))  # the reference's share of the tie term

    def __call__(self, window: np.ndarray, alpha: float = 0.01) -> WindowResult:
        w = np.asarray(window, dtype=np.float64).ravel()
        if w.size == 0:
            raise ValueError("window test needs scores in the window and the reference")
        if self._scipy_only or w.size <= 8 or not bool(np.isfinite(w).all()):
            res = stats.mannwhitneyu(w, self.reference, alternative="two-sided")
            return _result(
                float(res.statistic), float(res.pvalue), w.size, self.reference.size, alpha
            )
        n1, n2 = w.size, self._sorted.size
        below = np.searchsorted(self._sorted, w, side="left")  # reference scores under each
        equal = np.searchsorted(self._sorted, w, side="right") - below  # ... and equal to it
        u1 = float(below.sum() + 0.5 * equal.sum())  # pairs a window score wins, ties half
        # tie correction over the combined sample: each of the window's distinct values adds
        # its own count to the reference's count of it
        values, idx, counts = np.unique(w, return_index=True, return_counts=True)
        a = equal[idx].astype(np.float64)
        t = a + counts
        ties = self._ref_ties + float(np.sum(t**3 - t - (a**3 - a)))
        n = n1 + n2
        sigma = math.sqrt(n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))))
        u = max(u1, n1 * n2 - u1)
        if sigma == 0.0:  # every score equal: no evidence either way
            p = 1.0
        else:
            z = (u - n1 * n2 / 2 - 0.5) / sigma  # with the continuity correction
            p = min(1.0, max(0.0, math.erfc(z / math.sqrt(2.0))))  # 2 * P(Z > z)
        return _result(u1, p, n1, n2, alpha)


def _result(u1: float, p_value: float, n1: int, n2: int, alpha: float) -> WindowResult:
    stat = u1 / (n1 * n2)
    flagged = bool(p_value < alpha)
    direction: Literal["more", "less"] | None = None
    if flagged:
        direction = "more" if stat > 0.5 else "less"
    return WindowResult(stat, p_value, flagged, direction)


def window_test(window: np.ndarray, reference: np.ndarray, alpha: float = 0.01) -> WindowResult:
    """Do a window of recent per-request scores come from another distribution than clean
    scores, in either direction?

    Two-sided Mann-Whitney U test of the window against the clean calibration scores (as
    ``scipy.stats.mannwhitneyu``; :class:`WindowTest` when one reference serves many
    windows). Under an honest service the window and the reference are exchangeable, so a
    window is flagged with probability <= ``alpha``. A substitute that disagrees with the
    verifier more often shifts the scores up; one that reproduces the verifier (the verifier
    itself, or anything distilled to copy it) shifts them down, since the honest service never
    agrees with its verifier that closely. Both are substitutions. The statistic is U /
    (n_window * n_reference): the probability that a window score exceeds a clean one (0.5
    when honest).
    """
    if np.asarray(window).size == 0:
        raise ValueError("window test needs scores in the window and the reference")
    return WindowTest(reference)(window, alpha)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` per row (nats), ``[n, C] -> [n]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, None)
    out: np.ndarray = (p * (np.log(np.maximum(p, EPS)) - np.log(np.maximum(q, EPS)))).sum(-1)
    return out

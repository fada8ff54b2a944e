"""The windowed model-substitution test (shared by the evaluation and the gateway)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats

__all__ = ["EPS", "WindowResult", "kl_divergence", "window_test"]

EPS = 1e-7  # the probability floor of verifier.features, so both compute the same KL


@dataclass(frozen=True)
class WindowResult:
    statistic: float  # P(window score > clean score), from Mann-Whitney U; 0.5 when honest
    p_value: float  # two-sided
    flagged: bool
    # which way a flagged window leans: "more" disagreement with the verifier than the honest
    # service shows (a cheaper substitute), or "less" (answers that copy the verifier)
    direction: Literal["more", "less"] | None = None


def window_test(window: np.ndarray, reference: np.ndarray, alpha: float = 0.01) -> WindowResult:
    """Do a window of recent per-request scores come from another distribution than clean
    scores, in either direction?

    Two-sided Mann-Whitney U test (scipy.stats.mannwhitneyu) of the window against the clean
    calibration scores. Under an honest service the window and the reference are
    exchangeable, so a window is flagged with probability <= ``alpha``. A substitute that
    disagrees with the verifier more often shifts the scores up; one that reproduces the
    verifier (the verifier itself, or anything distilled to copy it) shifts them down, since
    the honest service never agrees with its verifier that closely. Both are substitutions.
    The statistic is U / (n_window * n_reference): the probability that a window score exceeds
    a clean one (0.5 when honest).
    """
    w = np.asarray(window, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if w.size == 0 or r.size == 0:
        raise ValueError("window test needs scores in the window and the reference")
    res = stats.mannwhitneyu(w, r, alternative="two-sided")
    stat = float(res.statistic) / (w.size * r.size)
    flagged = bool(res.pvalue < alpha)
    direction: Literal["more", "less"] | None = None
    if flagged:
        direction = "more" if stat > 0.5 else "less"
    return WindowResult(stat, float(res.pvalue), flagged, direction)


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` per row (nats), ``[n, C] -> [n]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, None)
    out: np.ndarray = (p * (np.log(np.maximum(p, EPS)) - np.log(np.maximum(q, EPS)))).sum(-1)
    return out

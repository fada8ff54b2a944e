"""The windowed model-substitution test (shared by the evaluation and the gateway)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["EPS", "WindowResult", "kl_divergence", "window_test"]

EPS = 1e-7  # the probability floor of verifier.features, so both compute the same KL


@dataclass(frozen=True)
class WindowResult:
    statistic: float  # P(window score > clean score), from Mann-Whitney U; 0.5 when honest
    p_value: float
    flagged: bool


def window_test(window: np.ndarray, reference: np.ndarray, alpha: float = 0.01) -> WindowResult:
    """Is a window of recent per-request scores stochastically larger than clean scores?

    One-sided Mann-Whitney U test (scipy.stats.mannwhitneyu, alternative "greater") of the
    window against the clean calibration scores. Under an honest service the window and the
    reference are exchangeable, so a window is flagged with probability <= ``alpha``; a
    substitute model that disagrees with the verifier more often shifts the scores up. The
    statistic is U / (n_window * n_reference): the probability that a window score exceeds a
    clean one (0.5 when honest).
    """
    w = np.asarray(window, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if w.size == 0 or r.size == 0:
        raise ValueError("window test needs scores in the window and the reference")
    res = stats.mannwhitneyu(w, r, alternative="greater")
    stat = float(res.statistic) / (w.size * r.size)
    return WindowResult(stat, float(res.pvalue), bool(res.pvalue < alpha))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` per row (nats), ``[n, C] -> [n]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, None)
    out: np.ndarray = (p * (np.log(np.maximum(p, EPS)) - np.log(np.maximum(q, EPS)))).sum(-1)
    return out

"""The integrity vocabulary: the pair models' tensor names, and the verdict on one answer
from the detector's scores and the novelty check: the one rule the gateway and the client SDK
both apply, so that an honest gateway and a checking client always agree."""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "DETECTOR_OUTPUT",
    "INVALID_ANSWER",
    "NOVELTY_OUTPUT",
    "OUT_OF_DISTRIBUTION",
    "P_INPUT",
    "Q_INPUT",
    "RECLASSIFIER_OUTPUT",
    "VERDICTS",
    "Verdict",
    "answer_score",
    "decide",
    "invalid_reason",
    "judged_scores",
    "novelty_reason",
]

Verdict = Literal["verified", "attack", "unverified"]
VERDICTS: tuple[Verdict, ...] = ("verified", "attack", "unverified")
OUT_OF_DISTRIBUTION = "out_of_distribution"
INVALID_ANSWER = "invalid_answer"  # the service's answer holds values that are not numbers

# The pair models (detector, re-classifier) take the service's and the verifier's class
# probabilities, [n, C] each; the novelty check takes the service's own input.
P_INPUT, Q_INPUT = "service_probs", "verifier_probs"
DETECTOR_OUTPUT = "attack_probability"  # [n, 1]
RECLASSIFIER_OUTPUT = "probabilities"  # [n, C]
NOVELTY_OUTPUT = "novelty_score"  # [n]


def judged_scores(scores: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The detector's ``scores`` ``[n]`` with NaN for every row whose service answer ``p``
    ``[n, C]`` holds a value that is not a number: no detector judged such a row (a NaN
    answer's score may come out as any number, and NaN > threshold is False)."""
    bad = ~np.isfinite(np.asarray(p, dtype=np.float64)).all(axis=1)  # [n]
    out = np.asarray(scores, dtype=np.float64).copy()
    out[bad] = np.nan
    return out


def decide(
    scores: np.ndarray, threshold: float, novel: np.ndarray | None = None
) -> tuple[Verdict, np.ndarray]:
    """``(verdict, attacked rows)`` for detector ``scores`` ``[n]`` (from
    :func:`judged_scores`).

    A row is attacked when its score is above ``threshold`` and its input is not novel:
    on an input unlike the data the verifier was calibrated on, honest models disagree like
    tampered ones, so the detector's score says nothing about the provider there. The answer
    is ``attack`` when any row is attacked; else ``unverified`` when any row is novel or has
    a score that is not a number (the verification could not judge it); else ``verified``.
    """
    s = np.asarray(scores, dtype=np.float64)
    novel_rows = np.zeros(len(s), dtype=bool) if novel is None else np.asarray(novel, bool)
    attacked = (s > threshold) & ~novel_rows  # [n]; NaN is never above
    if attacked.any():
        return "attack", attacked
    if novel_rows.any() or not np.isfinite(s).all():
        return "unverified", attacked
    return "verified", attacked


def answer_score(scores: np.ndarray) -> float | None:
    """The answer's score: its rows' largest that is a number (None when none is)."""
    s = np.asarray(scores, dtype=np.float64)
    finite = s[np.isfinite(s)]
    return float(finite.max()) if finite.size else None


def invalid_reason(scores: np.ndarray) -> str | None:
    """The ``integrity_reason`` part for rows :func:`judged_scores` could not judge."""
    bad = ~np.isfinite(np.asarray(scores, dtype=np.float64))
    if not bad.any():
        return None
    return (
        f"{INVALID_ANSWER}: {int(bad.sum())} of {len(bad)} row(s) of the service's answer hold "
        "values that are not numbers (NaN / Inf); nothing can verify them"
    )


def novelty_reason(novelty: np.ndarray, threshold: float) -> str:
    """The ``integrity_reason`` of an answer ``decide`` found ``unverified`` for novelty."""
    novel = novelty > threshold
    return (
        f"{OUT_OF_DISTRIBUTION}: {int(novel.sum())} of {len(novel)} input row(s) unlike the "
        f"data the verifier was calibrated on (novelty {float(novelty.max()):.4g} > threshold "
        f"{threshold:.4g}); the answer is neither verified nor accused"
    )

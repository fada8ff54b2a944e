"""The integrity vocabulary: the pair models' tensor names, and the verdict on one answer
from the detector's scores and the novelty check: the one rule the gateway and the client SDK
both apply, so that an honest gateway and a checking client always agree."""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = [
    "DETECTOR_OUTPUT",
    "NOVELTY_OUTPUT",
    "OUT_OF_DISTRIBUTION",
    "P_INPUT",
    "Q_INPUT",
    "RECLASSIFIER_OUTPUT",
    "VERDICTS",
    "Verdict",
    "decide",
    "novelty_reason",
]

Verdict = Literal["verified", "attack", "unverified"]
VERDICTS: tuple[Verdict, ...] = ("verified", "attack", "unverified")
OUT_OF_DISTRIBUTION = "out_of_distribution"

# The pair models (detector, re-classifier) take the service's and the verifier's class
# probabilities, [n, C] each; the novelty check takes the service's own input.
P_INPUT, Q_INPUT = "service_probs", "verifier_probs"
DETECTOR_OUTPUT = "attack_probability"  # [n, 1]
RECLASSIFIER_OUTPUT = "probabilities"  # [n, C]
NOVELTY_OUTPUT = "novelty_score"  # [n]


def decide(
    scores: np.ndarray, threshold: float, novel: np.ndarray | None = None
) -> tuple[Verdict, np.ndarray]:
    """``(verdict, attacked rows)`` for detector ``scores`` ``[n]``.

    A row is attacked when its score is above ``threshold`` and its input is not novel:
    on an input unlike the data the verifier was calibrated on, honest models disagree like
    tampered ones, so the detector's score says nothing about the provider there. The answer
    is ``attack`` when any row is attacked; else ``unverified`` when any row is novel (the
    verification could not judge it); else ``verified``.
    """
    novel_rows = np.zeros(len(scores), dtype=bool) if novel is None else np.asarray(novel, bool)
    attacked = (np.asarray(scores) > threshold) & ~novel_rows  # [n]
    if attacked.any():
        return "attack", attacked
    if novel_rows.any():
        return "unverified", attacked
    return "verified", attacked


def novelty_reason(novelty: np.ndarray, threshold: float) -> str:
    """The ``integrity_reason`` of an answer ``decide`` found ``unverified`` for novelty."""
    novel = novelty > threshold
    return (
        f"{OUT_OF_DISTRIBUTION}: {int(novel.sum())} of {len(novel)} input row(s) unlike the "
        f"data the verifier was calibrated on (novelty {float(novelty.max()):.4g} > threshold "
        f"{threshold:.4g}); the answer is neither verified nor accused"
    )

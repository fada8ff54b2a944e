"""A small integrity-enabled repository, trained for real on a digits subset (seconds):
the service student, its GDTL verifier, the GAN-trained detector, the re-classifier and a
cheaper substitute, exported by ``verifier.evaluate`` exactly as ``fides evaluate`` does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from verifier.defaults import DIGITS_DEFAULT
from verifier.evaluate import evaluate_experiment
from verifier.experiment import Experiment, parse_experiment

DETECTOR: dict[str, Any] = {
    "train_fraction": 0.3,
    "calibration_fraction": 0.5,
    "target_fpr": 0.02,
    "reclassifier_epochs": 10,
    "finetune_epochs": 3,
    "windows": 20,
    "window_size": 20,
    "fgsm_epsilons": [0.1],
    "gan": {"epochs": 10, "batch_size": 64},
    "substitutes": [
        {
            "name": "lite",
            "kind": "student",
            "net": {"widths": [4, 8]},
            "train": {"epochs": 1, "batch_size": 64},
        }
    ],
}


def small_experiment() -> Experiment:
    raw = json.loads(json.dumps(DIGITS_DEFAULT))  # a deep copy
    raw["teachers"][0]["train"]["epochs"] = 6
    raw["student"]["train"]["epochs"] = 6
    raw["verifier"]["pretrain"]["train"]["epochs"] = 1
    raw["verifier"]["step"]["epochs"] = 3
    raw["export"]["latency_repeats"] = 5
    raw["detector"] = DETECTOR
    return parse_experiment(raw)


def build_integrity_repository(root: Path) -> tuple[Path, dict[str, Any]]:
    """``root/repo`` with digits (integrity on), digits_verifier, digits_detector,
    digits_reclassifier and digits_lite; returns it and the evaluation report."""
    report = evaluate_experiment(small_experiment(), root / "run", repository=root / "repo")
    return root / "repo", report

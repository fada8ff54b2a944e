"""The embedded default experiment (digits, small settings), as used by
``fides models build-default``. ``experiments/digits.yaml`` is the same config as a file
(a test keeps the two equal); it lives here too so an installed package needs no YAML file.
"""

from __future__ import annotations

from typing import Any

from verifier.experiment import Experiment, parse_experiment

__all__ = ["DIGITS_DEFAULT", "digits_default"]

_OPTIM: dict[str, Any] = {"batch_size": 64, "lr": 0.004, "weight_decay": 0.0005}

DIGITS_DEFAULT: dict[str, Any] = {
    "name": "digits",
    "seed": 0,
    "threads": 1,
    "data": {
        "source": "digits",
        "val_fraction": 0.1,
        "test_fraction": 0.4,
        "augment": {"crop_padding": 1, "hflip": False},
    },
    "teachers": [
        {"net": {"widths": [32, 64, 128], "convs_per_block": 2}, "train": {"epochs": 20, **_OPTIM}}
    ],
    "student": {
        "net": {"widths": [32, 64, 128], "convs_per_block": 1},
        "train": {"epochs": 20, **_OPTIM},
        "kd": {"temperature": 4.0, "alpha": 0.9, "beta": 0.1},
    },
    "verifier": {
        "candidates": [{"widths": [8, 16, 32]}, {"widths": [12, 24, 48]}],
        "pretrain": {"task": "rotation", "train": {"epochs": 6, "batch_size": 64, "lr": 0.004}},
        "step": {"epochs": 12, **_OPTIM},
        "kd": {"temperature": 5.0, "alpha": 0.8, "beta": 0.2},
        "threshold": 0.002,
        "fidelity_target": 0.97,
        "max_flops_ratio": 0.25,
        "memory_budget_mb": 96,
        "memory_batch_size": 64,
    },
    "export": {
        "service_name": "digits",
        "verifier_name": "digits_verifier",
        "max_batch_size": 64,
        "latency_repeats": 100,
    },
    # 719 test images: 30% train the detector with the validation split, half calibrate (360
    # clean scores; a 1% target at 0.95 confidence needs >= 299), the remaining 144 evaluate
    "detector": {
        "train_fraction": 0.3,
        "calibration_fraction": 0.5,
        "target_fpr": 0.01,
        "fpr_confidence": 0.95,
        # out-of-distribution inputs (blank, inverted, faint, noise) are "unverified", not
        # "attack": at most 1% of clean inputs with probability 0.95
        "novelty": {"target_rate": 0.01, "confidence": 0.95},
        "substitutes": [
            {  # digits_lite: the cheap model the gateway's substitution drill serves
                "name": "lite",
                "kind": "student",
                "net": {"widths": [4, 8]},
                "train": {"epochs": 2, **_OPTIM},
            },
            {"name": "int8", "kind": "int8"},
        ],
    },
}


def digits_default(seed: int = 0) -> Experiment:
    return parse_experiment({**DIGITS_DEFAULT, "seed": seed}, "verifier.defaults.DIGITS_DEFAULT")

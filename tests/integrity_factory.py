"""A small integrity-enabled repository, trained for real on a digits subset (seconds):
the service student, its GDTL verifier, the GAN-trained detector, the re-classifier and a
cheaper substitute, exported by ``verifier.evaluate`` exactly as ``fides evaluate`` does."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

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
    "novelty": {"target_rate": 0.01},
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


@dataclass(frozen=True)
class Digits:
    """Digits on which the session's freshly trained models behave as any decent model does
    on most digits: the clean answer is verified with a margin below the detector's threshold,
    the answer with its top two classes switched is flagged with a margin above it and
    re-classified to the honest class, and the novelty check (when there is one) calls the
    input in distribution. Tests about plumbing (evidence, batching, drills, SDK checks) use
    these, so they do not depend on how one training run turned out on one CPU; tests about
    detection rates use all digits and assert rates with a tolerance."""

    images: np.ndarray  # [n, 1, 8, 8] float32 in [0, 1]
    labels: np.ndarray  # [n] the service's (honest) top-1

    def take(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` of them (seeded draw), ``[n, 1, 8, 8]``."""
        idx = np.random.default_rng(seed).choice(len(self.images), size=n, replace=False)
        return self.images[idx]

    def body(self, i: int = 0, **params: Any) -> dict[str, Any]:
        """An OIP request for digit ``i`` (id ``typical-digit-<i>``)."""
        return {"id": f"typical-digit-{i}", **infer_body(self.images[i : i + 1], **params)}


def infer_body(x: np.ndarray, **params: Any) -> dict[str, Any]:
    """An OIP request body for digit images ``x`` ``[n, 1, 8, 8]`` (and request parameters)."""
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ]
    }
    if params:
        body["parameters"] = params
    return body


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, feeds)[0])


def _threshold(repo: Path, name: str) -> float:
    card = json.loads((repo / name / "1" / "model_card.json").read_text(encoding="utf-8"))
    return float(card["threshold"])


def honest_digits(n: int, seed: int = 0) -> np.ndarray:
    """``n`` of all 1797 of scikit-learn's digits, a seeded draw with no selection,
    ``[n, 1, 8, 8]``: honest traffic for tests about what the stream checks (the windowed
    substitution test) say of honest traffic. Unlike :class:`Digits` (chosen for a low detector
    score, so their KL(service || verifier) sits well below the clean calibration pairs' and a
    two-sided window test calls them "less" disagreement now and then: about 2 % of windows of
    40 at alpha 0.001), a draw like this disagrees as the clean calibration pairs do, so a
    window of it is flagged about as often as the test's alpha says (measured: 1 in 1000)."""
    from sklearn.datasets import load_digits

    images, _ = load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return (np.asarray(images[idx], dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)


def typical_digits(repo: Path, minimum: int = 100) -> Digits:
    """Select :class:`Digits` from all 1797 of scikit-learn's digits with the models in
    ``repo`` (as built by :func:`build_integrity_repository`)."""
    from sklearn.datasets import load_digits

    images, _ = load_digits(return_X_y=True)
    x = (np.asarray(images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    p = _run(repo / "digits" / "1" / "model.onnx", {"input": x})  # [N, 10]
    q = _run(repo / "digits_verifier" / "1" / "model.onnx", {"input": x})
    top = np.argsort(p, axis=1)[:, -2:]
    rows = np.arange(len(p))
    switched = p.copy()
    switched[rows, top[:, 0]], switched[rows, top[:, 1]] = p[rows, top[:, 1]], p[rows, top[:, 0]]
    detector = repo / "digits_detector" / "1" / "model.onnx"
    thr = _threshold(repo, "digits_detector")
    clean = _run(detector, {"service_probs": p, "verifier_probs": q}).reshape(-1)
    attacked = _run(detector, {"service_probs": switched, "verifier_probs": q}).reshape(-1)
    restored = _run(
        repo / "digits_reclassifier" / "1" / "model.onnx",
        {"service_probs": switched, "verifier_probs": q},
    ).argmax(1)
    honest = p.argmax(1)
    keep = (
        (clean < 0.5 * thr)
        & (attacked > thr + 0.5 * (1 - thr))
        & (restored == honest)
        & (q.argmax(1) == honest)
    )
    if (repo / "digits_novelty").is_dir():
        novelty = _run(repo / "digits_novelty" / "1" / "model.onnx", {"input": x}).reshape(-1)
        keep &= novelty < 0.8 * _threshold(repo, "digits_novelty")
    found = int(keep.sum())
    assert found >= minimum, (
        f"only {found} of {len(x)} digits are clear cases for the trained test models (want "
        f">= {minimum}): the small experiment in tests/integrity_factory.py trained badly"
    )
    return Digits(np.ascontiguousarray(x[keep]), honest[keep])

"""``fides evaluate`` on a digits subset: the report has every key, the exported detector
and re-classifier load in the gateway's config schema and match torch."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gateway.model_config import load_model_config
from tests.verifier.test_pipeline import tiny_experiment
from verifier.data import Dataset, load_splits
from verifier.evaluate import (
    MEAN_DETECTION_ATTACKS,
    _with_views,
    evaluate_experiment,
    report_markdown,
)
from verifier.experiment import AugmentConfig, SubstituteConfig

DETECTOR = {
    "train_fraction": 0.3,
    "augment_views": 1,
    "calibration_fraction": 0.5,
    "target_fpr": 0.05,
    "fpr_confidence": 0.9,
    "reclassifier_epochs": 3,
    "finetune_epochs": 1,
    "windows": 20,
    "window_size": 20,
    "fgsm_epsilons": [0.05, 0.1],
    "gan": {"epochs": 3, "batch_size": 64},
    "substitutes": [
        {
            "name": "tiny",
            "kind": "student",
            "net": {"widths": [4, 8]},
            "train": {"epochs": 1, "batch_size": 64},
        },
        {"name": "int8", "kind": "int8"},
    ],
}


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("evaluate")
    exp = tiny_experiment(detector=DETECTOR)
    return root, evaluate_experiment(exp, root / "run", repository=root / "repo")


def test_report_has_every_key(evaluated: tuple[Path, dict[str, Any]]) -> None:
    _, r = evaluated
    assert 0 <= r["clean_fpr"] <= 1
    assert 0 <= r["reclassification_accuracy"] <= 1
    assert set(r["attacks"]) == {
        "switch",
        "avg",
        "random_switch",
        "targeted_flip",
        "noise",
        "gan",
        "fgsm_eps0.05",
        "fgsm_eps0.1",
    }
    for name in ("switch", "avg", "random_switch", "targeted_flip"):
        row = r["attacks"][name]
        assert row["flip_rate"] == 1.0  # these always change the answer
        for key in ("detection_accuracy", "tpr_at_1pct_fpr", "roc_auc"):
            assert 0 <= row[key] <= 1, (name, key)
    for row in r["attacks"].values():
        assert {"detection_accuracy", "tpr_at_1pct_fpr", "roc_auc", "flip_rate", "n"} <= set(row)
    assert r["mean_detection_attacks"] == list(MEAN_DETECTION_ATTACKS)
    assert set(r["baselines"]) == {"research_ce_threshold", "kl_percentile"}
    for b in r["baselines"].values():
        assert set(b["attacks"]) == set(r["attacks"])
        assert 0 <= b["clean_fpr"] <= 1
    assert set(r["substitution"]) == {"tiny", "int8"}
    for s in r["substitution"].values():
        for key in ("window_detector_score", "window_kl"):
            assert 0 <= s[key]["substitute"]["flag_rate"] <= 1
            assert 0 <= s[key]["clean_false_alarm"]["flag_rate"] <= 1
        assert 0 <= s["per_request"]["tpr_at_1pct_fpr"] <= 1
    assert len(r["gan"]["history"]["d_loss"]) == 3
    assert r["data"]["detector_train_augmented_views"] == 1
    assert math.isfinite(r["threshold"])
    md = report_markdown(r, "fides evaluate tiny.yaml")
    assert "| switch |" in md
    assert "## Model substitution" in md


def test_the_detector_beats_chance_on_switch(evaluated: tuple[Path, dict[str, Any]]) -> None:
    _, r = evaluated
    assert r["attacks"]["switch"]["roc_auc"] > 0.7  # a 40-image split of an 80% service


def test_exported_models_load_and_agree(evaluated: tuple[Path, dict[str, Any]]) -> None:
    root, r = evaluated
    repo = root / "repo"
    assert r["onnx_max_abs_diff"] <= 1e-4
    for name in ("digits_detector", "digits_reclassifier"):
        cfg = load_model_config(repo / name / "config.yaml", expected_name=name)
        assert cfg.platform == "onnx"
    card = json.loads((repo / "digits_detector" / "1" / "model_card.json").read_text())
    assert card["role"] == "detector"
    assert card["threshold"] == r["threshold"]
    assert card["target_fpr"] == 0.05
    assert card["fpr_confidence"] == r["fpr_confidence"] == 0.9
    assert "probability >= 0.9" in r["threshold_rule"]
    assert len(card["calibration_scores"]) == r["data"]["calibration"]
    sess = ort.InferenceSession(
        str(repo / "digits_detector" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    p = np.eye(10, dtype=np.float32)[[3, 3]] * 0.9 + 0.01
    q = np.eye(10, dtype=np.float32)[[3, 5]] * 0.9 + 0.01
    score = sess.run(None, {"service_probs": p, "verifier_probs": q})[0][:, 0]
    assert score[1] > score[0]  # disagreeing with a confident verifier looks worse


def test_augmented_views_keep_the_originals_and_are_seeded() -> None:
    x = torch.rand(6, 1, 8, 8)
    aug = AugmentConfig(crop_padding=1, hflip=True)
    views = _with_views(x, 2, aug, seed=3)
    assert views.shape == (18, 1, 8, 8)
    assert torch.equal(views[:6], x)  # the held-out images themselves come first
    assert not torch.equal(views[6:12], x)  # each copy is shifted or flipped
    assert torch.equal(views, _with_views(x, 2, aug, seed=3))
    assert torch.equal(_with_views(x, 0, aug, seed=3), x)


def test_a_failed_export_keeps_the_report_and_a_rerun_resumes(
    tmp_path: Path, evaluated: tuple[Path, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 26: an export that fails after every metric was computed used to lose them all.
    The report is on disk first, the trained detector stage is kept, and a rerun loads it and
    computes exactly what the uninterrupted run did."""
    import shutil

    import verifier.evaluate as ev
    from verifier.export import ExportError

    root, first = evaluated
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)  # the trained service, verifier and detector stages
    for stage in run.glob("detector-*"):
        shutil.rmtree(stage)  # train the detector again, then fail in the export
    (run / "evaluation.json").unlink()

    def broken(*args: Any, **kwargs: Any) -> float:
        raise ExportError("ONNX differs from torch by 0.00279 (limit 0.0001)")

    exp = tiny_experiment(detector=DETECTOR)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ev, "export_integrity", broken)
        with pytest.raises(ExportError):
            evaluate_experiment(exp, run, repository=tmp_path / "repo")
    kept = json.loads((run / "evaluation.json").read_text())
    for key in ("mean_detection_accuracy", "clean_fpr", "reclassification_accuracy", "attacks"):
        assert kept[key] == first[key]
    caplog.set_level("INFO", logger="verifier.evaluate")
    again = evaluate_experiment(exp, run, repository=tmp_path / "repo")
    assert any("loaded from" in r.getMessage() for r in caplog.records)
    for key in ("mean_detection_accuracy", "clean_fpr", "threshold", "attacks", "substitution"):
        assert again[key] == first[key]


def test_the_report_has_the_stream_monitor(evaluated: tuple[Path, dict[str, Any]]) -> None:
    """Issue 21: clean streams' false alarms and detection delays, simulated from the
    evaluation's scores (the guarantee itself is tested in tests/fides_core)."""
    _, r = evaluated
    st = r["streams"]
    assert st["alpha"] == 1e-5
    assert st["clean"]["answers"] == 1_000_000
    assert st["clean"]["false_alarms"] <= 10  # an ARL of 100,000 allows about 10
    assert set(st["delays"]) >= {"switch", "avg", "random_switch", "gan", "substitute_verifier"}
    for rates in st["delays"].values():
        assert set(rates) == {"1", "0.2", "0.05", "0.01"}
    # even this tiny detector catches a stream of random switches, answer after answer
    assert st["delays"]["random_switch"]["1"]["median"] is not None
    assert "## Answer streams" in report_markdown(r, "fides evaluate x")


def test_the_clean_fpr_comes_with_its_interval_and_the_rules_expectation() -> None:
    """44 of 4,000 clean answers flagged (1.10%) by a threshold with 12 of 2,000 calibration
    scores above it: the measurement's exact 95% interval holds 1%, and the rule expects
    13 / 2001 = 0.65%; one draw above the target is that draw, not a broken rule."""
    from verifier.evaluate import _fpr_uncertainty

    clean = np.r_[np.full(44, 0.9), np.full(3956, 0.1)]
    calibration = np.r_[np.full(12, 0.9), np.full(1988, 0.1)]
    out = _fpr_uncertainty(clean, calibration, threshold=0.5)
    low, high = out["clean_fpr_ci95"]  # type: ignore[misc]
    assert 0.0079 < low < 0.0081
    assert 0.0146 < high < 0.0148
    assert out["clean_fpr_expected_by_rule"] == round(13 / 2001, 5)


def _tiny_substitute() -> SubstituteConfig:
    """A one-epoch student substitute of a single 4-channel layer."""
    return SubstituteConfig.model_validate(
        {
            "name": "tiny",
            "kind": "student",
            "net": {"widths": [4]},
            "train": {"epochs": 1, "batch_size": 64},
        }
    )


def test_a_substitute_learned_from_other_labels_is_a_new_stage(tmp_path: Path) -> None:
    """Under fides protect a substitute learns the service's top-1 answers: new answers
    (another service version) must train a new stage, not load the old one."""
    from verifier.evaluate import _substitute

    exp = tiny_experiment()
    splits = load_splits("digits", None, seed=0)
    spec = _tiny_substitute()
    _substitute(spec, exp, splits, None, tmp_path, None)
    shifted = replace(splits, train=Dataset(splits.train.x, (splits.train.y + 1) % 10))
    _substitute(spec, exp, shifted, None, tmp_path, None)
    _substitute(spec, exp, splits, None, tmp_path, None)  # the first labels again: reused
    assert len(list(tmp_path.glob("substitute_tiny-*"))) == 2


def test_a_substitute_learned_from_other_images_or_threads_is_a_new_stage(
    tmp_path: Path,
) -> None:
    """A data file replaced by one with the same labels and other images (the stages before
    are refused and deleted, this one is not checked against a record) must not load the
    substitute trained on the old images; nor may a run on another thread count."""
    from verifier.evaluate import _substitute

    exp = tiny_experiment()
    splits = load_splits("digits", None, seed=0, train_limit=200)
    spec = _tiny_substitute()
    _substitute(spec, exp, splits, None, tmp_path, None)
    inverted = replace(splits, train=Dataset(1 - splits.train.x, splits.train.y))
    _substitute(spec, exp, inverted, None, tmp_path, None)
    assert len(list(tmp_path.glob("substitute_tiny-*"))) == 2
    _substitute(spec, exp.model_copy(update={"threads": 2}), splits, None, tmp_path, None)
    assert len(list(tmp_path.glob("substitute_tiny-*"))) == 3


def test_a_damaged_detector_stage_is_refused_by_name(tmp_path: Path) -> None:
    """The detector stage's file cut short (a copy interrupted, a disk error) is an error
    that names it and says what to do, not an unpickling traceback."""
    from verifier.evaluate import Pairs, TrainingPairs, _pairs_digest, _trained_detector
    from verifier.pipeline import stage_key
    from verifier.train import CheckpointError

    exp = tiny_experiment()
    rng = np.random.default_rng(0)
    part = Pairs(rng.random((8, 10)), rng.random((8, 10)), np.arange(8))
    pairs = TrainingPairs(part, part)
    key = stage_key(_pairs_digest(pairs), exp.detector.model_dump(mode="json"), exp.seed)
    path = tmp_path / f"detector-{key}" / "trained.pt"
    path.parent.mkdir()
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match=r"trained\.pt: not a readable stage result"):
        _trained_detector(exp, pairs, 10, torch.Generator(), tmp_path, None, {})

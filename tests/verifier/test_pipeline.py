"""The whole pipeline on a digits subset (seconds), resumable training, determinism."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from gateway.model_config import load_model_config
from verifier.data import load_splits
from verifier.defaults import DIGITS_DEFAULT, digits_default
from verifier.experiment import Experiment, OptimConfig, parse_experiment
from verifier.losses import cross_entropy
from verifier.nets import ConvNet, NetConfig
from verifier.pipeline import StageKeys, run_experiment, stage_keys
from verifier.train import fit, predict_logits, set_determinism


def tiny_experiment(**changes: Any) -> Experiment:
    raw = json.loads(json.dumps(DIGITS_DEFAULT))  # a deep copy
    raw["data"]["train_limit"] = 400
    raw["data"]["test_limit"] = 200
    raw["teachers"][0]["train"]["epochs"] = 4
    raw["student"]["train"]["epochs"] = 4
    raw["verifier"]["pretrain"]["train"]["epochs"] = 1
    raw["verifier"]["step"]["epochs"] = 2
    raw["export"]["latency_repeats"] = 5
    raw.update(changes)
    return parse_experiment(raw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], float]:
    root = tmp_path_factory.mktemp("pipeline")
    t0 = time.perf_counter()
    results = run_experiment(tiny_experiment(), root / "run", repository=root / "repo").report
    return root, results, time.perf_counter() - t0


def test_tiny_pipeline_runs_end_to_end(tiny_run: tuple[Path, dict[str, Any], float]) -> None:
    root, results, seconds = tiny_run
    assert seconds < 60
    assert results["dataset"]["train"] == 400
    assert results["student"]["teacher_to_student_flops_ratio"] >= 3
    assert 0.5 < results["student"]["test_accuracy"] <= 1  # 10 classes: chance is 0.1
    v = results["verifier"]
    assert v["flops_ratio_to_service"] <= 0.25
    assert v["fits_budget"]
    assert 0 <= v["test_fidelity_top1"] <= 1
    assert v["path"][0]["step"] == 0
    assert v["path"][0]["unfrozen_blocks"] == 0
    assert results["onnx_max_abs_diff"] <= 1e-4
    for name in ("digits", "digits_verifier"):
        cfg = load_model_config(root / "repo" / name / "config.yaml", expected_name=name)
        assert cfg.platform == "onnx"
        card = json.loads((root / "repo" / name / "1" / "model_card.json").read_text())
        for key in ("dataset", "metrics", "params", "flops_per_image", "cpu_latency_ms_batch1"):
            assert key in card
        assert card["training_config_sha256"] == results["config_sha256"]
        assert card["training_config"]["name"] == "digits"
    assert (root / "run" / "gdtl_path.md").read_text().startswith("| cand | step |")


def test_rerun_resumes_from_the_checkpoints(tiny_run: tuple[Path, dict[str, Any], float]) -> None:
    root, first, seconds = tiny_run
    t0 = time.perf_counter()
    again = run_experiment(tiny_experiment(), root / "run").report  # every stage is done: loaded
    assert time.perf_counter() - t0 < seconds / 2
    assert again["student"]["test_accuracy"] == first["student"]["test_accuracy"]
    assert again["verifier"]["test_fidelity_top1"] == first["verifier"]["test_fidelity_top1"]


def test_the_run_returns_the_trained_networks(
    tiny_run: tuple[Path, dict[str, Any], float],
) -> None:
    root, first, _ = tiny_run
    run = run_experiment(tiny_experiment(), root / "run")  # loaded from the finished stages
    assert run.report["student"]["test_accuracy"] == first["student"]["test_accuracy"]
    test = run.splits.test
    student = predict_logits(run.student, test.x).argmax(-1)
    assert round(float((student == test.y).float().mean()), 5) == first["student"]["test_accuracy"]
    verifier = predict_logits(run.verifier, test.x).argmax(-1)
    fidelity = round(float((verifier == student).float().mean()), 5)
    assert fidelity == first["verifier"]["test_fidelity_top1"]
    assert len(run.teachers) == len(first["teachers"])
    assert run.verifier.cfg.widths == tuple(first["verifier"]["widths"])


def test_stage_directories_keep_their_names() -> None:
    """The stage directories of the default experiment, as earlier versions named them: a
    change here means existing run directories no longer resume (and must be said so)."""
    exp = digits_default()
    assert exp.config_hash()[:8] == "5b740d6b"
    keys = stage_keys(exp)
    assert keys == StageKeys(teachers=("9b12b8fa",), student="0222c0ba", verifier="6d6d21fb")


def test_a_changed_verifier_config_reuses_teacher_and_student(
    tiny_run: tuple[Path, dict[str, Any], float],
) -> None:
    root, first, _ = tiny_run
    before = sorted(p.name for p in (root / "run").iterdir() if p.is_dir())
    exp = tiny_experiment()
    changed = exp.model_copy(
        update={"verifier": exp.verifier.model_copy(update={"fidelity_target": 0.5})}
    )
    again = run_experiment(changed, root / "run").report
    after = sorted(p.name for p in (root / "run").iterdir() if p.is_dir())
    new = sorted(set(after) - set(before))
    assert len(new) == 1
    assert new[0].startswith("verifier-")  # teacher and student stages were reused
    assert again["student"]["test_accuracy"] == first["student"]["test_accuracy"]


def test_student_must_be_three_times_cheaper(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(DIGITS_DEFAULT))
    raw["student"]["net"] = raw["teachers"][0]["net"]
    with pytest.raises(ValueError, match="below student.min_flops_ratio"):
        run_experiment(parse_experiment(raw), tmp_path / "run")


class Interrupt(Exception):
    pass


def test_an_interrupted_stage_resumes_to_the_same_weights(tmp_path: Path) -> None:
    splits = load_splits("digits", seed=0, train_limit=200)
    optim = OptimConfig(epochs=3, batch_size=32, lr=3e-3)

    def make() -> ConvNet:
        set_determinism(0, 1)
        return ConvNet(NetConfig(widths=(8, 16)))

    straight = make()
    fit(straight, splits.train, lambda z, _x, y: cross_entropy(z, y), optim, seed=0)

    calls = 0

    def crash_in_epoch_two(z: torch.Tensor, _x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 9:  # 7 batches per epoch
            raise Interrupt
        return cross_entropy(z, y)

    stage = tmp_path / "stage"
    with pytest.raises(Interrupt):
        fit(make(), splits.train, crash_in_epoch_two, optim, seed=0, stage_dir=stage)
    assert torch.load(stage / "last.pt", weights_only=True)["epoch"] == 1
    resumed = make()
    fit(resumed, splits.train, lambda z, _x, y: cross_entropy(z, y), optim, seed=0, stage_dir=stage)
    assert (stage / "done.pt").is_file()
    assert not (stage / "last.pt").exists()
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_the_report_has_per_class_figures(tiny_run: tuple[Path, dict[str, Any], float]) -> None:
    from verifier.cli import results_markdown

    _, results, _ = tiny_run
    pc = results["per_class"]
    assert set(pc["service_accuracy"]) == {str(i) for i in range(10)}
    for key in ("service_accuracy", "verifier_accuracy", "verifier_fidelity"):
        assert all(v is None or 0 <= v <= 1 for v in pc[key].values())
    md = results_markdown({**results, "wall_seconds": 1.0, "threads": 1}, "fides train x")
    assert "## Per class (test split)" in md
    assert "largest confusions" in md


def test_a_label_changing_flip_shows_in_the_confusions() -> None:
    """Issue 26: 41% of a service's errors were the mirror-image class; the overall accuracy
    hid it. Two mirror classes mixed half the time top the confusions, and their accuracy."""
    from verifier.pipeline import per_class_report

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 2000)
    service = y.copy()
    mirrored = (y == 1) & (rng.random(2000) < 0.5)
    service[mirrored] = 3  # "b" read as "d"
    noise = rng.random(2000) < 0.02
    service[noise] = rng.integers(0, 4, int(noise.sum()))
    verifier = service.copy()
    pc = per_class_report(y, service, verifier, ["a", "b", "c", "d"])
    top = pc["service_confusions"][0]
    assert (top["true"], top["predicted"]) == ("b", "d")
    assert top["share_of_errors"] > 0.8
    assert pc["service_accuracy"]["b"] < 0.6 < pc["service_accuracy"]["a"]
    assert pc["verifier_fidelity"]["b"] == 1.0
    assert pc["verifier_confusions"] == []


def test_a_changed_test_limit_retrains_no_stage() -> None:
    """``data.test_limit`` picks test images only (after the train / validation split): a run
    that evaluates on more or fewer test images trains exactly what it trained before, so it
    must reuse every stage, not retrain them all under new keys."""
    from verifier.pipeline import stage_inputs

    exp = tiny_experiment()
    fewer = exp.model_copy(update={"data": exp.data.model_copy(update={"test_limit": 100})})
    d = exp.data
    a, b = (
        load_splits(
            "digits", seed=0, train_limit=d.train_limit, test_limit=n, test_fraction=d.test_fraction
        )
        for n in (d.test_limit, 100)
    )
    assert torch.equal(a.train.x, b.train.x)
    assert torch.equal(a.val.y, b.val.y)
    assert len(a.test) != len(b.test)
    assert stage_keys(fewer) == stage_keys(exp)
    assert stage_inputs(fewer, "digits") == stage_inputs(exp, "digits")

"""`fides train` / `fides evaluate` from the command line: results files, exported models,
clear errors, progress in the log."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from fides.cli import app
from tests.verifier.test_evaluate import DETECTOR
from tests.verifier.test_pipeline import tiny_experiment


def test_train_writes_results_and_models(tmp_path: Path) -> None:
    exp = tmp_path / "tiny.yaml"
    exp.write_text(yaml.safe_dump(tiny_experiment().model_dump(mode="json")), encoding="utf-8")
    results = tmp_path / "out" / "verifier_digits.json"
    args = ["train", str(exp), "--run-dir", str(tmp_path / "run"), "--results", str(results)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    data = json.loads(results.read_text(encoding="utf-8"))
    assert data["command"] == f"fides train {exp}"
    assert data["student"]["test_accuracy"] > 0.5
    md = results.with_suffix(".md").read_text(encoding="utf-8")
    assert "| service student" in md
    assert "## GDTL path" in md
    for name in ("digits", "digits_verifier"):
        assert (tmp_path / "run" / "repository" / name / "1" / "model.onnx").is_file()


def test_train_reports_a_bad_experiment(tmp_path: Path) -> None:
    exp = tmp_path / "bad.yaml"
    exp.write_text("name: x\nepochs: 3\n", encoding="utf-8")
    out = CliRunner().invoke(app, ["train", str(exp)])
    assert out.exit_code == 2
    assert "unknown key 'epochs'" in out.output


def test_evaluate_logs_every_epoch_of_every_stage_without_a_terminal(tmp_path: Path) -> None:
    """Output to a file or CI (CliRunner's stderr is no terminal): no progress bars, but one
    log line per epoch of each training stage, with the epoch, the loss and the seconds."""
    raw = tiny_experiment().model_dump(mode="json")
    raw["verifier"]["candidates"] = raw["verifier"]["candidates"][:1]
    raw["detector"] = {
        **DETECTOR,
        "gan": {"epochs": 2, "batch_size": 64},
        "reclassifier_epochs": 2,
        "fgsm_epsilons": [0.1],
    }
    exp = tmp_path / "tiny.yaml"
    exp.write_text(yaml.safe_dump(raw), encoding="utf-8")
    args = ["evaluate", str(exp), "--run-dir", str(tmp_path / "run"), "--out"]
    out = CliRunner().invoke(app, [*args, str(tmp_path / "report.json")])
    assert out.exit_code == 0, out.output
    lines = out.stderr.splitlines()
    stages = {
        "teacher 0": 4,
        "student (KD)": 4,
        "verifier 0 pretrain": 1,
        "verifier 0 step 0": 2,
        "GAN": 2,
        "detector fine-tuning": 1,
        "re-classifier": 2,
        "substitute tiny": 1,
    }
    for stage, epochs in stages.items():
        pattern = re.compile(
            rf" {re.escape(stage)} epoch (\d+)/{epochs}: .*loss \d+\.\d+.* \(\d+\.\d+s\)$"
        )
        seen = [int(m.group(1)) for line in lines if (m := pattern.search(line))]
        assert seen == list(range(1, epochs + 1)), (stage, out.stderr)
    assert "\r" not in out.stderr  # no progress bar redrawing itself
    assert (tmp_path / "report.json").is_file()


def test_train_help_names_the_run_directory_the_code_uses() -> None:
    """Issue 26: the help said runs/<name>-<config hash>; the code uses runs/<name>."""
    from typer.testing import CliRunner

    from fides.cli import app
    from verifier.cli import default_run_dir
    from verifier.defaults import digits_default

    assert default_run_dir(digits_default()) == Path("runs") / "digits"
    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "default runs/<name>." in out
    assert "config hash" not in out


def test_a_copied_experiment_on_new_grouped_data_runs_from_anywhere(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Issue 26, done-when: a copy of a shipped experiment pointed at a new npz with a group
    key runs end to end from another directory and reports per-class figures."""
    from tests.verifier.test_data import _grouped_npz

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    _grouped_npz(project / "data" / "objects.npz")
    raw = tiny_experiment().model_dump(mode="json")
    raw["name"] = "objects"
    raw["data"] = {
        "source": "npz",
        "path": "../data/objects.npz",  # relative to the experiment file
        "group_key": "groups",
        "val_fraction": 0.2,
        "augment": {"crop_padding": 1},
    }
    raw["teachers"][0]["net"]["widths"] = [32, 64, 128]
    raw["student"]["net"]["widths"] = [16, 32, 64]
    raw["verifier"]["candidates"] = [{"widths": [4, 8, 16]}]
    raw["export"] = {**raw["export"], "service_name": "objects", "verifier_name": "objects_v"}
    (project / "experiments").mkdir()
    exp = project / "experiments" / "objects.yaml"
    exp.write_text(yaml.safe_dump(raw), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = CliRunner().invoke(app, ["train", str(exp), "--results", "r.json"])
    assert out.exit_code == 0, out.output
    data = json.loads((elsewhere / "r.json").read_text(encoding="utf-8"))
    assert data["dataset"]["validation_split"] == "by group (groups)"
    assert set(data["per_class"]["service_accuracy"]) == {"0", "1", "2", "3"}
    assert "## Per class (test split)" in (elsewhere / "r.md").read_text(encoding="utf-8")
    assert (elsewhere / "runs" / "objects" / "repository" / "objects" / "1").is_dir()

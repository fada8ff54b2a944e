"""`fides train` from the command line: results files, exported models, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from fides.cli import app
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

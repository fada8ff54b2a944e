"""`fides bench cost-quality` (issue 20): one verifier and detector per FLOPs share of the
service, from the one trained service, in a table; the experiment's own results untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fides.cli import app
from tests.verifier.test_evaluate import DETECTOR
from tests.verifier.test_pipeline import tiny_experiment
from verifier.cost_quality import candidate_at_share, cost_quality, table_markdown
from verifier.experiment import ExperimentError, NetSpec
from verifier.flops import count_flops
from verifier.nets import ConvNet
from verifier.pipeline import experiment_splits, net_config, run_experiment


def test_each_share_gets_the_widest_verifier_under_it() -> None:
    exp = tiny_experiment()
    splits = experiment_splits(exp)

    def flops_of(spec: NetSpec) -> int:
        return count_flops(ConvNet(net_config(spec, splits)), splits.image_shape)

    service = flops_of(exp.student.net)
    spec = NetSpec(widths=[8, 16, 32])
    last = 0
    for share in (0.1, 0.25, 0.5, 1.0):
        got = candidate_at_share(spec, flops_of, service, share)
        assert flops_of(got) <= share * service
        wider = got.model_copy(update={"widths": [w + 1 for w in got.widths]})
        assert flops_of(wider) > share * service  # nothing much wider would have fitted
        assert flops_of(got) > last
        last = flops_of(got)
    capped = candidate_at_share(spec, flops_of, service, 1.0, cap=list(exp.student.net.widths))
    assert all(w <= c for w, c in zip(capped.widths, exp.student.net.widths, strict=True))
    with pytest.raises(ExperimentError, match="no width factor"):
        candidate_at_share(spec, flops_of, service, 1e-6)


def test_the_sweep_trains_one_service_and_a_verifier_per_share(tmp_path: Path) -> None:
    exp = tiny_experiment(detector=DETECTOR)
    run_dir = tmp_path / "run"
    run_experiment(exp, run_dir)
    before = json.loads((run_dir / "results.json").read_text())["verifier"]
    result = cost_quality(exp, run_dir, [0.1, 0.5])
    assert [r["share"] for r in result["rows"]] == [0.1, 0.5]
    for row in result["rows"]:
        assert 0 < row["flops_ratio_to_service"] <= row["share"]
        assert 0 <= row["test_fidelity_top1"] <= 1
        assert set(row["per_attack_detection"]) == set(row["mean_detection_attacks"])
        assert row["fgsm"]  # TPR at 1% FPR per FGSM budget
    small, large = result["rows"]
    assert small["flops"] < large["flops"]
    # the service was trained once: each share's directory links the experiment's stages
    for share in ("0.1", "0.5"):
        links = [
            p for p in (run_dir / "cost_quality" / f"share_{share}").iterdir() if p.is_symlink()
        ]
        assert {p.name.split("-")[0] for p in links} >= {"teacher_0", "student"}
    # the experiment's own results are still those of its configured verifier
    after = json.loads((run_dir / "results.json").read_text())["verifier"]
    assert (after["widths"], after["test_fidelity_top1"]) == (
        before["widths"],
        before["test_fidelity_top1"],
    )
    header, separator, *rows = table_markdown(result)
    assert "fidelity" in header
    assert separator.startswith("|---")
    assert len(rows) == 2


def test_bad_shares_are_named(tmp_path: Path) -> None:
    runner = CliRunner()
    exp = Path(__file__).parents[2] / "experiments" / "digits.yaml"
    got = runner.invoke(app, ["bench", "cost-quality", str(exp), "--shares", "a,b"])
    assert got.exit_code == 2
    assert "--shares 'a,b'" in got.output
    got = runner.invoke(
        app,
        ["bench", "cost-quality", str(exp), "--shares", "0,1.5", "--run-dir", str(tmp_path)],
    )
    assert got.exit_code == 2
    assert "shares must be in (0, 1]" in got.output


def test_the_command_writes_the_table(tmp_path: Path) -> None:
    exp = tiny_experiment(detector=DETECTOR)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(exp.model_dump(mode="json")), encoding="utf-8")
    out = tmp_path / "cq.json"
    got = CliRunner().invoke(
        app,
        ["bench", "cost-quality", str(spec), "--shares", "0.5", "--run-dir", str(tmp_path / "r")]
        + ["--output", str(out)],
    )
    assert got.exit_code == 0, got.output
    result = json.loads(out.read_text())
    assert result["complete"] is True
    assert result["command"].endswith("--shares 0.5")
    assert [r["share"] for r in result["rows"]] == [0.5]
    assert "| FLOPs share |" in out.with_suffix(".md").read_text()


def test_the_configured_verifier_stands_for_its_share_without_retraining(tmp_path: Path) -> None:
    exp = tiny_experiment(detector=DETECTOR)
    first = run_experiment(exp, tmp_path / "probe").report
    share = first["verifier"]["flops"] / first["student"]["flops"]  # the configured one's
    # the experiment's own FLOPs ceiling is that share: the sweep's row for it must keep the
    # verifier stage's settings (and so its directory), not raise the ceiling by a hair
    exp = exp.model_copy(
        update={"verifier": exp.verifier.model_copy(update={"max_flops_ratio": share})}
    )
    run_dir = tmp_path / "run"
    own = run_experiment(exp, run_dir).report["verifier"]
    (row,) = cost_quality(exp, run_dir, [share])["rows"]
    assert row["widths"] == own["widths"]
    assert row["test_fidelity_top1"] == own["test_fidelity_top1"]
    share_dir = run_dir / "cost_quality" / f"share_{share:g}"
    # its verifier stage is the experiment's own, linked: nothing was trained again
    verifiers = list(share_dir.glob("verifier-*"))
    assert verifiers
    assert all(v.is_symlink() for v in verifiers)

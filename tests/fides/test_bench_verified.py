"""``fides bench integrity --part cost``: verified against unverified answers through a real
gateway process and its real (simulated) enclave, on the session's trained digits repository;
about a second per cell. What it measures is not asserted (timings belong to bench/results),
only that every number is there, comes from verified answers, and adds up."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from fides.bench.verified import (
    UNVERIFIED_SUFFIX,
    BenchSetupError,
    integrity_models,
    markdown,
    prepare_repository,
    run_verified_bench,
)
from tests.integrity_factory import Digits


def test_prepare_repository_copies_the_kit_and_an_unverified_twin(
    trained_repository: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    source = trained_repository[0]
    target = tmp_path / "repo"
    prepare_repository(source, target, ["digits"])
    config = yaml.safe_load((source / "digits" / "config.yaml").read_text())
    needed = integrity_models(config)
    assert {"digits_verifier", "digits_detector", "digits_reclassifier"} <= set(needed)
    assert {p.name for p in target.iterdir()} == {"digits", f"digits{UNVERIFIED_SUFFIX}", *needed}
    twin = yaml.safe_load((target / f"digits{UNVERIFIED_SUFFIX}" / "config.yaml").read_text())
    assert "integrity" not in twin
    assert twin.get("name", f"digits{UNVERIFIED_SUFFIX}") == f"digits{UNVERIFIED_SUFFIX}"
    assert {k: v for k, v in twin.items() if k != "name"} == {
        k: v for k, v in config.items() if k not in ("name", "integrity")
    }
    # the same weights: the comparison is of verification, not of two models
    assert (target / f"digits{UNVERIFIED_SUFFIX}" / "1" / "model.onnx").read_bytes() == (
        source / "digits" / "1" / "model.onnx"
    ).read_bytes()


def test_prepare_repository_names_what_is_missing(
    trained_repository: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    source = tmp_path / "source"
    shutil.copytree(trained_repository[0], source)
    with pytest.raises(BenchSetupError, match="no model 'nope'"):
        prepare_repository(source, tmp_path / "a", ["nope"])
    with pytest.raises(BenchSetupError, match="has no integrity: block"):
        prepare_repository(source, tmp_path / "b", ["digits_verifier"])
    shutil.rmtree(source / "digits_detector")
    with pytest.raises(BenchSetupError, match="needs 'digits_detector'"):
        prepare_repository(source, tmp_path / "c", ["digits"])


@pytest.mark.e2e
@pytest.mark.slow
def test_cost_bench_smoke(
    trained_repository: tuple[Path, dict[str, Any]], digits: Digits, tmp_path: Path
) -> None:
    output = tmp_path / "results" / "verification_cost_smoke.json"
    logged: list[str] = []
    doc = run_verified_bench(
        trained_repository[0],
        {"digits": digits.images},
        output,
        lambda *parts: logged.append(" ".join(str(p) for p in parts)),
        concurrency=(1, 4),
        duration_s=1.0,
        warmup_s=0.3,
        repeats=1,
        samples=64,
    )
    assert json.loads(output.read_text()) == json.loads(json.dumps(doc))
    r = doc["models"]["digits"]
    assert [row["concurrency"] for row in r["rows"]] == [1, 4]
    for row in r["rows"]:
        assert row["unverified_rps"] > 0, row
        assert row["verified_rps"] > 0, row
        assert row["errors"] == 0, row
        assert row["answers_not_verified"] == 0, row  # typical digits: every answer verified
        assert row["verified_p50_ms"] <= row["verified_p99_ms"], row
    b = r["breakdown_c1"]
    cell = r["cells"]["verified"]["1"]
    assert b["verdicts"]["verified"] + b["verdicts"]["attack"] >= cell["requests"] > 0
    for stage in ("service", "enclave", "judge", "monitor"):
        assert b["stages_us"][stage] is not None, stage
        assert b["stages_us"][stage] >= 0, stage
    assert b["stages_us"]["reclassify"] is None  # typical digits: nothing flagged
    assert b["unverified_reasons"] == {}
    for part in ("batching", "round_trip", "check"):
        assert b["enclave_us"][part] is not None, part
        assert b["enclave_us"][part] > 0, part
    assert b["batchers"]["service"]["compute_us"] > 0
    assert b["batchers"]["detector"]["model"] == "digits_detector"
    w = r["enclave_work"]
    assert 0 < w["verifier_ort_us"] < w["core_verify_us"]
    assert w["signature_us"] > 0
    # the unverified cells really went to the copy without integrity
    assert r["cells"]["unverified"]["1"]["mode"] == "unverified"
    table = output.with_suffix(".md").read_text()
    assert table.strip() == markdown(doc).strip()
    assert "| 1 |" in table
    assert "| · · signature |" in table
    assert any("c=4" in line and "verified" in line for line in logged)

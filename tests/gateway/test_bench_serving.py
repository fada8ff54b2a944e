"""Smoke test of ``fides bench serving``: a tiny model, about a second per cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fides.bench.serving import run_serving_bench
from tests.model_factory import TINY_CONFIG, tiny_classifier, write_config

MODES = {"raw_ort", "raw_ort_batcher", "gateway_json", "gateway_binary", "gateway_grpc"}


@pytest.mark.e2e
@pytest.mark.slow
def test_serving_bench_smoke(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_config(repo / "tiny", TINY_CONFIG)
    tiny_classifier(repo / "tiny" / "1" / "model.onnx")
    # another model that can never be ready (its version holds no artefact): the bench serves
    # the model it measures alone, so this one does not hold the gateway's readiness back
    write_config(repo / "unready", TINY_CONFIG)
    (repo / "unready" / "1").mkdir(parents=True)
    output = tmp_path / "results" / "serving.json"
    logged: list[str] = []

    doc = run_serving_bench(
        repo,
        "tiny",
        output,
        1.0,
        lambda *parts: logged.append(" ".join(str(p) for p in parts)),
        concurrencies=(1, 4),
        warmup_s=0.3,
    )

    on_disk = json.loads(output.read_text())
    assert on_disk["cells"] == doc["cells"]
    assert {"cpu_model", "usable_cores", "python", "onnxruntime"} <= set(on_disk["machine"])
    model = on_disk["model"]
    assert model["name"] == "tiny"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "request_shape": [1, 4]}]
    assert model["single_sample_ms"]["p50"] > 0
    assert model["batch_profile"][-1]["batch"] == TINY_CONFIG["max_batch_size"]

    cells = on_disk["cells"]
    assert {(c["mode"], c["concurrency"]) for c in cells} == {(m, c) for m in MODES for c in (1, 4)}
    for cell in cells:
        assert cell["throughput_rps"] > 0, cell
        assert cell["errors"] == 0, cell
        assert 0 < cell["p50_ms"] <= cell["p99_ms"], cell
        assert cell["mean_batch"] is not None, cell
        assert cell["mean_batch"] >= 1, cell
    # the gateway batched concurrent requests (max_batch_size 16, 2 ms queue delay)
    gw4 = [c for c in cells if c["mode"].startswith("gateway") and c["concurrency"] == 4]
    assert all(c["mean_batch"] > 1 for c in gw4), gw4
    for conc in ("1", "4"):
        assert set(on_disk["ratios"][conc]) == MODES - {"raw_ort"}
    assert set(on_disk["goal"]) >= {"target", "json_ratio", "binary_ratio", "grpc_ratio", "met"}

    table = output.with_suffix(".md").read_text()
    assert "| gateway_binary | 4 |" in table
    assert "| gateway_grpc | 4 |" in table
    assert any(line.startswith("| mode |") for line in logged)

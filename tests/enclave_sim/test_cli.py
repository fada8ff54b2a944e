"""``fides enclave`` commands (run in-process with typer's runner; ``run`` is tested as a real
process in test_protocol.py and test_sealing.py)."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
from typer.testing import CliRunner

from enclave_sim.cli import enclave_app
from enclave_sim.pki import ROOT_CERT
from enclave_sim.sealing import unseal
from fides.bench.enclave import markdown_table, run_enclave_bench
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.measurement import measure
from tests.model_factory import tiny_classifier

runner = CliRunner()


def test_init_ca_measure_seal(tmp_path: Path) -> None:
    platform = tmp_path / "platform"
    model = tmp_path / "v.onnx"
    tiny_classifier(model)
    config = tmp_path / "verifier.yaml"
    config.write_text("outputs: [probabilities]\nmax_batch_size: 8\n")

    done = runner.invoke(enclave_app, ["init-ca", "--platform-dir", str(platform)])
    assert done.exit_code == 0, done.output
    assert (platform / ROOT_CERT).is_file()
    again = runner.invoke(enclave_app, ["init-ca", "--platform-dir", str(platform)])
    assert again.exit_code == 2
    assert "--force" in again.output

    expected = measure(model.read_bytes(), EnclaveModelConfig.load(config))
    done = runner.invoke(enclave_app, ["measure", "--model", str(model), "--config", str(config)])
    assert done.exit_code == 0, done.output
    assert done.output.strip() == expected.hex
    done = runner.invoke(
        enclave_app, ["measure", "--model", str(model), "--config", str(config), "--json"]
    )
    assert json.loads(done.output)["pcr0"] == expected.hex

    sealed = tmp_path / "v.sealed"
    done = runner.invoke(
        enclave_app,
        [
            "seal",
            "--model",
            str(model),
            "--config",
            str(config),
            "--output",
            str(sealed),
            "--platform-dir",
            str(platform),
            "--version",
            "3",
        ],
    )
    assert done.exit_code == 0, done.output
    assert expected.hex in done.output
    assert sealed.stat().st_mode & 0o077 == 0
    opened = unseal(sealed.read_bytes(), platform)
    assert opened.version == 3
    assert opened.config.outputs == ("probabilities",)


def test_bad_config_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "v.onnx"
    tiny_classifier(model)
    config = tmp_path / "verifier.yaml"
    config.write_text("max_batchsize: 8\n")  # typo: must not silently measure as default
    done = runner.invoke(enclave_app, ["measure", "--model", str(model), "--config", str(config)])
    assert done.exit_code == 2
    assert "unknown keys" in done.output


def test_bench_smoke(tmp_path: Path) -> None:
    """The benchmark end to end on the tiny model with a token duration (numbers unchecked)."""
    model = tmp_path / "v.onnx"
    # the bench feeds [1, width] rows; the tiny classifier takes [N, 4]
    tiny_classifier(model)
    lines: list[str] = []
    out = tmp_path / "enclave.json"
    report = run_enclave_bench(
        out,
        lambda *a, **_: lines.append(" ".join(map(str, a))),
        models={"tiny": model},
        batch_sizes=(1, 4),
        duration_s=0.05,
        warmup=1,
    )
    saved = orjson.loads(out.read_bytes())
    assert saved["summary"] == report["summary"]
    assert [(s["model"], s["batch"]) for s in saved["summary"]] == [("tiny", 1), ("tiny", 4)]
    for s in saved["summary"]:
        assert s["socket_enclave_us"] > 0
        assert 0 <= s["overhead_share"] <= 1 or s["overhead_us"] < 0
    assert any(line.startswith("| model |") for line in lines)
    assert markdown_table(report["summary"])[2].startswith("| tiny | 1 |")

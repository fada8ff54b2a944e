"""``fides enclave seal --model-name NAME``: a file sealed from the command line is checked
against that model's rollback counter (``platform_dir/model_counters/NAME``), as the gateway
seals (``gateway.integrity.enclave.enclave_for_model``: ``seal(..., model_id=model)``).

Before, the command could not name the model: every file sealed from it shared the
platform-wide counter (``platform_dir/model_counter``), so sealing and booting a newer file of
model "b" refused model "a"'s own, older-numbered file (RollbackRejected) although nothing of
"a" had been rolled back."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import enclave_sim.cli as enclave_cli
from enclave_sim.cli import enclave_app
from enclave_sim.pki import init_ca
from enclave_sim.sealing import COUNTER_DIR, COUNTER_FILE, read_counter, unseal
from fides_core.enclave_errors import RollbackRejected
from gateway.errors import BadRequest
from gateway.repository import validate_model_name
from tests.model_factory import tiny_classifier

runner = CliRunner()


@pytest.fixture
def platform(tmp_path: Path) -> Path:
    init_ca(tmp_path / "platform")
    return tmp_path / "platform"


@pytest.fixture
def verifier(tmp_path: Path) -> Path:
    tiny_classifier(tmp_path / "v.onnx")
    return tmp_path / "v.onnx"


def _seal(platform: Path, verifier: Path, output: Path, *extra: str) -> str:
    done = runner.invoke(
        enclave_app,
        [
            "seal",
            "--model",
            str(verifier),
            "--output",
            str(output),
            "--platform-dir",
            str(platform),
            *extra,
        ],
    )
    assert done.exit_code == 0, done.output
    return done.output


def test_each_named_file_boots_against_its_own_models_counter(
    platform: Path, verifier: Path, tmp_path: Path
) -> None:
    a1, b1 = tmp_path / "a1.sealed", tmp_path / "b1.sealed"
    _seal(platform, verifier, a1, "--model-name", "a")
    assert "model 'b'" in _seal(platform, verifier, b1, "--model-name", "b")
    assert unseal(a1.read_bytes(), platform).version == 1  # "a" then "b" sealed, "a" boots
    assert (platform / COUNTER_DIR / "a").read_text().strip() == "1"
    assert unseal(b1.read_bytes(), platform).version == 1
    # "b" moves on: a newer file, booted
    b2 = tmp_path / "b2.sealed"
    _seal(platform, verifier, b2, "--model-name", "b")
    assert unseal(b2.read_bytes(), platform).version == 2
    # "a" still restarts from its own file (with one shared counter: RollbackRejected)
    assert unseal(a1.read_bytes(), platform).version == 1
    assert read_counter(platform, "a") == 1
    assert read_counter(platform, "b") == 2


def test_a_rollback_is_still_refused_per_model(
    platform: Path, verifier: Path, tmp_path: Path
) -> None:
    old, new, other = tmp_path / "a1.sealed", tmp_path / "a2.sealed", tmp_path / "b.sealed"
    _seal(platform, verifier, old, "--model-name", "a")
    unseal(old.read_bytes(), platform)
    _seal(platform, verifier, other, "--model-name", "b")
    version_b = unseal(other.read_bytes(), platform).version
    _seal(platform, verifier, new, "--model-name", "a")
    assert unseal(new.read_bytes(), platform).version == 2
    with pytest.raises(RollbackRejected, match=r"older than model 'a''s counter 2"):
        unseal(old.read_bytes(), platform)
    # "b"'s counter is its own: "a"'s newer version does not refuse it, nor does "b" reset "a"
    assert unseal(other.read_bytes(), platform).version == version_b
    with pytest.raises(RollbackRejected):
        unseal(old.read_bytes(), platform)


def test_a_named_file_sealed_before_other_models_boot_newer_versions_still_boots(
    platform: Path, verifier: Path, tmp_path: Path
) -> None:
    """Model b sealed at version 1, then a sealed and booted at versions 1 and 2 (raising the
    platform-wide counter to 2) before b ever boots: b's first boot is not a rollback."""
    b1 = tmp_path / "b1.sealed"
    _seal(platform, verifier, b1, "--model-name", "b")
    assert read_counter(platform, "b") == 0  # its own counter, fixed at sealing
    for name in ("a1", "a2"):
        _seal(platform, verifier, tmp_path / f"{name}.sealed", "--model-name", "a")
        unseal((tmp_path / f"{name}.sealed").read_bytes(), platform)
    assert read_counter(platform) == 2
    assert unseal(b1.read_bytes(), platform).version == 1
    assert read_counter(platform, "b") == 1


def test_without_a_name_the_platform_wide_counter(
    platform: Path, verifier: Path, tmp_path: Path
) -> None:
    """Backward compatible: an unnamed file is checked against ``model_counter``, as before;
    the help says so."""
    sealed = tmp_path / "v.sealed"
    assert "platform-wide counter" in _seal(platform, verifier, sealed)
    assert unseal(sealed.read_bytes(), platform).version == 1
    assert (platform / COUNTER_FILE).read_text().strip() == "1"
    assert not (platform / COUNTER_DIR).exists()
    help_text = " ".join(runner.invoke(enclave_app, ["seal", "--help"]).output.split())
    assert "--model-name" in help_text
    assert "platform-wide counter" in help_text


BAD_NAMES = ["", "..", "a..b", "../a", "a/b", "-a", ".a", "_a", "a b", "ünï", "x" * 129]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_the_gateway_cannot_serve_is_refused(
    platform: Path, verifier: Path, tmp_path: Path, name: str
) -> None:
    output = tmp_path / "v.sealed"
    done = runner.invoke(
        enclave_app,
        [
            "seal",
            "--model",
            str(verifier),
            "--output",
            str(output),
            "--platform-dir",
            str(platform),
            "--model-name",
            name,
        ],
    )
    assert done.exit_code == 2, done.output
    said = " ".join(done.output.replace("\u2502", " ").split())  # less rich's box
    assert "is not a model name the gateway serves" in said
    assert repr(name[:20]) in said
    assert not output.exists()
    assert not (platform / COUNTER_DIR).exists()


@pytest.mark.parametrize("name", [*BAD_NAMES, "a", "digits", "Model_1.v-2", "9", "x" * 128])
def test_the_name_rule_is_the_gateways(name: str) -> None:
    """The enclave's sealing and the gateway's serving take the same names (one rule, in
    fides_core.layout)."""
    try:
        validate_model_name(name)
        gateway_serves = True
    except BadRequest:
        gateway_serves = False
    try:
        enclave_cli._model_name(name)
        enclave_seals = True
    except typer.BadParameter:
        enclave_seals = False
    assert enclave_seals is gateway_serves

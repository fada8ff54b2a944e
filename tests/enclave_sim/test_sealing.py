"""Measurement and sealing: the sealed model opens only for the measured code on its platform."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from enclave_sim.pki import PLATFORM_SECRET, init_ca
from enclave_sim.sealing import COUNTER_FILE, read_counter, seal, unseal
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import (
    PlatformError,
    RollbackRejected,
    SealedFileMalformed,
    SealedFileTampered,
    SealedForOtherMeasurement,
    SealError,
)
from fides_core.measurement import CODE_ROOT, code_files, measure
from tests.enclave_sim.helpers import EnclaveFiles, copy_enclave_code, run_cli


def test_measurement_is_deterministic_and_covers_code_model_config(files: EnclaveFiles) -> None:
    model = files.model_bytes
    a = measure(model, files.config)
    assert a == measure(model, files.config) == files.measurement
    assert len(a.pcr0) == len(a.pcr1) == len(a.pcr2) == 48
    assert measure(model + b"\0", files.config).pcr0 != a.pcr0
    assert measure(model, EnclaveModelConfig(max_batch_size=8)).pcr0 != a.pcr0
    # defaults spelled out measure the same as no config
    assert measure(model, EnclaveModelConfig()) == measure(
        model, EnclaveModelConfig.from_dict({"max_batch_size": 64, "intra_op_threads": 1})
    )
    names = [p.relative_to(CODE_ROOT).as_posix() for p in code_files()]
    assert {"enclave_sim/core.py", "enclave_sim/server.py", "fides_core/verify.py"} <= set(names)
    assert names == sorted(names)
    assert not any(n.startswith(("gateway/", "fides/")) for n in names)  # host side


def test_modified_code_file_changes_the_measurement(files: EnclaveFiles, tmp_path: Path) -> None:
    code = copy_enclave_code(tmp_path / "copy")
    assert measure(files.model_bytes, files.config, code) == files.measurement
    with (code / "enclave_sim" / "core.py").open("a") as f:
        f.write("\n# a backdoor would go here\n")
    changed = measure(files.model_bytes, files.config, code)
    assert changed.pcr1 != files.measurement.pcr1
    assert changed.pcr0 != files.measurement.pcr0
    assert changed.pcr2 == files.measurement.pcr2


def test_seal_roundtrip_and_counter(files: EnclaveFiles) -> None:
    opened = unseal(files.sealed_path.read_bytes(), files.platform_dir)
    assert opened.model == files.model_bytes
    assert opened.config == files.config
    assert opened.version == 1
    assert opened.measurement == files.measurement
    assert read_counter(files.platform_dir) == 1


def test_every_flipped_byte_is_refused(files: EnclaveFiles) -> None:
    data = files.sealed_path.read_bytes()
    codes = set()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(SealError) as info:
            unseal(bytes(bad), files.platform_dir)
        codes.add(type(info.value))
    # magic/format -> malformed, measurement fields -> other measurement, the rest -> tampered
    assert codes == {SealedFileMalformed, SealedForOtherMeasurement, SealedFileTampered}


def test_truncated_and_extended_files_are_refused(files: EnclaveFiles) -> None:
    data = files.sealed_path.read_bytes()
    for bad in (b"", data[:10], data[:-1], data + b"\0"):
        with pytest.raises(SealError):
            unseal(bad, files.platform_dir)


def test_sealed_for_another_measurement(files: EnclaveFiles, tmp_path: Path) -> None:
    code = copy_enclave_code(tmp_path / "copy")
    (code / "enclave_sim" / "server.py").write_text(
        (code / "enclave_sim" / "server.py").read_text() + "\n# changed\n"
    )
    other, _, _ = seal(files.model_bytes, files.config, files.platform_dir, code_root=code)
    with pytest.raises(SealedForOtherMeasurement, match="sealed for measurement"):
        unseal(other, files.platform_dir)
    # and this build's file does not open under the modified code either
    with pytest.raises(SealedForOtherMeasurement):
        unseal(files.sealed_path.read_bytes(), files.platform_dir, code_root=code)


def test_sealed_on_another_platform(files: EnclaveFiles, tmp_path: Path) -> None:
    other = tmp_path / "other-platform"
    init_ca(other)
    with pytest.raises(SealedFileTampered, match="another platform"):
        unseal(files.sealed_path.read_bytes(), other)


def test_rollback_is_refused(files: EnclaveFiles) -> None:
    old = files.sealed_path.read_bytes()  # version 1
    unseal(old, files.platform_dir)  # booted once: the counter is 1
    new, _, version = seal(files.model_bytes, files.config, files.platform_dir)
    assert version == 2
    unseal(new, files.platform_dir)
    assert read_counter(files.platform_dir) == 2
    with pytest.raises(RollbackRejected, match="older than the platform counter"):
        unseal(old, files.platform_dir)
    # the same version again is fine (a reboot), and the counter never goes down
    unseal(new, files.platform_dir)
    assert (files.platform_dir / COUNTER_FILE).read_text().strip() == "2"


def test_platform_secret_with_open_permissions_is_refused(files: EnclaveFiles) -> None:
    os.chmod(files.platform_dir / PLATFORM_SECRET, 0o644)
    with pytest.raises(PlatformError, match="0600"):
        unseal(files.sealed_path.read_bytes(), files.platform_dir)


def test_init_ca_refuses_to_overwrite(files: EnclaveFiles) -> None:
    with pytest.raises(PlatformError, match="--force"):
        init_ca(files.platform_dir)


def test_boot_refuses_tampered_file_with_a_clear_error(files: EnclaveFiles, tmp_path: Path) -> None:
    data = bytearray(files.sealed_path.read_bytes())
    data[-5] ^= 0xFF
    bad = tmp_path / "bad.sealed"
    bad.write_bytes(bytes(data))
    done = run_cli(
        "run",
        "--socket",
        str(tmp_path / "never.sock"),
        "--sealed-model",
        str(bad),
        "--platform-dir",
        str(files.platform_dir),
    )
    assert done.returncode == 2, done.stderr
    assert "SIMULATED ENCLAVE" in done.stderr
    assert "failed authentication" in done.stderr
    assert not (tmp_path / "never.sock").exists()


def test_boot_refuses_modified_enclave_code(files: EnclaveFiles, tmp_path: Path) -> None:
    """A modified enclave (a copy of the package with one code file changed) cannot open the
    model sealed for the original measurement."""
    root = tmp_path / "modified"
    code = copy_enclave_code(root)
    (code / "enclave_sim" / "core.py").write_text(
        (code / "enclave_sim" / "core.py").read_text() + "\n# modified\n"
    )
    done = run_cli(
        "run",
        "--socket",
        str(tmp_path / "never.sock"),
        "--sealed-model",
        str(files.sealed_path),
        "--platform-dir",
        str(files.platform_dir),
        pythonpath=root,
    )
    assert done.returncode == 2, done.stderr
    assert "sealed for measurement" in done.stderr

"""Fixtures: a tiny verifier sealed on a fresh simulated platform, in-process cores, and one
shared enclave process per module for the socket tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from enclave_sim.core import EnclaveCore
from enclave_sim.pki import PlatformIdentity, create_identity, load_identity
from tests.enclave_sim.helpers import (
    EnclaveFiles,
    RunningEnclave,
    make_enclave_files,
    running_enclave,
    short_tmpdir,
)


@pytest.fixture
def files(tmp_path: Path) -> EnclaveFiles:
    return make_enclave_files(tmp_path / "enclave")


@pytest.fixture(scope="module")
def module_files(tmp_path_factory: pytest.TempPathFactory) -> EnclaveFiles:
    return make_enclave_files(tmp_path_factory.mktemp("enclave"))


@pytest.fixture(scope="module")
def identity() -> PlatformIdentity:
    return create_identity()[1]


@pytest.fixture(scope="module")
def core(module_files: EnclaveFiles) -> EnclaveCore:
    """An in-process enclave booted like the real one (unseal, measure, load)."""
    return EnclaveCore.boot(module_files.sealed_path, module_files.platform_dir)


@pytest.fixture(scope="module")
def enclave(module_files: EnclaveFiles) -> Iterator[RunningEnclave]:
    """One real enclave process for the module; stopped by pid at the end."""
    with short_tmpdir() as d, running_enclave(module_files, d / "e.sock") as running:
        yield running


@pytest.fixture(scope="module")
def platform_identity(module_files: EnclaveFiles) -> PlatformIdentity:
    return load_identity(module_files.platform_dir)

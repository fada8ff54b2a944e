"""The code measured is the code that runs: a boot with a module of ``enclave_sim`` or
``fides_core`` loaded from outside the measured tree is refused (``CodeNotMeasured``).

``python -m enclave_sim.cli`` puts its working directory first on ``sys.path``: an
``enclave_sim/`` there ran instead of the measured one, and was attested under the measurement
of the files it did not run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

from fides_core import measurement
from fides_core.enclave_errors import BootError
from fides_core.measurement import CODE_ROOT
from tests.enclave_sim.helpers import (
    REPO_ROOT,
    EnclaveFiles,
    enclave_command,
    enclave_env,
    short_tmpdir,
)


def _module(name: str, file: str | None, path: list[str] | None = None) -> ModuleType:
    module = ModuleType(name)
    module.__file__ = file
    if path is not None:
        module.__path__ = path
    return module


def test_this_process_runs_the_measured_code() -> None:
    measurement.check_loaded_code()  # every enclave_sim / fides_core module here is a measured file


def test_a_module_from_outside_the_measured_tree_is_refused(tmp_path: Path) -> None:
    shadow = tmp_path / "enclave_sim" / "core.py"
    with pytest.raises(
        measurement.CodeNotMeasured, match=r"enclave_sim\.core was loaded from .*shadows"
    ):
        measurement.check_loaded_code(
            modules={"enclave_sim.core": _module("enclave_sim.core", str(shadow))}
        )
    assert issubclass(measurement.CodeNotMeasured, BootError)  # the enclave's CLI refuses to start


def test_unmeasured_files_and_search_paths_are_refused(tmp_path: Path) -> None:
    measured = CODE_ROOT / "fides_core" / "__init__.py"
    pyc = CODE_ROOT / "fides_core" / "__pycache__" / "extra.cpython-311.pyc"
    cases = {
        "fides_core.extra": _module("fides_core.extra", str(pyc)),  # bytecode: not hashed
        "fides_core.nofile": _module("fides_core.nofile", None),
        "fides_core": _module("fides_core", str(measured), [str(tmp_path / "fides_core")]),
    }
    for name, module in cases.items():
        with pytest.raises(measurement.CodeNotMeasured, match=name):
            measurement.check_loaded_code(modules={name: module})
    main = _module("__main__", str(tmp_path / "enclave_sim" / "cli.py"))
    main.__spec__ = type("Spec", (), {"name": "enclave_sim.cli"})()  # type: ignore[assignment]
    with pytest.raises(measurement.CodeNotMeasured, match=r"enclave_sim\.cli"):
        measurement.check_loaded_code(modules={"__main__": main})
    measurement.check_loaded_code(modules={"other": _module("other", str(tmp_path / "other.py"))})


def test_a_boot_from_a_directory_shadowing_enclave_sim_is_refused(files: EnclaveFiles) -> None:
    """A copy of ``enclave_sim`` in the working directory of ``python -m enclave_sim.cli``
    (``fides_core`` and CODE_ROOT from the measured tree) refuses to boot, naming the module."""
    with short_tmpdir() as d:
        shadow = d / "cwd"
        shutil.copytree(
            REPO_ROOT / "enclave_sim",
            shadow / "enclave_sim",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        env = enclave_env(REPO_ROOT)  # fides_core from the measured tree
        try:
            done = subprocess.run(
                enclave_command(files, d / "e.sock"),
                cwd=shadow,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,  # it refuses in seconds; the old code served until killed
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("the enclave booted from the shadowing copy instead of refusing")
    assert done.returncode == 2, done.stderr
    assert "not from the measured code" in done.stderr
    assert str(shadow / "enclave_sim") in done.stderr

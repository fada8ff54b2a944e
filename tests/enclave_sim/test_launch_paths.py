"""Every way the enclave is started runs it as the gateway's supervisor does:
:meth:`gateway.enclave_client.EnclaveLaunch.command` (``python -I``, the measured code root
first on ``sys.path``), one function, not a copy.

Before, only the supervisor did. ``fides bench integrity`` started ``python -m
enclave_sim.cli`` with ``PYTHONPATH`` and its working directory, and ``fides enclave run`` (the
enclave container's command in the compose stack and the Helm chart, and the documented
command) ran in the ``fides`` process itself, with its environment: an ``enclave_sim`` on
``PYTHONPATH`` was imported in place of the measured one. The boot check
(``check_loaded_code``) refused that boot; the isolated launch runs the measured code instead.
The container's command itself is checked in tests/deploy/test_enclave_container_launch.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import fides.bench.enclave as bench
from fides.cli import app as fides_app
from fides_core.measurement import CODE_ROOT
from gateway.enclave_client import EnclaveLaunch, SocketEnclaveClient, VerifyRequest
from tests.enclave_sim.helpers import (
    READY_TIMEOUT_S,
    REPO_ROOT,
    make_enclave_files,
    ping_ok,
    short_tmpdir,
    wait_until,
)
from tests.model_factory import tiny_expected
from tests.processes import stop_process


def fides_enclave_exec(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> list[str]:
    """What ``fides ARGS`` replaces itself with (``os.execv`` stopped there)."""
    seen: list[list[str]] = []

    def execv(path: str, argv: list[str]) -> None:
        seen.append([path, *argv])
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", execv)
    done = CliRunner().invoke(fides_app, args)
    assert seen, (
        f"`fides {' '.join(args)}` ran in its own process ({done.exit_code}):\n{done.output}"
    )
    path, *argv = seen[0]
    assert path == argv[0]
    return argv


def test_the_bench_starts_the_enclave_as_the_gateway_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    started: list[dict[str, Any]] = []

    class Popen:
        def __init__(self, args: list[str], **kwargs: Any) -> None:
            started.append({"args": args, **kwargs})

    monkeypatch.setattr(bench.subprocess, "Popen", Popen)
    sealed, platform = tmp_path / "m.sealed", tmp_path / "platform"
    _, sock = bench._start_enclave(tmp_path, sealed, platform)
    shutil.rmtree(sock.parent)
    (call,) = started
    assert call["args"] == EnclaveLaunch(sock, sealed, platform).command()
    assert call["args"][1:3] == ["-I", "-c"]
    assert "PYTHONPATH" not in (call.get("env") or {})


def test_fides_enclave_run_replaces_itself_with_the_isolated_launch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sock, sealed, platform = tmp_path / "e.sock", tmp_path / "m.sealed", tmp_path / "platform"
    common = ["enclave", "run", "--socket", str(sock), "--sealed-model", str(sealed)]
    argv = fides_enclave_exec(
        monkeypatch,
        [*common, "--transition-us", "5", f"--platform-dir={platform}", "--paging"],
    )
    assert (
        argv
        == EnclaveLaunch(
            sock,
            sealed,
            platform,
            extra_args=("--transition-us", "5", "--paging", "--no-exit-with-parent"),
        ).command()
    )
    assert argv[:5] == [sys.executable, "-I", "-c", argv[3], str(CODE_ROOT)]
    # --exit-with-parent keeps `run`'s default (off) unless asked for
    argv = fides_enclave_exec(monkeypatch, [*common, "--exit-with-parent"])
    assert argv[argv.index("run") :].count("--no-exit-with-parent") == 0
    # the platform directory from the environment, as `run` reads it
    monkeypatch.setenv("FIDES_ENCLAVE_PLATFORM_DIR", str(platform))
    argv = fides_enclave_exec(monkeypatch, common)
    assert argv[argv.index("--platform-dir") + 1] == str(platform)


def test_fides_enclave_run_parses_as_the_enclave_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its help and its errors are the enclave's own ``run``'s; nothing is started."""
    monkeypatch.setattr(os, "execv", lambda *_: pytest.fail("started"))
    runner = CliRunner()
    shown = runner.invoke(fides_app, ["enclave", "run", "--help"])
    assert shown.exit_code == 0, shown.output
    assert "--memory-budget-mb" in shown.output
    refused = runner.invoke(fides_app, ["enclave", "run", "--sealed-model", "x"])
    assert refused.exit_code == 2
    assert "--socket" in refused.output
    refused = runner.invoke(
        fides_app, ["enclave", "run", "--socket", "s", "--sealed-model", "x", "--nope"]
    )
    assert refused.exit_code == 2
    assert "--nope" in refused.output


def _shadow_enclave_sim(where: Path) -> None:
    """A copy of ``enclave_sim`` whose enclave answers 0.5 for every output."""
    package = where / "enclave_sim"
    shutil.copytree(
        REPO_ROOT / "enclave_sim", package, ignore=shutil.ignore_patterns("__pycache__")
    )
    core = package / "core.py"
    original = "results = self._session.run(self.outputs, feeds)"
    text = core.read_text()
    assert original in text
    core.write_text(
        text.replace(original, "results = [np.full_like(r, 0.5) for r in " + original[10:] + "]")
    )


@pytest.fixture
def workdir() -> Iterator[Path]:
    with short_tmpdir() as d:
        yield d


async def test_the_fides_command_serves_the_measured_code_whatever_its_environment(
    workdir: Path,
) -> None:
    """``fides enclave run`` as the container runs it (the ``fides`` console script), started
    with a shadow ``enclave_sim`` on ``PYTHONPATH`` and in its working directory: the enclave
    that answers is the measured one (before: the shadow was imported and the boot refused)."""
    files = make_enclave_files(workdir / "files")
    shadow = workdir / "shadow"
    _shadow_enclave_sim(shadow)
    script = Path(sys.executable).with_name("fides")
    assert script.is_file(), f"no `fides` console script beside {sys.executable}"
    sock, log = workdir / "e.sock", workdir / "enclave.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIDES_")}
    env["PYTHONPATH"] = os.pathsep.join([str(shadow), str(REPO_ROOT)])  # the shadow first
    command = [str(script), "enclave", "run", "--socket", str(sock)]
    command += ["--sealed-model", str(files.sealed_path), "--platform-dir", str(files.platform_dir)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=shadow,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    client = SocketEnclaveClient(sock, timeout_s=30.0)
    try:
        wait_until(
            lambda: process.poll() is not None or ping_ok(sock), READY_TIMEOUT_S, "the enclave"
        )
        assert process.poll() is None, log.read_text()
        # the same pid, now the isolated interpreter
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert [a.decode() for a in cmdline[1:3]] == ["-I", "-c"]
        x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
        result = await client.verify([VerifyRequest("r1", os.urandom(16), {"input": x})])
        _, probabilities = tiny_expected(x)
        np.testing.assert_allclose(
            result.items[0].outputs["probabilities"], probabilities, rtol=1e-5
        )
    finally:
        await client.close()
        stop_process(process)

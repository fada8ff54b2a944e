"""A SIGTERM (Kubernetes stopping a pod) or SIGINT during ``fides serve``'s start-up stops it
at once: it was acted on only after every model had loaded and every enclave was up and
attested (or had given up: 30 s for a sidecar enclave that is not there). Nothing is left
behind: the models loaded so far are unloaded, an enclave being started is stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import USER_KEY
from tests.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
ENCLAVE_STARTING = "enclave state down -> starting"
EXIT_WAIT_S = 60.0  # generous: the point is that the start-up never completes


def _start(
    repository: Path, workdir: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], Path]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FIDES_")}
    base.update(
        {
            "FIDES_MODEL_REPOSITORY": str(repository),
            "FIDES_API_KEYS": USER_KEY,
            "FIDES_GRPC_ENABLED": "false",
            "FIDES_PORT": "0",
            "FIDES_LOG_JSON": "0",
            "FIDES_ENCLAVE_ALLOW_SIMULATED": "1",
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
            **env,
        }
    )
    log_path = workdir / "server.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve"],
            cwd=workdir,
            env=base,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process, log_path


def _wait_for(process: subprocess.Popen[bytes], log_path: Path, text: str) -> None:
    deadline = time.monotonic() + 120
    while text not in log_path.read_text() and time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        time.sleep(0.02)
    assert text in log_path.read_text(), log_path.read_text()


def _signal_and_wait(process: subprocess.Popen[bytes], log_path: Path, sig: int) -> str:
    os.kill(process.pid, sig)
    try:
        process.wait(timeout=EXIT_WAIT_S)
    finally:
        stop_process(process)
    return log_path.read_text()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_while_an_enclave_is_awaited_stops_the_start_up(
    trained_repository: tuple[Path, dict[str, Any]], tmp_path: Path, sig: int
) -> None:
    """A sidecar enclave that is not there yet: the start-up waits for it (30 s); a signal
    meanwhile stops the gateway without finishing the start-up (no "gateway started", no
    port bound), exiting as after a start (SIGTERM re-raised; SIGINT: status 0)."""
    from enclave_sim.pki import init_ca

    platform = tmp_path / "platform"
    init_ca(platform)
    process, log_path = _start(
        trained_repository[0],
        tmp_path,
        {
            "FIDES_ENCLAVE_EXTERNAL": "1",
            "FIDES_ENCLAVE_PLATFORM_DIR": str(platform),
            "FIDES_ENCLAVE_RUNTIME_DIR": str(tmp_path / "rt"),  # no sidecar's socket there
        },
    )
    _wait_for(process, log_path, ENCLAVE_STARTING)
    log = _signal_and_wait(process, log_path, sig)
    assert "gateway started" not in log, log
    assert "Uvicorn running" not in log, log
    assert "start-up stopped by a signal" in log, log
    assert "Traceback" not in log, log
    expected = (0, -signal.SIGTERM) if sig == signal.SIGTERM else (0,)
    assert process.returncode in expected, log


def _processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            found.append(int(entry.name))
    return found


def test_a_sigterm_as_the_enclave_starts_leaves_no_enclave_process(
    trained_repository: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The gateway spawns its enclave: a SIGTERM while it starts (or just after) leaves no
    enclave process behind, and the gateway exits."""
    runtime = tmp_path / "rt"
    process, log_path = _start(
        trained_repository[0],
        tmp_path,
        {
            "FIDES_ENCLAVE_INIT_PLATFORM": "1",
            "FIDES_ENCLAVE_PLATFORM_DIR": str(tmp_path / "platform"),
            "FIDES_ENCLAVE_RUNTIME_DIR": str(runtime),
        },
    )
    _wait_for(process, log_path, ENCLAVE_STARTING)
    log = _signal_and_wait(process, log_path, signal.SIGTERM)
    assert process.returncode in (0, -signal.SIGTERM), log
    leftovers = _processes_naming(str(runtime))
    for pid in leftovers:  # never leave one behind, even when the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftovers == [], log

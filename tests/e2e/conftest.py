"""End-to-end fixtures: the REAL gateway process (``python -m gateway.cli serve``) on a free port.

The server's stdout and stderr go to a file (a pipe could fill up and block it); the fixture
waits for ``/v2/health/ready``, and stops the process by its pid in a ``finally`` so that a
failing test never leaves a server behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY, USER_KEY
from tests.model_factory import make_repository
from tests.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0

# Every Open Inference Protocol datatype the ONNX identity models can carry.
ALL_DATATYPES: tuple[str, ...] = (
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
)


@dataclass
class GatewayProcess:
    """A running gateway: where it listens, its process and its log file."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    repository: Path
    grpc_port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``host:port``, as tritonclient wants its ``url``."""
        return f"{self.host}:{self.port}"

    @property
    def grpc_address(self) -> str:
        """``host:port`` of its gRPC endpoint, as tritonclient.grpc wants its ``url``."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines (FIDES_LOG_JSON=1) parsed; other lines are skipped."""
        records = []
        for line in self.log().splitlines():
            line = line.strip()
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    records.append(json.loads(line))
        return records


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _server_env(repository: Path) -> dict[str, str]:
    # Drop any FIDES_* settings of the developer's shell: the test decides them all.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIDES_")}
    env.update(
        {
            "FIDES_MODEL_REPOSITORY": str(repository),
            "FIDES_API_KEYS": USER_KEY,
            "FIDES_ADMIN_API_KEYS": ADMIN_KEY,
            "FIDES_LOG_JSON": "1",
            "FIDES_SHUTDOWN_GRACE_S": "5",
            # HTTP only unless the test asks (running_gateway does, on a free port): the
            # default gRPC port 8001 is one port for every process on the machine
            "FIDES_GRPC_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
            ),
        }
    )
    return env


def _wait_ready(gw: GatewayProcess, deadline_s: float) -> str | None:
    """None once /v2/health/ready answers 200; why not if the process exited first."""
    deadline = time.monotonic() + deadline_s
    last = "no answer yet"
    with httpx.Client(base_url=gw.base_url, timeout=2.0) as client:
        while True:
            if gw.process.poll() is not None:
                return f"exited early with status {gw.process.returncode}"
            try:
                r = client.get("/v2/health/ready")
                if r.status_code == 200:
                    return None
                last = f"{r.status_code} {r.text}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                pytest.fail(
                    f"gateway (pid {gw.pid}) not ready after {deadline_s:.0f}s; last: {last}\n"
                    f"--- server log ---\n{gw.log()}",
                    pytrace=False,
                )
            time.sleep(0.1)


@contextlib.contextmanager
def running_gateway(
    repository: Path,
    workdir: Path,
    attempts: int = 3,
    env: Mapping[str, str] | None = None,
    cwd: Path = REPO_ROOT,
) -> Iterator[GatewayProcess]:
    """Start ``gateway.cli serve`` on ``repository``, yield it once ready, always stop it.

    ``env``: extra environment for the server (e.g. ``FIDES_ENCLAVE_*`` settings), applied after
    the test's defaults; ``cwd``: its working directory."""
    workdir.mkdir(parents=True, exist_ok=True)
    failure = ""
    for _ in range(attempts):
        port, grpc_port = free_port(), free_port()
        log_path = workdir / f"server-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--host", HOST, "--port", str(port)],
                cwd=cwd,
                env={
                    **_server_env(repository),
                    "FIDES_INTEGRITY_STATE_DIR": str(workdir / "alarm-state"),
                    "FIDES_GRPC_ENABLED": "true",
                    "FIDES_GRPC_PORT": str(grpc_port),
                    **(env or {}),
                },
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C on pytest does not hit it; teardown stops it
            )
        gw = GatewayProcess(HOST, port, process, log_path, repository, grpc_port)
        try:
            why = _wait_ready(gw, READY_TIMEOUT_S)
            if why is None:
                yield gw
                return
        finally:
            stop_process(process)
        log = gw.log()
        failure = f"gateway (pid {gw.pid}) {why}\n--- server log ---\n{log}"
        # another process took the port between free_port() and the bind: try another one
        if "address already in use" not in log.lower():
            break
    pytest.fail(failure, pytrace=False)


def build_repository(root: Path, datatypes: tuple[str, ...] = ALL_DATATYPES) -> Path:
    """``make_repository`` with an identity model for each datatype (identity_<dt>)."""
    return make_repository(root, datatypes)


@pytest.fixture(scope="session")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A shared server for tests that do not change the repository."""
    base = tmp_path_factory.mktemp("e2e-shared")
    repository = build_repository(base / "repo")
    with running_gateway(repository, base / "logs") as gw:
        yield gw

"""Shared helpers for enclave tests (also used by tests/gateway/test_enclave_client.py).

Socket paths live in short directories under /tmp: a Unix socket path is limited to 107
bytes, and pytest's tmp_path can be longer. Every process started here is stopped by its pid
in a ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2

from enclave_sim.pki import ROOT_CERT, init_ca
from enclave_sim.sealing import seal
from fides_core import enclave_wire as protocol
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.measurement import MEASURED_PACKAGES, Measurement
from tests.model_factory import tiny_classifier
from tests.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 60.0


@dataclass
class EnclaveFiles:
    base: Path
    platform_dir: Path
    model_path: Path
    config: EnclaveModelConfig
    sealed_path: Path
    measurement: Measurement

    @property
    def model_bytes(self) -> bytes:
        return self.model_path.read_bytes()

    @property
    def root_pem(self) -> bytes:
        return (self.platform_dir / ROOT_CERT).read_bytes()


def make_enclave_files(
    base: Path, config: EnclaveModelConfig | None = None, code_root: Path | None = None
) -> EnclaveFiles:
    """A tiny verifier, a fresh simulated platform, and the model sealed for this code."""
    base.mkdir(parents=True, exist_ok=True)
    model_path = base / "verifier.onnx"
    tiny_classifier(model_path)
    platform_dir = base / "platform"
    init_ca(platform_dir)
    config = config or EnclaveModelConfig(max_batch_size=64)
    kwargs = {"code_root": code_root} if code_root is not None else {}
    data, measurement, _ = seal(model_path.read_bytes(), config, platform_dir, **kwargs)
    sealed_path = base / "verifier.sealed"
    sealed_path.write_bytes(data)
    return EnclaveFiles(base, platform_dir, model_path, config, sealed_path, measurement)


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fx-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def enclave_env(pythonpath: Path = REPO_ROOT) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIDES_")}
    env["PYTHONPATH"] = str(pythonpath)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def enclave_command(files: EnclaveFiles, socket_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "enclave_sim.cli",
        "run",
        "--socket",
        str(socket_path),
        "--sealed-model",
        str(files.sealed_path),
        "--platform-dir",
        str(files.platform_dir),
        *extra,
    ]


# -- raw frames (a deliberately dumb synchronous client, to send anything) -----------------


def connect(socket_path: Path, timeout_s: float = 30.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout_s)
        s.connect(str(socket_path))
    except BaseException:
        s.close()
        raise
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def recv_frame(s: socket.socket) -> dict[str, Any]:
    (n,) = struct.unpack(">I", recv_exactly(s, 4))
    body = cbor2.loads(recv_exactly(s, n))
    assert isinstance(body, dict)
    return body


def call(s: socket.socket, body: dict[str, Any]) -> dict[str, Any]:
    s.sendall(protocol.encode_frame(body))
    return recv_frame(s)


def ping_ok(socket_path: Path) -> bool:
    try:
        with connect(socket_path, timeout_s=2.0) as s:
            return "result" in call(s, protocol.request(1, "ping"))
    except OSError:
        return False


@dataclass
class RunningEnclave:
    process: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextlib.contextmanager
def running_enclave(
    files: EnclaveFiles,
    socket_path: Path,
    *extra: str,
    pythonpath: Path = REPO_ROOT,
) -> Iterator[RunningEnclave]:
    """Start ``enclave_sim.cli run`` and yield once it answers a ping; always stop it."""
    log_path = socket_path.with_suffix(".log")
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            enclave_command(files, socket_path, *extra),
            cwd=pythonpath,
            env=enclave_env(pythonpath),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = RunningEnclave(process, socket_path, log_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (socket_path.exists() and ping_ok(socket_path)):
            if process.poll() is not None:
                raise AssertionError(f"enclave exited with {process.returncode}:\n{running.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"enclave not ready in {READY_TIMEOUT_S} s:\n{running.log()}")
            time.sleep(0.05)
        yield running
    finally:
        stop_process(process)


def run_cli(
    *args: str, pythonpath: Path = REPO_ROOT, timeout_s: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """``python -m enclave_sim.cli ARGS`` to completion (for boots that must refuse)."""
    return subprocess.run(
        [sys.executable, "-m", "enclave_sim.cli", *args],
        cwd=pythonpath,
        env=enclave_env(pythonpath),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def copy_enclave_code(dest_root: Path) -> Path:
    """A copy of the measured packages under ``dest_root`` (to modify a code file); returns
    the copy's source root (``<root>/enclave_sim/core.py``)."""
    for package in MEASURED_PACKAGES:
        shutil.copytree(
            REPO_ROOT / package, dest_root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return dest_root

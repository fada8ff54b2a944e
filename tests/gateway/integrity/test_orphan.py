"""A gateway killed outright (SIGKILL: no shutdown code runs) does not leave its enclave
process behind: the enclave notices its parent is gone and stops (``--exit-with-parent``)."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import USER_KEY
from tests.e2e.conftest import running_gateway

pytestmark = pytest.mark.e2e


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_killing_the_gateway_stops_its_enclave(
    trained_repository: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained_repository[0], repo)
    short = Path(tempfile.mkdtemp(prefix="fo", dir="/tmp"))  # socket paths <= 107 bytes
    env = {
        "FIDES_ENCLAVE_PLATFORM_DIR": str(short / "p"),
        "FIDES_ENCLAVE_RUNTIME_DIR": str(short / "r"),
        "FIDES_ENCLAVE_INIT_PLATFORM": "1",
        "FIDES_ENCLAVE_ALLOW_SIMULATED": "1",
    }
    enclave_pid = None
    try:
        with running_gateway(repo, tmp_path / "gw", env=env) as gw:
            status = httpx.get(
                f"{gw.base_url}/v2/models/digits/integrity",
                headers={"X-API-Key": USER_KEY},
                timeout=10,
            ).json()
            enclave_pid = status["enclave"]["pid"]
            assert status["enclave"]["state"] == "up"
            assert _alive(enclave_pid)
            os.kill(gw.pid, signal.SIGKILL)
            gw.process.wait(timeout=10)
            deadline = time.monotonic() + 10
            while _alive(enclave_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not _alive(enclave_pid), "the enclave outlived its killed gateway"
    finally:
        if enclave_pid is not None and _alive(enclave_pid):
            os.kill(enclave_pid, signal.SIGKILL)
        shutil.rmtree(short, ignore_errors=True)

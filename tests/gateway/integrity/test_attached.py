"""FIDES_ENCLAVE_EXTERNAL: the gateway attaches to an enclave process it did not start (a
sidecar), attests it, and re-attests a restarted one before trusting it again."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from enclave_sim.pki import init_ca
from enclave_sim.sealing import seal
from fides_core.enclave_config import EnclaveModelConfig
from gateway.integrity.enclave import verifier_file
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY, serving
from tests.gateway.integrity.conftest import EXAMPLE
from tests.integrity_factory import Digits
from tests.processes import stop_process

REPO_ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fx", dir="/tmp"))  # Unix socket paths: <= 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _start_enclave(
    sealed: Path, platform: Path, socket: Path, log: Path
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "enclave_sim.cli", "run", "--socket", str(socket)]
    cmd += ["--sealed-model", str(sealed), "--platform-dir", str(platform)]
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - our own module
            cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


async def _wait_verdict(
    client: httpx.AsyncClient, body: dict[str, object], want: str, timeout_s: float
) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, object] = {}
    while time.monotonic() < deadline:
        r = await client.post("/v2/models/digits/infer", json=body)
        if r.status_code == 200:
            last = r.json()["parameters"]
            if last.get("integrity_verdict") == want:
                return last
        await asyncio.sleep(0.2)
    pytest.fail(f"no {want!r} verdict within {timeout_s} s; last: {last}")


async def test_attach_to_a_sidecar_enclave_and_reattest_after_its_restart(
    integrity_repo: Path, short_dir: Path, digits: Digits
) -> None:
    body = digits.body()
    platform, rt = short_dir / "p", short_dir / "r"
    rt.mkdir()
    init_ca(platform)
    onnx = verifier_file(integrity_repo, "digits_verifier").read_bytes()
    data, _, _ = seal(
        onnx, EnclaveModelConfig(outputs=("probabilities",), max_batch_size=64), platform
    )
    sealed = short_dir / "v.sealed"
    sealed.write_bytes(data)
    socket = rt / "digits.sock"
    first = _start_enclave(sealed, platform, socket, short_dir / "enclave.log")
    second: subprocess.Popen[bytes] | None = None
    try:
        settings = Settings(
            model_repository=integrity_repo,
            api_keys=[USER_KEY],
            admin_api_keys=[ADMIN_KEY],
            log_json=False,
            enclave_external=True,
            enclave_runtime_dir=rt,
            enclave_platform_dir=platform,
            enclave_allow_simulated=True,
            enclave_init_platform=False,
        )
        # the default enclave factory: attach, do not spawn
        async with serving(settings) as client:
            await _wait_verdict(client, body, "verified", 30)
            status = (await client.get("/v2/models/digits/integrity")).json()
            assert status["enclave"]["state"] == "up"
            assert status["enclave"]["pid"] is None  # not ours to manage
            module = status["enclave"]["module_id"]

            stop_process(first)  # the sidecar dies ...
            r = await client.post("/v2/models/digits/infer", json=body)
            assert r.status_code in (200, 503)  # never a false "verified" from a dead enclave
            if r.status_code == 200:
                assert r.json()["parameters"]["integrity_verdict"] == "verified"
            socket.unlink(missing_ok=True)
            second = _start_enclave(sealed, platform, socket, short_dir / "enclave2.log")
            await asyncio.sleep(0.5)
            await _wait_verdict(client, body, "verified", 40)  # ... and is re-attested when back
            status = (await client.get("/v2/models/digits/integrity")).json()
            assert status["enclave"]["module_id"] != module  # a new boot, a new identity
            assert status["enclave"]["restarts"] >= 1
    finally:
        stop_process(first)
        if second is not None:
            stop_process(second)


async def test_external_mode_needs_the_pinned_root(integrity_repo: Path, short_dir: Path) -> None:
    settings = Settings(
        model_repository=integrity_repo,
        api_keys=[USER_KEY],
        log_json=False,
        enclave_external=True,
        enclave_runtime_dir=short_dir,
        enclave_platform_dir=short_dir / "nothing-here",
    )
    async with serving(settings) as client:
        # integrity could not be set up: fail_closed refuses rather than serve unverified
        r = await client.post("/v2/models/digits/infer", json=EXAMPLE)
        assert r.status_code == 503
        assert "no pinned enclave root certificate" in r.json()["error"]
        status = (await client.get("/v2/models/digits/integrity")).json()
        assert "root certificate" in status["error"]
    assert not os.listdir(short_dir)  # nothing sealed, spawned or created

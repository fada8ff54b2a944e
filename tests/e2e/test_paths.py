"""The gateway writes only where its settings point: its working directory, its home and the
model repository stay untouched, so a container with a read-only root runs it with only the
documented volumes writable (issue 24: it used to create ``.fides`` in its working directory).
A verified model exercises every writer: the enclave platform, the enclave's socket and sealed
verifier, the alarm state (written at shutdown)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import USER_KEY
from tests.e2e.conftest import running_gateway
from tests.integrity_factory import Digits

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def writable() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fides-rw-", dir="/tmp"))  # socket paths <= 107 bytes
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_a_verified_gateway_writes_only_where_its_settings_point(
    trained_repository: tuple[Path, dict[str, Any]],
    digits: Digits,
    tmp_path: Path,
    writable: Path,
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained_repository[0], repo)
    workdir, home = tmp_path / "cwd", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    repo_before = snapshot(repo)
    env = {
        "HOME": str(home),
        "FIDES_ENCLAVE_PLATFORM_DIR": str(writable / "platform"),
        "FIDES_ENCLAVE_RUNTIME_DIR": str(writable / "run"),
        "FIDES_INTEGRITY_STATE_DIR": str(writable / "alarm"),
        "FIDES_ENCLAVE_INIT_PLATFORM": "1",
        "FIDES_ENCLAVE_ALLOW_SIMULATED": "1",
    }
    with running_gateway(repo, tmp_path / "logs", env=env, cwd=workdir) as gw:
        r = httpx.post(
            f"{gw.base_url}/v2/models/digits/infer",
            json=digits.body(0),
            headers={"X-API-Key": USER_KEY},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["integrity_verdict"] == "verified"
    # stopped with SIGTERM: the alarm state was saved on the way out
    assert sorted(p.name for p in writable.iterdir()) == ["alarm", "platform", "run"]
    assert any((writable / "alarm").iterdir())
    assert list(workdir.iterdir()) == []
    assert list(home.iterdir()) == []
    assert snapshot(repo) == repo_before

"""Readiness tells the truth about integrity: a model whose integrity cannot run under
``fail_closed`` refuses every request, so the server and the model are not ready, and the
model's readiness (behind the key) and the log say which model and why (Kubernetes then
sends the pod no traffic). Every way the set-up can fail, with the real enclave process
where one is started (the default enclave factory)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY, serving
from tests.integrity_factory import Digits

pytestmark = [pytest.mark.slow]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fr", dir="/tmp"))  # Unix socket paths: <= 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _enclave_block(repo: Path, **changes: object) -> None:
    path = repo / "digits" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["integrity"]["enclave"].update(changes)
    path.write_text(yaml.safe_dump(raw))


def _integrity_block(repo: Path, **changes: object) -> None:
    path = repo / "digits" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["integrity"].update(changes)
    path.write_text(yaml.safe_dump(raw))


def _drop_threshold(repo: Path) -> None:
    card = repo / "digits_detector" / "1" / "model_card.json"
    data = json.loads(card.read_text())
    del data["threshold"]
    card.write_text(json.dumps(data))


def _garbage_sealed_model(repo: Path) -> None:
    (repo / "digits" / "garbage.sealed").write_bytes(b"not a sealed model")
    _enclave_block(repo, sealed_model="garbage.sealed")


# (what breaks, how, settings changes, what the reason names)
CASES: list[tuple[str, Callable[[Path], None], dict[str, object], str]] = [
    (
        "simulated evidence refused",
        lambda repo: None,
        {"enclave_allow_simulated": False},
        "SimulatedEvidenceRejected",
    ),
    (
        "pinned measurement differs",
        lambda repo: _enclave_block(repo, measurement="ab" * 48),
        {},
        "MeasurementMismatch",
    ),
    ("the enclave cannot boot", _garbage_sealed_model, {}, "exited with status"),
    (
        "no enclave platform",
        lambda repo: None,
        {"enclave_init_platform": False},
        "no enclave platform",
    ),
    (
        "verifier missing",
        lambda repo: _enclave_block(repo, verifier_model="digits_nope"),
        {},
        "has no version",
    ),
    ("detector card broken", _drop_threshold, {}, "model card has no 'threshold'"),
    (
        "novelty check missing",
        lambda repo: _integrity_block(repo, novelty="digits_nope"),
        {},
        "digits_nope",
    ),
]


def _settings(repo: Path, short_dir: Path, **changes: object) -> Settings:
    base: dict[str, object] = {
        "model_repository": repo,
        "api_keys": [USER_KEY],
        "admin_api_keys": [ADMIN_KEY],
        "log_json": False,
        "shutdown_grace_s": 5,
        "enclave_platform_dir": short_dir / "platform",
        "enclave_runtime_dir": short_dir / "run",
        "enclave_init_platform": True,
        "enclave_allow_simulated": True,
    }
    return Settings(**{**base, **changes})


@pytest.mark.parametrize(("what", "breaks", "settings", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_integrity_that_cannot_run_is_not_ready_and_says_why(
    integrity_repo: Path,
    short_dir: Path,
    digits: Digits,
    what: str,
    breaks: Callable[[Path], None],
    settings: dict[str, object],
    reason: str,
) -> None:
    breaks(integrity_repo)
    async with serving(_settings(integrity_repo, short_dir, **settings)) as client:
        r = await client.get("/v2/health/ready")
        assert r.status_code == 503, (what, r.text)
        # which model and why: the model's readiness (behind the key), not the open probe
        assert "digits" not in r.json()["error"], r.text
        r = await client.get("/v2/models/digits/ready")
        assert r.status_code == 503
        assert reason in r.json()["error"], r.text
        r = await client.post("/v2/models/digits/infer", json=digits.body())
        assert r.status_code == 503, r.text
        assert "integrity_verdict" not in r.text
        # the models without an integrity block are ready and serve
        assert (await client.get("/v2/models/digits_lite/ready")).status_code == 200


async def test_under_fail_open_the_model_stays_ready_and_says_unverified(
    integrity_repo: Path, short_dir: Path, digits: Digits
) -> None:
    _integrity_block(integrity_repo, failure_policy="fail_open")
    async with serving(_settings(integrity_repo, short_dir, enclave_allow_simulated=False)) as c:
        assert (await c.get("/v2/health/ready")).status_code == 200
        r = await c.post("/v2/models/digits/infer", json=digits.body())
        assert r.status_code == 200
        params = r.json()["parameters"]
        assert params["integrity_verdict"] == "unverified"
        assert params["integrity_reason"].startswith("enclave_unavailable")


async def test_an_attested_enclave_is_ready(
    integrity_repo: Path, short_dir: Path, digits: Digits
) -> None:
    async with serving(_settings(integrity_repo, short_dir)) as client:
        assert (await client.get("/v2/health/ready")).status_code == 200
        assert (await client.get("/v2/models/digits/ready")).status_code == 200
        r = await client.post("/v2/models/digits/infer", json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"


async def _until_ready_is(
    client: httpx.AsyncClient, status: int, within_s: float
) -> dict[str, object]:
    deadline = time.monotonic() + within_s
    while True:
        r = await client.get("/v2/health/ready")
        if r.status_code == status:
            body: dict[str, object] = r.json()
            return body
        assert time.monotonic() < deadline, f"still {r.status_code}: {r.text}"
        await asyncio.sleep(0.1)


async def test_an_enclave_that_fails_to_restart_is_not_ready_while_it_does(
    integrity_repo: Path, short_dir: Path, digits: Digits
) -> None:
    """Under fail_closed a restarting enclave refuses every request, so the model is not
    ready from the moment it is lost, not after the ten failed restarts that mark it down
    (about 150 s of backoff, during which the server said ready and answered every request
    with 503); ready again once it is back."""
    async with serving(_settings(integrity_repo, short_dir)) as client:
        await _until_ready_is(client, 200, 30)
        pid = (await client.get("/v2/models/digits/integrity")).json()["enclave"]["pid"]
        sealed = short_dir / "run" / "digits.sealed"
        away = sealed.with_name("digits.away")
        sealed.rename(away)  # its restarts fail: the sealed verifier is gone
        os.kill(pid, signal.SIGKILL)
        await _until_ready_is(client, 503, 20)
        r = await client.get("/v2/models/digits/ready")
        assert r.status_code == 503
        assert "restarting" in r.json()["error"], r.text
        assert (await client.post("/v2/models/digits/infer", json=digits.body())).status_code == 503
        away.rename(sealed)
        await _until_ready_is(client, 200, 40)
        r = await client.post("/v2/models/digits/infer", json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"

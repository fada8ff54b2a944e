"""The verifying proxy: a gateway with an integrity block in front of an upstream MLaaS (a
second, real gateway served over HTTP on loopback). The set-up a user follows (README,
"Verifying an upstream MLaaS"): no version folder for the upstream model, a model first
loaded after start is verified from its first answer, and the upstream's own integrity
parameters are said to be dropped, not dropped silently."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.integrity.conftest import ADMIN, Fakes, integrity_gateway
from tests.gateway.test_upstream_gateway import serve_in_thread
from tests.integrity_factory import Digits

URL = "/v2/models/digits/infer"


@pytest.fixture
def mlaas(tmp_path: Path, integrity_repo: Path) -> Iterator[str]:
    """The third party: the trained digits model behind its own gateway (with its own
    integrity block, so that its answers carry integrity_* parameters of its own)."""
    repo = tmp_path / "mlaas"
    shutil.copytree(integrity_repo, repo)
    settings = Settings(
        model_repository=repo,
        api_keys=["mlaas-key"],
        admin_api_keys=["mlaas-admin"],
        log_json=False,
    )
    with serve_in_thread(create_app(settings, enclave_factory=Fakes(repo))) as (url, _):
        yield url


def _front(repo: Path, url: str) -> None:
    """digits becomes the upstream model, keeping its integrity block; no version folder."""
    path = repo / "digits" / "config.yaml"
    raw = yaml.safe_load(path.read_text())
    front = {
        "platform": "upstream",
        "max_batch_size": 64,
        "upstream": {
            "url": url,
            "model_name": "digits",
            "headers": {"Authorization": "Bearer mlaas-key"},
            "timeout_s": 5.0,
        },
        "integrity": raw["integrity"],
    }
    path.write_text(yaml.safe_dump(front))
    shutil.rmtree(repo / "digits" / "1")


async def test_an_upstream_model_needs_no_version_folder_and_is_verified(
    integrity_repo: Path, mlaas: str, digits: Digits, caplog: pytest.LogCaptureFixture
) -> None:
    _front(integrity_repo, mlaas)
    caplog.set_level(logging.WARNING, logger="gateway.runtimes.upstream")
    async with integrity_gateway(integrity_repo) as (client, _):
        assert (await client.get("/v2/health/ready")).status_code == 200
        meta = (await client.get("/v2/models/digits")).json()
        assert (meta["platform"], meta["versions"]) == ("upstream", ["1"])
        for i in range(3):
            r = await client.post(URL, json=digits.body(i))
            assert r.status_code == 200, r.text
            assert r.json()["parameters"]["integrity_verdict"] == "verified"
        warned = [r for r in caplog.records if "its own integrity parameters" in r.getMessage()]
        assert len(warned) == 1  # once, naming what is dropped
        assert "integrity_evidence" in warned[0].getMessage()
        # the third party turns dishonest: the proxy in front of it flags its answers
        with httpx.Client(base_url=mlaas, headers={"X-API-Key": "mlaas-admin"}) as admin:
            r = admin.put(DRILL_ON_MLAAS, json={"attack": "switch", "rate": 1.0})
            assert r.status_code == 200, r.text
        r = await client.post(URL, json=digits.body(0))
        assert r.json()["parameters"]["integrity_verdict"] == "attack"
        assert r.json()["parameters"]["integrity_reclassified"] == digits.labels[0]


DRILL_ON_MLAAS = "/v2/admin/models/digits/drill"


async def test_a_model_first_loaded_after_start_gets_its_integrity_then(
    integrity_repo: Path, mlaas: str, digits: Digits
) -> None:
    """It used to be refused with "the new config adds an integrity block", although nothing
    had been served before; now it is set up when it loads, and never served unverified."""
    _front(integrity_repo, mlaas)
    config = integrity_repo / "digits" / "config.yaml"
    held = config.read_text()
    config.unlink()  # not there when the gateway starts
    async with integrity_gateway(integrity_repo) as (client, _):
        assert (await client.post(URL, json=digits.body())).status_code == 404
        config.write_text(held)
        r = await client.post("/v2/repository/models/digits/load", headers=ADMIN)
        assert r.status_code == 200, r.text
        r = await client.post(URL, json=digits.body())
        assert r.status_code == 200, r.text
        assert r.json()["parameters"]["integrity_verdict"] == "verified"
        assert (await client.get("/v2/models/digits/integrity")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200
        # a later reload of the unchanged block is fine; a changed one still refused
        r = await client.post("/v2/repository/models/digits/load", headers=ADMIN)
        assert r.status_code == 200, r.text

"""Verified models load and set up their integrity side by side: the repository's locks are
per model, so one verified model's slow load (a big artefact, an enclave boot of seconds) no
longer holds back another's load and set-up; each still serves verified, with its own
enclave. With the real enclave process too: two enclaves sealed for and booted on the same
platform at once."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY, serving
from tests.gateway.conftest import WAIT_S, Gate
from tests.gateway.integrity.conftest import ADMIN, Fakes, integrity_gateway
from tests.integrity_factory import Digits


def _copies(repo: Path, *names: str) -> None:
    """Verified models beside digits: copies of it (its integrity block, its verifier)."""
    for name in names:
        shutil.copytree(repo / "digits", repo / name)


async def _verified(client: httpx.AsyncClient, model: str, digits: Digits) -> None:
    r = await client.post(f"/v2/models/{model}/infer", json=digits.body(0))
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["integrity_verdict"] == "verified", r.text


async def _until_begun(gate: Gate, model: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while gate.begun.get(model, 0) == 0:
        assert loop.time() < deadline, f"{model}'s load never began"
        await asyncio.sleep(0.01)


async def test_a_verified_model_sets_up_while_another_one_loads(
    integrity_repo: Path, digits: Digits, gate: Gate
) -> None:
    async with integrity_gateway(integrity_repo) as (client, fakes):
        _copies(integrity_repo, "digits_b", "digits_c")
        gate.held.add("digits_b")
        slow = asyncio.create_task(
            client.post("/v2/repository/models/digits_b/load", headers=ADMIN, json={})
        )
        await _until_begun(gate, "digits_b")

        fast = asyncio.create_task(
            client.post("/v2/repository/models/digits_c/load", headers=ADMIN, json={})
        )
        done, _ = await asyncio.wait({fast}, timeout=WAIT_S)
        assert fast in done, "digits_c's load waited for digits_b's"
        assert (await fast).status_code == 200, (await fast).text
        assert not slow.done()
        assert set(fakes.by_model) == {"digits", "digits_c"}
        await _verified(client, "digits_c", digits)
        await _verified(client, "digits", digits)  # the model set up at start is untouched
        # a wanted model still loading: the server is not ready, and says which
        assert (await client.get("/v2/health/ready")).status_code == 503

        gate.open()
        r = await asyncio.wait_for(slow, WAIT_S)
        assert r.status_code == 200, r.text
        await _verified(client, "digits_b", digits)
        assert (await client.get("/v2/health/ready")).status_code == 200
        # each its own enclave and pipeline
        assert len({id(fakes.by_model[m]) for m in ("digits", "digits_b", "digits_c")}) == 3


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fp", dir="/tmp"))  # Unix socket paths: <= 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
async def test_two_real_enclaves_seal_and_boot_at_once(
    integrity_repo: Path, digits: Digits, short_dir: Path
) -> None:
    """The default enclave factory: two verified models loaded at once after the start seal
    their verifier and boot their enclave on one platform at once; both come up attested."""
    settings = Settings(
        model_repository=integrity_repo,
        api_keys=[USER_KEY],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        shutdown_grace_s=5,
        enclave_platform_dir=short_dir / "platform",
        enclave_runtime_dir=short_dir / "run",
        enclave_init_platform=True,
        enclave_allow_simulated=True,
        integrity_state_dir=short_dir / "state",
    )
    async with serving(settings) as client:
        _copies(integrity_repo, "digits_b", "digits_c")
        answers = await asyncio.wait_for(
            asyncio.gather(
                *(
                    client.post(
                        f"/v2/repository/models/{m}/load", headers=ADMIN, json={}, timeout=120
                    )
                    for m in ("digits_b", "digits_c")
                )
            ),
            240,
        )
        for r in answers:
            assert r.status_code == 200, r.text
        for model in ("digits", "digits_b", "digits_c"):
            await _verified(client, model, digits)
            assert (await client.get(f"/v2/models/{model}/ready")).status_code == 200
        assert (await client.get("/v2/health/ready")).status_code == 200
        run = short_dir / "run"
        assert {p.name for p in run.glob("*.sealed")} >= {"digits_b.sealed", "digits_c.sealed"}


async def test_a_second_start_sets_verified_models_up_once_every_model_loaded(
    integrity_repo: Path, digits: Digits
) -> None:
    """The same app started again (a test client's second lifespan): the models load side by
    side, so a verified model may load before its novelty check or detector; its set-up waits
    for every model, as at the first start (set up at once, it found its novelty check not
    loaded and served 503 for good)."""
    assert "novelty" in (integrity_repo / "digits" / "config.yaml").read_text()
    settings = Settings(
        model_repository=integrity_repo,
        api_keys=[USER_KEY],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        shutdown_grace_s=5,
        integrity_state_dir=integrity_repo.parent / "alarm-state",
    )
    app = create_app(settings, enclave_factory=Fakes(integrity_repo))
    for _ in range(2):
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app),
                base_url="http://test",
                headers={"X-API-Key": USER_KEY},
            ) as client,
        ):
            await _verified(client, "digits", digits)
            assert (await client.get("/v2/health/ready")).status_code == 200

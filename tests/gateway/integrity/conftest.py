"""Integrity fixtures: the session's really trained integrity repository
(``trained_repository`` in tests/conftest.py, shared with the e2e alerting test) copied per
test, and an in-process gateway whose enclave is :class:`FakeEnclaveClient` (a real EnclaveCore
running the verifier and signing, without the process). For the incident tests: batched
verifications, waves of concurrent requests up to an alarm with one request of a signed batch
singled out (:func:`tag_request`), and the model's bundle once kept."""

from __future__ import annotations

import asyncio
import contextvars
import json
import secrets
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from enclave_sim.core import EnclaveCore
from fides_client.client import IntegrityModels
from fides_client.incident import verify_incident
from fides_core.attestation import AttestedEnclave, verify_attestation
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.integrity_config import EnclaveConfig
from fides_core.verify import VerifyRequest
from gateway.app import create_app
from gateway.enclave_client import VerifyResult
from gateway.integrity.pipeline import IntegrityPipeline
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.enclave_double import FakeEnclaveClient
from tests.integrity_factory import Digits, infer_body

__all__ = [
    "ADMIN",
    "EXAMPLE",
    "INCIDENTS",
    "Fakes",
    "RestartingEnclave",
    "batched",
    "bundle_when_kept",
    "check_bundle",
    "infer_body",
    "integrity_gateway",
    "model_incidents",
    "set_integrity",
    "switch_until_alarm",
    "tag_request",
    "wave",
    "waves_with",
]

EXAMPLE = json.loads((Path(__file__).resolve().parents[3] / "examples" / "digit.json").read_text())


@pytest.fixture
def integrity_repo(tmp_path: Path, trained_repository: tuple[Path, dict[str, Any]]) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(trained_repository[0], dst)
    return dst


def set_integrity(repo: Path, **changes: Any) -> None:
    """Change keys of digits' ``integrity:`` block."""
    path = repo / "digits" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["integrity"].update(changes)
    path.write_text(yaml.safe_dump(cfg))


class RestartingEnclave(FakeEnclaveClient):
    """The in-process enclave with a supervisor's ``attested`` boot, restarted (a new boot: new
    module id and keys, the same platform and verifier) as soon as it has signed its first
    batch, before the gateway has used that batch's answers: an enclave that crashes and is
    relaunched while requests it signed are still being judged. ``boots``: the module ids."""

    def __init__(self, model: bytes | Path, config: EnclaveModelConfig | None = None) -> None:
        super().__init__(model, config)
        self._model = model.read_bytes() if isinstance(model, Path) else model
        self.boots = [self.core.module_id]
        self.attested: AttestedEnclave | None = self._attest()

    def _attest(self) -> AttestedEnclave:
        nonce = secrets.token_bytes(32)
        doc = self.core.attest(nonce)
        return verify_attestation(doc, root=self.root_pem, policy=self.policy(), nonce=nonce)

    async def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        result = await super().verify(requests)
        if len(self.boots) == 1:  # boot A signed this batch; boot B is up before it is used
            identity = self.core._identity  # the same platform: the same root
            self.core = EnclaveCore(self._model, self.config, self.measurement, identity)
            self.boots.append(self.core.module_id)
            self.attested = self._attest()
        return result


class Fakes:
    """The in-process enclaves the factory handed out, by model (``enclave``: their class)."""

    def __init__(self, repo: Path, enclave: type[FakeEnclaveClient] = FakeEnclaveClient) -> None:
        self.repo = repo
        self.enclave = enclave
        self.by_model: dict[str, FakeEnclaveClient] = {}

    def __call__(self, model: str, cfg: EnclaveConfig) -> tuple[FakeEnclaveClient, str]:
        from gateway.integrity.enclave import verifier_file

        fake = self.enclave(
            verifier_file(self.repo, cfg.verifier_model),
            EnclaveModelConfig(outputs=tuple(cfg.outputs), max_batch_size=cfg.max_batch_size),
        )
        self.by_model[model] = fake
        return fake, fake.measurement.pcr0.hex()


@asynccontextmanager
async def integrity_gateway(
    repo: Path, enclave: type[FakeEnclaveClient] = FakeEnclaveClient, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Fakes]]:
    """The gateway on ``repo`` (``enclave``: the in-process enclave's class; ``overrides``:
    more settings, e.g. gRPC on) and a client."""
    settings = Settings(
        model_repository=repo,
        api_keys=[USER_KEY],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        **{
            "shutdown_grace_s": 5,
            "integrity_state_dir": repo.parent / "alarm-state",
            **overrides,
        },
    )
    fakes = Fakes(repo, enclave)
    app = create_app(settings, enclave_factory=fakes)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers={"X-API-Key": USER_KEY},
        ) as client,
    ):
        yield client, fakes


ADMIN = {"X-API-Key": ADMIN_KEY}
Metric = Callable[[str], float]


# -- incident bundles under concurrent load -------------------------------------------------

INFER = "/v2/models/digits/infer"
INCIDENTS = "/v2/admin/models/digits/integrity/incidents"


def batched(repo: Path) -> None:
    """Concurrent verifications share one enclave call (several requests per signed batch)."""
    set_integrity(
        repo,
        enclave={
            "verifier_model": "digits_verifier",
            "max_batch_size": 64,
            "max_queue_delay_microseconds": 200_000,
            "dispatch_when_idle": False,
        },
    )


async def wave(client: httpx.AsyncClient, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    answers = await asyncio.gather(*(client.post(INFER, json=b) for b in bodies))
    for r in answers:
        assert r.status_code == 200, r.text
    return [r.json()["parameters"] for r in answers]


def check_bundle(bundle: Any, fakes: Fakes, repo: Path, *, models: bool = True) -> Any:
    fake = fakes.by_model["digits"]
    return verify_incident(
        bundle,
        root=fake.root_pem,
        measurements=[fake.measurement.pcr0.hex()],
        allow_simulated=True,
        models=IntegrityModels.from_repository(repo, "digits") if models else None,
    )


def tag_request(monkeypatch: pytest.MonkeyPatch, request_id: str) -> contextvars.ContextVar[bool]:
    """A context variable that is true while :meth:`IntegrityPipeline.run` serves the request
    with id ``request_id`` (and in the tasks it starts: its wait for the enclave): what a test
    patches in the pipeline acts on that request alone."""
    tagged = contextvars.ContextVar(f"request {request_id}", default=False)
    run = IntegrityPipeline.run

    async def tagged_run(self: IntegrityPipeline, service: Any, tensors: Any, ctx: Any) -> Any:
        token = tagged.set(ctx.request_id == request_id)
        try:
            return await run(self, service, tensors, ctx)
        finally:
            tagged.reset(token)

    monkeypatch.setattr(IntegrityPipeline, "run", tagged_run)
    return tagged


async def waves_with(
    client: httpx.AsyncClient, digits: Digits, request_id: str
) -> asyncio.Task[httpx.Response]:
    """Three waves of three concurrent requests (one signed batch each), the second with
    request ``request_id`` too; that request, still out or not."""
    for n in range(3):
        bodies = [infer_body(digits.take(2, seed=10 * n + j)) for j in range(3)]
        if n == 1:
            extra = asyncio.create_task(
                client.post(INFER, json={"id": request_id, **infer_body(digits.take(2, seed=999))})
            )
        await wave(client, bodies)
    return extra


async def switch_until_alarm(client: httpx.AsyncClient, digits: Digits) -> list[dict[str, Any]]:
    """A switch drill, then waves of three concurrent requests until the alarm fires: the
    parameters of the wave that tripped it (returned at once: nothing awaited after it)."""
    r = await client.put(
        "/v2/admin/models/digits/drill", json={"attack": "switch", "rate": 1.0}, headers=ADMIN
    )
    assert r.status_code == 200
    for n in range(3, 20):
        bodies = [infer_body(digits.take(2, seed=10 * n + j)) for j in range(3)]
        params = await wave(client, bodies)
        if any(p["integrity_alarm"] for p in params):
            return params
    raise AssertionError("the switched answers did not raise the alarm")


async def model_incidents(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    listed = (await client.get(INCIDENTS, headers=ADMIN)).json()["incidents"]
    return [i for i in listed if i["scope"] == "model"]


async def bundle_when_kept(client: httpx.AsyncClient) -> dict[str, Any]:
    """The model's first bundle, once written (in the background when the alarm fires)."""
    for _ in range(400):
        model = await model_incidents(client)
        if model:
            bundle: dict[str, Any] = (
                await client.get(f"{INCIDENTS}/{model[0]['id']}", headers=ADMIN)
            ).json()
            return bundle
        await asyncio.sleep(0.02)
    raise AssertionError("no model incident kept")

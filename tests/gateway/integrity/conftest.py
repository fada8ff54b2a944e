"""Integrity fixtures: the session's really trained integrity repository
(``trained_repository`` in tests/conftest.py, shared with the e2e alerting test) copied per
test, and an in-process gateway whose enclave is :class:`FakeEnclaveClient` (a real EnclaveCore
running the verifier and signing, without the process)."""

from __future__ import annotations

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
from fides_core.attestation import AttestedEnclave, verify_attestation
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.integrity_config import EnclaveConfig
from fides_core.verify import VerifyRequest
from gateway.app import create_app
from gateway.enclave_client import VerifyResult
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.enclave_double import FakeEnclaveClient
from tests.integrity_factory import infer_body

__all__ = [
    "ADMIN",
    "EXAMPLE",
    "Fakes",
    "RestartingEnclave",
    "infer_body",
    "integrity_gateway",
    "set_integrity",
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
        shutdown_grace_s=5,
        integrity_state_dir=repo.parent / "alarm-state",
        **overrides,
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

"""All integrity pipelines of one gateway: built after the models load, closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fides_core.enclave_errors import EnclaveFailure as EnclaveSideError
from fides_core.integrity_config import EnclaveConfig
from gateway.enclave_client import EnclaveClient, EnclaveSupervisor
from gateway.errors import GatewayError, ModelLoadError, NotFound
from gateway.integrity.enclave import enclave_for_model
from gateway.integrity.metrics import IntegrityMetrics
from gateway.integrity.pipeline import IntegrityPipeline, UnavailableIntegrity
from gateway.model_config import ModelConfig
from gateway.repository import ModelRepository
from gateway.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["EnclaveFactory", "IntegrityService"]

# (model, its enclave config) -> (a client, the pinned measurement); tests pass an in-process one
EnclaveFactory = Callable[[str, EnclaveConfig], tuple[EnclaveClient, str | None]]


class IntegrityService:
    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: IntegrityMetrics,
        enclave_factory: EnclaveFactory | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self._factory = enclave_factory or (
            lambda model, cfg: enclave_for_model(model, cfg, repository.root, settings)
        )
        self.pipelines: dict[str, IntegrityPipeline | UnavailableIntegrity] = {}

    async def start(self) -> None:
        """One pipeline (and enclave) per loaded model with an ``integrity:`` block. A model
        whose enclave does not come up is still served; its failure policy then applies."""
        await asyncio.gather(*(self.setup(name) for name in self.repository.loaded_names()))
        self.repository.load_checks.append(self._check_load)

    async def setup(self, name: str) -> None:
        """Set up the integrity of served model ``name`` if its config has a block and it has
        no pipeline yet (at start, or when a model first loads later)."""
        cfg = self.repository.served(name).config.integrity
        if cfg is None or name in self.pipelines:
            return
        try:
            enclave, measurement = self._factory(name, cfg.enclave)
            self.pipelines[name] = IntegrityPipeline(
                name, cfg, self.repository, enclave, self.metrics, measurement=measurement
            )
        except (GatewayError, EnclaveSideError, ValueError, OSError, KeyError) as exc:
            # never serve the model as if it had no integrity block: its policy applies
            log.error("integrity for %s cannot be set up: %s", name, exc)
            self.pipelines[name] = UnavailableIntegrity(name, cfg, self.metrics, str(exc))
            return
        if isinstance(enclave, EnclaveSupervisor):
            await self._start(name, enclave)

    def _check_load(self, name: str, cfg: ModelConfig) -> None:
        """Refuse a hot (re)load that adds, removes or changes an ``integrity:`` block.

        Integrity is set up at start (the enclave spawned, the verifier sealed, attested);
        a reload that changed the block would otherwise be ignored silently: a model that
        gains one served unverified answers as if nothing were asked, one that loses it kept
        being verified, a new threshold or policy not applied. A clear 400 instead, and the
        versions that serve keep serving; a restart applies the change."""
        pipe = self.pipelines.get(name)
        if pipe is None and name not in self.repository.loaded_names():
            return  # a first load: its integrity is set up once it has loaded (setup)
        current = None if pipe is None else pipe.cfg
        if cfg.integrity == current:
            return
        change = (
            "adds an integrity block"
            if current is None
            else "removes its integrity block"
            if cfg.integrity is None
            else "changes its integrity block"
        )
        raise ModelLoadError(
            f"model '{name}': the new config {change}; integrity is set up when the gateway "
            "starts (enclave, sealed verifier, attestation): restart the gateway to apply it"
        )

    async def _start(self, name: str, enclave: EnclaveSupervisor) -> None:
        try:
            await enclave.start()
            log.info("enclave for %s is up and attested", name, extra={"model": name})
        except GatewayError as exc:
            log.error("enclave for %s did not start: %s", name, exc, extra={"model": name})

    def get(self, name: str) -> IntegrityPipeline | UnavailableIntegrity | None:
        return self.pipelines.get(name)

    def require(self, name: str) -> IntegrityPipeline | UnavailableIntegrity:
        pipe = self.pipelines.get(name)
        if pipe is None:
            self.repository.get(name, None)  # 404 for an unknown model
            raise NotFound(f"model '{name}' has no integrity verification configured")
        return pipe

    async def close(self) -> None:
        for name, pipe in self.pipelines.items():
            await pipe.close()
            if isinstance(pipe, UnavailableIntegrity):
                continue
            enclave = pipe.enclave
            if isinstance(enclave, EnclaveSupervisor):
                await enclave.stop()
            else:
                await enclave.close()
            log.info("integrity for %s stopped", name)
        self.pipelines.clear()

"""The integrity of every verified model: the wrapper the repository serves them through, and
their pipelines, set up after the models load and stopped with the model.

A model whose ``config.yaml`` has an ``integrity:`` block is served as a
:class:`~gateway.servables.VerifiedServable`: its versions' own servables inside, the model's
:class:`ModelIntegrity` around them (one pipeline and one enclave per model, shared by its
versions, stopped with the last of them). The repository is the one registry: this service
finds a model's integrity through the servable it serves. At start the pipelines are set up
once every model has loaded (the detector, re-classifier and novelty check are models of the
same repository); a model first loaded later gets its pipeline when it loads. Until its
pipeline exists a verified model answers 503, never unverified as if it had no block.

Set-ups run concurrently: the repository loads different models at once (its locks are per
model), and :meth:`IntegrityService.start` sets every waiting model up together. What they
share (the enclave platform, created once; the runtime directory; the sealing counters; the
metrics registry; the alarm state directory, one file per model) is touched only in the
synchronous part of a set-up (the factory, the pipeline's constructor), which no other
set-up can interleave with on the event loop; the one wait, an enclave's boot, touches only
that model's files (its socket, log and sealed verifier, named after it). Keep it so: moving
the factory to a thread would need a lock around that part.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fides_core.enclave_errors import EnclaveFailure as EnclaveSideError
from fides_core.integrity_config import EnclaveConfig, IntegrityConfig
from gateway.enclave_client import EnclaveClient, EnclaveSupervisor
from gateway.errors import GatewayError, ModelLoadError, NotFound, Unavailable
from gateway.integrity.enclave import enclave_for_model
from gateway.integrity.metrics import IntegrityMetrics
from gateway.integrity.pipeline import IntegrityPipeline, UnavailableIntegrity
from gateway.model_config import ModelConfig
from gateway.repository import ModelRepository
from gateway.runtimes import Tensors
from gateway.servables import (
    InferContext,
    Inferred,
    Servable,
    TensorServable,
    VerifiedServable,
)
from gateway.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["EnclaveFactory", "IntegrityService", "ModelIntegrity"]

# (model, its enclave config) -> (a client, the pinned measurement); tests pass an in-process one
EnclaveFactory = Callable[[str, EnclaveConfig], tuple[EnclaveClient, str | None]]
Pipeline = IntegrityPipeline | UnavailableIntegrity


class ModelIntegrity:
    """One verified model's integrity: what its servables run every request through. Its
    versions share it (one pipeline, one enclave per model); it stops when the last one is
    retired (an unload), not when a reload replaces them."""

    def __init__(self, model: str, cfg: IntegrityConfig) -> None:
        self.model = model
        self.cfg = cfg
        self.pipeline: Pipeline | None = None  # None until set up
        self._users = 0

    async def run(self, service: TensorServable, inputs: Tensors, ctx: InferContext) -> Inferred:
        if self.pipeline is None:
            raise Unavailable(f"model '{self.model}': its integrity is being set up")
        return await self.pipeline.run(service, inputs, ctx)

    def readiness_error(self) -> str | None:
        if self.pipeline is None:
            return "its integrity is being set up"
        return self.pipeline.readiness_error()

    def attach(self) -> None:
        self._users += 1

    async def release(self) -> None:
        """One version retired; with the last one, stop the pipeline and the enclave."""
        self._users -= 1
        if self._users > 0:
            return
        pipe, self.pipeline = self.pipeline, None
        if pipe is None:
            return
        await pipe.close()
        if not isinstance(pipe, UnavailableIntegrity):
            enclave = pipe.enclave
            await (enclave.stop() if isinstance(enclave, EnclaveSupervisor) else enclave.close())
        log.info("integrity for %s stopped", self.model)


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
        self._started = False

    async def wrap(
        self, name: str, cfg: ModelConfig, versions: list[TensorServable]
    ) -> list[Servable]:
        """The repository's hook on every load: a model with an integrity block is served
        verified. A reload that adds, removes or changes the block of a model that already
        serves is refused (ModelLoadError, a 400): integrity is set up once (enclave, sealed
        verifier, attestation), and ignoring the change would be silent (a model that gains a
        block answering unverified, a new threshold or policy not applied)."""
        current = self._current(name)
        self._refuse_a_changed_block(name, cfg.integrity, current)
        if cfg.integrity is None:
            return list(versions)
        if current is None:
            current = ModelIntegrity(name, cfg.integrity)
            # loaded after start: set up now, before it serves. While the repository loads
            # every model (a start, a second one included) it waits for start(): the detector,
            # re-classifier and novelty check it needs may still be loading beside it.
            if self._started and not self.repository.starting:
                await self._setup(current, versions[-1])
        for _ in versions:
            current.attach()
        return [VerifiedServable(v, current) for v in versions]

    def _current(self, name: str) -> ModelIntegrity | None:
        """The integrity of ``name`` as it serves now (None: not served, or unverified)."""
        if name not in self.repository.loaded_names():
            return None
        latest = self.repository.served(name).latest
        return _integrity_of(latest)

    def _refuse_a_changed_block(
        self, name: str, new: IntegrityConfig | None, current: ModelIntegrity | None
    ) -> None:
        old = None if current is None else current.cfg
        if new == old or name not in self.repository.loaded_names():
            return  # unchanged, or a first load (its integrity is set up as it loads)
        change = (
            "adds an integrity block"
            if old is None
            else "removes its integrity block"
            if new is None
            else "changes its integrity block"
        )
        raise ModelLoadError(
            f"model '{name}': the new config {change}; integrity is set up when the gateway "
            "starts (enclave, sealed verifier, attestation): restart the gateway to apply it"
        )

    async def start(self) -> None:
        """Set up the pipeline (and enclave) of every verified model that loaded. A model whose
        enclave does not come up is still served; its failure policy then applies."""
        waiting = [
            (mi, self.repository.get(name).tensors)
            for name in self.repository.loaded_names()
            if (mi := self._current(name)) is not None and mi.pipeline is None
        ]
        await asyncio.gather(*(self._setup(mi, service) for mi, service in waiting))
        self._started = True

    async def _setup(self, mi: ModelIntegrity, service: TensorServable) -> None:
        try:
            enclave, measurement = self._factory(mi.model, mi.cfg.enclave)
            mi.pipeline = IntegrityPipeline(
                mi.model,
                mi.cfg,
                self.repository,
                enclave,
                self.metrics,
                service_inputs=service.inputs,
                measurement=measurement,
                state_dir=self.settings.alarm_state_dir,
                incidents_max_bytes=int(self.settings.integrity_incidents_max_mb * 2**20),
                close_grace_s=self.settings.shutdown_grace_s,
            )
        except (GatewayError, EnclaveSideError, ValueError, OSError, KeyError) as exc:
            # never serve the model as if it had no integrity block: its policy applies
            log.error("integrity for %s cannot be set up: %s", mi.model, exc)
            mi.pipeline = UnavailableIntegrity(mi.model, mi.cfg, self.metrics, str(exc))
            return
        if isinstance(enclave, EnclaveSupervisor):
            try:
                await enclave.start()
                log.info("enclave for %s is up and attested", mi.model, extra={"model": mi.model})
            except GatewayError as exc:
                log.error(
                    "enclave for %s did not start: %s", mi.model, exc, extra={"model": mi.model}
                )

    def get(self, name: str) -> Pipeline | None:
        mi = self._current(name)
        return None if mi is None else mi.pipeline

    def require(self, name: str) -> Pipeline:
        """The model's pipeline, for the integrity routes (404 / 503 otherwise)."""
        mi = _integrity_of(self.repository.get(name))  # 404 unknown, 503 while not served
        if mi is None:
            raise NotFound(f"model '{name}' has no integrity verification configured")
        if mi.pipeline is None:
            raise Unavailable(f"model '{name}': its integrity is being set up")
        return mi.pipeline


def _integrity_of(servable: Servable) -> ModelIntegrity | None:
    if isinstance(servable, VerifiedServable) and isinstance(servable.integrity, ModelIntegrity):
        return servable.integrity
    return None

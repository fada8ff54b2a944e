"""Serving logic shared by every protocol: lookup, input validation, batching, responses.

Routes (``gateway.api``) only translate HTTP to calls on :class:`DataPlane` and back.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from gateway import __version__
from gateway.codec import InferRequest, InferResponse, OutputTensor
from gateway.errors import BadRequest, GatewayError, Unavailable
from gateway.integrity.service import IntegrityService
from gateway.metrics import GatewayMetrics
from gateway.repository import ModelRepository, ModelVersion
from gateway.runtimes import Tensors, TensorSpec
from gateway.settings import Settings

log = logging.getLogger(__name__)

SERVER_NAME = "fides-gateway"
EXTENSIONS = ["model_repository", "binary_tensor_data", "statistics_metrics"]


class DataPlane:
    def __init__(
        self, repository: ModelRepository, settings: Settings, metrics: GatewayMetrics
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.integrity: IntegrityService | None = None  # set by the app when it starts

    # -- health and metadata --------------------------------------------------------------------

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every model serves; else what does not (a name, or a name and why)."""
        ok, missing = self.repository.ready()
        for name in self.repository.loaded_names():
            if (error := self.integrity_setup_error(name)) is not None:
                missing.append(f"{name} ({error})")
        return not missing, missing

    def integrity_setup_error(self, name: str) -> str | None:
        """Why ``name`` cannot answer at all: its policy is fail_closed and its integrity
        block could not be set up, or its enclave is down or not attested (it refuses every
        request). None otherwise; under fail_open it serves, marked unverified. A restarting
        enclave is transient and not counted."""
        pipe = None if self.integrity is None else self.integrity.get(name)
        return None if pipe is None else pipe.readiness_error()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        mv = self.repository.get(name, version)
        served = self.repository.served(name)
        rt = mv.runtime
        meta: dict[str, Any] = {
            "name": name,
            "versions": [str(v) for v in sorted(served.versions)],
            "platform": rt.platform,
            "inputs": [t.as_dict() for t in rt.inputs],
            "outputs": [t.as_dict() for t in rt.outputs],
        }
        params: dict[str, Any] = {"max_batch_size": served.config.max_batch_size}
        if served.config.labels:
            params["labels"] = served.config.labels
        meta["parameters"] = params
        return meta

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            mv = self.repository.get(name, version)
        except Unavailable:
            return False
        return not mv.batcher.closed and self.integrity_setup_error(name) is None

    # -- inference ------------------------------------------------------------------------------

    def admit(self, name: str, version: str | None) -> None:
        """Refuse now (404, or 503 for a full queue) what :meth:`infer` would refuse, so that
        the HTTP layer sheds load before reading and parsing a body it would throw away
        (under 4x overload, refusals after the parse were 10x slower). The queue may still
        fill before the request reaches it; then :meth:`infer` refuses it."""
        mv = self.repository.get(name, version)
        try:
            mv.batcher.check_queue()
        except GatewayError as exc:
            self._count_failure(name, str(mv.version), exc)
            raise

    def _count_failure(self, name: str, version: str, exc: GatewayError) -> None:
        self.metrics.model_series(name, version).failure.inc()
        self.metrics.failures.labels(name, version, exc.reason).inc()

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        mv = self.repository.get(name, version)
        if mv.batcher.closed:  # raced with a hot reload: take the new version
            mv = self.repository.get(name, version)
        version_label = str(mv.version)
        series = self.metrics.model_series(name, version_label)
        t0 = time.perf_counter()
        series.inflight.inc()
        try:
            outputs, params = await self._infer(mv, request)
        except GatewayError as exc:
            self._count_failure(name, version_label, exc)
            raise
        finally:
            series.inflight.dec()
        series.success.inc()
        series.duration.observe(time.perf_counter() - t0)
        return InferResponse(name, str(mv.version), outputs, id=request.id, parameters=params)

    async def _infer(
        self, mv: ModelVersion, request: InferRequest
    ) -> tuple[list[OutputTensor], dict[str, Any]]:
        rt = mv.runtime
        cfg = mv.batcher.runtime.config
        tensors = self._check_inputs(
            rt.name, rt.inputs, cfg.max_batch_size, cfg.allow_non_finite, request
        )
        wanted = self._check_outputs(rt.name, rt.outputs, request)
        deadline = time.monotonic() + self._timeout_s(cfg.dynamic_batching, request)
        pipeline = self.integrity.get(rt.name) if self.integrity is not None else None
        if pipeline is None and cfg.integrity is not None:
            # loaded, its integrity not set up yet: never answer as if it had no block
            raise Unavailable(f"model '{rt.name}': its integrity is being set up")
        params: dict[str, Any] = {}
        if pipeline is None:
            results = await mv.batcher.submit(tensors, deadline)
        else:
            outcome = await pipeline.run(
                mv, tensors, request_id=request.id, parameters=request.parameters, deadline=deadline
            )
            results, params = outcome.results, outcome.parameters
        specs = {o.name: o for o in rt.outputs}
        return [OutputTensor(n, results[n], _bf16(specs.get(n))) for n in wanted], params

    def _timeout_s(self, db: Any, request: InferRequest) -> float:
        # OIP parameter `timeout`, in microseconds as Triton and tritonclient use it
        raw = request.parameters.get("timeout")
        if raw is not None:
            if not isinstance(raw, int | float) or isinstance(raw, bool) or raw <= 0:
                raise BadRequest("parameter 'timeout' must be a positive number of microseconds")
            return float(raw) / 1e6
        if db is not None and db.default_timeout_microseconds:
            return float(db.default_timeout_microseconds) / 1e6
        return self.settings.default_timeout_s

    def _check_inputs(
        self,
        model: str,
        specs: list[TensorSpec],
        max_batch: int,
        allow_non_finite: bool,
        request: InferRequest,
    ) -> Tensors:
        by_name = {s.name: s for s in specs}
        given = {t.name: t for t in request.inputs}
        unknown = sorted(set(given) - set(by_name))
        if unknown:
            raise BadRequest(
                f"model '{model}' has no input(s) {unknown}; it expects {sorted(by_name)}"
            )
        missing = sorted(set(by_name) - set(given))
        if missing:
            raise BadRequest(f"model '{model}': missing input(s) {missing}")
        batch_sizes = set()
        out: Tensors = {}
        for name, spec in by_name.items():
            t = given[name]
            if t.datatype != spec.datatype:
                raise BadRequest(
                    f"input '{name}': datatype {t.datatype} does not match the model's "
                    f"{spec.datatype}"
                )
            if len(t.shape) != len(spec.shape) or any(
                want not in (-1, got) for want, got in zip(spec.shape, t.shape, strict=True)
            ):
                raise BadRequest(
                    f"input '{name}': shape {list(t.shape)} does not match the model's "
                    f"{list(spec.shape)} (-1 = any size)"
                )
            if max_batch > 0:
                if t.shape[0] > max_batch:
                    raise BadRequest(
                        f"input '{name}': batch of {t.shape[0]} exceeds max_batch_size {max_batch}"
                    )
                if t.shape[0] == 0:
                    raise BadRequest(f"input '{name}': empty batch")
                batch_sizes.add(t.shape[0])
            if not allow_non_finite and t.data.dtype.kind == "f" and not np.isfinite(t.data).all():
                raise BadRequest(
                    f"input '{name}' contains NaN or Inf; model '{model}' does not accept them"
                )
            out[name] = t.data
        if len(batch_sizes) > 1:
            raise BadRequest(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
        return out

    def _check_outputs(
        self, model: str, specs: list[TensorSpec], request: InferRequest
    ) -> list[str]:
        names = [s.name for s in specs]
        if request.outputs is None:
            return names
        asked = [o.name for o in request.outputs]
        unknown = sorted(set(asked) - set(names))
        if unknown:
            raise BadRequest(f"model '{model}' has no output(s) {unknown}; it has {names}")
        return asked


def _bf16(spec: TensorSpec | None) -> str | None:
    return "BF16" if spec is not None and spec.datatype == "BF16" else None

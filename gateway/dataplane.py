"""Serving logic shared by every protocol: lookup, input validation, batching, responses.

Routes (``gateway.api``) only translate HTTP to calls on :class:`DataPlane` and back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import numpy as np

from gateway import __version__
from gateway.errors import BadRequest, GatewayError
from gateway.metrics import GatewayMetrics
from gateway.repository import ModelRepository
from gateway.runtimes import Tensors, TensorSpec
from gateway.servables import InferContext, InferenceServable
from gateway.settings import Settings
from gateway.statistics import Statistics
from gateway.types import (
    InferRequest,
    InferResponse,
    OutputTensor,
    check_input,
    unknown_inputs,
)

log = logging.getLogger(__name__)

SERVER_NAME = "fides-gateway"
EXTENSIONS = [
    "model_repository",
    "model_configuration",
    "binary_tensor_data",
    "statistics",
    "statistics_metrics",
]
# what a requested output may carry: HTTP's binary_data (accepted over gRPC too, where every
# output travels raw anyway); Triton's classification and shared_memory_* are refused by name
OUTPUT_PARAMETERS = frozenset({"binary_data"})
# a request cancelled this close to its caller's deadline was cancelled by it: a gRPC client's
# own timer cancels the call when its deadline passes, and that cancellation reaches the server
# before the server's copy of the deadline (read from the request's header, which arrived a
# little after the client started its clock) by however much later the request arrived than
# the cancellation: a few ms on loopback, tens of ms on a loaded machine (row 141)
DEADLINE_SLACK_S = 0.05


class DataPlane:
    def __init__(
        self,
        repository: ModelRepository,
        settings: Settings,
        metrics: GatewayMetrics,
        statistics: Statistics | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self.metrics = metrics
        self.statistics = statistics or Statistics()

    # -- health and metadata --------------------------------------------------------------------

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every model serves; else what does not (a name, or a name and why)."""
        ok, missing = self.repository.ready()
        for name in self.repository.loaded_names():
            if (why := self.not_ready(name)) is not None:
                missing.append(f"{name} ({why})")
        return not missing, missing

    def not_ready(self, name: str, version: str | None = None) -> str | None:
        """Why model ``name`` cannot answer now (e.g. its integrity cannot run under
        fail_closed), or None when it can (an unknown model raises NotFound)."""
        return self.repository.servable(name, version).not_ready()

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        servable = self.repository.get(name, version)
        served = self.repository.served(name)
        meta: dict[str, Any] = {
            "name": name,
            "versions": [str(v) for v in sorted(served.versions)],
            "platform": servable.platform,
            "inputs": [t.as_dict() for t in servable.inputs],
            "outputs": [t.as_dict() for t in servable.outputs],
        }
        params: dict[str, Any] = {"max_batch_size": served.config.max_batch_size}
        if served.config.labels:
            params["labels"] = served.config.labels
        meta["parameters"] = params
        return meta

    def model_statistics(self, name: str | None, version: str | None) -> dict[str, Any]:
        """The statistics extension: every loaded model's versions (no ``name``), one model's
        loaded versions, or one version (404 for an unknown model or version)."""
        if name is None:
            names = self.repository.loaded_names()
            wanted = [(n, self._versions(n)) for n in names]
        elif version is None:
            wanted = [(name, self._versions(name))]
        else:
            wanted = [(name, [str(self.repository.servable(name, version).version)])]
        return self.statistics.snapshot(wanted)

    def _versions(self, name: str) -> list[str]:
        self.repository.servable(name)  # 404 unknown, 503 while it is not serving
        return [str(v) for v in sorted(self.repository.served(name).versions)]

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """The model configuration extension, in Triton's shape (tritonclient's
        ``get_model_config``): tensor data types as ``TYPE_*`` and, for a model with a batch
        dimension, ``dims`` without it."""
        servable = self.repository.get(name, version)
        cfg = servable.config
        batched = cfg.max_batch_size > 0

        def tensor(spec: TensorSpec) -> dict[str, Any]:
            dims = list(spec.shape[1:] if batched else spec.shape)
            return {"name": spec.name, "data_type": _TRITON_TYPES[spec.datatype], "dims": dims}

        out: dict[str, Any] = {
            "name": name,
            "platform": servable.platform,
            "backend": servable.platform,
            "max_batch_size": cfg.max_batch_size,
            "input": [tensor(t) for t in servable.inputs],
            "output": [tensor(t) for t in servable.outputs],
            "version_policy": cfg.version_policy.model_dump(exclude_none=True) or {"latest": {}},
            "instance_group": [
                {
                    "count": cfg.instance_group.count,
                    "kind": f"KIND_{cfg.instance_group.kind.upper()}",
                }
            ],
        }
        if cfg.dynamic_batching is not None:
            out["dynamic_batching"] = cfg.dynamic_batching.model_dump(exclude_none=True)
        if cfg.integrity is not None:
            out["parameters"] = {"integrity": {"string_value": "verified"}}
        return out

    # -- inference ------------------------------------------------------------------------------

    def admit(self, name: str, version: str | None) -> InferenceServable:
        """Refuse now (404, or 503 for a full queue) what :meth:`infer` would refuse, so that
        the HTTP layer sheds load before reading and parsing a body it would throw away
        (under 4x overload, refusals after the parse were 10x slower). The queue may still
        fill before the request reaches it; then :meth:`infer` refuses it. Returns the
        servable, whose declared inputs and outputs bound what a parser needs to read."""
        servable = self.repository.get(name, version)
        try:
            servable.check_queue()
        except GatewayError as exc:
            self._count_failure(name, str(servable.version), exc.reason)
            self.statistics.model(name, str(servable.version)).request_done(False, 0.0)
            raise
        return servable

    def refused(self, servable: InferenceServable, exc: GatewayError) -> None:
        """Count a request to ``servable`` that a protocol layer refused after :meth:`admit`
        (a body its parser refused: an input of the wrong datatype or shape is checked before
        its data is decoded), as :meth:`infer` counts the ones it refuses."""
        version = str(servable.version)
        self._count_failure(servable.name, version, exc.reason)
        self.statistics.model(servable.name, version).request_done(False, 0.0)

    def _count_failure(self, name: str, version: str, reason: str) -> None:
        self.metrics.model_series(name, version).failure.inc()
        self.metrics.failures.labels(name, version, reason).inc()

    async def infer(
        self,
        name: str,
        version: str | None,
        request: InferRequest,
        client: str | None = None,
        *,
        deadline: float | None = None,
    ) -> InferResponse:
        """``deadline``: the caller's own (``time.monotonic()``, e.g. a gRPC call's), which the
        inference's deadline never passes."""
        servable = self.repository.get(name, version)
        if servable.closed:  # raced with a hot reload: take the new version
            servable = self.repository.get(name, version)
        version_label = str(servable.version)
        series = self.metrics.model_series(name, version_label)
        stats = self.statistics.model(name, version_label)
        t0 = time.perf_counter()
        series.inflight.inc()
        try:
            outputs, params = await self._infer(servable, request, client, deadline)
        except GatewayError as exc:
            self._count_failure(name, version_label, exc.reason)
            stats.request_done(False, time.perf_counter() - t0)
            raise
        except asyncio.CancelledError:  # the caller went away, or its deadline passed
            past = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
            self._count_failure(name, version_label, "timeout" if past else "cancelled")
            stats.request_done(False, time.perf_counter() - t0)
            raise
        except Exception:  # a fault of ours: answered 500 by the app, counted here too
            self._count_failure(name, version_label, "internal")
            stats.request_done(False, time.perf_counter() - t0)
            raise
        finally:
            series.inflight.dec()
        elapsed = time.perf_counter() - t0
        series.success.inc()
        series.duration.observe(elapsed)
        stats.request_done(True, elapsed)
        return InferResponse(name, version_label, outputs, id=request.id, parameters=params)

    async def _infer(
        self,
        servable: InferenceServable,
        request: InferRequest,
        client: str | None,
        deadline: float | None,
    ) -> tuple[list[OutputTensor], dict[str, Any]]:
        cfg = servable.config
        tensors = self._check_inputs(
            servable.name, servable.inputs, cfg.max_batch_size, cfg.allow_non_finite, request
        )
        wanted = self._check_outputs(servable.name, servable.outputs, request)
        own = time.monotonic() + self._timeout_s(cfg.dynamic_batching, request)
        ctx = InferContext(
            deadline=own if deadline is None else min(own, deadline),
            request_id=request.id,
            parameters=request.parameters,
            client=client,
        )
        done = await servable.infer(tensors, ctx)
        specs = {o.name: o for o in servable.outputs}
        outputs = [OutputTensor(n, done.outputs[n], _bf16(specs.get(n))) for n in wanted]
        return outputs, done.parameters

    def _timeout_s(self, db: Any, request: InferRequest) -> float:
        # OIP parameter `timeout`, in microseconds as Triton and tritonclient use it (NaN and
        # infinity pass `raw <= 0`; gRPC's double_param carries both)
        raw = request.parameters.get("timeout")
        if raw is not None:
            if (
                not isinstance(raw, int | float)
                or isinstance(raw, bool)
                or not math.isfinite(raw)
                or raw <= 0
            ):
                raise BadRequest(
                    f"parameter 'timeout' must be a positive number of microseconds, not {raw!r}"
                )
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
        if len(request.inputs) > len(specs):  # the list of unknown names stays short
            raise BadRequest(
                f"the request has {len(request.inputs)} inputs; model '{model}' takes "
                f"{len(specs)}: {sorted(by_name)}"
            )
        given = {t.name: t for t in request.inputs}
        unknown = sorted(set(given) - set(by_name))
        if unknown:
            raise unknown_inputs(model, unknown, sorted(by_name))
        missing = sorted(set(by_name) - set(given))
        if missing:
            raise BadRequest(f"model '{model}': missing input(s) {missing}")
        batch_sizes = set()
        out: Tensors = {}
        for name, spec in by_name.items():
            t = given[name]
            check_input(name, t.datatype, t.shape, spec.datatype, spec.shape, max_batch)
            if max_batch > 0:
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
        if len(request.outputs) > len(specs):  # the list of unknown names stays short
            raise BadRequest(
                f"the request asks for {len(request.outputs)} outputs; model '{model}' has "
                f"{len(specs)}: {names}"
            )
        asked = [o.name for o in request.outputs]
        unknown = sorted(set(asked) - set(names))
        if unknown:
            raise BadRequest(f"model '{model}' has no output(s) {unknown}; it has {names}")
        for out in request.outputs:
            unsupported = sorted(set(out.parameters) - OUTPUT_PARAMETERS)
            if unsupported:
                raise BadRequest(
                    f"output '{out.name}': parameter(s) {unsupported} not supported; the "
                    "gateway answers whole tensors (no classification, no shared memory) and "
                    f"takes only {sorted(OUTPUT_PARAMETERS)} on an output"
                )
        return asked


# OIP tensor data types -> Triton's model configuration names
_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BF16": "TYPE_BF16",
    "BYTES": "TYPE_STRING",
}


def _bf16(spec: TensorSpec | None) -> str | None:
    return "BF16" if spec is not None and spec.datatype == "BF16" else None

"""Open Inference Protocol (KServe V2) REST routes: HTTP only. The wire format is in
:mod:`gateway.api.v2.protocol`, the inference handler in :mod:`gateway.api.v2.serving`, the
serving logic in :class:`gateway.dataplane.DataPlane`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.datastructures import State

from gateway.api.deps import DataPlaneDep, UserAuth
from gateway.api.responses import json_response
from gateway.api.v2.protocol import INFER_BODY_SCHEMA
from gateway.api.v2.serving import infer_handler
from gateway.dataplane import DataPlane
from gateway.errors import Unavailable

log = logging.getLogger(__name__)

health = APIRouter(prefix="/v2/health", tags=["health"])
router = APIRouter(prefix="/v2", tags=["inference"], dependencies=[UserAuth])


@health.get("/live")
async def live() -> dict[str, bool]:
    return {"live": True}


# What an unauthenticated probe learns: ready or not. Which models, and why (a load error
# names files on the server), is for the log and for those holding a key.
NOT_READY = (
    "not ready: a model is not serving yet (which and why: the gateway's log, or "
    "/v2/repository/index and /v2/models/<name>/ready with an API key)"
)


@health.get("/ready")
async def ready(request: Request, dp: DataPlaneDep) -> Response:
    ok, missing = dp.ready()
    _log_change(request.app.state, missing)
    if ok:
        return json_response({"ready": True})
    return json_response({"ready": False, "error": NOT_READY}, status_code=503)


def _log_change(state: State, missing: list[str]) -> None:
    """Log the server's readiness when it changes, not once per probe (Kubernetes probes
    every few seconds while a model loads): the models not ready and why at WARNING, ready
    again at INFO."""
    last: list[str] | None = getattr(state, "readiness_logged", None)
    if missing == (last or []):
        return
    state.readiness_logged = missing
    if missing:
        log.warning("server not ready: models not ready: %s", missing)
    else:
        log.info("server ready: every model serves")


@router.get("")
async def server_metadata(dp: DataPlaneDep) -> dict[str, Any]:
    return dp.server_metadata()


# Statistics and model configuration extensions (Triton's shapes: tritonclient's
# get_inference_statistics and get_model_config). /models/stats comes before /models/{name}.
@router.get("/models/stats")
async def all_model_statistics(dp: DataPlaneDep) -> dict[str, Any]:
    return dp.model_statistics(None, None)


@router.get("/models/{name}/stats")
async def model_statistics(name: str, dp: DataPlaneDep) -> dict[str, Any]:
    return dp.model_statistics(name, None)


@router.get("/models/{name}/versions/{version}/stats")
async def model_version_statistics(name: str, version: str, dp: DataPlaneDep) -> dict[str, Any]:
    return dp.model_statistics(name, version)


@router.get("/models/{name}/config")
async def model_config(name: str, dp: DataPlaneDep) -> dict[str, Any]:
    return dp.model_config(name, None)


@router.get("/models/{name}/versions/{version}/config")
async def model_version_config(name: str, version: str, dp: DataPlaneDep) -> dict[str, Any]:
    return dp.model_config(name, version)


@router.get("/models/{name}")
async def model_metadata(name: str, dp: DataPlaneDep) -> dict[str, Any]:
    return dp.model_metadata(name, None)


@router.get("/models/{name}/versions/{version}")
async def model_version_metadata(name: str, version: str, dp: DataPlaneDep) -> dict[str, Any]:
    return dp.model_metadata(name, version)


def _ready_response(name: str, version: str | None, dp: DataPlane) -> Response:
    try:
        why = dp.not_ready(name, version)
    except Unavailable as exc:
        why = exc.message.removeprefix(f"model '{name}' is not ready: ")
    if why is None:
        return json_response({"name": name, "ready": True})
    error = f"model '{name}' is not ready: {why}"
    return json_response({"name": name, "ready": False, "error": error}, status_code=503)


@router.get("/models/{name}/ready")
async def model_ready(name: str, dp: DataPlaneDep) -> Response:
    return _ready_response(name, None, dp)


@router.get("/models/{name}/versions/{version}/ready")
async def model_version_ready(name: str, version: str, dp: DataPlaneDep) -> Response:
    return _ready_response(name, version, dp)


# The inference routes take the data plane and settings from app.state rather than through
# dependencies: FastAPI's dependency solving is a measurable share of a small request's cost.
@router.post("/models/{name}/infer", openapi_extra=INFER_BODY_SCHEMA)
async def infer(name: str, request: Request) -> Response:
    return await infer_handler(name, None, request)


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=INFER_BODY_SCHEMA)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await infer_handler(name, version, request)

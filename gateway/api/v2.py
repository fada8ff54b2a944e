"""Open Inference Protocol (KServe V2) REST routes, with Triton's binary tensor extension."""

from __future__ import annotations

import zlib
from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.api.deps import DataPlaneDep, UserAuth
from gateway.api.responses import json_response
from gateway.codec import HEADER_LENGTH, encode_infer_response, parse_infer_request
from gateway.dataplane import DataPlane
from gateway.errors import BadRequest, PayloadTooLarge, Unavailable
from gateway.settings import Settings

health = APIRouter(prefix="/v2/health", tags=["health"])
router = APIRouter(prefix="/v2", tags=["inference"], dependencies=[UserAuth])

_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name", "shape", "datatype", "data"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "shape": {"type": "array", "items": {"type": "integer"}},
                                    "datatype": {"type": "string"},
                                    "parameters": {"type": "object"},
                                    "data": {},
                                },
                            },
                        },
                        "outputs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "parameters": {"type": "object"},
                                },
                            },
                        },
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
            },
        },
    }
}


@health.get("/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@health.get("/ready")
async def ready(dp: DataPlaneDep) -> Response:
    ok, missing = dp.ready()
    if ok:
        return json_response({"ready": True})
    return json_response({"ready": False, "error": f"models not ready: {missing}"}, status_code=503)


@router.get("")
async def server_metadata(dp: DataPlaneDep) -> dict[str, Any]:
    return dp.server_metadata()


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
@router.post("/models/{name}/infer", openapi_extra=_INFER_BODY)
async def infer(name: str, request: Request) -> Response:
    return await _infer(name, None, request)


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_BODY)
async def infer_version(name: str, version: str, request: Request) -> Response:
    return await _infer(name, version, request)


async def _infer(name: str, version: str | None, request: Request) -> Response:
    dp: DataPlane = request.app.state.dataplane
    settings: Settings = request.app.state.settings
    # Unknown model or full queue: refuse before reading a possibly large body.
    dp.admit(name, version)
    # size, read deadline and hang-up are checked as it arrives (gateway/api/body.py)
    body = await request.body()
    body = _decompress(body, request.headers.get("content-encoding"), settings.max_body_bytes)
    header_len = request.headers.get(HEADER_LENGTH.lower())
    if header_len is not None and not _is_ascii_digits(header_len.strip()):
        raise BadRequest(f"{HEADER_LENGTH} must be a non-negative integer")
    req = parse_infer_request(
        body,
        int(header_len) if header_len is not None else None,
        max_elements=settings.max_tensor_elements,
    )
    resp = await dp.infer(name, version, req)
    binary_names = {o.name: o.binary for o in req.outputs or [] if o.binary is not None}
    payload, headers = encode_infer_response(resp, req.binary_output_default, binary_names)
    media = "application/octet-stream" if headers else "application/json"
    return Response(payload, media_type=media, headers=headers)


def _is_ascii_digits(value: str) -> bool:
    # str.isdigit() also accepts '²' or '١', which int() refuses (latin-1 headers carry '²')
    return value.isascii() and value.isdigit()


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Request compression as tritonclient sends it (gzip or deflate)."""
    if encoding is None or encoding.lower() == "identity":
        return body
    enc = encoding.lower()
    if enc not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid {enc}: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
    return out

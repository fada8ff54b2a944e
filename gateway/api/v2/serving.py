"""The inference handler of the OIP REST routes: shed load before reading a body, read it within
its limits, decompress, parse, hand the request to the data plane, encode the answer."""

from __future__ import annotations

import zlib

from fastapi import Request, Response

from gateway.api.v2.protocol import HEADER_LENGTH, encode_infer_response, parse_infer_request
from gateway.auth import KeyChecker
from gateway.dataplane import DataPlane
from gateway.errors import BadRequest, PayloadTooLarge
from gateway.integrity.alarm import client_id
from gateway.settings import Settings

__all__ = ["decompress", "infer_handler"]


# The data plane and settings come from app.state rather than through dependencies: FastAPI's
# dependency solving is a measurable share of a small request's cost.
async def infer_handler(name: str, version: str | None, request: Request) -> Response:
    dp: DataPlane = request.app.state.dataplane
    settings: Settings = request.app.state.settings
    # Unknown model or full queue: refuse before reading a possibly large body.
    servable = dp.admit(name, version)
    # size, read deadline and hang-up are checked as it arrives (gateway/api/body.py)
    body = await request.body()
    body = decompress(body, request.headers.get("content-encoding"), settings.max_body_bytes)
    header_len = request.headers.get(HEADER_LENGTH.lower())
    if header_len is not None and not _is_ascii_digits(header_len.strip()):
        raise BadRequest(f"{HEADER_LENGTH} must be a non-negative integer")
    req = parse_infer_request(
        body,
        int(header_len) if header_len is not None else None,
        max_elements=settings.max_tensor_elements,
        max_inputs=len(servable.inputs),
        max_outputs=len(servable.outputs),
    )
    resp = await dp.infer(name, version, req, client_id(KeyChecker.presented(request)))
    binary_names = {o.name: o.binary for o in req.outputs or [] if o.binary is not None}
    payload, headers = encode_infer_response(resp, req.binary_output_default, binary_names)
    media = "application/octet-stream" if headers else "application/json"
    return Response(payload, media_type=media, headers=headers)


def _is_ascii_digits(value: str) -> bool:
    # str.isdigit() also accepts '²' or '١', which int() refuses (latin-1 headers carry '²')
    return value.isascii() and value.isdigit()


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
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

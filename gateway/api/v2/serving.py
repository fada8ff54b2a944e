"""The inference handler of the OIP REST routes: shed load before reading a body, read it within
its limits, decompress, parse, hand the request to the data plane, encode the answer."""

from __future__ import annotations

import asyncio
import zlib

from fastapi import Request, Response

from gateway.api.v2.protocol import HEADER_LENGTH, encode_infer_response, parse_infer_request
from gateway.auth import KeyChecker
from gateway.dataplane import DataPlane
from gateway.errors import BadRequest, GatewayError, PayloadTooLarge
from gateway.integrity.alarm import client_id
from gateway.settings import Settings
from gateway.types import InferRequest

__all__ = ["THREAD_ENCODE_ELEMENTS", "THREAD_PARSE_BYTES", "decompress", "infer_handler"]

# bodies above this (and every compressed one) are decompressed and parsed off the event loop
THREAD_PARSE_BYTES = 1024 * 1024

# Answers whose outputs hold more elements than this are encoded in a worker thread, as large
# request bodies are parsed. Encoding FP32 to JSON costs about 25 ns an element (BYTES 85): 4 Mi
# elements took 108 ms on the loop (44 MiB of JSON; its gzip took 414 ms, in a worker thread
# already: Starlette's middleware compresses bodies over 128 KiB there), 64 Ki elements 1.6 ms
# (0.7 MiB), less than a JSON request body of THREAD_PARSE_BYTES takes to parse (3.6 ms). Small
# answers (a classifier's scores) stay on the loop: the hop to a thread costs about 40 us.
THREAD_ENCODE_ELEMENTS = 64 * 1024


# The data plane and settings come from app.state rather than through dependencies: FastAPI's
# dependency solving is a measurable share of a small request's cost.
async def infer_handler(name: str, version: str | None, request: Request) -> Response:
    dp: DataPlane = request.app.state.dataplane
    settings: Settings = request.app.state.settings
    # Unknown model or full queue: refuse before reading a possibly large body.
    servable = dp.admit(name, version)
    # size, read deadline and hang-up are checked as it arrives (gateway/api/body.py)
    body = await request.body()
    header_len = request.headers.get(HEADER_LENGTH.lower())
    if header_len is not None and not _is_ascii_digits(header_len.strip()):
        raise BadRequest(f"{HEADER_LENGTH} must be a non-negative integer")
    encoding = request.headers.get("content-encoding")
    contract = servable.input_contract

    def read() -> InferRequest:
        return parse_infer_request(
            decompress(body, encoding, settings.max_body_bytes),
            int(header_len) if header_len is not None else None,
            max_elements=settings.max_tensor_elements,
            max_inputs=len(servable.inputs),
            max_outputs=len(servable.outputs),
            contract=contract,
        )

    # A large body, or a compressed one of any size (a few KB of gzip are 16 MiB), is decoded
    # in a worker thread: tens of MiB of JSON or BYTES take seconds that would stall every other
    # request on the event loop. A small plain body costs less than the hop to a thread.
    try:
        if len(body) > THREAD_PARSE_BYTES or (encoding or "identity").lower() != "identity":
            req = await asyncio.to_thread(read)
        else:
            req = read()
    except GatewayError as exc:  # counted against the model, as the data plane's refusals are
        dp.refused(servable, exc)
        raise
    resp = await dp.infer(name, version, req, client_id(KeyChecker.presented(request)))
    binary_names = {o.name: o.binary for o in req.outputs or [] if o.binary is not None}
    encode = (resp, req.binary_output_default, binary_names)
    if sum(out.data.size for out in resp.outputs) > THREAD_ENCODE_ELEMENTS:
        # sliced: orjson holds the GIL for a whole call, the loop gets it back between slices
        payload, headers = await asyncio.to_thread(encode_infer_response, *encode, sliced=True)
    else:
        payload, headers = encode_infer_response(*encode)
    media = "application/octet-stream" if headers else "application/json"
    return Response(payload, media_type=media, headers=headers)


def _is_ascii_digits(value: str) -> bool:
    # str.isdigit() also accepts '²' or '١', which int() refuses (latin-1 headers carry '²')
    return value.isascii() and value.isdigit()


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """Request compression as tritonclient sends it (gzip or deflate), whole and checked: a
    stream cut short (gzip's CRC and length trailer missing) or followed by other bytes is
    refused (400), every member of a multi-member gzip is read (RFC 1952), and more than
    ``limit`` bytes out is refused (413) as soon as it is reached."""
    if encoding is None or encoding.lower() == "identity":
        return body
    enc = encoding.lower()
    if enc not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip or deflate")
    parts: list[bytes] = []
    total = 0
    rest = body
    while True:
        d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
        try:
            out = d.decompress(rest, limit - total + 1)
        except zlib.error as exc:
            raise BadRequest(f"body is not valid {enc}: {exc}") from None
        total += len(out)
        if total > limit or d.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
        if not d.eof:
            raise BadRequest(f"body is not valid {enc}: the stream is truncated")
        parts.append(out)
        rest = d.unused_data
        if not rest:
            return parts[0] if len(parts) == 1 else b"".join(parts)
        if enc != "gzip" or not rest.startswith(_GZIP_MAGIC):
            raise BadRequest(f"body is not valid {enc}: {len(rest)} bytes follow the stream")


_GZIP_MAGIC = b"\x1f\x8b"

"""The socket protocol: length-prefixed CBOR frames over a Unix domain socket.

A Unix socket stands in for Nitro's vsock: the enclave has no network listener, and only
processes that can open the socket file (mode 0600) reach it.

Frame::

    [4 bytes: body length, big-endian uint32][body: one CBOR map]

Request body  ``{"v": 1, "id": int, "op": str, ...op arguments}``
Answer body   ``{"v": 1, "id": int, "result": {...}}``
Error body    ``{"v": 1, "id": int | null, "error": {"code": str, "message": str}}``

Operations: ``ping``, ``info``, ``attest`` (``nonce``, ``user_data``?, ``session_key``?: an
X25519 public key, see :mod:`fides_core.session`) and ``verify`` (``requests``:
``[{"id": str, "nonce": bytes, "inputs": {name: tensor}}]``, one frame per batch; ``session``?:
a session id, and the answer then carries ``mac``, the session's MAC of the signed result,
unless the enclave does not know the session). Both optional fields were added without a
version change: an enclave that ignores them answers as before.

A body longer than the maximum frame size is answered with ``frame_too_large`` and the
connection is closed (the stream cannot be trusted past an unread body); a malformed body or
another version is answered with an error and the connection goes on.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import cbor2

from fides_core.enclave_errors import FrameTooLarge, MalformedFrame, UnsupportedVersion

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
HEADER = struct.Struct(">I")
OPS = ("ping", "info", "attest", "verify")


class ConnectionClosed(Exception):
    """The peer closed the stream cleanly between two frames."""


def encode_frame(body: dict[str, Any], max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    data = cbor2.dumps(body)
    if len(data) > max_frame_bytes:
        raise FrameTooLarge(
            f"frame of {len(data)} bytes exceeds the maximum of {max_frame_bytes}",
            request_id=_int_or_none(body.get("id")),
        )
    return HEADER.pack(len(data)) + data


def request(request_id: int, op: str, **args: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "op": op, **args}


def answer(request_id: int | None, result: dict[str, Any]) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "result": result}


def error(request_id: int | None, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "error": {"code": code, "message": message}}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decode_body(data: bytes) -> dict[str, Any]:
    """One frame body to a map; checks the envelope (version, id), not the operation."""
    try:
        body = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise MalformedFrame(f"frame body is not valid CBOR: {exc}") from None
    except Exception as exc:  # cbor2's semantic tags can raise many things on hostile input
        raise MalformedFrame(f"frame body cannot be decoded: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise MalformedFrame(f"frame body must be a CBOR map, not {type(body).__name__}")
    request_id = _int_or_none(body.get("id"))
    version = body.get("v")
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
            request_id=request_id,
        )
    if request_id is None and "id" in body and body["id"] is not None:
        raise MalformedFrame("frame id must be an integer")
    return body


async def read_frame(
    reader: asyncio.StreamReader,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    body_timeout_s: float | None = 30.0,
) -> dict[str, Any]:
    """Read one frame. Raises ConnectionClosed at a clean end of stream,
    ``asyncio.IncompleteReadError`` for a truncated frame, TimeoutError for a stalled frame,
    FrameTooLarge (body left unread), MalformedFrame and UnsupportedVersion.

    An idle connection may wait for its next frame as long as it likes; once a frame's first
    byte is in, the rest of it (header and body) must follow within ``body_timeout_s``."""
    try:
        first = await reader.readexactly(1)
    except asyncio.IncompleteReadError:
        raise ConnectionClosed from None
    deadline = (
        None if body_timeout_s is None else asyncio.get_running_loop().time() + body_timeout_s
    )
    async with asyncio.timeout_at(deadline):
        header = first + await reader.readexactly(HEADER.size - 1)
    (length,) = HEADER.unpack(header)
    if length > max_frame_bytes:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the maximum of {max_frame_bytes}")
    if length == 0:
        raise MalformedFrame("empty frame")
    async with asyncio.timeout_at(deadline):
        data = await reader.readexactly(length)
    return decode_body(data)

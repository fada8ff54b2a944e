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

Bodies are plain CBOR: maps, arrays, strings, integers, floats and simple values. A semantic
tag, an indefinite length, more than ``DEFAULT_MAX_FRAME_ITEMS`` data items, nesting deeper than
``MAX_FRAME_DEPTH`` or bytes after the map make the frame ``malformed_frame``
(:func:`check_plain_cbor`), on both sides: the enclave reads requests and the gateway reads
answers with :func:`read_frame`.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import cbor2

from fides_core.enclave_errors import FrameTooLarge, MalformedFrame, UnsupportedVersion
from fides_core.plain_cbor import DEFAULT_MAX_ITEMS, UnsafeCbor, check_plain, skip_item

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
# A verify call holds about 17 items per one-input request: 2**18 is 15,000 such requests,
# 3.7x the gateway's largest enclave batch (4,096 rows); walking it takes 30-60 ms.
DEFAULT_MAX_FRAME_ITEMS = DEFAULT_MAX_ITEMS
MAX_FRAME_DEPTH = 16  # a verify answer nests 7 deep (body, result, items, item, outputs, ...)
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


def check_plain_cbor(data: bytes, max_items: int = DEFAULT_MAX_FRAME_ITEMS) -> None:
    """Refuse, before cbor2 builds anything, a body that holds a semantic tag, an indefinite
    length, more than ``max_items`` data items, or bytes after its one item
    (:func:`fides_core.plain_cbor.check_plain`: cbor2 evaluates its built-in tags before any
    ``tag_hook``, a rational of two bignums for seconds to hours). The protocol uses no tags."""
    try:
        check_plain(data, what="frame body", max_items=max_items)
    except UnsafeCbor as exc:
        raise MalformedFrame(str(exc)) from None


def _walk(data: bytes, pos: int, max_items: int) -> tuple[int, int]:
    """Skip the one CBOR item at ``pos``, tags included: (where it ends, items seen)."""
    try:
        return skip_item(data, pos, max_items, what="frame body", allowed_tags=None)
    except UnsafeCbor as exc:
        raise MalformedFrame(str(exc)) from None


_ID_KEY = cbor2.dumps("id")


def _envelope_id(data: bytes, max_items: int) -> int | None:
    """The integer ``id`` of a body refused by :func:`check_plain_cbor`, when its top-level map
    can be walked, so that the error answer names the request."""
    try:
        if not data or data[0] >> 5 != 5 or data[0] & 0x1F >= 24:
            return None  # only small maps: an envelope has a handful of keys
        pos, budget = 1, max_items
        for _ in range(data[0] & 0x1F):
            key_end, n = _walk(data, pos, budget)
            value_end, m = _walk(data, key_end, budget - n)
            budget -= n + m
            if data[pos:key_end] == _ID_KEY and data[key_end] >> 5 in (0, 1):
                return _int_or_none(cbor2.loads(data[key_end:value_end]))
            pos = value_end
    except (MalformedFrame, cbor2.CBORDecodeError, IndexError):
        return None
    return None


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    # never reached after check_plain_cbor; kept so that no unknown tag becomes a CBORTag
    raise MalformedFrame(f"frame body holds CBOR tag {tag.tag}; the protocol uses no tags")


def decode_body(data: bytes, max_items: int = DEFAULT_MAX_FRAME_ITEMS) -> dict[str, Any]:
    """One frame body to a map; checks the envelope (version, id), not the operation."""
    try:
        check_plain_cbor(data, max_items)
    except MalformedFrame as exc:
        exc.request_id = _envelope_id(data, max_items)
        raise
    try:
        body = cbor2.loads(data, tag_hook=_refuse_tag, max_depth=MAX_FRAME_DEPTH)
    except MalformedFrame:
        raise
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise MalformedFrame(f"frame body is not valid CBOR: {exc}") from None
    except Exception as exc:  # whatever else hostile input makes cbor2 raise
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
    max_items: int = DEFAULT_MAX_FRAME_ITEMS,
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
    return decode_body(data, max_items)

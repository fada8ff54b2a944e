"""JSON responses serialised with orjson (numpy-aware, much faster than json)."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from fastapi import Response

__all__ = ["JSON_SLICE_ELEMENTS", "dumps", "error_response", "json_response"]

_NUMPY = orjson.OPT_SERIALIZE_NUMPY

# Longer arrays and lists are written this many elements at a time (about 1.6 ms for FP32,
# 0.7 MiB of JSON). orjson holds the GIL for the whole of one call: 4 Mi FP32 elements in one
# call held it 108 ms, so a worker thread encoding an answer froze the event loop as long as
# encoding on the loop did (longest stall 122-219 ms, 2 cores under load). Between slices the
# loop takes the GIL back within the interpreter's switch interval (5 ms): 10-13 ms with
# slices of 8 to 64 Ki elements, 20 ms with 256 Ki.
JSON_SLICE_ELEMENTS = 64 * 1024

# Stands for a long value in the document's first pass. orjson escapes control characters in
# strings (NUL is written \u0000), so this raw byte appears nowhere else in its output.
_SLOT_BYTE = b"\x00"
_SLOT = orjson.Fragment(_SLOT_BYTE)


def json_response(
    doc: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(doc, option=_NUMPY),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


def error_response(
    message: str, status_code: int, headers: dict[str, str] | None = None
) -> Response:
    return json_response({"error": message}, status_code, headers)


def dumps(doc: Any) -> bytes:
    """``orjson.dumps(doc, option=OPT_SERIALIZE_NUMPY)`` byte for byte (and its errors), with
    every array or list of more than :data:`JSON_SLICE_ELEMENTS` elements written a slice at a
    time, so that a worker thread encoding a large document lets the event loop run between
    slices. Dicts, and lists of dicts, lists or arrays, are looked into; arrays are cut along
    their first axis (the tensor data the gateway writes is flat)."""
    long: list[list[Any] | np.ndarray] = []
    head = orjson.dumps(_set_aside(doc, long), option=_NUMPY)
    if not long:
        return head
    texts = head.split(_SLOT_BYTE)
    out: list[bytes] = []
    for value, text in zip(long, texts[:-1], strict=True):
        out.append(text)
        out.append(b"[")
        step = _slice_rows(value)
        for start in range(0, len(value), step):
            if start:
                out.append(b",")
            out.append(orjson.dumps(value[start : start + step], option=_NUMPY)[1:-1])
        out.append(b"]")
    out.append(texts[-1])
    return b"".join(out)  # above 1 MiB, bytes.join copies without holding the GIL


def _set_aside(value: Any, long: list[list[Any] | np.ndarray]) -> Any:
    """``value`` with each long array or list replaced by :data:`_SLOT`, appended to ``long``
    in the order orjson writes them (a dict's insertion order)."""
    if isinstance(value, dict):
        return {key: _set_aside(item, long) for key, item in value.items()}
    if isinstance(value, list):
        if len(value) > JSON_SLICE_ELEMENTS:
            long.append(value)
            return _SLOT
        # a list of scalars (a BYTES tensor's strings) is not walked item by item
        if value and isinstance(value[0], dict | list | np.ndarray):
            return [_set_aside(item, long) for item in value]
        return value
    if isinstance(value, np.ndarray) and value.ndim > 0 and value.size > JSON_SLICE_ELEMENTS:
        long.append(value)
        return _SLOT
    return value


def _slice_rows(value: list[Any] | np.ndarray) -> int:
    if isinstance(value, list):
        return JSON_SLICE_ELEMENTS
    per_row = int(value.size) // int(value.shape[0])  # >= 1: more elements than a slice
    return max(1, JSON_SLICE_ELEMENTS // per_row)

"""The Open Inference Protocol's tensors: datatypes and their numpy equivalents, and the one
codec of tensor data (JSON lists and Triton's binary tensor extension) that the gateway's
routes, its upstream runtime and the client SDK all use.

Decoding is done by hand rather than through pydantic models: a 1 MB tensor as a JSON list
would otherwise be validated element by element, and hand-written checks give error messages
that name the tensor and the problem (:class:`TensorError`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from itertools import chain
from typing import Any

import numpy as np

__all__ = [
    "DATATYPES",
    "TensorError",
    "decode_binary_data",
    "decode_json_data",
    "decode_json_tensor",
    "deserialize_bytes",
    "element_size",
    "encode_binary_data",
    "encode_json_data",
    "encode_json_tensor",
    "oip_datatype",
    "serialize_bytes",
]

_INT_KINDS = frozenset("iu")


class TensorError(ValueError):
    """Tensor data that does not match its datatype or shape; the message names the tensor."""


# OIP datatype -> numpy dtype. BYTES is carried as an object array of ``bytes``.
DATATYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    # BF16 (Triton extension) travels as raw 2-byte words; numpy has no bfloat16, so it is
    # widened to float32 on decode (exact) and narrowed by truncation on encode.
    "BF16": np.dtype(np.float32),
    "BYTES": np.dtype(np.object_),
}

_NP_TO_OIP: dict[np.dtype[np.generic], str] = {
    v: k for k, v in DATATYPES.items() if k not in ("BF16",)
}


def oip_datatype(dtype: np.dtype[np.generic]) -> str:
    """The OIP name of a numpy dtype (str/bytes/object arrays are BYTES)."""
    if dtype.kind in ("S", "U", "O"):
        return "BYTES"
    try:
        return _NP_TO_OIP[dtype]
    except KeyError:
        raise ValueError(f"no Open Inference Protocol datatype for numpy dtype {dtype}") from None


def element_size(datatype: str) -> int:
    """Bytes per element in the binary tensor encoding (BYTES is variable: 0)."""
    if datatype == "BYTES":
        return 0
    if datatype == "BF16":
        return 2
    return int(DATATYPES[datatype].itemsize)


def decode_json_data(data: Any, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A tensor from its JSON ``data`` (flat or nested, row-major), exactly ``shape``; values
    that do not fit ``datatype`` are refused, never wrapped. ``what`` names the tensor in
    errors (``input 'x'``)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        if not all(isinstance(x, str) for x in flat):
            raise TensorError(f"{what}: BYTES data must be strings")
        if len(flat) != count:
            raise _count_error(what, len(flat), shape)
        arr = np.empty(count, dtype=object)
        arr[:] = [x.encode("utf-8") for x in flat]
        return arr.reshape(shape)
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise TensorError(f"{what}: data is ragged or not numeric") from None
    if arr.size != count:
        raise _count_error(what, arr.size, shape)
    target = DATATYPES[datatype]
    kind = arr.dtype.kind
    if count == 0:
        return np.zeros(shape, dtype=target)
    if datatype == "BOOL":
        if kind != "b":
            raise TensorError(f"{what}: BOOL data must be true/false")
    elif kind == "b" or (kind in "iuf" and bool in _element_types(data)):
        # numpy reads true as 1: [true, 2] would pass as INT32 [1, 2]
        raise TensorError(f"{what}: {datatype} data must be numbers, not true/false")
    elif target.kind in _INT_KINDS:
        return _decode_ints(data, arr, datatype, shape, what)
    elif kind not in "iuf":
        raise TensorError(f"{what}: {datatype} data must be numbers, got {_kind(kind)}")
    with np.errstate(over="ignore"):
        out = arr.astype(target, copy=False).reshape(shape)
    narrowed = target.kind == "f" and target.itemsize < arr.dtype.itemsize
    # a finite value too large for the narrower float (NaN/Inf sent as such are the model's call)
    if narrowed and np.isinf(out).any() and np.isfinite(arr).all():
        raise TensorError(f"{what}: values out of range for {datatype}")
    return out


def _decode_ints(
    data: Any, arr: np.ndarray, datatype: str, shape: tuple[int, ...], what: str
) -> np.ndarray:
    target = DATATYPES[datatype]
    info = np.iinfo(target)  # type: ignore[type-var]
    kind = arr.dtype.kind
    if kind in _INT_KINDS:
        if arr.min() < info.min or arr.max() > info.max:
            raise TensorError(f"{what}: values out of range for {datatype}")
        return arr.astype(target, copy=False).reshape(shape)
    # numpy turns a mix of ints beyond int64 (large UINT64 values) into floats or objects:
    # check the Python values themselves
    flat = _flatten(data)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise TensorError(f"{what}: {datatype} data must be integers, got {_kind(kind)}")
    if min(flat) < info.min or max(flat) > info.max:
        raise TensorError(f"{what}: values out of range for {datatype}")
    return np.array(flat, dtype=target).reshape(shape)


def _kind(kind: str) -> str:
    return {"f": "floats", "U": "strings", "O": "mixed values", "b": "booleans"}.get(kind, kind)


def _count_error(what: str, got: int, shape: tuple[int, ...]) -> TensorError:
    return TensorError(
        f"{what}: data has {got} elements but shape {list(shape)} needs {math.prod(shape)}"
    )


def _element_types(data: list[Any]) -> set[type]:
    """The types of a rectangular nested list's elements (numpy accepted it as numbers, so
    every level is all lists or all scalars), without building the flat list."""
    items: Iterator[Any] = iter(data)
    probe = data
    while probe and isinstance(probe[0], list):
        items = chain.from_iterable(items)
        probe = probe[0]
    return set(map(type, items))


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def decode_binary_data(
    chunk: memoryview, datatype: str, shape: tuple[int, ...], what: str
) -> np.ndarray:
    """A tensor from its raw little-endian bytes (Triton's binary tensor extension)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        try:
            items = deserialize_bytes(chunk, what, max_count=count)
        except _TooManyElements:
            raise TensorError(
                f"{what}: data has more than {count} elements but shape {list(shape)} needs {count}"
            ) from None
        if len(items) != count:
            raise _count_error(what, len(items), shape)
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    size = element_size(datatype)
    if len(chunk) != count * size:
        raise TensorError(
            f"{what}: binary_data_size is {len(chunk)} bytes but shape {list(shape)} "
            f"of {datatype} needs {count * size}"
        )
    if datatype == "BF16":
        words = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
        return words.view(np.float32).reshape(shape)
    dtype = DATATYPES[datatype].newbyteorder("<")
    return np.frombuffer(chunk, dtype=dtype).reshape(shape)


class _TooManyElements(TensorError):
    """More BYTES elements than ``max_count`` (the caller names the shape)."""


def deserialize_bytes(chunk: memoryview, what: str, max_count: int | None = None) -> list[bytes]:
    """Triton's BYTES encoding: each element is a 4-byte little-endian length then the bytes.

    ``max_count``: refuse (TensorError) at the first element past it, before reading the rest:
    16 MiB of zero lengths are 4M empty elements, seconds of the event loop to split.
    """
    items: list[bytes] = []
    pos = 0
    while pos < len(chunk):
        if max_count is not None and len(items) == max_count:
            raise _TooManyElements(f"{what}: data has more than {max_count} elements")
        if pos + 4 > len(chunk):
            raise TensorError(f"{what}: truncated BYTES element length")
        n = int.from_bytes(chunk[pos : pos + 4], "little")
        pos += 4
        if pos + n > len(chunk):
            raise TensorError(f"{what}: BYTES element runs past binary_data_size")
        items.append(bytes(chunk[pos : pos + n]))
        pos += n
    return items


def serialize_bytes(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(len(b).to_bytes(4, "little"))
        parts.append(b)
    return b"".join(parts)


def encode_binary_data(arr: np.ndarray, datatype: str) -> bytes:
    """Raw little-endian bytes of a tensor (BYTES: Triton's length-prefixed elements)."""
    if datatype == "BYTES":
        return serialize_bytes(arr)
    if datatype == "BF16":
        words = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32) >> 16
        return words.astype("<u2").tobytes()
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def encode_json_data(arr: np.ndarray, datatype: str) -> Any:
    """The JSON ``data`` of a tensor, flat (FP16 widened; BYTES as UTF-8 strings)."""
    flat = arr.ravel()
    if datatype == "BYTES":
        out = []
        for item in flat:
            if isinstance(item, bytes):
                try:
                    out.append(item.decode("utf-8"))
                except UnicodeDecodeError:
                    raise TensorError(
                        "output holds bytes that are not UTF-8; ask for it with binary_data"
                    ) from None
            else:
                out.append(str(item))
        return out
    if datatype == "FP16":
        return flat.astype(np.float32)
    return np.ascontiguousarray(flat)


def decode_json_tensor(item: Any, kind: str = "output") -> tuple[str, np.ndarray]:
    """A whole JSON tensor object ``{"name", "datatype", "shape", "data"}`` (what a client
    reads from an answer, or a server from a request), every field checked."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise TensorError(f"every {kind} must be an object with a string 'name'")
    name = item["name"]
    what = f"{kind} '{name}'"
    datatype, shape = item.get("datatype"), item.get("shape")
    if datatype not in DATATYPES:
        raise TensorError(f"{what}: unknown datatype {datatype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorError(f"{what}: 'shape' must be a list of non-negative integers")
    if "data" not in item:
        raise TensorError(f"{what}: no 'data' (binary tensors are not read here)")
    return name, decode_json_data(item["data"], datatype, tuple(shape), what)


def encode_json_tensor(name: str, array: np.ndarray, datatype: str | None = None) -> dict[str, Any]:
    """A JSON tensor object for ``array`` (its datatype from its dtype unless given)."""
    datatype = datatype or oip_datatype(array.dtype)
    flat = np.ascontiguousarray(array).reshape(-1)
    data = encode_json_data(flat, datatype)
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}

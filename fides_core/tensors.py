"""Tensors on the wire and their canonical digest (what a signed result commits to).

Wire form (a CBOR map)::

    {"datatype": "FP32", "shape": [2, 4], "data": <raw bytes, little-endian, C order>}

Canonical bytes, hashed with SHA-256 into a verification result (any client, in any language,
recomputes them from the exact tensor it sent)::

    b"fides-tensor/1;" + datatype + b";" + ",".join(shape) + b";" + raw little-endian C-order bytes

The prefix names the scheme; datatype and shape are in the digest so that the same bytes read
as another type or shape (FP32 [2, 2] vs INT32 [4]) never share a digest.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fides_core.enclave_errors import InvalidRequest
from fides_core.oip import DATATYPES as OIP_DATATYPES

# The numeric Open Inference Protocol datatypes (fides_core.oip's table), little-endian. BYTES is
# not supported: a verifier model takes numbers; nor BF16, which numpy has no type for.
DATATYPES: dict[str, np.dtype[Any]] = {
    name: dtype.newbyteorder("<")
    for name, dtype in OIP_DATATYPES.items()
    if name not in ("BYTES", "BF16")
}
_BY_KIND = {(dt.kind, dt.itemsize): name for name, dt in DATATYPES.items()}
MAX_RANK = 8
MAX_DIM = 2**31 - 1

Array = npt.NDArray[Any]


def datatype_of(array: Array) -> str:
    """The OIP datatype name of a numpy array (byte order aside)."""
    name = _BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if name is None:
        raise InvalidRequest(f"unsupported tensor dtype {array.dtype}")
    return name


def raw_bytes(array: Array) -> bytes:
    """Little-endian, C-order bytes of ``array`` (a copy only where needed)."""
    dt = DATATYPES[datatype_of(array)]
    return np.ascontiguousarray(array, dtype=dt).tobytes(order="C")


def canonical_bytes(array: Array) -> bytes:
    shape = ",".join(str(int(d)) for d in array.shape)
    header = f"fides-tensor/1;{datatype_of(array)};{shape};".encode("ascii")
    return header + raw_bytes(array)


def tensor_digest(array: Array) -> bytes:
    """SHA-256 of :func:`canonical_bytes`, 32 bytes."""
    return hashlib.sha256(canonical_bytes(array)).digest()


def encode_tensor(array: Array) -> dict[str, Any]:
    return {
        "datatype": datatype_of(array),
        "shape": [int(d) for d in array.shape],
        "data": raw_bytes(array),
    }


def decode_tensor(obj: Any, *, what: str = "tensor") -> Array:
    """A wire tensor back to numpy; every field is checked (the sender may be hostile)."""
    if not isinstance(obj, Mapping):
        raise InvalidRequest(f"{what}: expected a map with datatype, shape and data")
    datatype, shape, data = obj.get("datatype"), obj.get("shape"), obj.get("data")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise InvalidRequest(f"{what}: unsupported datatype {datatype!r}")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InvalidRequest(f"{what}: shape must be a list of at most {MAX_RANK} ints >= 0")
    if not isinstance(data, bytes):
        raise InvalidRequest(f"{what}: data must be a byte string")
    dt = DATATYPES[datatype]
    if any(d > MAX_DIM for d in shape):  # an empty [0, 2**62] would pass the size check
        raise InvalidRequest(f"{what}: a dimension exceeds {MAX_DIM}")
    expected = math.prod(shape) * dt.itemsize
    if len(data) != expected:
        raise InvalidRequest(
            f"{what}: {len(data)} data bytes for {datatype} {list(shape)} (expected {expected})"
        )
    return np.frombuffer(data, dtype=dt).reshape(shape)


def decode_tensors(obj: Any, *, what: str) -> dict[str, Array]:
    if not isinstance(obj, Mapping) or not obj:
        raise InvalidRequest(f"{what}: expected a non-empty map of name -> tensor")
    out: dict[str, Array] = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            raise InvalidRequest(f"{what}: tensor names must be strings")
        out[name] = decode_tensor(value, what=f"{what}.{name}")
    return out

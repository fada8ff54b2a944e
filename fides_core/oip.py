"""Open Inference Protocol datatypes and their numpy equivalents."""

from __future__ import annotations

import numpy as np

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

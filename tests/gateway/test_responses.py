"""The sliced JSON writer (gateway/api/responses.py): byte for byte, and error for error, what
one orjson call writes, for every kind of value an answer holds, at and around slice lengths."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from gateway.api.responses import JSON_SLICE_ELEMENTS, dumps

S = JSON_SLICE_ELEMENTS


def _values(n: int, dtype: str) -> np.ndarray:
    return (np.random.default_rng(n).standard_normal(n) * 1000).astype(dtype)


DOCS: dict[str, Any] = {
    "short": {"a": _values(10, "float32"), "b": [1, 2, 3]},
    "one slice": {"data": _values(S, "float32")},
    "one more": {"data": _values(S + 1, "float32")},
    "slices exactly": {"data": _values(3 * S, "float32")},
    "slices and a rest": {"data": _values(3 * S + 7, "float64")},
    "int64": {"data": np.arange(-S, 2 * S, dtype=np.int64) * 123_456_789},
    "bool": {"data": np.arange(S + 5) % 3 == 0},
    "uint8": {"data": (np.arange(S + 5) % 256).astype(np.uint8)},
    "2-d": {"data": _values(4 * S, "float32").reshape(-1, 1024)},
    "2-d, rows longer than a slice": {"data": _values(4 * S, "float32").reshape(2, -1)},
    "strings": {"data": [f'label {i} \u00e9\u4e2d\x00"\\' for i in range(2 * S + 1)]},
    "an answer": {
        "model_name": "m\x00",  # NUL in a string is written escaped: not a slot
        "model_version": "1",
        "id": "x",
        "parameters": {"note": "\x00\x00", "n": 3},
        "outputs": [
            {"name": "a", "datatype": "FP32", "shape": [S + 1], "data": _values(S + 1, "float32")},
            {"name": "b", "datatype": "INT32", "shape": [2], "data": np.arange(2, dtype=np.int32)},
            {"name": "c", "datatype": "FP16", "shape": [2 * S], "data": _values(2 * S, "float32")},
        ],
    },
    "nested lists": [[_values(S + 3, "float32"), [_values(2 * S, "int32")]], {"k": [1.5]}],
}


@pytest.mark.parametrize("name", list(DOCS))
def test_the_sliced_writer_writes_what_orjson_writes(name: str) -> None:
    doc = DOCS[name]
    assert dumps(doc) == orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def test_the_sliced_writer_refuses_what_orjson_refuses() -> None:
    for doc in (
        {"data": _values(3 * S, "float32")[::2]},  # not C-contiguous, in a long value
        {"data": _values(2 * S, "float32"), 1: "a key that is not a string"},
        {"data": [*range(S), object()]},
    ):
        with pytest.raises(orjson.JSONEncodeError):
            orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        with pytest.raises(orjson.JSONEncodeError):
            dumps(doc)

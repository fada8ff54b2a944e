"""Log lines carry their structured fields in text mode too (not just ``request``)."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.logs import JsonFormatter, TextFormatter


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gateway.access", logging.INFO, __file__, 1, msg, (), None)
    record.__dict__.update(extra)
    return record


def test_a_text_access_line_names_method_path_status_and_time() -> None:
    extra = {
        "method": "POST",
        "path": "/v2/models/digits/infer",
        "status": 400,
        "duration_s": 0.0012,
    }
    line = TextFormatter().format(_record("request", request_id="abc123", **extra))
    assert line.endswith(
        "INFO gateway.access request method=POST path=/v2/models/digits/infer status=400 "
        "duration_s=0.0012 request_id=abc123"
    )


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("a b", 'x="a b"'),
        ({"attack": "switch", "rate": 1.0}, 'x={"attack":"switch","rate":1.0}'),
        ("", 'x=""'),
    ],
)
def test_text_values_stay_one_readable_token(value: object, shown: str) -> None:
    assert TextFormatter().format(_record("m", x=value)).endswith(f"m {shown}")


def test_json_and_text_carry_the_same_fields() -> None:
    record = _record("request", method="GET", status=200)
    doc = json.loads(JsonFormatter().format(record))
    assert (doc["method"], doc["status"]) == ("GET", 200)
    assert "method=GET status=200" in TextFormatter().format(record)

"""The repository layout's version names: ASCII digits, at least 1, at most 18 digits (a name
past Python's 4,300-digit int() limit is not a version, never a ValueError)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fides_core.layout import (
    MAX_VERSION_DIGITS,
    MODEL_NAME_RULE,
    is_model_name,
    is_version,
    versions_on_disk,
)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("1", True),
        ("42", True),
        ("9" * MAX_VERSION_DIGITS, True),
        ("1" * (MAX_VERSION_DIGITS + 1), False),
        ("9" * 5000, False),  # int() would raise ValueError past 4,300 digits
        ("0", False),
        ("", False),
        ("01x", False),
        ("\u00b2", False),
        ("-1", False),
    ],
)
def test_is_version(name: str, ok: bool) -> None:
    assert is_version(name) is ok


def test_overlong_version_directories_are_skipped(tmp_path: Path) -> None:
    for name in ("1", "3", "7" * 200):  # a file name holds 255 bytes at most
        (tmp_path / name).mkdir()
    assert versions_on_disk(tmp_path) == [1, 3]


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("digits", True),
        ("a.b-c_d", True),
        ("Stats", True),  # routes match case-sensitively: only 'stats' is shadowed
        ("stats2", True),
        ("stats", False),  # GET /v2/models/stats is every model's statistics
        ("a..b", False),
        ("a@b", False),
    ],
)
def test_is_model_name(name: str, ok: bool) -> None:
    assert is_model_name(name) is ok


def test_the_rule_says_why_stats_is_no_model_name() -> None:
    assert "not 'stats'" in MODEL_NAME_RULE
    assert "/v2/models/stats" in MODEL_NAME_RULE

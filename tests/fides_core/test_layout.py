"""The repository layout's version names: ASCII digits, at least 1, at most 18 digits (a name
past Python's 4,300-digit int() limit is not a version, never a ValueError)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fides_core.layout import MAX_VERSION_DIGITS, is_version, versions_on_disk


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

"""``check_writable``: whether the sequential alarm's state can be kept in a directory, asked
before the gateway starts (``fides serve`` refuses to start when it cannot)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.integrity.alarm_state import check_writable


def test_a_missing_directory_is_made_and_no_probe_is_left(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "alarm"
    check_writable(directory)
    assert directory.is_dir()
    assert list(directory.iterdir()) == []


def test_a_directory_that_cannot_be_made_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(NotADirectoryError):
        check_writable(blocker / "alarm")

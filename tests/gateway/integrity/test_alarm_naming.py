"""Whose alarm state file is whose (issue 21): model and host names may both hold dots, so
``<model>.<host>.alarm.npz`` gave model ``a`` on host ``b.c`` and model ``a.b`` on host ``c``
one file, and a model's start took over or set aside files of any model whose name it
prefixes. Files are ``<model>@<host>.alarm.npz`` now; the files of the earlier naming are still
read back on an upgrade, only by the model their metadata names."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fides_core.layout import MODEL_NAME_RE
from gateway.integrity.alarm import AlarmMonitor
from gateway.integrity.alarm_state import instance_name

HIGH, LOW, KL = np.array([0.999]), np.array([0.01]), np.array([0.2])


def monitor(tmp_path: Path, model: str, instance: str) -> AlarmMonitor:
    rng = np.random.default_rng(0)
    return AlarmMonitor(
        model,
        rng.random(500) * 0.1,  # clean detector scores: low
        rng.random(500) * 0.5,  # clean KL
        state_dir=tmp_path,
        instance=instance,
    )


def _saved(tmp_path: Path, model: str, instance: str, *, alarm: str | None = None) -> Path:
    """A monitor that sees a few answers (and raises ``alarm``'s key alarm), saves, stops."""
    mon = monitor(tmp_path, model, instance)
    for k in range(3):
        mon.observe(f"k{k}", LOW, KL)
    for _ in range(20 if alarm else 0):
        mon.observe(alarm or "", HIGH, np.array([3.0]))
    mon.save()
    assert mon.path is not None
    path = mon.path
    del mon  # the gateway stops: its lock goes with it
    return path


def test_a_dotted_model_and_a_dotted_host_write_files_of_their_own(tmp_path: Path) -> None:
    """Model ``a.b`` on host ``c`` and model ``a`` on host ``b.c``, on one volume: before, one
    file ``a.b.c.alarm.npz``, and ``a``'s start set ``a.b``'s latched alarm aside."""
    theirs = _saved(tmp_path, "a.b", "c", alarm="key-x")
    mine = monitor(tmp_path, "a", "b.c")
    assert mine.path != theirs
    assert mine.restored == "new", mine.restored
    assert mine.state_notes == []  # no shared lock either
    assert theirs.is_file()
    assert not list(tmp_path.glob("*.rejected"))
    mine.observe("k", LOW, KL)
    mine.save()
    del mine
    again = monitor(tmp_path, "a.b", "c")  # its own file, untouched by a's saves
    assert again.restored == "restored 4 keys and the model's stream", again.restored
    assert again.in_alarm() == {"model": True, "keys": ["key-x"]}
    assert monitor(tmp_path, "a", "b.c").restored == "restored 1 keys and the model's stream"


def test_a_damaged_file_of_a_dotted_model_is_not_set_aside_by_the_shorter_name(
    tmp_path: Path,
) -> None:
    theirs = _saved(tmp_path, "a.b", "h")
    theirs.write_bytes(b"PK\x03\x04 truncated")
    other = monitor(tmp_path, "a", "h2")  # a new host name: takes over what is free of a's
    assert other.restored == "new", other.restored
    assert theirs.read_bytes() == b"PK\x03\x04 truncated"
    # its own model refuses it, sets it aside and says so
    owner = monitor(tmp_path, "a.b", "h")
    assert owner.restored.startswith("refused ("), owner.restored
    assert theirs.with_name(theirs.name + ".rejected").is_file()


def test_a_state_file_of_the_earlier_naming_is_read_back_on_an_upgrade(tmp_path: Path) -> None:
    """``<model>.<host>.alarm.npz``, as the code before ``<model>@<host>`` wrote it (the
    content is the same): restored with its statistics and latched alarms, then renamed."""
    mon = monitor(tmp_path, "m", "h")
    for k in range(3):
        mon.observe(f"k{k}", LOW, KL)
    for _ in range(20):
        mon.observe("key-x", HIGH, np.array([3.0]))
    before = mon.status()
    mon.save()
    assert mon.path is not None
    legacy = tmp_path / "m.h.alarm.npz"
    os.replace(mon.path, legacy)
    (tmp_path / "m.h.alarm.lock").touch()  # the earlier version's lock, free
    del mon
    new = monitor(tmp_path, "m", "h")
    assert "restored 4 keys and the model's stream" in new.restored, new.restored
    after = new.status()
    assert after["model"] == before["model"]
    assert after["keys"]["in_alarm"] == before["keys"]["in_alarm"]
    assert new.in_alarm() == {"model": True, "keys": ["key-x"]}
    assert new.path is not None
    assert new.path.is_file()
    assert new.path.name == "m@h.alarm.npz"
    assert not legacy.exists()  # taken over: one file from now on
    assert not (tmp_path / "m.h.alarm.lock").exists()


def test_an_earlier_file_that_fits_two_models_goes_to_the_one_it_names(tmp_path: Path) -> None:
    """``a.b.c.alarm.npz`` of the earlier naming: model ``a`` on host ``b.c`` or model ``a.b``
    on host ``c``. Its metadata decides; the other model leaves it alone."""
    path = _saved(tmp_path, "a", "b.c", alarm="key-x")
    legacy = tmp_path / "a.b.c.alarm.npz"
    os.replace(path, legacy)
    other = monitor(tmp_path, "a.b", "c")
    assert other.restored == "new", other.restored
    assert legacy.is_file()
    del other
    owner = monitor(tmp_path, "a", "b.c")
    assert owner.restored.startswith("took over a.b.c.alarm.npz"), owner.restored
    assert owner.in_alarm() == {"model": True, "keys": ["key-x"]}
    assert not legacy.exists()


@pytest.mark.parametrize("model", ["a", "a.b"])
def test_a_damaged_earlier_file_that_may_be_another_models_is_left_in_place(
    tmp_path: Path, model: str
) -> None:
    """Neither its name nor its content says whose it is: no model may set it aside (each
    that it may belong to starts clean and says so)."""
    legacy = tmp_path / "a.b.c.alarm.npz"
    legacy.write_bytes(b"PK\x03\x04 truncated")
    mon = monitor(tmp_path, model, "h")
    assert mon.restored == "new", mon.restored
    assert legacy.read_bytes() == b"PK\x03\x04 truncated"
    assert not list(tmp_path.glob("*.rejected"))
    (note,) = mon.state_notes
    assert note.startswith("a.b.c.alarm.npz (named before <model>@<instance>) cannot be read")
    assert "left in place" in note


def test_the_separator_is_in_no_model_or_instance_name(tmp_path: Path) -> None:
    from gateway.integrity.alarm_state import SEPARATOR, state_path  # old code lacks SEPARATOR

    assert SEPARATOR == "@"
    assert not MODEL_NAME_RE.fullmatch("a@b")
    assert MODEL_NAME_RE.fullmatch("a.b-c_d")  # dots and dashes: the reason for the separator
    assert SEPARATOR not in instance_name("gw@host.example")
    assert state_path(tmp_path, "a.b", "c").name == "a.b@c.alarm.npz"
    assert state_path(tmp_path, "a", "b.c").name == "a@b.c.alarm.npz"
    for model, instance in (("a@b", "c"), ("a", "b@c"), ("../a", "c"), (".a", "c")):
        with pytest.raises(ValueError, match="cannot name an alarm state file"):
            state_path(tmp_path, model, instance)

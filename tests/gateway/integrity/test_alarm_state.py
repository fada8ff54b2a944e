"""The sequential alarm's persisted state (review defects 3, 5 and 6): a damaged file of any
kind is set aside and the gateway starts clean; gateways sharing a state directory keep their
own latched alarms; a file no running gateway holds is taken over by a new instance; keys in
alarm survive the key bound; a recalibration keeps the latched alarms."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.integrity.alarm import AlarmMonitor
from tests.gateway.integrity.conftest import integrity_gateway
from tests.gateway.integrity.test_alarm import monitor

HIGH, LOW = np.array([0.999]), np.array([0.01])  # detector scores: switched, honest
KL = np.array([0.2])


def _alarmed(mon: AlarmMonitor, *keys: str) -> None:
    for key in keys:
        for _ in range(20):
            mon.observe(key, HIGH, np.array([3.0]))
    assert mon.model_state.alarm


def _saved_bytes(tmp_path: Path) -> tuple[Path, bytes]:
    """A valid state file (written by a monitor that then stops) and its bytes."""
    mon = monitor(tmp_path)
    for k in range(3):
        mon.observe(f"k{k}", LOW, KL)
    mon.save()
    assert mon.path is not None
    path, data = mon.path, mon.path.read_bytes()
    del mon  # its process ends (its lock, where it holds one, goes with it)
    return path, data


def _zip_flags(data: bytes, offset: int, change: Callable[[int], int]) -> bytes:
    """Change a 16-bit field of every central-directory entry (8: flags, 10: method)."""
    b, pos = bytearray(data), 0
    while (pos := b.find(b"PK\x01\x02", pos)) >= 0:
        struct.pack_into(
            "<H", b, pos + offset, change(struct.unpack_from("<H", b, pos + offset)[0])
        )
        pos += 4
    return bytes(b)


def _rewritten(data: bytes, meta: dict[str, Any] | None = None, **arrays: Any) -> bytes:
    with np.load(io.BytesIO(data)) as z:
        out = dict(z)
    if meta:
        out["meta"] = np.array(json.dumps({**json.loads(str(out["meta"])), **meta}))
    out.update(arrays)
    buf = io.BytesIO()
    np.savez(buf, **out)
    return buf.getvalue()


def _rows(data: bytes) -> int:
    with np.load(io.BytesIO(data)) as z:
        return int(z["answers"].shape[0])


DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    # one bit of a member's compression method (zipfile: NotImplementedError, or bad data)
    "compression_method": lambda d: _zip_flags(d, 10, lambda _: 1),
    "unknown_compression": lambda d: _zip_flags(d, 10, lambda _: 99),
    # the "encrypted" flag (zipfile: RuntimeError, password required)
    "encrypted_flag": lambda d: _zip_flags(d, 8, lambda f: f | 1),
    # counters that are no numbers a state can hold (int() of them: OverflowError)
    "infinite_dropped_keys": lambda d: _rewritten(d, {"dropped_keys": float("inf")}),
    "infinite_answers": lambda d: _rewritten(d, answers=np.full(_rows(d), np.inf)),
    "infinite_alarm_at": lambda d: _rewritten(d, alarm_at=np.full(_rows(d), np.inf)),
    "nan_peak": lambda d: _rewritten(d, peak=np.full(_rows(d), np.nan)),
    "fractional_count": lambda d: _rewritten(d, {"dropped_keys": 2.5}),
    "count_as_bool": lambda d: _rewritten(d, {"dropped_keys": True}),
    "repeated_key": lambda d: _rewritten(d, keys=np.array(["k0", "k0", "k1"])),
    "alarm_without_position": lambda d: _rewritten(d, alarm=np.ones(_rows(d), dtype=bool)),
    "huge_answer_count": lambda d: _rewritten(d, answers=np.full(_rows(d), 2**63 - 1)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_state_file_is_set_aside_and_the_monitor_starts_clean(
    tmp_path: Path, damage: str
) -> None:
    path, good = _saved_bytes(tmp_path)
    path.write_bytes(DAMAGE[damage](good))
    mon = monitor(tmp_path)  # never raises: a state file cannot stop the gateway
    status = mon.status()
    assert status["restored"].startswith("refused ("), status["restored"]
    assert f"set aside as {path.name}.rejected" in status["restored"]
    assert status["restored"].endswith("started clean")
    assert path.with_name(path.name + ".rejected").is_file()
    assert not path.exists()
    assert status["model"]["answers"] == 0
    assert status["keys"]["tracked"] == 0
    mon.observe("a", LOW, KL)  # and it works
    assert mon.model_state.answers == 1


async def test_a_damaged_state_file_does_not_stop_the_gateway(integrity_repo: Path) -> None:
    """One flipped bit in the zip's compression method stopped every model (START FAILED)."""
    async with integrity_gateway(integrity_repo) as (client, _):
        assert (await client.get("/v2/models/digits/integrity")).status_code == 200
    state = integrity_repo.parent / "alarm-state"
    (path,) = [p for p in state.iterdir() if p.name.endswith(".alarm.npz")]
    path.write_bytes(DAMAGE["compression_method"](path.read_bytes()))
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.get("/v2/models/digits/integrity")
        assert r.status_code == 200
        restored = r.json()["alarm"]["restored"]
        assert "refused (NotImplementedError" in restored, restored
        assert ".rejected" in restored
        assert (await client.get("/v2/health/ready")).status_code == 200
    assert path.with_name(path.name + ".rejected").is_file()


def test_gateways_sharing_a_directory_keep_their_own_latched_alarms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas on one claim: A's alarm, then B's periodic save, then both restart."""
    monkeypatch.setattr(socket, "gethostname", lambda: "gateway-0")
    a = monitor(tmp_path)
    monkeypatch.setattr(socket, "gethostname", lambda: "gateway-1")
    b = monitor(tmp_path)
    _alarmed(a, "key-a")
    a.save()
    for _ in range(3):
        b.observe("key-b", LOW, KL)
    b.save()  # after A's: it must not replace A's alarm
    del a, b  # both pods stop
    monkeypatch.setattr(socket, "gethostname", lambda: "gateway-0")
    a2 = monitor(tmp_path)
    assert a2.in_alarm() == {"model": True, "keys": ["key-a"]}
    monkeypatch.setattr(socket, "gethostname", lambda: "gateway-1")
    b2 = monitor(tmp_path)
    assert b2.in_alarm() == {"model": False, "keys": []}
    assert b2.model_state.answers == 3
    assert a2.path != b2.path
    assert a2.status()["state"]["instance"] == "gateway-0"


def test_a_running_gateways_file_is_never_taken_over(tmp_path: Path) -> None:
    live = monitor(tmp_path, instance="gateway-0")
    _alarmed(live, "key-a")
    live.save()
    new = monitor(tmp_path, instance="gateway-1")  # scaled up beside it
    assert new.restored == "new"
    assert not new.model_state.alarm
    assert live.path is not None
    assert live.path.is_file()
    assert (
        monitor(tmp_path, instance="gateway-0")
        .state_notes[0]
        .startswith("another running gateway holds the instance name 'gateway-0'")
    )


async def test_a_new_instance_takes_over_the_files_no_gateway_holds(tmp_path: Path) -> None:
    """A container recreated under a new host name resumes its predecessor's state; the
    latched alarms of an older orphan are kept too; the files taken over are removed."""
    old = monitor(tmp_path, instance="c-old")
    prev = monitor(tmp_path, instance="c-prev")  # both running: neither takes the other's
    assert old.restored == prev.restored == "new"
    _alarmed(old, "key-old")
    for _ in range(7):
        prev.observe("key-prev", LOW, KL)
    await old.flush()  # SIGTERM: saved, and the lock released
    await prev.flush()
    assert prev.path is not None
    assert old.path is not None
    os.utime(old.path, (1, 1))  # the older of the two
    stale = prev.path.with_name(f".{prev.path.name}.abc.tmp")
    stale.write_bytes(b"a write cut short")
    new = monitor(tmp_path, instance="c-new")
    assert new.restored.startswith("took over"), new.restored
    assert "restored 1 keys and the model's stream" in new.restored
    assert "latched alarms of the older files kept" in new.restored
    assert new.model_state.answers == 7  # the newest file's statistics
    assert new.in_alarm() == {"model": True, "keys": ["key-old"]}
    assert "key-prev" in new.keys
    assert not old.path.exists()
    assert not prev.path.exists()
    assert new.path is not None
    assert new.path.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m@c-new.alarm.lock",
        "m@c-new.alarm.npz",
    ]
    assert not stale.exists()


def test_the_file_of_an_older_version_is_taken_over(tmp_path: Path) -> None:
    """``<model>.alarm.npz`` (version 1, before files were named per instance)."""
    mon = monitor(tmp_path, instance="v1")
    _alarmed(mon, "key-a")
    snapshot = mon._snapshot()[1]
    meta = json.loads(str(snapshot["meta"]))
    snapshot["meta"] = np.array(
        json.dumps({k: meta[k] for k in ("model", "fingerprint", "dropped_keys")} | {"version": 1})
    )
    with (tmp_path / "m.alarm.npz").open("wb") as fh:
        np.savez(fh, **snapshot)  # type: ignore[arg-type]
    new = monitor(tmp_path, instance="v2")
    assert new.restored.startswith("took over m.alarm.npz"), new.restored
    assert new.in_alarm() == {"model": True, "keys": ["key-a"]}
    assert not (tmp_path / "m.alarm.npz").exists()


def test_a_file_of_another_model_with_a_dotted_name_is_left_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    other = AlarmMonitor(
        "m.x", rng.random(500) * 0.1, rng.random(500) * 0.5, state_dir=tmp_path, instance="h"
    )
    other.observe("a", LOW, KL)
    other.save()
    del other
    mon = monitor(tmp_path, instance="h2")  # m.x@h.alarm.npz: not a candidate by its name
    assert mon.restored == "new"
    assert (tmp_path / "m.x@h.alarm.npz").is_file()


def test_keys_in_alarm_survive_the_key_bound(tmp_path: Path) -> None:
    mon = monitor(tmp_path, max_keys=2)
    _alarmed(mon, "key-a", "key-b")
    assert mon.in_alarm()["keys"] == ["key-a", "key-b"]
    answers = mon.model_state.answers
    scopes = mon.observe("key-c", LOW, KL)  # no room, and no key may go
    assert mon.in_alarm()["keys"] == ["key-a", "key-b"]
    assert scopes == ["model"]  # key-c is watched on the model's stream only
    assert mon.model_state.answers == answers + 1
    status = mon.status()
    assert status["keys"]["untracked_requests"] == 1
    assert status["keys"]["dropped"] == 0
    assert "key-c" not in mon.keys
    mon.save()
    again = monitor(tmp_path, max_keys=2)
    assert again.status()["keys"]["untracked_requests"] == 1  # the count is kept
    again.reset("key", "key-a")  # after an investigation: room again
    again.observe("key-c", LOW, KL)
    assert "key-c" in again.keys
    assert "key-a" not in again.keys
    assert again.status()["keys"]["dropped"] == 1


def test_a_recalibration_keeps_the_latched_alarms(tmp_path: Path) -> None:
    mon = monitor(tmp_path)
    _alarmed(mon, "key-a")
    mon.observe("key-quiet", LOW, KL)
    fired_at = mon.model_state.alarm_at
    mon.save()
    rng = np.random.default_rng(0)
    scores, kl = rng.random(500) * 0.1, rng.random(500) * 0.5
    scores[0] += 1e-7  # the detector card re-published: one calibration value changed
    del mon
    new = AlarmMonitor("m", scores, kl, alpha=1e-5, state_dir=tmp_path)
    assert new.in_alarm() == {"model": True, "keys": ["key-a"]}
    status = new.status()
    assert status["restored"].startswith("recalibrated"), status["restored"]
    assert "statistics start over" in " ".join(status["state"]["notes"])
    assert status["model"]["alarm_at_answer"] == fired_at
    assert status["model"]["statistic"] == 0.0  # the statistics start over
    assert status["keys"]["tracked"] == 1  # the quiet key is not kept
    new.reset("all")
    assert new.in_alarm() == {"model": False, "keys": []}


def test_each_write_is_synced_and_uses_its_own_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mon = monitor(tmp_path)
    mon.observe("a", LOW, KL)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    mon.save()
    assert synced, "the state was not fsynced before it replaced the old one"
    # two monitors writing the same file at once (two gateways under one name) never
    # share a temp file: each write completes
    other = monitor(tmp_path)
    errors: list[BaseException] = []

    def hammer(m: AlarmMonitor) -> None:
        try:
            for _ in range(30):
                m.save()
                assert not m._save_failing
        except BaseException as exc:  # pragma: no cover - the failure is the assertion
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(m,)) for m in (mon, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_instance_names_are_safe_file_name_parts() -> None:
    from gateway.integrity.alarm_state import instance_name  # new module: old code lacks it

    assert instance_name("gateway-0") == "gateway-0"
    assert instance_name("a/../b c") == "a_.._b_c"  # no directory part, ever
    assert instance_name("..") == "gateway"
    assert instance_name("") == "gateway"

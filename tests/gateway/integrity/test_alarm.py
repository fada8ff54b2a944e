"""The sequential integrity alarm (issue 21) in the gateway: a switch drill raises it on the
model and on the caller's key; it shows in the response, the status and the metrics; only an
admin resets it; it survives a restart; per-key isolation, bounded keys and corrupt state."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import NotFound
from gateway.integrity.alarm import AlarmMonitor, client_id
from tests.conftest import USER_KEY
from tests.gateway.integrity.conftest import ADMIN, infer_body, integrity_gateway
from tests.gateway.integrity.test_pipeline import URL, metric
from tests.integrity_factory import Digits

RESET = "/v2/admin/models/digits/integrity/alarm/reset"


async def test_a_switch_drill_raises_the_alarm_until_an_admin_resets_it(
    integrity_repo: Path, digits: Digits
) -> None:
    async with integrity_gateway(integrity_repo) as (client, _):
        x = digits.take(30)
        for i in range(10):  # honest answers: no alarm
            r = await client.post(URL, json=infer_body(x[i : i + 1]))
            assert r.json()["parameters"]["integrity_alarm"] is False
        r = await client.put(
            "/v2/admin/models/digits/drill", json={"attack": "switch", "rate": 1.0}, headers=ADMIN
        )
        assert r.status_code == 200
        raised_after = None
        for i in range(30):
            params = (await client.post(URL, json=infer_body(x[i : i + 1]))).json()["parameters"]
            if params["integrity_alarm"]:
                raised_after = i + 1
                assert params["integrity_alarm_scope"] == "model,key"
                break
        assert raised_after is not None, "30 switched answers did not raise the alarm"
        status = (await client.get("/v2/models/digits/integrity")).json()["alarm"]
        assert status["model"]["alarm"] is True
        assert list(status["keys"]["in_alarm"]) == [client_id(USER_KEY)]
        assert await metric(client, "fides_integrity_alarm", scope="model") == 1
        assert await metric(client, "fides_integrity_alarm", scope="key") == 1
        assert await metric(client, "fides_integrity_alarm_statistic", scope="model") >= 5
        # the alarm latches: the drill stops, the alarm stays until someone looks
        await client.delete("/v2/admin/models/digits/drill", headers=ADMIN)
        params = (await client.post(URL, json=infer_body(x[:1]))).json()["parameters"]
        assert params["integrity_alarm"] is True
        # only an admin resets it, naming what
        assert (await client.post(RESET, json={"scope": "model"})).status_code == 403
        bad = await client.post(RESET, json={"scope": "everything"}, headers=ADMIN)
        assert bad.status_code == 400
        assert "scope must be one of model, key, all" in bad.json()["error"]
        unknown = await client.post(RESET, json={"scope": "key", "key": "key-0"}, headers=ADMIN)
        assert unknown.status_code == 404
        assert "no tracked key 'key-0'" in unknown.json()["error"]
        r = await client.post(RESET, json={"scope": "model"}, headers=ADMIN)
        assert r.status_code == 200
        assert r.json()["model"]["alarm"] is False
        assert r.json()["keys"]["in_alarm"]  # the key's alarm is its own
        r = await client.post(RESET, headers=ADMIN)  # no body: everything
        assert r.json()["keys"]["in_alarm"] == {}
        assert await metric(client, "fides_integrity_alarm", scope="key") == 0
        missing = await client.post("/v2/admin/models/nope/integrity/alarm/reset", headers=ADMIN)
        assert missing.status_code == 404


async def test_the_alarm_survives_a_restart(integrity_repo: Path, digits: Digits) -> None:
    async with integrity_gateway(integrity_repo) as (client, _):
        await client.put(
            "/v2/admin/models/digits/drill", json={"attack": "switch", "rate": 1.0}, headers=ADMIN
        )
        for i in range(30):
            await client.post(URL, json=infer_body(digits.take(30)[i : i + 1]))
        before = (await client.get("/v2/models/digits/integrity")).json()["alarm"]
        assert before["model"]["alarm"] is True
    # written at shutdown (and when the alarm fired), named after the instance (the host)
    (saved,) = (integrity_repo.parent / "alarm-state").glob("digits@*.alarm.npz")
    assert saved.is_file()
    async with integrity_gateway(integrity_repo) as (client, _):
        after = (await client.get("/v2/models/digits/integrity")).json()["alarm"]
        assert after["model"]["alarm"] is True
        assert after["model"]["answers"] == before["model"]["answers"]
        assert after["restored"].startswith("restored 1 keys")


def monitor(tmp_path: Path, **kw: object) -> AlarmMonitor:
    rng = np.random.default_rng(0)
    return AlarmMonitor(
        "m",
        rng.random(500) * 0.1,  # clean detector scores: low
        rng.random(500) * 0.5,  # clean KL
        alpha=1e-5,
        state_dir=tmp_path,
        **kw,  # type: ignore[arg-type]
    )


def test_one_attacked_client_is_not_diluted_by_the_others(tmp_path: Path) -> None:
    mon = monitor(tmp_path)
    rng = np.random.default_rng(1)
    raised_at = None
    for step in range(60):
        for k in range(20):  # 19 honest clients and one attacked, interleaved
            attacked = k == 7
            det = np.array([0.95 if attacked else rng.random() * 0.1])
            scopes = mon.observe(f"client-{k}", det, np.array([rng.random() * 0.5]))
            if attacked and "key" in scopes and raised_at is None:
                raised_at = step + 1
    assert raised_at is not None
    assert raised_at <= 10  # that client's own answers, not everyone's
    assert list(mon.in_alarm()["keys"]) == ["client-7"]


def test_keys_are_bounded_and_alarms_are_kept(tmp_path: Path) -> None:
    mon = monitor(tmp_path, max_keys=3)
    for _ in range(10):
        mon.observe("bad", np.array([0.99]), np.array([0.2]))
    for k in range(5):
        mon.observe(f"k{k}", np.array([0.01]), np.array([0.2]))
    status = mon.status()
    assert status["keys"]["tracked"] == 3
    assert status["keys"]["dropped"] == 3
    assert "bad" in status["keys"]["in_alarm"]  # the key in alarm was never dropped


def test_corrupt_or_foreign_state_is_set_aside_and_said(tmp_path: Path) -> None:
    mon = monitor(tmp_path)
    mon.observe("a", np.array([0.5]), np.array([0.2]))
    mon.save()
    assert monitor(tmp_path).status()["restored"] == "restored 1 keys and the model's stream"
    path = mon.path
    assert path is not None
    with np.load(path) as z:
        arrays = dict(z)
    arrays["r"] = -arrays["r"] - 1.0  # statistics cannot be negative
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    again = monitor(tmp_path)
    assert again.status()["restored"].startswith("refused (a stream state of the wrong size")
    assert path.with_name(path.name + ".rejected").is_file()
    assert again.status()["model"]["answers"] == 0
    path.write_bytes(b"PK\x03\x04 truncated")
    assert monitor(tmp_path).status()["restored"].startswith("refused (")
    rng = np.random.default_rng(9)
    other = AlarmMonitor("m", rng.random(500), rng.random(500), state_dir=tmp_path)
    mon.save()  # a state of this calibration, read by a monitor of another one
    assert other.restored == "new"
    assert AlarmMonitor(  # its latched alarms would be kept; only the statistics start over
        "m", rng.random(500), rng.random(500), state_dir=tmp_path
    ).restored.startswith("recalibrated (written for another calibration")
    with pytest.raises(NotFound):
        mon.reset("key", "nobody")


def test_a_state_of_more_keys_than_allowed_is_trimmed_on_load(tmp_path: Path) -> None:
    mon = monitor(tmp_path, max_keys=10)
    for _ in range(10):
        mon.observe("bad", np.array([0.99]), np.array([0.2]))
    for k in range(9):
        mon.observe(f"k{k}", np.array([0.01]), np.array([0.2]))
    mon.save()
    small = monitor(tmp_path, max_keys=3)
    status = small.status()
    assert status["keys"]["tracked"] <= 4  # the 3 most recent, and the key in alarm
    assert "bad" in status["keys"]["in_alarm"]
    assert status["keys"]["dropped"] >= 6


def test_an_unwritable_state_dir_is_said_once_and_the_alarm_keeps_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    mon = monitor(blocked / "state")  # its parent is a file: every save fails
    for _ in range(10):
        mon.observe("a", np.array([0.99]), np.array([0.2]))
        mon.save()
    assert mon.in_alarm()["keys"] == ["a"]
    errors = [r for r in caplog.records if "not saved" in r.getMessage()]
    assert len(errors) == 1


def test_the_largest_key_statistic_is_kept_as_keys_update(tmp_path: Path) -> None:
    mon = monitor(tmp_path)
    rng = np.random.default_rng(2)
    for k in range(50):
        det = np.array([0.97 if k % 7 == 0 else rng.random() * 0.1])
        mon.observe(f"client-{k % 10}", det, np.array([rng.random() * 0.5]))
    scanned = max(mon.detector.statistic(s) for s in mon.keys.values())
    assert mon.key_statistic_max() == pytest.approx(scanned, rel=1e-12)
    mon.reset("all")
    assert mon.key_statistic_max() == 0.0


async def test_periodic_saves_are_written_by_a_worker_and_flushed_at_close(
    tmp_path: Path,
) -> None:
    mon = monitor(tmp_path, save_every_s=0.0)  # every observe saves
    for k in range(20):
        mon.observe(f"client-{k}", np.array([0.05]), np.array([0.2]))
    assert mon._writing is not None  # a worker thread writes, the event loop does not wait
    await mon.flush()
    restored = monitor(tmp_path)
    assert restored.restored == "restored 20 keys and the model's stream"
    assert restored.model_state.answers == 20


async def test_an_alarm_raised_while_a_save_is_being_written_reaches_the_disk(
    tmp_path: Path,
) -> None:
    """The worker's write of the state before the alarm is held up; the alarm fires
    meanwhile; once that write is done the alarm's state follows without another answer."""
    mon = monitor(tmp_path, save_every_s=0.0)
    mon.observe("a", np.array([0.05]), np.array([0.2]))
    await mon.flush()
    mon._write_lock.acquire()  # the disk is slow: the next write waits
    try:
        mon.save_soon()  # the pre-alarm state, queued
        first = mon._writing
        for _ in range(20):  # switched answers: the alarm fires
            mon.observe("a", np.array([0.999]), np.array([3.0]))
        assert mon.model_state.alarm
    finally:
        mon._write_lock.release()
    assert first is not None
    await first
    for _ in range(100):  # the catch-up save, written by a worker
        await asyncio.sleep(0.01)
        if mon._writing is not first and mon._writing is not None and mon._writing.done():
            break
    assert monitor(tmp_path).model_state.alarm, "the alarm was not saved"


def test_an_older_snapshot_never_replaces_a_newer_one(tmp_path: Path) -> None:
    """A periodic write that finishes after an admin's reset does not bring the alarm back."""
    mon = monitor(tmp_path)
    for _ in range(20):
        mon.observe("a", np.array([0.999]), np.array([3.0]))
    assert mon.model_state.alarm
    before_reset = mon._snapshot()  # taken for a worker that is slow to write it
    mon.reset("all")  # written at once
    mon._write(*before_reset)
    assert not monitor(tmp_path).model_state.alarm


def test_state_metadata_that_is_not_an_object_is_set_aside(tmp_path: Path) -> None:
    mon = monitor(tmp_path)
    mon.observe("a", np.array([0.5]), np.array([0.2]))
    mon.save()
    path = mon.path
    assert path is not None
    with np.load(path) as z:
        arrays = dict(z)
    bad_count = {"version": 1, "model": "m", "fingerprint": mon.fingerprint, "dropped_keys": -3}
    for meta in ("[1, 2]", json.dumps(bad_count)):
        arrays["meta"] = np.array(meta)
        with path.open("wb") as fh:
            np.savez(fh, **arrays)
        assert monitor(tmp_path).restored.startswith("refused ("), meta

"""The sequential alarm's state when saving it fails while the gateway runs (disk full, the
directory gone, an I/O error): the alarm keeps working in memory, but a restart would lose
its state, latched alarms included. That is never said by a log line alone: the integrity
status (``alarm.state.saving``: since when, why), the gauge
``fides_integrity_alarm_state_saved`` and the counter
``fides_integrity_alarm_state_save_failures_total`` say so (the alert
FidesIntegrityAlarmStateNotSaved fires on them), and all return to normal, with an INFO line,
once a save works again. The model stays ready.

The failure is real, and one that root meets too (these tests may run as root, which chmod
does not stop): the state directory is replaced by a file after the start."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.integrity.alarm import AlarmMonitor
from gateway.integrity.metrics import IntegrityMetrics
from tests.gateway.integrity.conftest import ADMIN, integrity_gateway
from tests.gateway.integrity.test_pipeline import metric

HIGH, KL = np.array([0.999]), np.array([3.0])
SAVED = "fides_integrity_alarm_state_saved"
FAILURES = "fides_integrity_alarm_state_save_failures_total"
STATUS = "/v2/models/digits/integrity"
RESET = "/v2/admin/models/digits/integrity/alarm/reset"


def block(state_dir: Path) -> None:
    """The state directory replaced by a file: every write into it fails, root's included."""
    shutil.rmtree(state_dir)
    state_dir.write_text("not a directory")


def unblock(state_dir: Path) -> None:
    state_dir.unlink()
    state_dir.mkdir()


def monitor(state_dir: Path, registry: CollectorRegistry, **kwargs: Any) -> AlarmMonitor:
    rng = np.random.default_rng(0)
    return AlarmMonitor(
        "m",
        rng.random(500) * 0.1,
        rng.random(500) * 0.5,
        state_dir=state_dir,
        on_saved=IntegrityMetrics(registry).alarm_state_saving("m"),
        **kwargs,
    )


def test_a_failing_save_shows_in_the_status_and_metrics_until_a_save_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    state_dir = tmp_path / "state"
    mon = monitor(state_dir, registry)
    value = registry.get_sample_value
    # exported from the set-up: increase() sees the first failure
    assert value(SAVED, {"model": "m"}) == 1
    assert value(FAILURES, {"model": "m"}) == 0
    assert mon.status()["state"]["saving"] == {
        "saved": True,
        "failing_since": None,
        "error": None,
        "failed_saves": 0,
    }
    block(state_dir)
    before = datetime.now(UTC)
    for _ in range(20):  # the alarm fires (and saves) while the directory is gone
        mon.observe("key-a", HIGH, KL)
    mon.save()
    mon.save()
    assert mon.in_alarm() == {"model": True, "keys": ["key-a"]}  # still working, in memory
    saving = mon.status()["state"]["saving"]
    assert saving["saved"] is False
    assert saving["error"] == "Not a directory"  # the error's text, no path
    assert str(tmp_path) not in str(saving)
    since = datetime.fromisoformat(saving["failing_since"])
    assert before - timedelta(seconds=1) <= since <= datetime.now(UTC)
    assert saving["failed_saves"] >= 3
    assert value(SAVED, {"model": "m"}) == 0
    assert value(FAILURES, {"model": "m"}) == saving["failed_saves"]
    errors = [r for r in caplog.records if "not saved" in r.getMessage()]
    assert len(errors) == 1  # once per spell
    assert errors[0].levelno == logging.ERROR
    assert "latched alarms included" in errors[0].getMessage()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gateway.integrity.alarm"):
        unblock(state_dir)
        mon.save()
    saving = mon.status()["state"]["saving"]
    assert saving == {
        "saved": True,
        "failing_since": None,
        "error": None,
        "failed_saves": value(FAILURES, {"model": "m"}),
    }
    assert value(SAVED, {"model": "m"}) == 1
    again = [r for r in caplog.records if "saved to" in r.getMessage()]
    assert len(again) == 1
    assert again[0].levelno == logging.INFO
    assert f"{saving['failed_saves']} saves failed" in again[0].getMessage()
    # what was kept in memory meanwhile is on disk now: a restart keeps the latched alarms
    registry2 = CollectorRegistry()
    restarted = monitor(state_dir, registry2)
    assert restarted.in_alarm() == {"model": True, "keys": ["key-a"]}


async def test_saves_are_tried_again_without_answers_once_the_directory_is_fixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An idle model (no answers, so no periodic save) still gets its state on disk, and its
    status and gauge back to normal, once the directory is fixed: failing saves are retried."""
    registry = CollectorRegistry()
    state_dir = tmp_path / "state"
    mon = monitor(state_dir, registry, save_every_s=0.05)
    block(state_dir)
    for _ in range(20):  # the alarm fires: saved from a worker thread, which fails
        mon.observe("key-a", HIGH, KL)
    assert mon.in_alarm()["keys"] == ["key-a"]
    deadline = time.monotonic() + 30
    while mon.failed_saves < 3 and time.monotonic() < deadline:  # tried again, not answered
        await asyncio.sleep(0.05)
    assert mon.failed_saves >= 3
    assert mon.status()["state"]["saving"]["saved"] is False
    assert registry.get_sample_value(SAVED, {"model": "m"}) == 0
    with caplog.at_level(logging.INFO, logger="gateway.integrity.alarm"):
        unblock(state_dir)
        while not mon.status()["state"]["saving"]["saved"] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert mon.status()["state"]["saving"]["saved"] is True
    assert registry.get_sample_value(SAVED, {"model": "m"}) == 1
    assert any("saved to" in r.getMessage() for r in caplog.records)
    # the latched alarm is on disk: a restart keeps it
    assert monitor(state_dir, CollectorRegistry()).in_alarm()["keys"] == ["key-a"]
    failed = mon.failed_saves
    await mon.flush()  # no more tries after the shutdown
    await asyncio.sleep(0.2)
    assert mon.failed_saves == failed


async def test_a_state_not_saved_at_shutdown_is_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state_dir = tmp_path / "state"
    mon = monitor(state_dir, CollectorRegistry())
    for _ in range(20):
        mon.observe("key-a", HIGH, KL)
    block(state_dir)
    await mon.flush()
    (last,) = [r for r in caplog.records if "not saved at shutdown" in r.getMessage()]
    assert last.levelno == logging.ERROR
    assert "latched alarms included, is lost" in last.getMessage()
    assert "key-a" in last.getMessage()


async def test_the_gateway_says_its_alarm_state_is_not_saved(integrity_repo: Path) -> None:
    """Over HTTP: the model's integrity status says the state is not saved, since when and
    why; the model stays ready (it verifies; only the state's memory across a restart is at
    risk); all back to normal once a save works."""
    state_dir = integrity_repo.parent / "alarm-state"
    async with integrity_gateway(integrity_repo) as (client, _):
        saving = (await client.get(STATUS)).json()["alarm"]["state"]["saving"]
        assert saving["saved"] is True
        assert saving["failing_since"] is None
        block(state_dir)
        r = await client.post(RESET, json={"scope": "model"}, headers=ADMIN)  # saves now
        assert r.status_code == 200
        saving = (await client.get(STATUS)).json()["alarm"]["state"]["saving"]
        assert saving["saved"] is False, saving
        assert saving["error"] == "Not a directory"
        assert saving["failing_since"] is not None
        assert saving["failed_saves"] >= 1
        assert (await client.get("/v2/models/digits/ready")).status_code == 200
        unblock(state_dir)
        assert (await client.post(RESET, json={"scope": "model"}, headers=ADMIN)).is_success
        saving = (await client.get(STATUS)).json()["alarm"]["state"]["saving"]
        assert saving["saved"] is True, saving
        assert saving["error"] is None


async def test_the_gateway_exports_whether_its_alarm_state_is_saved(integrity_repo: Path) -> None:
    state_dir = integrity_repo.parent / "alarm-state"
    async with integrity_gateway(integrity_repo) as (client, _):
        text = (await client.get("/metrics")).text
        assert f'{SAVED}{{model="digits"}} 1.0' in text
        assert f'{FAILURES}{{model="digits"}} 0.0' in text
        block(state_dir)
        assert (await client.post(RESET, json={"scope": "model"}, headers=ADMIN)).is_success
        assert await metric(client, SAVED, model="digits") == 0
        assert await metric(client, FAILURES, model="digits") >= 1
        unblock(state_dir)
        assert (await client.post(RESET, json={"scope": "model"}, headers=ADMIN)).is_success
        assert await metric(client, SAVED, model="digits") == 1

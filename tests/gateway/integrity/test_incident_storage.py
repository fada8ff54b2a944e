"""The incident bundles' byte bound (FIDES_INTEGRITY_INCIDENTS_MAX_MB): the directory is the
alarm state's volume, by default an emptyDir the kubelet evicts the pod for overfilling, and a
full bundle is a few MB. Bundles written past the bound keep this instance's files under it,
even while one is being written; the newest is always kept (alone when it is over the bound on
its own, and logged); another instance's files, and those of a version before, are untouched."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

import pytest

from gateway.app import create_app
from gateway.integrity import incident as incident_module
from gateway.integrity.alarm import AlarmMonitor
from gateway.integrity.incident import MAX_BYTES, IncidentRecorder
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.fides_core.incident_kit import ALPHA, CAL_KL, CAL_SCORES, DELTA, OUTPUT, Platform
from tests.gateway.integrity.conftest import Fakes

MODEL = "tiny"
ME, OTHER = "gateway-0", "gateway-1"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Platform:
    return Platform(tmp_path_factory.mktemp("platform"))


def _recorder(
    platform: Platform, directory: Path | None, *, max_bytes: int, requests: int = 9
) -> IncidentRecorder:
    """A recorder of instance ME whose ring holds ``requests`` really signed requests."""
    alarm = AlarmMonitor(MODEL, CAL_SCORES, CAL_KL, alpha=ALPHA, delta=DELTA, instance=ME)

    async def no_attest(nonce: bytes) -> bytes:
        raise AssertionError("every boot's document was given")

    rec = IncidentRecorder(
        MODEL,
        alarm,
        verifier_output=OUTPUT,
        detector_threshold=0.9,
        attest=no_attest,
        directory=directory,
        max_bytes=max_bytes,
        settle_s=0.0,
    )
    boot = platform.boot(time.time() - 3600)
    boot.now = time.time() - 1800
    rec.boot(boot.module_id, boot.attest())
    while len(rec.ring) < requests:
        boot.now += 1
        for answer in boot.sign(min(3, requests - len(rec.ring))):
            rec.record(answer)
    return rec


async def _fire(rec: IncidentRecorder, n: int) -> list[str]:
    """Fire ``n`` alarms one after another; the id of each bundle written, in order."""
    written = []
    for _ in range(n):
        before = {s["id"] for s in rec.summaries()}
        rec.fired(["model"], "anonymous")
        await asyncio.gather(*list(rec._tasks))  # built, written and pruned
        new = [s["id"] for s in rec.summaries() if s["id"] not in before]
        assert len(new) == 1, new
        written.append(new[0])
    return written


def _own_bytes(directory: Path) -> int:
    """What this instance's files take: its bundles and any temp file being written."""
    return sum(p.stat().st_size for p in directory.glob(f"*@{ME}.json*"))


def _others(directory: Path) -> dict[str, bytes]:
    """A bundle of another instance sharing the directory, and one of a version before
    instances were named, written before ME's."""
    directory.mkdir(parents=True)
    files = {
        f"20260101T000000Z-model@{OTHER}.json": os.urandom(40_000),
        "20260101T000001Z-model.json": os.urandom(40_000),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


async def test_bundles_past_the_bound_keep_the_directory_under_it(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bundles written until several times the bound: after every write this instance's files
    take at most the bound, and at every write's rename too (room is made before a bundle is
    written: no moment over the bound for the kubelet to measure); the newest bundle is kept,
    the oldest go first; the other instance's and the earlier version's files stay as they
    were, though older than every bundle of this instance (and over the bound with them)."""
    d = tmp_path / "incidents" / MODEL
    others = _others(d)
    probe = _recorder(platform, None, max_bytes=MAX_BYTES)
    [first] = await _fire(probe, 1)
    size = len(json.dumps(probe.get(first)).encode())
    bound = int(size * 2.5)  # two bundles fit, not three
    rec = _recorder(platform, tmp_path / "incidents", max_bytes=bound)

    peaks: list[int] = []
    replace = os.replace

    def measured_replace(src: Any, dst: Any) -> None:
        if str(src).endswith(".json.tmp"):
            peaks.append(_own_bytes(d))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", measured_replace)
    kept: list[str] = []
    for _ in range(6):
        [ident] = await _fire(rec, 1)
        kept.append(ident)
        own = sorted(p.name.removesuffix(".json") for p in d.glob(f"*@{ME}.json"))
        assert _own_bytes(d) <= bound
        assert ident in own  # the newest is kept
        assert own == sorted(kept[-2:])  # the two newest: the oldest went first
    assert len(peaks) == 6
    assert peaks[0] > 0  # the temp file being renamed is counted
    assert max(peaks) <= bound
    for name, data in others.items():
        assert (d / name).read_bytes() == data
    assert not list(d.glob(".*.tmp"))


async def test_a_bundle_over_the_bound_on_its_own_is_kept_alone(
    platform: Platform, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bound smaller than one bundle: each new bundle is still written (the evidence of the
    alarm that just fired), every older one of this instance goes, and the log says so;
    another instance's files stay."""
    d = tmp_path / "incidents" / MODEL
    others = _others(d)
    rec = _recorder(platform, tmp_path / "incidents", max_bytes=1024)
    with caplog.at_level(logging.WARNING, logger="gateway.integrity.incident"):
        written = await _fire(rec, 3)
    own = [p.name.removesuffix(".json") for p in d.glob(f"*@{ME}.json")]
    assert own == [written[-1]]
    assert rec.get(written[-1])["id"] == written[-1]
    over = [r for r in caplog.records if "over the bound" in r.getMessage()]
    assert len(over) == 3
    assert "every older bundle of this instance deleted (1)" in over[-1].getMessage()
    for name, data in others.items():
        assert (d / name).read_bytes() == data


async def test_a_stale_temp_file_of_this_instance_is_removed(
    platform: Platform, tmp_path: Path
) -> None:
    """A write cut short (a crash mid-write) leaves its temp file, which no bound counts
    otherwise: the next write removes this instance's, never another's."""
    d = tmp_path / "incidents" / MODEL
    d.mkdir(parents=True)
    mine = d / f".20260101T000000Z-model@{ME}.json.tmp"
    theirs = d / f".20260101T000000Z-model@{OTHER}.json.tmp"
    for p in (mine, theirs):
        p.write_bytes(os.urandom(50_000))
    rec = _recorder(platform, tmp_path / "incidents", max_bytes=MAX_BYTES)
    await _fire(rec, 1)
    assert not mine.exists()
    assert theirs.exists()


async def test_the_bound_holds_in_memory_too(platform: Platform) -> None:
    """Without a state directory the bundles are kept in memory, under the same bound."""
    probe = _recorder(platform, None, max_bytes=MAX_BYTES)
    [first] = await _fire(probe, 1)
    size = len(json.dumps(probe.get(first)).encode())
    rec = _recorder(platform, None, max_bytes=int(size * 1.5))
    written = await _fire(rec, 3)
    assert [s["id"] for s in rec.summaries()] == [written[-1]]


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().integrity_incidents_max_mb * 2**20 == MAX_BYTES
    monkeypatch.setenv("FIDES_INTEGRITY_INCIDENTS_MAX_MB", "48")
    assert Settings().integrity_incidents_max_mb == 48


async def test_the_setting_reaches_each_verified_models_recorder(
    tmp_path: Path, trained_repository: tuple[Path, dict[str, Any]]
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained_repository[0], repo)
    settings = Settings(
        model_repository=repo,
        api_keys=[USER_KEY],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        integrity_state_dir=tmp_path / "alarm-state",
        integrity_incidents_max_mb=12.5,
    )
    app = create_app(settings, enclave_factory=Fakes(repo))
    async with app.router.lifespan_context(app):
        pipeline = app.state.integrity.get("digits")
        assert pipeline.incidents.max_bytes == int(12.5 * 2**20)
        assert pipeline.incidents.directory == tmp_path / "alarm-state" / "incidents"


class _Frozen(datetime):
    """``datetime.now`` stuck in one second: every alarm of a test fires within it."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> _Frozen:
        return cls(2026, 12, 8, 1, 2, 3, tzinfo=tz)


@pytest.mark.parametrize("on_disk", [True, False])
async def test_an_id_is_never_given_twice_though_its_bundle_was_pruned(
    platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_disk: bool
) -> None:
    """Ids were ``<second>-<scope>[-n]@<instance>`` with the first ``n`` free among the kept
    bundles: once the bound pruned a bundle, the next alarm in the same second took its id,
    one an operator may already have exported or referenced. An id is now given once for the
    life of the state directory (of the process without one), across a restart too."""
    monkeypatch.setattr(incident_module, "datetime", _Frozen)
    directory = tmp_path / "incidents" if on_disk else None
    rec = _recorder(platform, directory, max_bytes=1024)  # every bundle alone over the bound
    written = await _fire(rec, 3)
    assert len(set(written)) == 3, written
    assert [s["id"] for s in rec.summaries()] == [written[-1]]  # the others were pruned
    if on_disk:  # a restart within the same second: still never an id given before
        again = _recorder(platform, directory, max_bytes=1024)
        for f in (tmp_path / "incidents" / MODEL).glob("*.json"):
            f.unlink()  # even with every bundle gone (deleted by hand, or by another instance)
        written += await _fire(again, 2)
        assert len(set(written)) == 5, written
        assert [s["id"] for s in again.summaries()] == [written[-1]]

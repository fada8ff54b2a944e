"""Temp files of gateways sharing the state volume (replicas; the files are per
``<model>@<instance>``): a write cut short (a crash, an eviction, a full disk) leaves its temp
file, an alarm state's (a few MB with 10,000 keys) or an incident bundle's (a few MB), which no
bound counts. Each instance removed only its own, so those of a peer that never came back
under its name (a Deployment's replaced pod, a recreated container) stayed forever. Now a
starting instance (and each bundle written) also removes the temp files of this model that no
write has touched for ``STALE_TEMP_S`` (an hour; a write takes milliseconds to seconds), and
never a younger one: it may be a live peer's write in flight."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway.integrity.alarm_state import STALE_TEMP_S
from tests.fides_core.incident_kit import Platform
from tests.gateway.integrity.test_alarm import monitor
from tests.gateway.integrity.test_incident_storage import MODEL, OTHER, _fire, _recorder

PEER, GONE = "gateway-1", "gateway-7"


def _temp(path: Path, age_s: float) -> Path:
    path.write_bytes(os.urandom(10_000))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


async def test_a_starting_monitor_removes_a_crashed_peers_temp_files_only(
    tmp_path: Path,
) -> None:
    first = monitor(tmp_path, instance="gateway-0")
    await first.flush()  # this instance's own file exists: nothing to take over at the start
    peer_file = tmp_path / f"m@{PEER}.alarm.npz"
    peer_file.write_bytes(b"a peer's state")
    live = _temp(tmp_path / f".m@{PEER}.alarm.npz.k3j9x0qa.tmp", 5)  # a peer writing now
    gone = _temp(tmp_path / f".m@{GONE}.alarm.npz.p0d8s7ab.tmp", STALE_TEMP_S + 60)
    other_model = _temp(tmp_path / f".n@{GONE}.alarm.npz.p0d8s7ab.tmp", STALE_TEMP_S + 60)
    again = monitor(tmp_path, instance="gateway-0")
    assert again.restored.startswith("restored")
    assert live.exists()
    assert not gone.exists(), "a crashed peer's temp file of this model is left forever"
    assert other_model.exists()  # another model's monitor judges its own files
    assert peer_file.read_bytes() == b"a peer's state"
    await again.flush()


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Platform:
    return Platform(tmp_path_factory.mktemp("platform"))


@pytest.mark.parametrize("when", ["start", "write"])
async def test_a_crashed_peers_incident_temp_files_are_removed(
    platform: Platform, tmp_path: Path, when: str
) -> None:
    d = tmp_path / "incidents" / MODEL
    d.mkdir(parents=True)
    live = _temp(d / f".20261208T000000Z-model@{OTHER}.json.tmp", 5)
    gone = _temp(d / f".20261207T000000Z-model@{GONE}.json.tmp", STALE_TEMP_S + 60)
    gone_marker = _temp(d / f".last-id@{GONE}.tmp", STALE_TEMP_S + 60)
    bundle = d / f"20261207T000000Z-model@{GONE}.json"
    bundle.write_bytes(b"{}")
    rec = _recorder(platform, tmp_path / "incidents", max_bytes=2**30)
    if when == "write":
        _temp(gone, STALE_TEMP_S + 60)  # as if it crashed after this instance started
        await _fire(rec, 1)
    assert live.exists()
    assert not gone.exists(), "a crashed peer's temp file is left forever"
    assert not gone_marker.exists()
    assert bundle.exists()  # bundles are pruned by the bounds, not by age

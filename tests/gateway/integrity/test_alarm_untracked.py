"""Requests the sequential alarm cannot track (issue 21): when every tracked key is in alarm,
a new key's requests feed the model's stream only. They were counted in the integrity status
alone; they are a metric too, ``fides_integrity_alarm_untracked_requests_total{model,scope}``,
and the alert FidesIntegrityAlarmKeysUntracked fires while it grows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from gateway.integrity.alarm import AlarmMonitor
from gateway.integrity.metrics import IntegrityMetrics
from tests.gateway.integrity.conftest import infer_body, integrity_gateway, set_integrity
from tests.integrity_factory import Digits

HIGH, LOW, KL = np.array([0.999]), np.array([0.01]), np.array([0.2])
NAME = "fides_integrity_alarm_untracked_requests_total"


def test_each_untracked_request_is_counted_in_the_metric(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = IntegrityMetrics(registry)
    rng = np.random.default_rng(0)
    mon = AlarmMonitor(
        "m",
        rng.random(500) * 0.1,
        rng.random(500) * 0.5,
        max_keys=1,
        state_dir=tmp_path,
        on_untracked=metrics.alarm_untracked.labels("m", "key").inc,
    )
    assert registry.get_sample_value(NAME, {"model": "m", "scope": "key"}) == 0
    for _ in range(20):
        mon.observe("key-a", HIGH, np.array([3.0]))
    assert mon.in_alarm()["keys"] == ["key-a"]  # the one key it may track, latched
    for client in ("key-b", "key-c", "key-b"):
        assert mon.observe(client, LOW, KL) == ["model"]
    assert mon.status()["keys"]["untracked_requests"] == 3
    assert registry.get_sample_value(NAME, {"model": "m", "scope": "key"}) == 3
    mon.reset("key", "key-a")  # room again: tracked, no longer counted
    mon.observe("key-b", LOW, KL)
    assert registry.get_sample_value(NAME, {"model": "m", "scope": "key"}) == 3
    (family,) = [f for f in registry.collect() if f.name + "_total" == NAME]
    assert "every one of its integrity.alarm_max_keys tracked keys was in alarm" in (
        family.documentation
    )


async def test_the_gateway_exports_its_untracked_requests(
    integrity_repo: Path, digits: Digits
) -> None:
    """The gateway's pipeline wires the monitor to the counter: exported from 0 (so that
    ``increase()`` sees the first), then one per request of a key that cannot be tracked."""
    set_integrity(integrity_repo, alarm_max_keys=1)
    # a latched alarm on another key, as a restart reads it back: the bound is reached
    rng = np.random.default_rng(0)
    state_dir = integrity_repo.parent / "alarm-state"
    earlier = AlarmMonitor("digits", rng.random(500) * 0.1, rng.random(500), state_dir=state_dir)
    for _ in range(30):
        earlier.observe("key-earlier", HIGH, np.array([3.0]))
    await earlier.flush()
    async with integrity_gateway(integrity_repo) as (client, _):
        status = (await client.get("/v2/models/digits/integrity")).json()["alarm"]
        assert list(status["keys"]["in_alarm"]) == ["key-earlier"], status["restored"]
        text = (await client.get("/metrics")).text
        assert f'{NAME}{{model="digits",scope="key"}} 0.0' in text, (
            "the pipeline does not export the untracked requests (AlarmMonitor on_untracked)"
        )
        x = digits.take(3)
        for i in range(3):
            r = await client.post("/v2/models/digits/infer", json=infer_body(x[i : i + 1]))
            assert r.status_code == 200
        status = (await client.get("/v2/models/digits/integrity")).json()["alarm"]
        assert status["keys"]["untracked_requests"] == 3
        text = (await client.get("/metrics")).text
        assert f'{NAME}{{model="digits",scope="key"}} 3.0' in text

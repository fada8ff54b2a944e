"""Keys the sequential alarm drops to stay within ``integrity.alarm_max_keys`` (issue 21): the
least recently seen key not in alarm goes, and its evidence with it. They were counted in the
integrity status alone (``keys.dropped``); they are a metric too,
``fides_integrity_alarm_keys_dropped_total{model}``, counted once per key dropped by this
gateway: a restart counts the keys it drops while reading a larger state back, never again
those the saved count holds (the process that dropped them counted them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from gateway.integrity.alarm import AlarmMonitor
from gateway.integrity.metrics import IntegrityMetrics
from tests.gateway.integrity.conftest import ADMIN, infer_body, integrity_gateway, set_integrity
from tests.integrity_factory import Digits

LOW, KL = np.array([0.01]), np.array([0.2])
NAME = "fides_integrity_alarm_keys_dropped_total"


def _monitor(tmp_path: Path, registry: CollectorRegistry, max_keys: int) -> AlarmMonitor:
    metrics = IntegrityMetrics(registry)
    rng = np.random.default_rng(0)
    return AlarmMonitor(
        "m",
        rng.random(500) * 0.1,
        rng.random(500) * 0.5,
        max_keys=max_keys,
        state_dir=tmp_path,
        on_dropped=metrics.alarm_keys_dropped.labels("m").inc,
    )


def test_each_dropped_key_is_counted_once_in_the_metric(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    mon = _monitor(tmp_path, registry, max_keys=2)
    assert registry.get_sample_value(NAME, {"model": "m"}) == 0
    for client in ("key-a", "key-b", "key-a", "key-c", "key-d", "key-d"):
        mon.observe(client, LOW, KL)
    # key-b went for key-c, key-a for key-d; seeing a tracked key again drops nothing
    assert mon.status()["keys"]["dropped"] == 2
    assert registry.get_sample_value(NAME, {"model": "m"}) == 2
    (family,) = [f for f in registry.collect() if f.name + "_total" == NAME]
    assert "integrity.alarm_max_keys" in family.documentation


async def test_a_restart_counts_only_the_keys_it_drops(tmp_path: Path) -> None:
    first = _monitor(tmp_path, CollectorRegistry(), max_keys=4)
    for client in ("key-a", "key-b", "key-c", "key-d", "key-e"):
        first.observe(client, LOW, KL)
    await first.flush()
    assert first.status()["keys"]["dropped"] == 1
    # read back under a smaller bound: two of the four saved keys go now, counted now; the one
    # dropped before the restart stays in the status' total, not in this process' counter
    registry = CollectorRegistry()
    again = _monitor(tmp_path, registry, max_keys=2)
    assert again.status()["keys"]["dropped"] == 3
    assert registry.get_sample_value(NAME, {"model": "m"}) == 2
    again.observe("key-f", LOW, KL)
    assert again.status()["keys"]["dropped"] == 4
    assert registry.get_sample_value(NAME, {"model": "m"}) == 3


async def test_the_gateway_exports_its_dropped_keys(integrity_repo: Path, digits: Digits) -> None:
    """The pipeline wires the monitor to the counter, exported from 0 (so that ``increase()``
    sees the first)."""
    set_integrity(integrity_repo, alarm_max_keys=1)
    async with integrity_gateway(integrity_repo) as (client, _):
        text = (await client.get("/metrics")).text
        assert f'{NAME}{{model="digits"}} 0.0' in text, (
            "the pipeline does not export the dropped keys (AlarmMonitor on_dropped)"
        )
        x = digits.take(2)
        for i, headers in enumerate(({}, ADMIN)):  # two API keys: the second drops the first
            r = await client.post(
                "/v2/models/digits/infer", json=infer_body(x[i : i + 1]), headers=headers
            )
            assert r.status_code == 200, r.text
        status = (await client.get("/v2/models/digits/integrity")).json()["alarm"]
        text = (await client.get("/metrics")).text
    assert status["keys"]["dropped"] == 1
    assert f'{NAME}{{model="digits"}} 1.0' in text

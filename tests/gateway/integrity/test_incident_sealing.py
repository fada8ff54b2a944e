"""Sealing and writing incident bundles (issue 21), the recorder on its own with really signed
answers: a key's bundle counts the other clients' requests of its signed batches already
judged and does not wait for them; a request with no row fed to the alarm takes no slot of the
ring and is not waited for; an attestation document that does not decode is not kept; no
answer's evidence is decoded on the event loop when a bundle is written; an alarm firing
while (or after) the gateway shuts down still has its bundle written; ids are matched whole."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fides_core.incident import IncidentAnswer
from fides_core.integrity import OUT_OF_DISTRIBUTION
from gateway.errors import NotFound
from gateway.integrity import incident as incident_module
from tests.fides_core.incident_kit import Platform
from tests.gateway.integrity.test_incident_recorder import _batch, _boot, _check, _kept, _recorder

A, B = "key-aaaaaaaaaaaa", "key-bbbbbbbbbbbb"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Platform:
    return Platform(tmp_path_factory.mktemp("platform"))


def _as(answer: IncidentAnswer, client: str) -> IncidentAnswer:
    return IncidentAnswer(
        answer.request_id,
        client,
        answer.evidence,
        answer.rows,
        answer.service,
        answer.detector,
        answer.kl,
        answer.excluded,
    )


def _unfed(answer: IncidentAnswer) -> IncidentAnswer:
    """The request with every row kept out of the alarm (out of distribution): none fed."""
    n = len(answer.rows)
    return IncidentAnswer(
        answer.request_id,
        answer.client,
        answer.evidence,
        np.arange(0),
        np.zeros((0, answer.service.shape[1]), np.float32),
        np.zeros(0),
        np.zeros(0),
        {OUT_OF_DISTRIBUTION: np.arange(n)},
    )


async def test_a_keys_bundle_does_not_wait_for_other_clients_requests_already_judged(
    platform: Platform,
) -> None:
    """Two clients share every signed batch, and every request is judged before key A's
    alarm fires: its bundle is sealed at once with nothing missing, and holds A's requests
    only (B's are gaps by nature, which the check reports)."""
    rec = _recorder(None, "gw-0", settle_s=3.0)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    for _ in range(3):
        for i, x in enumerate(_batch(boot, 4)):
            rec.record(_as(x, A if i % 2 == 0 else B))
    rec.fired(["key"], A)
    [ident] = await _kept(rec, 1, timeout_s=5.0)
    bundle = rec.get(ident)
    assert bundle["settle"]["missing"] == 0
    assert bundle["settle"]["waited_s"] < 1.0
    assert {a["client"] for a in bundle["answers"]} == {A}
    check = _check(bundle, platform)
    assert (check.requests, check.batch_requests) == (6, 12)
    await rec.close()


async def test_a_keys_bundle_still_waits_for_its_batches_requests_being_judged(
    platform: Platform,
) -> None:
    rec = _recorder(None, "gw-0", settle_s=5.0)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    batch = [_as(x, A if i % 2 == 0 else B) for i, x in enumerate(_batch(boot, 4))]
    for x in batch[:3]:
        rec.record(x)
    rec.fired(["key"], A)
    await asyncio.sleep(0.2)
    assert rec.summaries() == []  # B's last request is still being judged
    rec.record(batch[3])
    [ident] = await _kept(rec, 1, timeout_s=2.0)
    assert rec.get(ident)["settle"]["missing"] == 0
    await rec.close()


async def test_a_request_with_no_row_fed_takes_no_slot_and_is_not_waited_for(
    platform: Platform,
) -> None:
    """A request whose every row was kept out of the alarm: no slot of the ring; a bundle of
    its signed batch counts it as judged, holds it (its rows named as kept out), and has no
    gap."""
    rec = _recorder(None, "gw-0", settle_s=3.0, capacity=4)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    batch = _batch(boot, 4)
    for x in [_unfed(batch[0]), *batch[1:]]:
        rec.record(x)
    assert [a.request_id for a in rec.ring] == [x.request_id for x in batch[1:]]
    rec.fired(["model"], "anonymous")
    [ident] = await _kept(rec, 1, timeout_s=5.0)
    bundle = rec.get(ident)
    assert bundle["settle"]["missing"] == 0
    assert bundle["settle"]["waited_s"] < 1.0
    check = _check(bundle, platform)
    assert check.requests == 4
    assert check.gaps() == ["2 signed rows kept out of the alarm by the gateway's word"]
    await rec.close()


async def test_a_document_that_does_not_decode_is_not_kept(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    rec = _recorder(None, "gw-0", settle_s=0.0)
    boot, doc = _boot(platform)
    with caplog.at_level(logging.WARNING, logger=incident_module.__name__):
        rec.boot(boot.module_id, b"\xa0not-a-document")
    assert boot.module_id not in rec.attestations
    assert "does not decode" in caplog.text
    rec.boot(boot.module_id, doc)
    assert rec.attestations[boot.module_id] == [doc]
    for x in _batch(boot, 3):
        rec.record(x)
    rec.fired(["model"], "anonymous")
    [ident] = await _kept(rec, 1)
    assert _check(rec.get(ident), platform).requests == 3
    await rec.close()


async def test_no_evidence_is_decoded_on_the_event_loop_when_a_bundle_is_written(
    platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of evidences (a full ring) are decoded off the event loop: the serving path
    does not stall while a bundle is written."""
    loop_thread = threading.get_ident()
    on_loop = [0]

    def counted(fn: Any) -> Any:
        def wrapper(evidence: bytes) -> Any:
            if threading.get_ident() == loop_thread:
                on_loop[0] += 1
            return fn(evidence)

        return wrapper

    for name in ("signed_place", "evidence_module_id"):
        if hasattr(incident_module, name):
            monkeypatch.setattr(incident_module, name, counted(getattr(incident_module, name)))
    rec = _recorder(None, "gw-0", settle_s=0.0)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    for _ in range(8):
        for x in _batch(boot, 32):
            rec.record(x)
    rec.fired(["model", "key"], "key-000000000000")
    await _kept(rec, 2, timeout_s=30.0)
    await rec.close()
    assert on_loop[0] == 0


async def test_an_alarm_firing_while_the_gateway_shuts_down_is_written(
    platform: Platform,
) -> None:
    rec = _recorder(None, "gw-0", settle_s=30.0)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    rec.record(_batch(boot, 2)[0])  # the other request of its batch is being judged
    rec.fired(["model"], "anonymous")
    await asyncio.sleep(0.05)
    [first] = rec._tasks  # waiting for it
    # another alarm fires just as the first bundle is written (a request finishing its
    # judging meanwhile), before close() would have returned
    first.add_done_callback(lambda _: rec.fired(["model"], "anonymous"))
    t0 = time.perf_counter()
    await rec.close()
    assert time.perf_counter() - t0 < 5.0  # sealed at once, not after 30 s
    assert not rec._tasks
    assert len(rec.summaries()) == 2


async def test_an_alarm_firing_after_close_is_written_at_once_and_said(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    rec = _recorder(None, "gw-0", settle_s=30.0)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    batch = _batch(boot, 3)
    rec.record(batch[0])
    await rec.close()
    with caplog.at_level(logging.WARNING, logger=incident_module.__name__):
        rec.fired(["model"], "anonymous")
        [ident] = await _kept(rec, 1, timeout_s=5.0)
    assert "fired while the gateway shuts down" in caplog.text
    settle = rec.get(ident)["settle"]
    assert settle["waited_s"] < 1.0
    assert settle["missing"] == 2


async def test_an_id_with_a_trailing_newline_is_not_an_incident(
    platform: Platform, tmp_path: Path
) -> None:
    rec = _recorder(tmp_path, "gw-0", settle_s=0.0)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    for x in _batch(boot, 2):
        rec.record(x)
    rec.fired(["model"], "anonymous")
    [ident] = await _kept(rec, 1)
    await rec.close()
    d = tmp_path / "tiny"
    (d / f"{ident}\n.json").write_bytes((d / f"{ident}.json").read_bytes())
    assert [s["id"] for s in rec.summaries()] == [ident]
    with pytest.raises(NotFound):
        rec.get(f"{ident}\n")


def test_bundles_of_one_second_are_listed_in_the_order_written(tmp_path: Path) -> None:
    """Ids of one second are ``<t>-model@i``, ``<t>-model-2@i`` .. ``<t>-model-10@i``: a plain
    text sort listed ``-10``, ``-2``, then the first (``-`` sorts before ``@``), so the newest
    was not last, where `fides incident export` takes it by default."""
    rec = _recorder(tmp_path, "gw-0")
    d = tmp_path / "tiny"
    d.mkdir(parents=True)
    t = "20261207T101010Z"
    written = [f"{t}-model@gw-0", f"{t}-model-2@gw-0", f"{t}-model-10@gw-0"]
    written.insert(0, "20261207T101009Z-model-3@gw-1")  # an earlier second, another instance
    for ident in reversed(written):
        (d / f"{ident}.json").write_text("{}")
    assert rec._ids() == written


async def test_a_request_recorded_after_close_is_counted_and_logged_by_id(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    """A signed answer that comes after the incident record closed (shutdown, unload) is held
    by no bundle sealed then: counted (the metric's callback) and logged with its request id."""
    rec = _recorder(None, "gw-0", settle_s=0.0)
    dropped: list[str] = []
    rec.on_dropped = dropped.append
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    first, late = _batch(boot, 2)
    rec.record(first)
    await rec.close()
    with caplog.at_level(logging.WARNING, logger=incident_module.__name__):
        rec.record(late)
    assert dropped == ["after_close"]
    assert f"request {late.request_id} (signed by the enclave) recorded after" in caplog.text


async def test_requests_with_no_row_fed_pushed_out_of_their_buffer_are_named_in_the_bundle(
    platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    """More requests that fed nothing to the alarm than are kept aside for bundles (256 here,
    the ring's capacity): the oldest are pushed out. Their batches' bundle shows them as gaps
    (it cannot hold them) and says why: ``settle.unfed_dropped`` counts them, the metric's
    callback too, and the log names the bound. Before, they went without a word."""
    rec = _recorder(None, "gw-0", settle_s=0.2, capacity=256)
    dropped: list[str] = []
    rec.on_dropped = dropped.append
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    with caplog.at_level(logging.WARNING, logger=incident_module.__name__):
        for _ in range(10):  # 10 signed batches of 30 requests: one fed, 29 not
            fed, *others = _batch(boot, 30)
            rec.record(fed)
            for x in others:
                rec.record(_unfed(x))
        rec.fired(["model"], "anonymous")
        [ident] = await _kept(rec, 1, timeout_s=10.0)
    await rec.close()
    bundle = rec.get(ident)
    assert dropped == ["unfed_overflow"] * (290 - 256)
    assert bundle["settle"]["unfed_dropped"] == 290 - 256
    assert bundle["settle"]["missing"] == 290 - 256  # the gaps are those requests
    check = _check(bundle, platform)
    assert check.batch_requests - check.requests == 290 - 256
    assert "pushed out" in caplog.text

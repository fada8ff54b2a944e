"""The gateway's incident recorder on its own, with really signed answers (tests/fides_core/
incident_kit.py): bundles of two instances sharing one directory stay whole and apart, and are
all listed; a bundle waits (bounded, in the background) for the requests of its signed batches
still being judged when the alarm fired, so it normally has no gaps, and reports those that
remain; the documents of a boot that outlives its certificate are renewed."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest

from fides_core.incident import IncidentAnswer, check_incident
from gateway.integrity.alarm import AlarmMonitor
from gateway.integrity.incident import IncidentRecorder
from tests.fides_core.incident_kit import (
    ALPHA,
    CAL_KL,
    CAL_SCORES,
    DAY,
    DELTA,
    OUTPUT,
    Boot,
    Platform,
)

MODEL = "tiny"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Platform:
    return Platform(tmp_path_factory.mktemp("platform"))


def _recorder(
    directory: Path | None,
    instance: str,
    *,
    settle_s: float = 5.0,
    capacity: int = 2048,
    max_incidents: int = 50,
    attest: Any = None,
) -> IncidentRecorder:
    alarm = AlarmMonitor(MODEL, CAL_SCORES, CAL_KL, alpha=ALPHA, delta=DELTA, instance=instance)

    async def no_attest(nonce: bytes) -> bytes:
        raise AssertionError("every boot's document was given")

    return IncidentRecorder(
        MODEL,
        alarm,
        verifier_output=OUTPUT,
        detector_threshold=0.9,
        attest=attest or no_attest,
        directory=directory,
        capacity=capacity,
        max_incidents=max_incidents,
        settle_s=settle_s,
    )


def _boot(platform: Platform) -> tuple[Boot, bytes]:
    boot = platform.boot(time.time() - 3600)
    boot.now = time.time() - 1800
    return boot, boot.attest()


def _batch(boot: Boot, requests: int, client: str = "key-000000000000") -> list[IncidentAnswer]:
    boot.now += 1
    return boot.sign(requests, client=client)


def _check(bundle: dict[str, Any], platform: Platform) -> Any:
    return check_incident(bundle, root=platform.root_pem, policy=platform.policy())


async def _kept(recorder: IncidentRecorder, n: int, timeout_s: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ids = [s["id"] for s in recorder.summaries()]
        if len(ids) >= n:
            return ids
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {n} bundles kept")


async def test_two_instances_sharing_a_directory_keep_both_bundles_whole(
    platform: Platform, tmp_path: Path
) -> None:
    """Two gateways (pods) with one volume: each alarm's bundle is named after its instance,
    written and pruned by it alone, and listed and returned by either; the other instance's
    files and those of a version that named none are never overwritten or mixed in."""
    shared = tmp_path / "incidents"
    a = _recorder(shared, "gateway-0", max_incidents=2)
    b = _recorder(shared, "gateway-1", max_incidents=2)
    legacy = shared / MODEL / "20260101T000000Z-model.json"  # before ids named the instance
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps({"type": "fides-incident/2", "scope": "model", "answers": []}))
    signed: dict[str, set[bytes]] = {}
    for name, rec in (("gateway-0", a), ("gateway-1", b)):
        boot, doc = _boot(platform)
        rec.boot(boot.module_id, doc)
        answers = [x for _ in range(3) for x in _batch(boot, 3)]
        for x in answers:
            rec.record(x)
        signed[name] = {x.evidence for x in answers}
    # both fire within the same second: the same time in their ids
    a.fired(["model"], "anonymous")
    b.fired(["model"], "anonymous")
    await asyncio.gather(a.close(), b.close())

    files = sorted(p.name for p in (shared / MODEL).glob("*.json"))
    assert len(files) == 3
    assert sum(f.endswith("@gateway-0.json") for f in files) == 1
    assert sum(f.endswith("@gateway-1.json") for f in files) == 1
    assert not list((shared / MODEL).glob(".*.tmp"))
    for rec in (a, b):  # either lists every instance's, and the version before's
        listed = rec.summaries()
        assert [s["id"] for s in listed] == [f.removesuffix(".json") for f in files]
        assert {s["instance"] for s in listed} == {None, "gateway-0", "gateway-1"}
    for s in a.summaries():
        if s["instance"] is None:
            continue
        bundle = b.get(s["id"])  # the other instance returns it
        assert bundle["instance"] == s["instance"]
        check = _check(bundle, platform)
        assert check.requests == 9
        assert check.gaps() == []
        assert {x["evidence"] for x in bundle["answers"]} == {
            base64.b64encode(e).decode("ascii") for e in signed[s["instance"]]
        }

    # each instance prunes its own bundles only (two kept here), never another's
    a2 = _recorder(shared, "gateway-0", max_incidents=2)
    boot, doc = _boot(platform)
    a2.boot(boot.module_id, doc)
    for _ in range(3):
        for x in _batch(boot, 2):
            a2.record(x)
        a2.fired(["model"], "anonymous")
        await asyncio.sleep(0)
    await a2.close()
    names = [p.name for p in (shared / MODEL).glob("*.json")]
    assert sum(n.endswith("@gateway-0.json") for n in names) == 2
    assert sum(n.endswith("@gateway-1.json") for n in names) == 1
    assert legacy.name in names
    assert len({n.removesuffix(".json") for n in names}) == len(names)


async def test_a_bundle_waits_for_the_requests_of_its_batches_still_being_judged(
    platform: Platform,
) -> None:
    """The alarm fires while two requests of a signed batch it holds, and a whole batch
    within the span it holds, are still being judged: firing returns at once (the tripping
    request does not wait), the bundle waits for them and holds every request: no gaps. A
    batch signed after the last one held is not waited for nor added."""
    rec = _recorder(None, "gateway-0", settle_s=5.0)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    first, middle, last = _batch(boot, 3), _batch(boot, 2), _batch(boot, 3)
    for x in [*first, *last[:1]]:  # the middle batch and two of the last one: being judged
        rec.record(x)
    t0 = time.perf_counter()
    rec.fired(["model"], "anonymous")
    # nothing waited on the serving path: the seal, build and write are handed off (no bundle
    # yet), and firing took far less than the 5 s settle a wait there would last (a bound
    # generous enough for a loaded machine)
    assert rec.summaries() == []
    assert time.perf_counter() - t0 < 1.0
    later = _batch(boot, 2)  # signed after the alarm: not the bundle's
    await asyncio.sleep(0.2)
    assert rec.summaries() == []  # still waiting
    for x in [*last[1:], *later, *middle]:
        rec.record(x)
    [ident] = await _kept(rec, 1)
    bundle = rec.get(ident)
    assert bundle["settle"]["missing"] == 0
    assert 0.15 <= bundle["settle"]["waited_s"] < 5.0  # waited for them, not the whole settle
    check = _check(bundle, platform)
    assert check.requests == 8
    assert check.gaps() == []
    assert (check.signed_batches, check.batch_span) == (3, 3)
    await rec.close()


async def test_a_request_not_judged_within_the_bound_stays_a_gap(platform: Platform) -> None:
    rec = _recorder(None, "gateway-0", settle_s=0.3)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    batch = _batch(boot, 3)
    for x in batch[:2]:
        rec.record(x)
    rec.fired(["model"], "anonymous")
    [ident] = await _kept(rec, 1)
    rec.record(batch[2])  # too late
    bundle = rec.get(ident)
    assert bundle["settle"]["missing"] == 1
    assert bundle["settle"]["waited_s"] >= 0.3
    check = _check(bundle, platform)
    assert (check.requests, check.batch_requests) == (2, 3)
    assert check.gaps() == ["1 requests of the signed batches held are not in the bundle"]
    await rec.close()


async def test_answers_pushed_out_of_a_full_ring_complete_the_oldest_batch(
    platform: Platform,
) -> None:
    """A ring of 4: the first batch's first two requests are pushed out before the alarm.
    They are kept aside a while, so the bundle's oldest batch is whole; a key's bundle takes
    its own requests only."""
    rec = _recorder(None, "gateway-0", settle_s=5.0, capacity=4)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    for x in [*_batch(boot, 3), *_batch(boot, 3)]:
        rec.record(x)
    assert len(rec.ring) == 4
    rec.fired(["model"], "anonymous")
    [ident] = await _kept(rec, 1)
    check = _check(rec.get(ident), platform)
    assert check.requests == 6
    assert check.gaps() == []
    assert rec.get(ident)["settle"]["waited_s"] < 2.5  # nothing to wait for: not the 5 s settle
    await rec.close()


async def test_closing_seals_a_waiting_bundle_at_once(platform: Platform) -> None:
    rec = _recorder(None, "gateway-0", settle_s=30.0)
    boot, doc = _boot(platform)
    rec.boot(boot.module_id, doc)
    batch = _batch(boot, 3)
    rec.record(batch[0])
    rec.fired(["model"], "anonymous")
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    await rec.close()  # the gateway's shutdown: no 30 s wait
    assert time.perf_counter() - t0 < 10.0
    [summary] = rec.summaries()
    assert rec.get(summary["id"])["settle"]["missing"] == 2


async def test_a_boot_outliving_its_certificate_is_attested_again(platform: Platform) -> None:
    """A boot whose certificate (7 days) nears its end while it signs: the recorder attests
    it again in the background; answers before and after the first certificate's end are
    then bundled with the document covering each, and the bundle proves now."""
    now = time.time()
    boot = platform.boot(now - 7 * DAY + 3 * 3600)  # its certificate ends in 3 hours
    boot.now = now - 7 * DAY + 4 * 3600
    old = boot.attest()
    asked: list[bytes] = []

    async def attest(nonce: bytes) -> bytes:
        asked.append(nonce)
        boot.certify(now - 600)  # the platform renews the boot's certificate
        boot.now = now - 300
        return boot.attest()

    rec = _recorder(None, "gateway-0", settle_s=0.5, attest=attest)
    rec.boot(boot.module_id, old)  # the enclave's first call: within its last eighth
    await asyncio.sleep(0.1)
    assert len(asked) == 1
    assert len(rec.attestations[boot.module_id]) == 2
    rec.boot(boot.module_id, old)  # later calls: renewed, not asked again
    await asyncio.sleep(0.05)
    assert len(asked) == 1

    boot.now = now - 7 * DAY + 5 * 3600  # under the first certificate only
    early = _batch(boot, 2)
    boot.now = now - 200  # under both: bundled with the renewed one
    late = _batch(boot, 2)
    for x in [*early, *late]:
        rec.record(x)
    rec.fired(["model"], "anonymous")
    [ident] = await _kept(rec, 1)
    bundle = rec.get(ident)
    assert len(bundle["attestations"][boot.module_id]) == 2
    check = _check(bundle, platform)  # the renewed document is current now
    assert check.requests == 4
    await rec.close()

"""A request whose enclave verification timed out (issue 21): the gateway answered it without
a verdict (``enclave_timeout``) and fed nothing of it to the alarm, but the enclave still signed
it, in a batch with requests that were answered and fed. Its evidence, arriving after the
timeout, was dropped: a bundle holding that batch waited the sealing bound for a request that
would never be judged, then showed it as a gap no one explained. The late evidence is now kept:
the bundle holds the request, its rows named as kept out of the alarm (``enclave_timeout``, the
gateway's word), and the check counts them like the other rows kept out."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from fides_core.incident import evidence_module_id
from gateway.enclave_client import VerifiedItem
from gateway.integrity import incident as incident_module
from gateway.integrity import pipeline as pipeline_module
from gateway.integrity.enclave import EnclaveBatcher
from gateway.integrity.pipeline import IntegrityPipeline
from tests.gateway.integrity.conftest import (
    batched,
    bundle_when_kept,
    check_bundle,
    integrity_gateway,
    switch_until_alarm,
    tag_request,
    waves_with,
)
from tests.gateway.integrity.test_enclave_batcher import _enclave, _request
from tests.integrity_factory import Digits

LATE = "timed-out-request"


@pytest.fixture
def one_request_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The request with id LATE waits at most 50 ms for the enclave (the others the
    configured ``timeout_s``): it times out while its batch gathers (200 ms), and the enclave
    signs it with the others of the batch all the same."""
    late = tag_request(monkeypatch, LATE)
    timeout = asyncio.timeout

    def short_for_late(delay: float | None) -> asyncio.Timeout:
        # only the pipeline's wait for the enclave (IntegrityPipeline._verify) of LATE
        if late.get() and sys._getframe(1).f_code.co_name == "_verify":
            return timeout(0.05)
        return timeout(delay)

    monkeypatch.setattr(pipeline_module.asyncio, "timeout", short_for_late)


async def _alarm_with_one_request_timed_out(
    client: httpx.AsyncClient, digits: Digits, rid: str = LATE
) -> httpx.Response:
    """Waves of three concurrent requests (one signed batch each); the second wave carries
    request ``rid`` too (LATE: it times out); then a switch drill until the alarm fires."""
    answered = await (await waves_with(client, digits, rid))
    await switch_until_alarm(client, digits)
    return answered


async def test_a_timed_out_request_signed_in_a_batch_is_named_in_the_bundle(
    integrity_repo: Path,
    digits: Digits,
    one_request_times_out: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    batched(integrity_repo)
    monkeypatch.setattr(incident_module, "SETTLE_S", 1.0)
    async with integrity_gateway(integrity_repo) as (client, fakes):
        answered = await _alarm_with_one_request_timed_out(client, digits)
        bundle = await bundle_when_kept(client)
    # the gateway's answer: no verdict, never fed to the alarm
    if answered.status_code == 200:
        assert answered.json()["parameters"]["integrity_reason"].startswith("enclave_timeout")
    else:
        assert answered.status_code == 503
        assert "enclave_timeout" in answered.text
    held = {a["request_id"]: a for a in bundle["answers"]}
    assert LATE in held, "the signed evidence of the timed-out request is not in the bundle"
    assert held[LATE]["rows"] == []
    assert held[LATE]["excluded"] == {"enclave_timeout": [0, 1]}
    assert bundle["settle"]["missing"] == 0  # nothing waited for in vain
    assert bundle["settle"]["waited_s"] < 1.0
    check = check_bundle(bundle, fakes, integrity_repo)
    assert check.requests == check.batch_requests
    assert check.signed_batches == check.batch_span
    assert check.excluded["enclave_timeout"] == 2
    assert "2 signed rows kept out of the alarm by the gateway's word" in check.gaps()
    assert "(2 enclave timeout)" in check.summary()
    assert check.peak >= check.threshold


async def test_the_batcher_hands_a_late_signed_answer_to_the_request_that_gave_up(
    tmp_path: Path,
) -> None:
    """A waiter that gives up (cancelled, timed out) leaves its request in the batch; its
    ``late`` is told the signed answer, a waiter that got it is not, and a ``late`` that fails
    fails no other request."""
    enclave = _enclave(tmp_path)
    enclave.delay_s = 0.2
    batcher = EnclaveBatcher(enclave, max_rows=32, delay_s=0.05)
    told: dict[str, VerifiedItem] = {}

    def broken(item: VerifiedItem) -> None:
        raise RuntimeError("bookkeeping failed")

    gave_up = asyncio.ensure_future(batcher.verify(_request(0), 1, late=lambda i: told.update(a=i)))
    also = asyncio.ensure_future(batcher.verify(_request(1), 1, late=broken))
    kept = asyncio.ensure_future(batcher.verify(_request(2), 1, late=lambda i: told.update(c=i)))
    await asyncio.sleep(0.1)  # the call is out
    gave_up.cancel()
    also.cancel()
    item = await kept
    await batcher.close()
    assert item.id == "r2"
    assert list(told) == ["a"]
    assert told["a"].id == "r0"
    assert told["a"].evidence
    assert evidence_module_id(told["a"].evidence) == evidence_module_id(item.evidence)
    assert enclave.calls == 1


async def test_a_signed_request_whose_judging_failed_is_named_in_the_bundle(
    integrity_repo: Path, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a request signed and then not judged (its detector call failed; a client
    gone away or a deadline passed alike): ``not_judged``."""
    unjudged = tag_request(monkeypatch, "unjudged")
    judge = IntegrityPipeline._judge

    async def failing_judge(self: IntegrityPipeline, pair: Any, tensors: Any, d: float) -> Any:
        if unjudged.get():
            raise RuntimeError("the detector failed")
        return await judge(self, pair, tensors, d)

    monkeypatch.setattr(IntegrityPipeline, "_judge", failing_judge)
    monkeypatch.setattr(incident_module, "SETTLE_S", 1.0)
    batched(integrity_repo)
    async with integrity_gateway(integrity_repo) as (client, fakes):
        answered = await _alarm_with_one_request_timed_out(client, digits, "unjudged")
        bundle = await bundle_when_kept(client)
    assert answered.status_code >= 500
    held = {a["request_id"]: a for a in bundle["answers"]}
    assert held["unjudged"]["excluded"] == {"not_judged": [0, 1]}
    assert bundle["settle"]["missing"] == 0
    check = check_bundle(bundle, fakes, integrity_repo)
    assert check.requests == check.batch_requests
    assert check.excluded["not_judged"] == 2

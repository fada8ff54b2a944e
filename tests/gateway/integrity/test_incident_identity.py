"""Incident bundles under concurrent load and client-chosen ids (review of issue 21): an answer
is its signed leaf (enclave boot, signed batch, place in the batch), never the client's request
id; a bundle is in the enclave's signing order whatever order judging ended in; and every signed
row of a request held is accounted for, while the requests a bundle holds of its signed batches
are counted (X of Y) so that a selection shows."""

from __future__ import annotations

import asyncio
import base64
import copy
from pathlib import Path
from typing import Any

import cbor2
import httpx
import numpy as np
import pytest

from fides_core.incident import (
    INCIDENT_TYPE,
    LEGACY_TYPE,
    UNLISTED,
    IncidentAnswer,
    IncidentError,
    build_bundle,
)
from tests.gateway.integrity.conftest import (
    ADMIN,
    Fakes,
    infer_body,
    integrity_gateway,
)
from tests.gateway.integrity.conftest import batched as _batched
from tests.gateway.integrity.conftest import check_bundle as _check
from tests.gateway.integrity.conftest import wave as _wave
from tests.integrity_factory import Digits

INCIDENTS = "/v2/admin/models/digits/integrity/incidents"
SAME_ID = "the-same-id"  # every request of these tests: a client that never varies its ids


async def _alarm_in_batches(client: httpx.AsyncClient, digits: Digits) -> list[dict[str, Any]]:
    """Waves of three concurrent requests of two rows each, all with the same OIP id: honest
    first (one with an input unlike any digit, which the novelty check keeps out of the alarm),
    then under a switch drill until the alarm fires. The parameters of every answer."""
    noise = np.random.default_rng(7).uniform(-3, 3, size=(1, 1, 8, 8)).astype(np.float32)
    params = []
    for wave in range(3):
        xs = [digits.take(2, seed=10 * wave + j) for j in range(3)]
        if wave == 0:
            xs[1] = np.concatenate([xs[1][:1], noise])
        params += await _wave(client, [{"id": SAME_ID, **infer_body(x)} for x in xs])
    r = await client.put(
        "/v2/admin/models/digits/drill", json={"attack": "switch", "rate": 1.0}, headers=ADMIN
    )
    assert r.status_code == 200
    for wave in range(3, 20):
        xs = [digits.take(2, seed=10 * wave + j) for j in range(3)]
        params += await _wave(client, [{"id": SAME_ID, **infer_body(x)} for x in xs])
        if any(p["integrity_alarm"] for p in params):
            return params
    raise AssertionError("the switched answers did not raise the alarm")


async def _model_bundle(client: httpx.AsyncClient) -> dict[str, Any]:
    for _ in range(200):  # written in the background when the alarm fires
        listed = (await client.get(INCIDENTS, headers=ADMIN)).json()["incidents"]
        model = [i for i in listed if i["scope"] == "model"]
        if model:
            bundle: dict[str, Any] = (
                await client.get(f"{INCIDENTS}/{model[0]['id']}", headers=ADMIN)
            ).json()
            return bundle
        await asyncio.sleep(0.02)
    raise AssertionError("no model incident kept")


def _leaf(answer: dict[str, Any]) -> tuple[int, int, int]:
    """(signed batch sequence number, place in the batch, requests in the batch), read here
    from the evidence (the test's own reading, not the code under test's)."""
    doc = cbor2.loads(base64.b64decode(answer["evidence"]))
    payload = cbor2.loads(cbor2.loads(doc["result"]).value[2])
    return payload["seq"], doc["entry"]["index"], payload["count"]


def _as_recorded(answer: dict[str, Any]) -> IncidentAnswer:
    """A bundle's answer back as the gateway's ring holds it."""
    extra = {}
    if answer.get("excluded"):
        extra["excluded"] = {k: np.asarray(v, int) for k, v in answer["excluded"].items()}
    return IncidentAnswer(
        answer["request_id"],
        answer["client"],
        base64.b64decode(answer["evidence"]),
        np.asarray(answer["rows"], int),
        np.asarray(answer["service"], np.float32).reshape(len(answer["rows"]), -1),
        np.asarray(answer["detector"], np.float64),
        np.asarray(answer["kl"], np.float64),
        **extra,
    )


@pytest.fixture
async def batched_alarm(
    integrity_repo: Path, digits: Digits
) -> tuple[dict[str, Any], list[dict[str, Any]], Fakes, Path]:
    _batched(integrity_repo)
    async with integrity_gateway(integrity_repo) as (client, fakes):
        params = await _alarm_in_batches(client, digits)
        bundle = await _model_bundle(client)
    return bundle, params, fakes, integrity_repo


async def test_a_ring_out_of_signing_order_gives_a_bundle_that_proves(
    batched_alarm: tuple[dict[str, Any], list[dict[str, Any]], Fakes, Path],
) -> None:
    """Judging ends in another order than the enclave signed in (under load; the attacked rows
    also wait for the re-classifier): the gateway's ring holds the answers as judging ended.
    Built from a ring in reverse signing order, the bundle is in signing order again (batch,
    then place in the batch) and proves the alarm; a bundle listed out of order is put in
    signing order by the checker, not refused."""
    bundle, _, fakes, repo = batched_alarm
    assert max(_leaf(a)[2] for a in bundle["answers"]) >= 2  # batches of several requests
    mon = bundle["monitor"]
    rebuilt = build_bundle(
        model=bundle["model"],
        scope=bundle["scope"],
        client=bundle["client"],
        raised_at=bundle["raised_at"],
        verifier_output=bundle["verifier_output"],
        detector_threshold=bundle["detector_threshold"],
        calibration_scores=np.asarray(mon["calibration"]["detector"]),
        calibration_kl=np.asarray(mon["calibration"]["kl"]),
        alpha=mon["alpha"],
        delta=mon["delta"],
        attestations={m: base64.b64decode(d) for m, d in bundle["attestations"].items()},
        answers=[_as_recorded(a) for a in reversed(bundle["answers"])],
        live=bundle["live"],
    )
    places = [_leaf(a)[:2] for a in rebuilt["answers"]]
    assert places == sorted(places)
    assert len(set(places)) == len(places) == len(bundle["answers"])
    check = _check(rebuilt, fakes, repo)
    assert check.requests == len(bundle["answers"])
    assert check.peak >= check.threshold
    unpinned = _check(rebuilt, fakes, repo, models=False)  # the recorded trajectory agrees
    assert unpinned.peak == pytest.approx(check.peak, rel=1e-6)
    assert "in the enclave's signing order" in check.summary()

    listed = copy.deepcopy(rebuilt)
    listed["answers"].reverse()  # listed out of order: sorted by the checker
    again = _check(listed, fakes, repo, models=False)
    assert (again.peak, again.alarm_at, again.requests) == (
        unpinned.peak,
        unpinned.alarm_at,
        unpinned.requests,
    )


async def test_requests_with_the_same_client_id_count_once_each(
    batched_alarm: tuple[dict[str, Any], list[dict[str, Any]], Fakes, Path],
) -> None:
    """Every request carries the same OIP id, several in one signed batch: the enclave signs
    each (its own place in the batch), the gateway verifies each, and the bundle proves the
    alarm with each request counted once. The same signed answer twice is still refused."""
    bundle, params, fakes, repo = batched_alarm
    assert all(p["integrity_request_id"] == SAME_ID for p in params)
    assert {p["integrity_verdict"] for p in params} <= {"verified", "attack", "unverified"}
    answers = bundle["answers"]
    assert {a["request_id"] for a in answers} == {SAME_ID}
    leaves = [_leaf(a) for a in answers]
    seqs = [seq for seq, _, _ in leaves]
    assert any(seqs.count(s) >= 2 for s in seqs)  # two requests with one id in one batch
    check = _check(bundle, fakes, repo)
    assert check.requests == len(answers) >= 6
    assert check.signed_rows == 2 * len(answers)  # every request had two rows

    twice = copy.deepcopy(bundle)
    twice["answers"].append(copy.deepcopy(answers[-1]))
    with pytest.raises(IncidentError) as err:
        _check(twice, fakes, repo)
    assert err.value.part == f"answer {len(answers)} (request {SAME_ID})"
    assert "no answer counts twice" in str(err.value)


async def test_signed_rows_and_requests_left_out_of_a_bundle_show(
    batched_alarm: tuple[dict[str, Any], list[dict[str, Any]], Fakes, Path],
) -> None:
    """The rows the gateway kept out of the alarm (an input unlike any digit) are reported as
    kept out by its word; a signed row deleted from a bundle is refused, not passed over; a
    request deleted from its signed batch shows in the counts (X of the Y requests)."""
    bundle, _, fakes, repo = batched_alarm
    check = _check(bundle, fakes, repo)
    assert check.signed_rows == 2 * check.requests
    ood = check.excluded["out_of_distribution"]
    assert ood >= 1  # the honest wave's noise input
    assert check.answers == check.signed_rows - sum(check.excluded.values())
    assert check.requests <= check.batch_requests
    summary = check.summary()
    assert f"{check.answers} of the {check.signed_rows} signed rows" in summary
    assert "kept out of the alarm by the gateway's word" in summary
    assert f"{ood} out of distribution" in summary
    assert f"{check.requests} of the {check.batch_requests} requests" in summary

    # a low-scoring signed row deleted, as if the request had had one row
    first = next(i for i, a in enumerate(bundle["answers"]) if len(a["rows"]) == 2)
    cut = copy.deepcopy(bundle)
    a = cut["answers"][first]
    for name in ("rows", "service", "detector", "kl"):
        a[name] = a[name][1:]
    with pytest.raises(IncidentError) as err:
        _check(cut, fakes, repo)
    assert err.value.part.startswith(f"answer {first}")
    assert "signed rows [0] of its 2 are neither fed to the statistic nor kept out" in str(
        err.value
    )
    # ... or passed off as the gateway's exclusion: proven, with the gateway's word reported
    a["excluded"] = {"out_of_distribution": [0]}
    claimed = _check(cut, fakes, repo)
    assert claimed.excluded["out_of_distribution"] == ood + 1
    assert f"{claimed.answers} of the {claimed.signed_rows} signed rows" in claimed.summary()
    assert claimed.answers == check.answers - 1

    # a whole request deleted from a signed batch of several
    seqs = [_leaf(a)[0] for a in bundle["answers"]]
    shared = next(i for i, s in enumerate(seqs) if seqs.count(s) >= 2)
    fewer = copy.deepcopy(bundle)
    del fewer["answers"][shared]
    less = _check(fewer, fakes, repo)
    assert less.batch_requests == check.batch_requests
    assert less.requests == check.requests - 1
    assert f"{less.requests} of the {check.batch_requests} requests" in less.summary()
    assert any("requests of the signed batches held" in g for g in less.gaps())


async def test_a_version_1_bundle_without_excluded_rows_reports_them_as_a_gap(
    batched_alarm: tuple[dict[str, Any], list[dict[str, Any]], Fakes, Path],
) -> None:
    """Bundles written before the gateway listed the rows it kept out (fides-incident/1) still
    check: their unlisted rows are a gap the summary names, not a refusal; a version 2 bundle
    missing the list is refused."""
    bundle, _, fakes, repo = batched_alarm
    assert bundle["type"] == INCIDENT_TYPE
    ood = _check(bundle, fakes, repo).excluded["out_of_distribution"]
    old = copy.deepcopy(bundle)
    old["type"] = LEGACY_TYPE
    for answer in old["answers"]:
        answer.pop("excluded", None)
    check = _check(old, fakes, repo)
    assert check.excluded[UNLISTED] == ood
    assert f"{ood} unlisted in a version 1 bundle" in check.summary()
    unlisted = copy.deepcopy(old)
    unlisted["type"] = INCIDENT_TYPE
    with pytest.raises(IncidentError, match="neither fed to the statistic nor kept out"):
        _check(unlisted, fakes, repo)

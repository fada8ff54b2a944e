"""Incident bundles (issue 21): when the alarm fires the gateway keeps the signed evidence that
drove it; the SDK proves the alarm from the bundle alone (every attestation and signature, KL
and the detector scores recomputed, the statistic recomputed to the threshold), and names the
broken part of every tampered or truncated bundle."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from typer.testing import CliRunner

from fides.cli import app
from fides_client.client import IntegrityModels
from fides_client.incident import load_bundle, verify_incident
from fides_core.incident import IncidentError
from gateway.integrity.alarm import client_id
from tests.conftest import USER_KEY
from tests.gateway.integrity.conftest import (
    ADMIN,
    Fakes,
    RestartingEnclave,
    infer_body,
    integrity_gateway,
)
from tests.gateway.integrity.test_pipeline import URL
from tests.integrity_factory import Digits

INCIDENTS = "/v2/admin/models/digits/integrity/incidents"


async def _raise_alarm(client: httpx.AsyncClient, digits: Digits) -> None:
    x = digits.take(40)
    for i in range(8):  # honest answers first: the bundle holds them too
        await client.post(URL, json=infer_body(x[i : i + 1]))
    r = await client.put(
        "/v2/admin/models/digits/drill", json={"attack": "switch", "rate": 1.0}, headers=ADMIN
    )
    assert r.status_code == 200
    for i in range(8, 40):
        params = (await client.post(URL, json=infer_body(x[i : i + 1]))).json()["parameters"]
        if params["integrity_alarm"]:
            return
    raise AssertionError("32 switched answers did not raise the alarm")


async def _incidents(client: httpx.AsyncClient, n: int) -> list[dict[str, Any]]:
    for _ in range(200):  # written in the background when the alarm fires
        listed = (await client.get(INCIDENTS, headers=ADMIN)).json()["incidents"]
        if len(listed) >= n:
            return listed  # type: ignore[no-any-return]
        await asyncio.sleep(0.02)
    raise AssertionError(f"fewer than {n} incidents kept")


def _check(bundle: Any, fakes: Fakes, repo: Path, *, models: bool = True, **kw: Any) -> Any:
    fake = fakes.by_model["digits"]
    return verify_incident(
        bundle,
        root=fake.root_pem,
        measurements=kw.pop("measurements", [fake.measurement.pcr0.hex()]),
        allow_simulated=kw.pop("allow_simulated", True),
        models=IntegrityModels.from_repository(repo, "digits") if models else None,
    )


def _broken(bundle: dict[str, Any], fakes: Fakes, repo: Path, **kw: Any) -> IncidentError:
    with pytest.raises(IncidentError) as err:
        _check(bundle, fakes, repo, **kw)
    return err.value


def _flip(b64: str, at: int) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[at] ^= 0x01
    return base64.b64encode(bytes(raw)).decode("ascii")


def _bad_signature(evidence_b64: str) -> str:
    """The per-request evidence with one bit of its batch signature flipped."""
    doc = cbor2.loads(base64.b64decode(evidence_b64))
    sign1 = cbor2.loads(doc["result"])
    signature = bytearray(sign1.value[3])
    signature[0] ^= 0x01
    sign1.value[3] = bytes(signature)
    doc["result"] = cbor2.dumps(sign1)
    return base64.b64encode(cbor2.dumps(doc)).decode("ascii")


async def test_an_alarm_keeps_a_bundle_the_sdk_proves_and_every_tamper_is_named(
    integrity_repo: Path, digits: Digits, tmp_path: Path
) -> None:
    async with integrity_gateway(integrity_repo) as (client, fakes):
        assert (await client.get(INCIDENTS)).status_code == 403  # admin only
        assert (await client.get(INCIDENTS, headers=ADMIN)).json()["incidents"] == []
        await _raise_alarm(client, digits)
        listed = await _incidents(client, 2)  # the model's and the key's alarm, both fired
        assert {i["scope"] for i in listed} == {"model", "key"}
        key_incident = next(i for i in listed if i["scope"] == "key")
        assert key_incident["client"] == client_id(USER_KEY)
        bundle = (await client.get(f"{INCIDENTS}/{key_incident['id']}", headers=ADMIN)).json()
        missing = await client.get(f"{INCIDENTS}/20260101T000000Z-model", headers=ADMIN)
        assert missing.status_code == 404
        assert "no incident" in missing.json()["error"]
        bad_id = await client.get(f"{INCIDENTS}/..%2Fsecret", headers=ADMIN)
        assert bad_id.status_code == 404

    # proven: with the published detector (scores recomputed) and without it
    check = _check(bundle, fakes, integrity_repo)
    assert check.scope == "key"
    assert check.client == client_id(USER_KEY)
    assert check.scores_recomputed
    assert check.simulated
    assert check.peak >= check.threshold
    assert 8 < check.alarm_at <= check.answers
    assert check.requests == len(bundle["answers"]) >= 9  # honest answers and the attacked
    assert check.calibration_pinned
    assert check.drill  # raised by a drill: the bundle says it was an exercise
    assert check.batch_span >= check.signed_batches >= 1
    assert "the detector card's calibration" in check.summary()
    assert "an exercise" in check.summary()
    unpinned = _check(bundle, fakes, integrity_repo, models=False)
    assert not unpinned.scores_recomputed
    assert not unpinned.calibration_pinned
    assert "the calibration the bundle carries" in unpinned.summary()

    def tampered(change: Any) -> dict[str, Any]:
        b = copy.deepcopy(bundle)
        change(b)
        return b

    last = len(bundle["answers"]) - 1
    # a signature that does not verify
    sig = tampered(
        lambda b: b["answers"][last].update(evidence=_bad_signature(b["answers"][last]["evidence"]))
    )
    err = _broken(sig, fakes, integrity_repo)
    assert err.part.startswith(f"answer {last} (request ")
    assert "Signature" in str(err)

    # a service answer changed after the fact: KL no longer matches the signed output
    def soften(b: dict[str, Any]) -> None:
        b["answers"][last]["service"][0] = [0.1] * len(b["answers"][last]["service"][0])

    err = _broken(tampered(soften), fakes, integrity_repo)
    assert err.part.startswith(f"answer {last}")
    assert "KL" in str(err)
    # a detector score inflated: our detector disagrees
    err = _broken(
        tampered(lambda b: b["answers"][0].update(detector=[0.999])), fakes, integrity_repo
    )
    assert err.part.startswith("answer 0")
    assert "detector scores differ" in str(err)
    # evidence moved to another request id
    err = _broken(
        tampered(lambda b: b["answers"][0].update(request_id="someone-else")), fakes, integrity_repo
    )
    assert err.part == "answer 0 (request someone-else)"
    assert "BindingError" in str(err)
    # an attestation document altered, or missing
    module = next(iter(bundle["attestations"]))
    err = _broken(
        tampered(
            lambda b: b["attestations"].update({module: _flip(b["attestations"][module], -5)})
        ),
        fakes,
        integrity_repo,
    )
    assert err.part == f"attestation {module}"
    err = _broken(tampered(lambda b: b["attestations"].clear()), fakes, integrity_repo)
    assert err.part.startswith("answer 0")
    assert "no attestation" in str(err)
    # an answer whose boot is not a name (a list is not hashable: no TypeError from underneath)
    err = _broken(
        tampered(lambda b: b["answers"][0].update(module_id=[module])), fakes, integrity_repo
    )
    assert err.part.startswith("answer 0")
    assert "no attestation" in str(err)
    # an enclave the policy does not expect, or simulated evidence under a strict policy
    err = _broken(bundle, fakes, integrity_repo, measurements=["00" * 48])
    assert err.part == f"attestation {module}"
    assert "MeasurementMismatch" in str(err)
    err = _broken(bundle, fakes, integrity_repo, allow_simulated=False)
    assert "SimulatedEvidenceRejected" in str(err)

    # a calibration that makes anything an alarm
    def shrink(b: dict[str, Any]) -> None:
        b["monitor"]["calibration"]["detector"] = [
            x / 10 for x in b["monitor"]["calibration"]["detector"]
        ]

    assert _broken(tampered(shrink), fakes, integrity_repo).part == "calibration"
    # a looser false-alarm level than the checker accepts (clean answers would then alarm)
    loose = _broken(tampered(lambda b: b["monitor"].update(alpha=0.5)), fakes, integrity_repo)
    assert loose.part == "calibration"
    assert "looser than this check accepts" in str(loose)
    loose = _broken(tampered(lambda b: b["monitor"].update(delta=0.9)), fakes, integrity_repo)
    assert "looser than this check accepts" in str(loose)
    # one signed answer counted twice (the same signed leaf), or one row of it
    twice = tampered(lambda b: b["answers"].append(copy.deepcopy(b["answers"][last])))
    err = _broken(twice, fakes, integrity_repo)
    assert err.part.startswith(f"answer {last + 1}")
    assert f"the signed answer of answer {last} again" in str(err)
    assert "no answer counts twice" in str(err)

    def repeat_rows(b: dict[str, Any]) -> None:
        a = b["answers"][last]
        a.update(rows=a["rows"] * 2, service=a["service"] * 2, detector=a["detector"] * 2)
        a.update(kl=a["kl"] * 2)

    err = _broken(tampered(repeat_rows), fakes, integrity_repo)
    assert "'rows' repeat" in str(err)

    # answers listed out of the enclave's signing order: the checker puts them in it
    def swap(b: dict[str, Any]) -> None:
        b["answers"][0], b["answers"][last] = b["answers"][last], b["answers"][0]

    swapped = _check(tampered(swap), fakes, integrity_repo)
    assert (swapped.peak, swapped.alarm_at) == (check.peak, check.alarm_at)
    # truncated to the honest answers: the alarm is not proven
    honest = tampered(lambda b: b.update(answers=b["answers"][:8], trajectory=b["trajectory"][:8]))
    err = _broken(honest, fakes, integrity_repo)
    assert err.part == "statistic"
    assert "below the alarm threshold" in str(err)
    # answers dropped, trajectory kept: the recorded statistic is not what the answers give
    dropped = tampered(lambda b: b.update(answers=b["answers"][1:]))
    assert _broken(dropped, fakes, integrity_repo, models=False).part == "statistic"
    # a file cut short
    text = json.dumps(bundle)
    with pytest.raises(IncidentError) as cut:
        load_bundle(text[: len(text) // 2].encode())
    assert cut.value.part == "format"
    assert "truncated" in str(cut.value)
    assert _broken({"type": "something"}, fakes, integrity_repo).part == "format"

    # the command line: fides incident verify, PROVEN / NOT PROVEN with the part named
    fake = fakes.by_model["digits"]
    (tmp_path / "root.pem").write_bytes(fake.root_pem)
    (tmp_path / "ok.json").write_text(json.dumps(bundle))
    (tmp_path / "bad.json").write_text(json.dumps(sig))
    args = ["--root", str(tmp_path / "root.pem"), "--repository", str(integrity_repo)]
    runner = CliRunner()
    ok = runner.invoke(
        app, ["incident", "verify", str(tmp_path / "ok.json"), *args, "--allow-simulated"]
    )
    assert ok.exit_code == 0, ok.output
    assert "PROVEN" in ok.output
    assert "recomputed with the repository's detector" in " ".join(ok.output.split())
    bad = runner.invoke(
        app, ["incident", "verify", str(tmp_path / "bad.json"), *args, "--allow-simulated"]
    )
    assert bad.exit_code == 1
    assert "NOT PROVEN" in bad.output
    assert f"answer {last}" in bad.output


async def test_an_answer_keeps_the_boot_that_signed_it_after_the_enclave_restarted(
    integrity_repo: Path, digits: Digits
) -> None:
    """The enclave restarts after signing the first request and before the gateway keeps its
    answer, so no answer of that boot is ever kept while it runs: the bundle still carries
    that boot's attestation document (not the boot running at keep time), holds the answer,
    and the SDK proves it with both boots."""
    async with integrity_gateway(integrity_repo, RestartingEnclave) as (client, fakes):
        await _raise_alarm(client, digits)
        listed = await _incidents(client, 2)
        ident = next(i["id"] for i in listed if i["scope"] == "model")
        bundle = (await client.get(f"{INCIDENTS}/{ident}", headers=ADMIN)).json()
    fake = fakes.by_model["digits"]
    assert isinstance(fake, RestartingEnclave)
    first, second = fake.boots
    assert bundle["answers_left_out"] == {"no_attestation": 0, "outside_attestation": 0}
    assert bundle["answers"][0]["module_id"] == first
    assert {a["module_id"] for a in bundle["answers"][1:]} == {second}
    assert set(bundle["attestations"]) == {first, second}
    check = _check(bundle, fakes, integrity_repo)
    assert check.modules == sorted([first, second])
    assert check.requests == len(bundle["answers"]) >= 9


async def test_bundles_are_kept_across_a_restart_and_bounded(
    integrity_repo: Path, digits: Digits
) -> None:
    async with integrity_gateway(integrity_repo) as (client, _):
        await _raise_alarm(client, digits)
        ids = {i["id"] for i in await _incidents(client, 2)}
    kept = integrity_repo.parent / "alarm-state" / "incidents" / "digits"
    assert {p.stem for p in kept.glob("*.json")} == ids
    async with integrity_gateway(integrity_repo) as (client, _):
        assert {i["id"] for i in await _incidents(client, 2)} == ids


async def test_a_reset_clears_the_answers_of_the_incident_it_closes(
    integrity_repo: Path, digits: Digits
) -> None:
    """After an admin reset, the next bundle holds only answers the restarted statistic saw."""
    async with integrity_gateway(integrity_repo) as (client, _):
        await _raise_alarm(client, digits)
        first = await _incidents(client, 2)
        ids = [i["id"] for i in first]
        old = set()
        for ident in ids:
            bundle = (await client.get(f"{INCIDENTS}/{ident}", headers=ADMIN)).json()
            old |= {a["request_id"] for a in bundle["answers"]}
        r = await client.post(
            "/v2/admin/models/digits/integrity/alarm/reset", json={"scope": "all"}, headers=ADMIN
        )
        assert r.status_code == 200
        await _raise_alarm(client, digits)
        listed = await _incidents(client, 4)
        for incident in listed:
            if incident["id"] in ids:
                continue
            bundle = (await client.get(f"{INCIDENTS}/{incident['id']}", headers=ADMIN)).json()
            assert incident["drill"] is not None
            assert not {a["request_id"] for a in bundle["answers"]} & old

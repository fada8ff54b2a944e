"""The integrity pipeline in the gateway (in-process; the enclave is FakeEnclaveClient, a real
EnclaveCore that runs the sealed verifier's ONNX and really signs)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import cbor2
import httpx
import numpy as np
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fides_core.attestation import check_verification, verify_attestation
from gateway.enclave_client import EnclaveUnavailable
from tests.gateway.integrity.conftest import (
    ADMIN,
    EXAMPLE,
    infer_body,
    integrity_gateway,
    set_integrity,
)
from tests.integrity_factory import Digits

URL = "/v2/models/digits/infer"


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def _probs(resp: httpx.Response) -> np.ndarray:
    out = resp.json()["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


async def test_an_honest_answer_is_verified_with_evidence(
    integrity_repo: Path, digits: Digits
) -> None:
    async with integrity_gateway(integrity_repo) as (client, fakes):
        nonce = b"client-nonce-0001"
        body = digits.body(0, integrity_nonce=base64.b64encode(nonce).decode())
        r = await client.post(URL, json=body)
        assert r.status_code == 200, r.text
        params = r.json()["parameters"]
        assert params["integrity_verdict"] == "verified"
        assert 0 <= params["integrity_score"] <= params["integrity_threshold"]
        assert "integrity_reclassified" not in params
        assert int(np.argmax(_probs(r))) == digits.labels[0]
        # the evidence is the enclave's, bound to these input bytes, this nonce and this id
        fake = fakes.by_model["digits"]
        attested = verify_attestation(
            await fake.attest(b"handshake-nonce-1"),
            root=fake.root_pem,
            policy=fake.policy(),
            nonce=b"handshake-nonce-1",
        )
        x = digits.images[0:1]
        evidence = base64.b64decode(params["integrity_evidence"])
        checked = check_verification(
            evidence, attested=attested, inputs={"input": x}, nonce=nonce, request_id=body["id"]
        )
        assert checked is not None
        entry = cbor2.loads(evidence)["entry"]
        assert entry["id"] == body["id"]
        assert await metric(client, "fides_integrity_verdicts_total", verdict="verified") == 1
        assert await metric(client, "fides_enclave_up", model="digits") == 1


async def test_switch_drill_is_detected_and_reclassified(
    integrity_repo: Path, digits: Digits
) -> None:
    async with integrity_gateway(integrity_repo) as (client, _):
        x = digits.take(40)
        honest = []
        for i in range(len(x)):
            r = await client.post(URL, json=infer_body(x[i : i + 1]))
            assert r.json()["parameters"]["integrity_verdict"] == "verified"
            honest.append(int(np.argmax(_probs(r))))
        r = await client.put(
            "/v2/admin/models/digits/drill", json={"attack": "switch", "rate": 1.0}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        assert r.json()["drill"]["attack"] == "switch"
        assert await metric(client, "fides_integrity_drill_active", attack="switch") == 1
        detected = restored = 0
        for i in range(len(x)):
            r = await client.post(URL, json=infer_body(x[i : i + 1]))
            params = r.json()["parameters"]
            served = int(np.argmax(_probs(r)))
            assert served != honest[i]  # monitor mode: answered as (mis)served, flagged
            if params["integrity_verdict"] == "attack":
                detected += 1
                restored += params["integrity_reclassified"] == honest[i]
        assert detected >= 0.9 * len(x)
        assert restored >= 0.9 * detected
        assert await metric(client, "fides_integrity_attacks_detected_total") == detected
        assert await metric(client, "fides_integrity_drill_tampered_total", attack="switch") == 40
        r = await client.delete("/v2/admin/models/digits/drill", headers=ADMIN)
        assert r.json()["drill"] is None
        assert await metric(client, "fides_integrity_drill_active", attack="switch") == 0


async def test_enforce_mode_replaces_an_attacked_answer(
    integrity_repo: Path, digits: Digits
) -> None:
    set_integrity(integrity_repo, mode="enforce", drill={"attack": "switch", "rate": 1.0})
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.post(URL, json=digits.body(0))
        params = r.json()["parameters"]
        assert params["integrity_verdict"] == "attack"
        assert params["integrity_replaced"] is True
        assert int(np.argmax(_probs(r))) == params["integrity_reclassified"] == digits.labels[0]


async def test_batches_get_per_row_reclassification(integrity_repo: Path, digits: Digits) -> None:
    set_integrity(integrity_repo, drill={"attack": "switch", "rate": 1.0})
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.post(URL, json=infer_body(digits.take(4)))
        params = r.json()["parameters"]
        assert params["integrity_verdict"] == "attack"
        assert len(str(params["integrity_reclassified"]).split(",")) == 4


@pytest.mark.parametrize(
    ("policy", "status", "verdict"),
    [("fail_closed", 503, None), ("fail_open", 200, "unverified")],
)
async def test_enclave_outage_follows_the_failure_policy(
    integrity_repo: Path, digits: Digits, policy: str, status: int, verdict: str | None
) -> None:
    set_integrity(integrity_repo, failure_policy=policy)
    async with integrity_gateway(integrity_repo) as (client, fakes):
        fakes.by_model["digits"].fail = EnclaveUnavailable("enclave process died")
        r = await client.post(URL, json=digits.body())
        assert r.status_code == status, r.text
        if verdict is None:
            assert "could not be verified" in r.json()["error"]
            assert r.headers["retry-after"] == "1"
        else:
            params = r.json()["parameters"]
            assert params["integrity_verdict"] == "unverified"
            assert params["integrity_reason"].startswith("enclave_unavailable")
            assert "integrity_evidence" not in params
        assert (
            await metric(client, "fides_integrity_unverified_total", reason="enclave_unavailable")
            == 1
        )
        assert await metric(client, "fides_enclave_up", model="digits") == 0
        # it keeps serving once the enclave is back
        fakes.by_model["digits"].fail = None
        r = await client.post(URL, json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"


async def test_a_hung_enclave_times_out(integrity_repo: Path, digits: Digits) -> None:
    cfg_path = integrity_repo / "digits" / "config.yaml"
    cfg_path.write_text(
        cfg_path.read_text().replace("max_batch_size: 64}", "max_batch_size: 64, timeout_s: 0.2}")
    )
    set_integrity(integrity_repo, failure_policy="fail_open")
    async with integrity_gateway(integrity_repo) as (client, fakes):
        fakes.by_model["digits"].delay_s = 2.0
        r = await client.post(URL, json=digits.body())
        params = r.json()["parameters"]
        assert params["integrity_verdict"] == "unverified"
        assert params["integrity_reason"].startswith("enclave_timeout")


async def test_unsampled_requests_are_never_called_verified(
    integrity_repo: Path, digits: Digits
) -> None:
    set_integrity(integrity_repo, sampling_rate=0.0)
    async with integrity_gateway(integrity_repo) as (client, fakes):
        r = await client.post(URL, json=digits.body())
        assert r.json()["parameters"] == {
            "integrity_verdict": "unverified",
            "integrity_reason": "not_sampled: sampling_rate is 0",
        }
        assert fakes.by_model["digits"].calls == 0


async def test_concurrent_verifications_share_enclave_calls(
    integrity_repo: Path, digits: Digits
) -> None:
    async with integrity_gateway(integrity_repo) as (client, fakes):
        x = digits.take(24)
        rs = await asyncio.gather(
            *(client.post(URL, json=infer_body(x[i : i + 1])) for i in range(24))
        )
        assert all(r.json()["parameters"]["integrity_verdict"] == "verified" for r in rs)
        assert fakes.by_model["digits"].calls < 24  # batched into fewer enclave calls


async def test_substitution_drill_raises_the_window_statistic(
    integrity_repo: Path, digits: Digits
) -> None:
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.put(
            "/v2/admin/models/digits/drill",
            json={"attack": "substitution", "substitute": "digits_lite", "rate": 1.0},
            headers=ADMIN,
        )
        assert r.status_code == 200, r.text
        x = digits.take(60, seed=1)
        for i in range(len(x)):
            r = await client.post(URL, json=infer_body(x[i : i + 1]))
            assert r.status_code == 200
        status = (await client.get("/v2/models/digits/integrity")).json()
        assert status["substitution"]["scores_in_window"] == 20
        assert status["substitution"]["statistic"] > 0.5
        stat = await metric(client, "fides_integrity_substitution_statistic", model="digits")
        assert stat == pytest.approx(status["substitution"]["statistic"])


async def test_bad_integrity_input_is_a_clear_400(integrity_repo: Path, digits: Digits) -> None:
    async with integrity_gateway(integrity_repo) as (client, _):
        bad_nonce = digits.body(integrity_nonce="not base64!")
        r = await client.post(URL, json=bad_nonce)
        assert r.status_code == 400
        assert "integrity_nonce" in r.json()["error"]
        short = digits.body(integrity_nonce=base64.b64encode(b"abc").decode())
        assert "8..512 bytes" in (await client.post(URL, json=short)).json()["error"]
        drill = "/v2/admin/models/digits/drill"
        r = await client.put(drill, json={"attack": "switch"})  # user key: not an admin
        assert r.status_code == 403
        r = await client.put(drill, json={"attack": "explode"}, headers=ADMIN)
        assert r.status_code == 400
        assert "attack" in r.json()["error"]
        r = await client.put(drill, json={"attack": "switch", "rate": 2}, headers=ADMIN)
        assert r.status_code == 400
        r = await client.put(
            drill, json={"attack": "substitution", "substitute": "nope"}, headers=ADMIN
        )
        assert r.status_code == 404
        r = await client.put(drill, content=b"[", headers=ADMIN)
        assert r.status_code == 400
        r = await client.get("/v2/models/digits_lite/integrity")
        assert r.status_code == 404
        assert "no integrity verification" in r.json()["error"]
        r = await client.get("/v2/models/digits/attestation", params={"nonce": "x"})
        assert r.status_code == 400
        # and it still serves
        r = await client.post(URL, json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"


async def test_attestation_handshake(integrity_repo: Path, digits: Digits) -> None:
    async with integrity_gateway(integrity_repo) as (client, fakes):
        nonce = b"0123456789abcdef"
        r = await client.get(
            "/v2/models/digits/attestation",
            params={"nonce": base64.urlsafe_b64encode(nonce).decode()},
        )
        assert r.status_code == 200, r.text
        fake = fakes.by_model["digits"]
        assert r.json()["measurement"] == fake.measurement.pcr0.hex()
        attested = verify_attestation(
            base64.b64decode(r.json()["attestation"]),
            root=fake.root_pem,
            policy=fake.policy(),
            nonce=nonce,
        )
        assert attested.measurement == fake.measurement.pcr0


async def test_a_hot_reload_that_changes_the_integrity_block_is_refused(
    integrity_repo: Path, digits: Digits
) -> None:
    """Integrity is set up at start (enclave, sealed verifier, attestation). A reload that
    changed the block was ignored silently: a new threshold or policy not applied, a model
    that gained a block served unverified. Now such a reload is a 400 naming the change, and
    the versions that serve keep serving, verified; a reload that leaves it alone works."""
    load = "/v2/repository/models/{}/load"
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.post(load.format("digits"), headers=ADMIN)
        assert r.status_code == 200, r.text  # unchanged block: reloads
        set_integrity(integrity_repo, failure_policy="fail_open")
        r = await client.post(load.format("digits"), headers=ADMIN)
        assert r.status_code == 400
        assert "changes its integrity block" in r.json()["error"]
        assert "restart the gateway" in r.json()["error"]
        r = await client.post(URL, json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"
        # a model without a block that gains one (digits_lite takes the same input)
        lite = integrity_repo / "digits_lite" / "config.yaml"
        digits = yaml.safe_load((integrity_repo / "digits" / "config.yaml").read_text())
        cfg = yaml.safe_load(lite.read_text())
        lite.write_text(yaml.safe_dump({**cfg, "integrity": digits["integrity"]}))
        r = await client.post(load.format("digits_lite"), headers=ADMIN)
        assert r.status_code == 400
        assert "adds an integrity block" in r.json()["error"]
        r = await client.post("/v2/models/digits_lite/infer", json=EXAMPLE)
        assert r.status_code == 200
        assert "integrity_verdict" not in r.json().get("parameters", {})


async def test_a_reload_keeps_the_enclave_and_an_unload_stops_it(
    integrity_repo: Path, digits: Digits
) -> None:
    """A verified model's versions share one pipeline and one enclave: a reload keeps them (no
    new attestation), an unload stops them (no enclave left running for a model not served)."""
    load, unload = "/v2/repository/models/digits/load", "/v2/repository/models/digits/unload"
    async with integrity_gateway(integrity_repo) as (client, fakes):
        fake = fakes.by_model["digits"]
        assert (await client.post(load, headers=ADMIN)).status_code == 200
        assert fakes.by_model["digits"] is fake  # the same enclave
        r = await client.post(URL, json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"
        assert (await client.post(unload, headers=ADMIN)).status_code == 200
        assert fake.health().reason == "the enclave client is closed"
        assert (await client.get("/v2/models/digits/integrity")).status_code == 503
        assert (await client.post(load, headers=ADMIN)).status_code == 200  # set up anew
        assert fakes.by_model["digits"] is not fake
        r = await client.post(URL, json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"


async def test_an_answer_holding_nan_is_never_verified(
    integrity_repo: Path, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A provider (or a broken model) answering NaN at the class it wants: argmax reads that
    class, the detector's score is NaN and NaN > threshold is False, so the answer was
    `verified`. It is `unverified` with the reason named, and kept out of the stream checks."""
    from gateway.integrity.pipeline import IntegrityPipeline

    def nan_at_7(
        self: IntegrityPipeline, results: dict[str, np.ndarray], drill: object
    ) -> dict[str, np.ndarray]:
        p = np.array(results[self.cfg.output], dtype=np.float32)
        p[:, 7] = np.nan
        return {**results, self.cfg.output: p}

    monkeypatch.setattr(IntegrityPipeline, "_tampered", nan_at_7)
    async with integrity_gateway(integrity_repo) as (client, _):
        body = digits.body(0)
        body["parameters"] = {**body.get("parameters", {}), "binary_data_output": True}
        r = await client.post(URL, json=body)
        assert r.status_code == 200, r.text
        header_len = int(r.headers["inference-header-content-length"])
        params = orjson.loads(r.content[:header_len])["parameters"]
        assert params["integrity_verdict"] == "unverified"
        assert params["integrity_reason"].startswith("invalid_answer: 1 of 1 row(s)")
        assert params["integrity_score"] is None
        assert params["integrity_evidence"]  # the enclave's own answer is still attached
        assert (
            await metric(client, "fides_integrity_unverified_total", reason="invalid_answer") == 1
        )
        assert await metric(client, "fides_integrity_verdicts_total", verdict="verified") == 0
        status = (await client.get("/v2/models/digits/integrity")).json()
        assert status["substitution"]["scores_in_window"] == 0  # not fed to the window

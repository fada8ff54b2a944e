"""What a dishonest provider or one bad request could use against the integrity promise
(in-process gateway; the enclave is FakeEnclaveClient, a real EnclaveCore that signs):

- the verifier is never served on the data plane, and answers that copy it are a substitution;
- one bad request in a shared enclave call fails alone;
- a drill switched off leaves no stale alarm;
- an honest input unlike the training data is "unverified", not an accusation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.integrity.conftest import ADMIN, infer_body, integrity_gateway, set_integrity
from tests.integrity_factory import Digits, honest_digits

URL = "/v2/models/digits/infer"
DRILL = "/v2/admin/models/digits/drill"


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float | None:
    text = (await client.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return None


# -- the verifier is private ---------------------------------------------------------------------


async def test_the_verifier_is_not_served_on_the_data_plane(
    integrity_repo: Path, digits: Digits
) -> None:
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.post("/v2/models/digits_verifier/infer", json=digits.body())
        assert r.status_code == 404
        assert "an enclave verifier is not served" in r.json()["error"]
        r = await client.get("/v2/models/digits_verifier")
        assert r.status_code == 404
        index = (await client.post("/v2/repository/index")).json()
        assert "digits_verifier" not in {row["name"] for row in index}
        r = await client.post("/v2/repository/models/digits_verifier/load", headers=ADMIN)
        assert r.status_code == 400
        assert "is the enclave verifier of 'digits'" in r.json()["error"]
        assert (await client.get("/v2/health/ready")).status_code == 200
        # the verifier still runs where it belongs: in the enclave
        r = await client.post(URL, json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"


async def test_serving_the_verifier_in_place_of_the_service_is_caught(
    integrity_repo: Path, digits: Digits
) -> None:
    """The cheapest substitution: answers that are the verifier's own. Every one of them
    agrees with the enclave perfectly, which the honest service never does; the two-sided
    window test flags it ("less" disagreement than clean), where a one-sided test saw nothing."""
    set_integrity(integrity_repo, substitution_window=40)
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.put(
            DRILL, json={"attack": "substitution", "substitute": "digits_verifier"}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
        x = digits.take(60, seed=5)
        verdicts = []
        for i in range(len(x)):
            r = await client.post(URL, json=infer_body(x[i : i + 1]))
            assert r.status_code == 200
            verdicts.append(r.json()["parameters"]["integrity_verdict"])
        assert set(verdicts) == {"verified"}  # per answer, a copy of the verifier looks fine
        status = (await client.get("/v2/models/digits/integrity")).json()
        sub = status["substitution"]
        assert sub["suspected"] is True, sub
        assert sub["direction"] == "less"
        assert sub["statistic"] < 0.2
        assert await metric(client, "fides_integrity_substitution_suspected", model="digits") == 1
        assert status["drill"]["tampered_rows"] == 60


async def test_honest_traffic_keeps_the_two_sided_window_quiet(integrity_repo: Path) -> None:
    """Honest traffic is a plain draw of all digits, not the clear cases (Digits): those are
    chosen for low detector scores, which biases their KL low, and the two-sided test flagged
    about 2 % of such windows as "less" disagreement. A plain draw is flagged with probability
    about alpha (0.001), whatever the training run."""
    set_integrity(integrity_repo, substitution_window=40)
    async with integrity_gateway(integrity_repo) as (client, _):
        x = honest_digits(60, seed=6)
        for i in range(len(x)):
            await client.post(URL, json=infer_body(x[i : i + 1]))
        sub = (await client.get("/v2/models/digits/integrity")).json()["substitution"]
        assert sub["scores_in_window"] == 40
        assert sub["suspected"] is False, sub


# -- drills ------------------------------------------------------------------------------------


async def test_stopping_a_drill_clears_the_substitution_gauges(
    integrity_repo: Path, digits: Digits
) -> None:
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.put(
            DRILL, json={"attack": "substitution", "substitute": "digits_lite"}, headers=ADMIN
        )
        assert r.status_code == 200
        x = digits.take(40, seed=2)
        for i in range(len(x)):
            await client.post(URL, json=infer_body(x[i : i + 1]))
        assert await metric(client, "fides_integrity_substitution_suspected", model="digits") == 1
        r = await client.delete(DRILL, headers=ADMIN)
        assert r.status_code == 200
        assert r.json()["substitution"]["suspected"] is False
        assert await metric(client, "fides_integrity_substitution_suspected", model="digits") == 0
        stat = await metric(client, "fides_integrity_substitution_statistic", model="digits")
        assert stat == 0.5
        assert await metric(client, "fides_integrity_substitution_p_value", model="digits") == 1


async def test_a_substitution_drill_must_name_a_classifier(
    integrity_repo: Path, digits: Digits
) -> None:
    text = integrity_repo / "code"
    (text / "1").mkdir(parents=True)
    (text / "config.yaml").write_text("platform: causal_lm\n")
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.put(
            DRILL, json={"attack": "substitution", "substitute": "code"}, headers=ADMIN
        )
        assert r.status_code == 400
        assert "is a text model" in r.json()["error"]
        r = await client.put(
            DRILL, json={"attack": "substitution", "substitute": "digits_detector"}, headers=ADMIN
        )
        assert r.status_code == 400
        assert "has no output 'probabilities'" in r.json()["error"]
        r = await client.post(URL, json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"


# -- one bad request -----------------------------------------------------------------------------


async def test_one_bad_request_in_a_shared_enclave_call_fails_alone(
    integrity_repo: Path, digits: Digits
) -> None:
    """A long id used to be checked only by the enclave, which refused the whole shared call:
    20 of 24 honest requests got 503. Now it is a 400 for that request, before it joins."""
    set_integrity(integrity_repo, failure_policy="fail_closed")
    async with integrity_gateway(integrity_repo) as (client, fakes):
        x = digits.take(24, seed=3)
        bodies = [{**infer_body(x[i : i + 1]), "id": f"honest-{i}"} for i in range(24)]
        for i in range(3, 24, 7):
            bodies[i]["id"] = "x" * 300
        rs = await asyncio.gather(*(client.post(URL, json=b) for b in bodies))
        bad = [i for i, r in enumerate(rs) if r.status_code != 200]
        assert bad == [3, 10, 17], [(r.status_code, r.text[:120]) for r in rs]
        for i in bad:
            assert rs[i].status_code == 400
            assert "request 'id' must be 1..256 characters" in rs[i].json()["error"]
        for i, r in enumerate(rs):
            if i not in bad:
                assert r.json()["parameters"]["integrity_verdict"] == "verified", r.text
        assert fakes.by_model["digits"].calls < 21  # the good ones still shared calls


async def test_too_many_rows_for_the_enclave_is_a_400(integrity_repo: Path, digits: Digits) -> None:
    cfg = integrity_repo / "digits" / "config.yaml"
    raw = yaml.safe_load(cfg.read_text())
    raw["integrity"]["enclave"]["max_batch_size"] = 4
    cfg.write_text(yaml.safe_dump(raw))
    async with integrity_gateway(integrity_repo) as (client, _):
        r = await client.post(URL, json=infer_body(digits.take(5)))
        assert r.status_code == 400
        assert "its enclave verifies at most 4" in r.json()["error"]
        r = await client.post(URL, json=infer_body(digits.take(4)))
        assert r.json()["parameters"]["integrity_verdict"] == "verified"


# -- out of distribution -------------------------------------------------------------------------


async def test_an_honest_input_unlike_any_digit_is_unverified_not_an_attack(
    integrity_repo: Path, digits: Digits
) -> None:
    """Blank, inverted, faint and noise images: honest, but the service and the verifier
    disagree on them like a tampered answer does. The calibrated novelty check says so."""
    rng = np.random.default_rng(0)
    x = digits.take(8, seed=4)
    novel = {
        "blank": np.zeros((1, 1, 8, 8), np.float32),
        "inverted": 1.0 - x[:1],
        "faint": x[1:2] * 0.3,
        "noise": rng.random((1, 1, 8, 8)).astype(np.float32),
    }
    async with integrity_gateway(integrity_repo) as (client, _):
        for name, image in novel.items():
            r = await client.post(URL, json=infer_body(image))
            params = r.json()["parameters"]
            assert params["integrity_verdict"] == "unverified", (name, params)
            assert params["integrity_reason"].startswith("out_of_distribution"), params
            assert "integrity_evidence" in params  # the enclave still signed its answer
        unverified = await metric(
            client, "fides_integrity_unverified_total", reason="out_of_distribution"
        )
        assert unverified == len(novel)
        assert await metric(client, "fides_integrity_attacks_detected_total", model="digits") == 0
        # in a batch beside clear digits: the batch is not verified as a whole
        mixed = np.concatenate([x[:3], novel["blank"]])
        r = await client.post(URL, json=infer_body(mixed))
        assert r.json()["parameters"]["integrity_verdict"] == "unverified"
        assert "1 of 4 input row(s)" in r.json()["parameters"]["integrity_reason"]
        # a tampered answer on an in-distribution row is still an attack beside a novel one
        await client.put(DRILL, json={"attack": "switch", "rate": 1.0}, headers=ADMIN)
        r = await client.post(URL, json=infer_body(mixed))
        assert r.json()["parameters"]["integrity_verdict"] == "attack"
        classes = str(r.json()["parameters"]["integrity_reclassified"]).split(",")
        assert classes[3] == "-1"  # the novel row is not accused


# -- what a client pins ----------------------------------------------------------------------


def test_fides_enclave_measure_prints_what_the_gateway_pins(
    integrity_repo: Path, tmp_path: Path
) -> None:
    """It printed another measurement for the verifier's own file (the defaults instead of
    the integrity block's settings), and refused the model's config.yaml."""
    from typer.testing import CliRunner

    from enclave_sim.cli import enclave_app
    from fides_client import IntegrityModels
    from gateway.integrity.enclave import enclave_for_model
    from gateway.model_config import load_model_config
    from gateway.settings import Settings

    cfg = load_model_config(integrity_repo / "digits" / "config.yaml")
    assert cfg.integrity is not None
    settings = Settings(
        model_repository=integrity_repo,
        dev_mode=True,
        enclave_platform_dir=tmp_path / "platform",
        enclave_runtime_dir=tmp_path / "run",
    )
    _, gateway_pins = enclave_for_model("digits", cfg.integrity.enclave, integrity_repo, settings)
    runner = CliRunner()
    verifier = integrity_repo / "digits_verifier" / "1" / "model.onnx"
    by_file = runner.invoke(enclave_app, ["measure", "--model", str(verifier)])
    by_config = runner.invoke(
        enclave_app, ["measure", "--config", str(integrity_repo / "digits" / "config.yaml")]
    )
    for done in (by_file, by_config):
        assert done.exit_code == 0, done.output
        assert done.stdout.strip() == gateway_pins
    assert "integrity.enclave block of 'digits'" in by_file.output  # says which settings
    assert IntegrityModels.from_repository(integrity_repo, "digits").measurement == gateway_pins
    # a pinned measurement in the block is what the gateway (and the client) pins
    raw = yaml.safe_load((integrity_repo / "digits" / "config.yaml").read_text())
    raw["integrity"]["enclave"]["measurement"] = "ab" * 48
    (integrity_repo / "digits" / "config.yaml").write_text(yaml.safe_dump(raw))
    pinned = runner.invoke(
        enclave_app, ["measure", "--config", str(integrity_repo / "digits" / "config.yaml")]
    )
    assert pinned.stdout.strip() == "ab" * 48
    assert "warning: the config pins measurement" in pinned.output
    no_block = runner.invoke(
        enclave_app, ["measure", "--config", str(integrity_repo / "digits_lite" / "config.yaml")]
    )
    assert no_block.exit_code == 2
    assert "without an integrity.enclave block" in no_block.output

"""The model repository and health surface as a Triton / KServe user sees them (a review's
rows): a model name a route shadows is refused by name, the index lists what the repository
holds now, labels that do not fit the class output are refused at load, and an unauthenticated
readiness probe learns ready or not (the detail is in the log and behind a key), its failures
logged once per change rather than a WARNING per probe. In-process, through the ASGI app."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, serving, serving_app
from tests.model_factory import TINY_CONFIG, tiny_classifier, write_config

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {
    "inputs": [
        {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [[1.0, 2.0, 3.0, 4.0]]}
    ]
}


def _tiny(model_dir: Path, **config: object) -> None:
    write_config(model_dir, {**TINY_CONFIG, **config})
    tiny_classifier(model_dir / "1" / "model.onnx")


def _anon(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _index(client: httpx.AsyncClient) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = (await client.post("/v2/repository/index")).json()
    return rows


# -- a model name a route shadows ---------------------------------------------------------------


async def test_a_model_named_stats_is_refused_by_name(settings: Settings) -> None:
    """GET /v2/models/stats is every model's statistics: a model named 'stats' loaded, but its
    metadata was never reachable. It is refused, the index and the load saying why."""
    _tiny(settings.model_repository / "stats")
    async with serving(settings) as c:
        rows = [r for r in await _index(c) if r["name"] == "stats"]
        assert len(rows) == 1, rows
        assert rows[0]["state"] == "UNAVAILABLE"
        assert "not 'stats'" in rows[0]["reason"]
        r = await c.post("/v2/repository/models/stats/load", headers=ADMIN)
        assert r.status_code == 400, r.text
        assert "invalid model name 'stats'" in r.json()["error"]
        assert "GET /v2/models/stats" in r.json()["error"]
        # the statistics route still answers, and the server is ready (stats is not wanted)
        stats = (await c.get("/v2/models/stats")).json()
        assert "stats" not in {m["name"] for m in stats["model_stats"]}
        assert (await c.get("/v2/health/ready")).status_code == 200
        # names that only resemble it are models like any other
        _tiny(settings.model_repository / "Stats")
        assert (await c.post("/v2/repository/models/Stats/load", headers=ADMIN)).status_code == 200
        assert (await c.get("/v2/models/Stats")).json()["name"] == "Stats"


# -- the index lists what the repository holds now ----------------------------------------------


async def test_a_model_removed_from_disk_leaves_the_index(
    client: httpx.AsyncClient, repo_path: Path
) -> None:
    repo = repo_path
    _tiny(repo / "gone")
    assert (await client.post("/v2/repository/models/gone/load", headers=ADMIN)).is_success
    assert (await client.post("/v2/repository/models/gone/unload", headers=ADMIN)).is_success
    assert {"name": "gone", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"} in (
        await _index(client)
    )
    shutil.rmtree(repo / "gone")
    assert "gone" not in {r["name"] for r in await _index(client)}
    # and it is unknown (404), not "not ready" (503)
    r = await client.get("/v2/models/gone/ready")
    assert r.status_code == 404, r.text


async def test_a_serving_model_whose_directory_vanished_is_listed_with_why(
    client: httpx.AsyncClient, repo_path: Path
) -> None:
    repo = repo_path
    _tiny(repo / "vanishing")
    assert (await client.post("/v2/repository/models/vanishing/load", headers=ADMIN)).is_success
    shutil.rmtree(repo / "vanishing")
    rows = [r for r in await _index(client) if r["name"] == "vanishing"]
    assert [(r["version"], r["state"]) for r in rows] == [("1", "READY")]
    assert "no longer in the repository" in rows[0]["reason"]
    assert "serves until it is unloaded" in rows[0]["reason"]
    assert (await client.post("/v2/models/vanishing/infer", json=BODY)).status_code == 200
    assert (await client.post("/v2/repository/models/vanishing/unload", headers=ADMIN)).is_success
    assert "vanishing" not in {r["name"] for r in await _index(client)}
    # the rest of the index is as before
    ready = (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert "tiny" in {r["name"] for r in ready}


# -- labels against the class output ------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "config", "message"),
    [
        (["a", "b"], {}, "labels lists 2 classes but output 'logits' has 3"),
        (["a", "b", "c", "d"], {}, "output 'probabilities' has 3"),
        (["a", "b"], {"max_batch_size": 0, "dynamic_batching": None}, "labels lists 2 classes"),
    ],
)
async def test_labels_that_do_not_fit_the_output_are_refused_at_load(
    settings: Settings, labels: list[str], config: dict[str, object], message: str
) -> None:
    _tiny(settings.model_repository / "mislabelled", labels=labels, **config)
    _tiny(settings.model_repository / "labelled", labels=["x", "y", "z"], **config)
    async with serving(settings) as c:
        r = await c.post("/v2/models/mislabelled/infer", json=BODY)
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert "model 'mislabelled' version 1" in error, error
        assert message in error, error
        rows = [x for x in await _index(c) if x["name"] == "mislabelled"]
        assert rows[0]["state"] == "UNAVAILABLE"
        assert message in rows[0]["reason"]
        r = await c.post("/v2/repository/models/mislabelled/load", headers=ADMIN)
        assert r.status_code >= 400
        assert message in r.json()["error"]
        # labels that fit load and are shown with the metadata
        doc = (await c.get("/v2/models/labelled")).json()
        assert doc["parameters"]["labels"] == ["x", "y", "z"]
        r = await c.post("/v2/models/labelled/infer", json=BODY)
        assert r.status_code == 200, r.text
        assert np.asarray(r.json()["outputs"][0]["shape"]).tolist()[-1] == 3


# -- an unauthenticated readiness probe ---------------------------------------------------------


async def test_the_unauthenticated_readiness_probe_names_no_model_nor_path(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    repo = settings.model_repository
    write_config(repo / "secretive", {"platform": "onnx"})
    (repo / "secretive" / "1").mkdir()
    (repo / "secretive" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    caplog.set_level(logging.DEBUG)
    async with serving_app(settings) as (app, c), _anon(app) as anon:
        for _ in range(5):  # Kubernetes probes every few seconds while the model loads
            r = await anon.get("/v2/health/ready")
            assert r.status_code == 503
            assert r.json()["ready"] is False
            assert "secretive" not in r.text
            assert str(repo) not in r.text
            assert "model.onnx" not in r.text
        # the detail is behind the key: the index and the model's readiness
        rows = [x for x in await _index(c) if x["name"] == "secretive"]
        assert "model.onnx" in rows[0]["reason"]
        r = await c.get("/v2/models/secretive/ready")
        assert r.status_code == 503
        assert "model.onnx" in r.json()["error"]
        assert (await anon.get("/v2/repository/index")).status_code == 401
        # ... and in the log, once for the five probes
        said = [
            x
            for x in caplog.records
            if x.levelno == logging.WARNING and "server not ready" in x.getMessage()
        ]
        assert len(said) == 1, [x.getMessage() for x in said]
        assert "secretive" in said[0].getMessage()
        # ready again: said once, at INFO
        assert (await c.post("/v2/repository/models/secretive/unload", headers=ADMIN)).is_success
        for _ in range(3):
            assert (await anon.get("/v2/health/ready")).status_code == 200
        again = [x for x in caplog.records if "server ready" in x.getMessage()]
        assert [x.levelno for x in again] == [logging.INFO]


async def test_failing_readiness_probes_are_no_warning_but_real_503s_are(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    repo = settings.model_repository
    write_config(repo / "broken", {"platform": "onnx"})
    (repo / "broken" / "1").mkdir()
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    caplog.set_level(logging.DEBUG, logger="gateway.access")
    async with serving_app(settings) as (app, c), _anon(app) as anon:
        caplog.clear()
        for _ in range(5):
            assert (await anon.get("/v2/health/ready")).status_code == 503
            assert (await c.get("/v2/models/broken/ready")).status_code == 503
            assert (await c.get("/v2/models/broken/versions/1/ready")).status_code == 503
        access = [x for x in caplog.records if x.name == "gateway.access"]
        assert len(access) == 15
        assert {x.levelno for x in access} == {logging.DEBUG}
        assert {x.__dict__["status"] for x in access} == {503}
        caplog.clear()
        # an inference refused with 503 is a real failure: a WARNING as before
        assert (await c.post("/v2/models/broken/infer", json=BODY)).status_code == 503
        access = [x for x in caplog.records if x.name == "gateway.access"]
        assert [x.levelno for x in access] == [logging.WARNING]

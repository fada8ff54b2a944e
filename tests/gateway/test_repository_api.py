"""The repository extension's request bodies (Triton's): a load's ``config`` override or
``file:`` contents are refused by name instead of ignored under a 200 "loaded"; malformed
bodies are a 400; the index's ``ready`` filter is honoured. In-process, then with tritonclient
against the real server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.conftest import ADMIN_KEY
from tests.e2e.conftest import running_gateway
from tests.model_factory import make_repository

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


async def _config(client: httpx.AsyncClient) -> dict[str, object]:
    doc: dict[str, object] = (await client.get("/v2/models/tiny/config")).json()
    return doc


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"parameters": {"config": '{"max_batch_size": 4}'}}, "['config'] are not supported"),
        ({"parameters": {"file:1/model.onnx": "AAAA"}}, "['file:1/model.onnx'] are not"),
        ({"parameters": {"unload_dependents": True}}, "['unload_dependents'] are not"),
        ({"parameters": "config"}, "'parameters' must be a JSON object"),
        ({"config": {"max_batch_size": 4}}, "unknown keys ['config']"),
        ([1], "must be a JSON object"),
    ],
)
async def test_a_load_it_cannot_honour_is_refused_by_name(
    client: httpx.AsyncClient, body: object, message: str
) -> None:
    before = await _config(client)
    r = await client.post("/v2/repository/models/tiny/load", headers=ADMIN, json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]
    assert await _config(client) == before  # nothing was reloaded
    assert (await client.get("/v2/models/tiny/ready")).status_code == 200


async def test_a_load_or_unload_body_that_is_not_json_is_a_400(client: httpx.AsyncClient) -> None:
    for action in ("load", "unload"):
        r = await client.post(f"/v2/repository/models/tiny/{action}", headers=ADMIN, content="{")
        assert r.status_code == 400
        assert r.json()["error"] == f"{action} body is not valid JSON"
    assert (await client.get("/v2/models/tiny/ready")).status_code == 200


async def test_empty_and_plain_load_and_unload_bodies_work(client: httpx.AsyncClient) -> None:
    r = await client.post("/v2/repository/models/tiny/unload", headers=ADMIN, json={})
    assert r.json() == {"name": "tiny", "unloaded": True}
    r = await client.post("/v2/repository/models/tiny/load", headers=ADMIN, content=b"")
    assert r.json() == {"name": "tiny", "versions": ["1", "2"], "loaded": True}
    body = {"parameters": {"unload_dependents": False}}  # what tritonclient sends
    r = await client.post("/v2/repository/models/tiny/unload", headers=ADMIN, json=body)
    assert r.status_code == 200
    r = await client.post("/v2/repository/models/tiny/load", headers=ADMIN, json={"parameters": {}})
    assert r.status_code == 200
    bad = {"parameters": {"unload_dependents": "yes"}}
    r = await client.post("/v2/repository/models/tiny/unload", headers=ADMIN, json=bad)
    assert r.status_code == 400
    assert "'unload_dependents' must be a JSON boolean" in r.json()["error"]


async def test_the_index_honours_ready(client: httpx.AsyncClient) -> None:
    await client.post("/v2/repository/models/identity_int32/unload", headers=ADMIN)
    every = (await client.post("/v2/repository/index")).json()
    assert {
        "name": "identity_int32",
        "version": "",
        "state": "UNAVAILABLE",
        "reason": "unloaded",
    } in every
    ready = (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert ready == [row for row in every if row["state"] == "READY"]
    assert (await client.post("/v2/repository/index", json={"ready": False})).json() == every
    r = await client.post("/v2/repository/index", json={"ready": "true"})
    assert r.status_code == 400
    assert "'ready' must be a JSON boolean" in r.json()["error"]
    r = await client.post("/v2/repository/index", json={"repository": "x"})
    assert r.status_code == 400
    assert "unknown keys ['repository']" in r.json()["error"]


def test_tritonclient_load_with_a_config_is_refused_and_the_rest_works(tmp_path: Path) -> None:
    repo = make_repository(tmp_path / "repo", datatypes=("FP32",))
    with running_gateway(repo, tmp_path / "logs") as gw:
        c = httpclient.InferenceServerClient(gw.address)
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        with pytest.raises(InferenceServerException, match=r"\['config'\] are not supported"):
            c.load_model("tiny", headers=auth, config='{"max_batch_size": 4}')
        assert c.get_model_config("tiny", headers=auth)["max_batch_size"] == 16
        c.unload_model("tiny", headers=auth)
        assert not c.is_model_ready("tiny", headers=auth)
        index = c.get_model_repository_index(headers=auth)
        assert {
            "name": "tiny",
            "version": "",
            "state": "UNAVAILABLE",
            "reason": "unloaded",
        } in index
        c.load_model("tiny", headers=auth)
        assert c.is_model_ready("tiny", headers=auth)
        c.close()


async def test_unloading_a_model_whose_load_failed_succeeds(
    client: httpx.AsyncClient, repo_path: Path
) -> None:
    (repo_path / "broken" / "1").mkdir(parents=True)
    (repo_path / "broken" / "config.yaml").write_text("platform: onnx\n")
    (repo_path / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    r = await client.post("/v2/repository/models/broken/load", headers=ADMIN)
    assert r.status_code == 400
    assert (await client.get("/v2/health/ready")).status_code == 503  # broken is wanted
    r = await client.post("/v2/repository/models/broken/unload", headers=ADMIN)
    assert r.status_code == 200, r.text  # was a 404 "not loaded" that had made it ready
    assert r.json() == {"name": "broken", "unloaded": True}
    assert (await client.get("/v2/health/ready")).status_code == 200
    row = {"name": "broken", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert row in (await client.get("/v2/repository/index")).json()
    # again: still not loaded, still a success; a name never loaded is a 404
    r = await client.post("/v2/repository/models/broken/unload", headers=ADMIN)
    assert r.status_code == 200
    r = await client.post("/v2/repository/models/never/unload", headers=ADMIN)
    assert r.status_code == 404
    assert r.json()["error"] == "model 'never' is not loaded"

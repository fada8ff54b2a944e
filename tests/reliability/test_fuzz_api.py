"""Schemathesis against the gateway's own OpenAPI schema, in process (ASGI), every operation,
each generated case sent three times: without a key, with a user key, with an admin key.

Properties, for positive (schema-conforming) and negative (schema-violating) cases alike:
- no 5xx, no hang (each call has a 20 s read deadline, the test pytest-timeout's);
- every 4xx carries a message: ``{"error": "..."}``, or OpenAI's ``{"error": {"message"}}``
  at /v1;
- without a key, nothing but the health and metrics routes ever answers 2xx;
- a user key never gets a 2xx from an admin route (load, unload, drills).

A second pass pins the model name to the served models, so that inference and metadata
operations reach the data plane rather than stopping at "unknown model"; a hypothesis test
then sends near-valid tensors to those models and checks the answers.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import requests
import schemathesis
from fastapi import FastAPI
from hypothesis import given
from hypothesis import strategies as st
from schemathesis.python import asgi

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.model_factory import TINY_B, TINY_W, make_repository
from tests.reliability.conftest import FUZZ_SCALE, fuzz_settings, record

pytestmark = pytest.mark.timeout(240)

EXAMPLES = 25 * FUZZ_SCALE  # per operation and generation mode
PUBLIC = {"/v2/health/live", "/v2/health/ready", "/metrics"}
ADMIN_PREFIXES = ("/v2/repository/models/", "/v2/admin/")
CALLERS = (
    ("no key", {}),
    ("user key", {"X-API-Key": USER_KEY}),
    ("admin key", {"X-API-Key": ADMIN_KEY}),
)
MODELS = ("tiny", "identity_fp32", "identity_int32", "identity_bytes")


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastAPI]:
    repo = make_repository(tmp_path_factory.mktemp("fuzz-api") / "repo")
    settings = Settings(
        model_repository=repo,
        api_keys=[USER_KEY],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        shutdown_grace_s=2,
        max_tensor_elements=100_000,
        max_body_bytes=1024 * 1024,
    )
    app = create_app(settings)
    try:
        yield app
    finally:
        asgi.shutdown_lifespans()  # schemathesis runs the app's lifespan in its own thread


def openapi_schema(**parameters: str) -> Any:
    """The gateway's OpenAPI schema, taken from an app that is built but never started (the
    calls go to the started ``fuzz_app``, passed to each call)."""
    app = create_app(Settings(dev_mode=True, model_repository=Path("/nonexistent")))
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.config.generation.update(max_examples=EXAMPLES, database="none")
    if parameters:
        schema.config.update(parameters=parameters)
    return schema


def error_message(r: requests.Response) -> str:
    try:
        doc = r.json()
    except ValueError:
        return ""
    err = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(err, dict):  # /v1: OpenAI's error body
        err = err.get("message")
    return err if isinstance(err, str) else ""


def check(app: FastAPI, case: Any, label: str) -> None:
    path = case.operation.path
    for who, headers in CALLERS:
        r = case.call(app=app, headers=headers, timeout=20)
        record(f"api {label}: {who}")
        where = f"{who}: {case.as_curl_command(headers=headers)}\n-> {r.status_code} {r.text[:500]}"
        assert r.status_code < 500, where
        if r.status_code >= 400:
            assert error_message(r).strip(), f"a {r.status_code} without a message; {where}"
        ok = 200 <= r.status_code < 300
        if who == "no key" and path not in PUBLIC:
            assert not ok, f"served without a key; {where}"
        if who == "user key" and path.startswith(ADMIN_PREFIXES):
            assert not ok, f"admin route served to a user key; {where}"


api = openapi_schema()
# the data plane beyond "unknown model": tiny, version 2 where a version is asked
served = openapi_schema(**{"path.name": "tiny", "path.version": "2"}).include(
    path_regex=r"^/v2/models/\{name\}"
)


@api.parametrize()
def test_every_operation_without_and_with_keys(fuzz_app: FastAPI, case: Any) -> None:
    check(fuzz_app, case, "all operations")


@served.parametrize()
def test_served_model_operations(fuzz_app: FastAPI, case: Any) -> None:
    check(fuzz_app, case, "served model")


# -- near-valid tensors for the served models --------------------------------------------------


@st.composite
def infer_requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    model = draw(st.sampled_from(MODELS))
    datatype = {"tiny": "FP32", "identity_fp32": "FP32", "identity_int32": "INT32"}.get(
        model, "BYTES"
    )
    if draw(st.integers(0, 4)) == 0:
        datatype = draw(st.sampled_from(["FP32", "INT32", "BYTES", "FP64", "BOOL", "UINT8"]))
    if model == "tiny":
        shape = [draw(st.integers(0, 18)), draw(st.sampled_from([4, 4, 4, 3, 5]))]
    else:
        shape = [draw(st.integers(0, 6))]
    if draw(st.integers(0, 9)) == 0:
        shape = draw(st.lists(st.integers(-1, 5), max_size=3))
    n = max(0, math.prod(shape))
    if datatype == "BYTES":
        element: st.SearchStrategy[Any] = st.text(max_size=5)
    elif datatype in ("FP32", "FP64"):
        element = st.floats(-1e4, 1e4, width=32) | st.integers(-1000, 1000)
    elif datatype == "BOOL":
        element = st.booleans()
    else:
        element = st.integers(-(2**31), 2**31 - 1)
    size = n + draw(st.sampled_from([0, 0, 0, 0, -1, 1])) if n else draw(st.integers(0, 2))
    data = draw(st.lists(element, min_size=max(0, size), max_size=max(0, size)))
    body: dict[str, Any] = {
        "id": draw(st.text(max_size=12)),
        "inputs": [
            {
                "name": draw(st.sampled_from(["input"] * 9 + ["x"])),
                "shape": shape,
                "datatype": datatype,
                "data": data,
            }
        ],
    }
    if draw(st.booleans()):
        body["outputs"] = [
            {
                "name": draw(st.sampled_from(["logits", "probabilities", "output", "z"])),
                "parameters": {"binary_data": draw(st.booleans())},
            }
        ]
    if draw(st.integers(0, 4)) == 0:
        body["parameters"] = {"timeout": draw(st.integers(-5, 10**9) | st.floats(allow_nan=False))}
    return model, body


@contextlib.contextmanager
def client(app: FastAPI) -> Iterator[requests.Session]:
    with asgi.get_client(app) as c:
        c.headers["X-API-Key"] = USER_KEY
        yield c


@fuzz_settings(300)
@given(req=infer_requests())
def test_near_valid_tensors_get_an_answer_or_a_clear_400(
    fuzz_app: FastAPI, req: tuple[str, dict[str, Any]]
) -> None:
    model, body = req
    record("api: near-valid tensors")
    with client(fuzz_app) as c:
        r = c.post(f"/v2/models/{model}/infer", data=orjson.dumps(body), timeout=20)
    allowed = {200, 400, 413} | ({504} if "parameters" in body else set())  # its own timeout
    assert r.status_code in allowed, f"{model} {body} -> {r.status_code} {r.text}"
    if r.status_code != 200:
        assert error_message(r), r.text
        return
    if r.headers.get("inference-header-content-length"):
        return  # binary outputs: the codec's round trips are tested in test_fuzz_codec
    doc = r.json()
    assert doc["id"] == body["id"]
    x = body["inputs"][0]
    for out in doc["outputs"]:
        if model == "tiny":
            # the latest version, 2, is tiny_classifier(scale=2.0)
            xs = np.asarray(x["data"], np.float32).reshape(x["shape"])
            logits = xs @ (TINY_W * 2.0) + TINY_B
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
            want = logits if out["name"] == "logits" else probs
            got = np.asarray(out["data"], np.float32).reshape(out["shape"])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:
            assert out["data"] == x["data"] or np.allclose(out["data"], x["data"])


def test_the_fuzzed_app_is_still_ready_and_serving(fuzz_app: FastAPI) -> None:
    """After every fuzz case above (admin calls included), nothing has changed state."""
    with client(fuzz_app) as c:
        assert c.get("/v2/health/ready").status_code == 200
        index = c.get("/v2/repository/index").json()
        assert sorted({row["name"] for row in index}) == sorted(MODELS)
        assert all(row["state"] == "READY" for row in index)

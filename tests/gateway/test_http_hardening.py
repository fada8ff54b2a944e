"""The OIP REST surface against hostile or sloppy bodies: inputs checked against the model
before their data is decoded (and large or compressed bodies decoded off the event loop),
NaN outputs refused in JSON, gzip/deflate integrity, strict booleans, and the API docs only in
development mode. Both inference paths (the fast path and FastAPI's routes) answer alike."""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from fides_core.oip import TensorError, decode_json_data
from gateway.api.v2 import serving
from gateway.api.v2.serving import decompress
from gateway.app import create_app
from gateway.errors import BadRequest, PayloadTooLarge
from gateway.settings import Settings
from tests.conftest import serving as serve
from tests.model_factory import nan_on_blank, write_config

INFER = "/v2/models/tiny/infer"


@pytest.fixture(params=[True, False], ids=["fast_path", "fastapi"])
async def client(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Any]:
    async with serve(settings.model_copy(update={"infer_fast_path": request.param})) as c:
        yield c


def _body(name: str, datatype: str, shape: list[int], data: Any) -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]}


# -- 1. inputs checked against the model before their data is decoded ---------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        # the data is not even valid for the datatype sent: decoding it first would say so
        (
            _body("input", "BYTES", [2, 4], [1, 2]),
            "input 'input': datatype BYTES does not match the model's FP32",
        ),
        (
            _body("input", "FP32", [2, 5], ["x"]),
            "input 'input': shape [2, 5] does not match the model's [-1, 4] (-1 = any size)",
        ),
        (
            _body("input", "FP32", [40, 4], ["x"]),
            "input 'input': batch of 40 exceeds max_batch_size 16",
        ),
        (_body("input", "FP32", [0, 4], ["x"]), "input 'input': empty batch"),
        (
            _body("other", "FP32", [2, 4], ["x"]),
            "model 'tiny' has no input(s) ['other']; it expects ['input']",
        ),
    ],
)
async def test_inputs_are_checked_against_the_model_before_decoding(
    client: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    r = await client.post(INFER, json=body)
    assert r.status_code == 400
    assert r.json() == {"error": message}


async def test_binary_input_of_the_wrong_datatype_is_refused_unread(
    client: httpx.AsyncClient,
) -> None:
    # the reviewer's case: BYTES of 4M zero-length elements to an FP32 model (here malformed
    # BYTES framing too, which a decode would report instead)
    chunk = b"\x00\x00\x00"
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "BYTES",
                    "shape": [4, 4],
                    "parameters": {"binary_data_size": len(chunk)},
                }
            ]
        }
    )
    r = await client.post(
        INFER,
        content=header + chunk,
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert r.status_code == 400
    assert r.json() == {"error": "input 'input': datatype BYTES does not match the model's FP32"}


async def test_compressed_and_large_bodies_are_parsed_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: list[bool] = []
    parse = serving.parse_infer_request

    def spy(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return parse(*args, **kwargs)

    monkeypatch.setattr(serving, "parse_infer_request", spy)
    monkeypatch.setattr(serving, "THREAD_PARSE_BYTES", 500)
    small = orjson.dumps(_body("input", "FP32", [1, 4], [1.0, 2.0, 3.0, 4.0]))
    large = orjson.dumps(_body("input", "FP32", [16, 4], [[0.123456789] * 4] * 16))
    assert len(small) < 500 < len(large)
    for content, encoding in [(small, None), (gzip.compress(small), "gzip"), (large, None)]:
        headers = {"Content-Encoding": encoding} if encoding else {}
        r = await client.post(INFER, content=content, headers=headers)
        assert r.status_code == 200, r.text
    assert threads == [True, False, False]  # the small plain body stays on the loop


async def test_a_gzip_bomb_of_the_wrong_datatype_is_refused_by_datatype(
    client: httpx.AsyncClient,
) -> None:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "BYTES",
                    "shape": [20000, 4],
                    "parameters": {"binary_data_size": 4 * 20000 * 4},
                }
            ]
        }
    )
    body = gzip.compress(header + bytes(4 * 20000 * 4))
    r = await client.post(
        INFER,
        content=body,
        headers={
            "Content-Encoding": "gzip",
            "Inference-Header-Content-Length": str(len(header)),
        },
    )
    assert r.status_code == 400
    assert "datatype BYTES does not match the model's FP32" in r.json()["error"]


# -- 2. NaN and Inf outputs ------------------------------------------------------------------


@pytest.fixture
async def nan_client(settings: Settings, repo_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    write_config(repo_path / "nanny", {"platform": "onnx", "max_batch_size": 8})
    nan_on_blank(repo_path / "nanny" / "1" / "model.onnx")
    async with serve(settings) as c:
        yield c


def _images(blank: bool) -> dict[str, Any]:
    x = np.zeros((1, 1, 8, 8)) if blank else np.ones((1, 1, 8, 8))
    return _body("input", "FP32", [1, 1, 8, 8], x.ravel().tolist())


async def test_nan_output_is_refused_in_json_and_carried_as_binary(
    nan_client: httpx.AsyncClient,
) -> None:
    url = "/v2/models/nanny/infer"
    ok = await nan_client.post(url, json=_images(blank=False))
    assert ok.status_code == 200
    r = await nan_client.post(url, json=_images(blank=True))
    assert r.status_code == 500
    error = r.json()["error"]
    assert "output 'probabilities' holds NaN or Inf" in error
    assert '"binary_data": true' in error
    for extra in (
        {"outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]},
        {"parameters": {"binary_data_output": True}},
    ):
        r = await nan_client.post(url, json={**_images(blank=True), **extra})
        assert r.status_code == 200
        start = int(r.headers["Inference-Header-Content-Length"])
        values = np.frombuffer(r.content[start:], dtype="<f4")
        assert values.shape == (10,)
        assert np.isnan(values).all()


# -- 4. gzip and deflate integrity -----------------------------------------------------------


def test_truncated_gzip_or_deflate_is_refused() -> None:
    raw = b'{"inputs": []}'
    with pytest.raises(BadRequest, match="truncated"):
        decompress(gzip.compress(raw)[:-8], "gzip", 1000)  # no CRC/length trailer
    with pytest.raises(BadRequest, match="truncated"):
        decompress(zlib.compress(raw)[:-4], "deflate", 1000)  # no Adler-32
    with pytest.raises(BadRequest, match="truncated"):
        decompress(b"", "gzip", 1000)


def test_data_after_the_stream_is_refused() -> None:
    raw = b'{"inputs": []}'
    with pytest.raises(BadRequest, match="5 bytes follow the stream"):
        decompress(gzip.compress(raw) + b"junk!", "gzip", 1000)
    with pytest.raises(BadRequest, match="5 bytes follow the stream"):
        decompress(zlib.compress(raw) + b"junk!", "deflate", 1000)
    with pytest.raises(BadRequest, match="not valid gzip"):  # a second member that is not one
        decompress(gzip.compress(raw) + b"\x1f\x8bjunk", "gzip", 1000)


def test_every_member_of_a_multi_member_gzip_is_read() -> None:
    assert decompress(gzip.compress(b"abc") + gzip.compress(b"def"), "gzip", 1000) == b"abcdef"
    assert decompress(gzip.compress(b"abc"), "gzip", 1000) == b"abc"
    # the limit counts every member
    with pytest.raises(PayloadTooLarge):
        decompress(gzip.compress(bytes(600)) + gzip.compress(bytes(600)), "gzip", 1000)
    assert len(decompress(gzip.compress(bytes(500)) * 2, "gzip", 1000)) == 1000
    with pytest.raises(PayloadTooLarge):
        decompress(zlib.compress(bytes(1001)), "deflate", 1000)


async def test_a_gzip_body_without_its_trailer_gets_400(client: httpx.AsyncClient) -> None:
    body = orjson.dumps(_body("input", "FP32", [1, 4], [1.0, 2.0, 3.0, 4.0]))
    r = await client.post(
        INFER, content=gzip.compress(body)[:-8], headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 400
    assert r.json() == {"error": "body is not valid gzip: the stream is truncated"}
    r = await client.post(
        INFER, content=gzip.compress(body) * 2, headers={"Content-Encoding": "gzip"}
    )
    assert r.status_code == 400  # two bodies in a row are not one JSON document
    assert "not valid JSON" in r.json()["error"]


# -- 5. booleans only where booleans belong -------------------------------------------------


@pytest.mark.parametrize("flag", ["false", 0, "true", None])
async def test_binary_data_output_must_be_a_json_boolean(
    client: httpx.AsyncClient, flag: Any
) -> None:
    body = {**_body("input", "FP32", [1, 4], [1.0, 2.0, 3.0, 4.0])}
    body["parameters"] = {"binary_data_output": flag}
    r = await client.post(INFER, json=body)
    if flag is None:  # JSON null: the parameter is not set
        assert r.status_code == 200
        return
    assert r.status_code == 400
    assert r.json() == {"error": "parameter 'binary_data_output' must be a boolean (true or false)"}


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("INT32", [True, 2]),
        ("INT32", [True, False]),
        ("INT64", [[1], [True]]),
        ("FP32", [True, 2.5]),
        ("FP32", [True]),
        ("UINT8", [[False, 1]]),
    ],
)
def test_booleans_are_not_numbers(datatype: str, data: Any) -> None:
    shape = tuple(np.asarray(data).shape)
    with pytest.raises(TensorError, match=f"input 'x': {datatype} data must be numbers"):
        decode_json_data(data, datatype, shape, "input 'x'")


def test_bool_and_numbers_still_decode() -> None:
    out = decode_json_data([True, False], "BOOL", (2,), "input 'x'")
    assert out.tolist() == [True, False]
    assert decode_json_data([[1, 2]], "INT32", (1, 2), "x").tolist() == [[1, 2]]
    assert decode_json_data([1, 2.5], "FP32", (2,), "x").tolist() == [1.0, 2.5]
    assert decode_json_data(3, "INT64", (1,), "x").tolist() == [3]


async def test_a_boolean_to_an_int_model_gets_400(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v2/models/identity_int32/infer", json=_body("input", "INT32", [2], [True, 2])
    )
    assert r.status_code == 400
    assert r.json() == {"error": "input 'input': INT32 data must be numbers, not true/false"}


# -- 6. API docs only in development mode ----------------------------------------------------

DOCS = ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"]


@pytest.mark.parametrize("dev_mode", [False, True])
async def test_api_docs_only_in_development_mode(settings: Settings, dev_mode: bool) -> None:
    app = create_app(settings.model_copy(update={"dev_mode": dev_mode}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as anon,
    ):
        for path in DOCS:
            r = await anon.get(path)  # no key
            assert r.status_code == (200 if dev_mode else 404), path
        if dev_mode:
            doc = (await anon.get("/openapi.json")).json()
            assert "/v2/models/{name}/infer" in doc["paths"]

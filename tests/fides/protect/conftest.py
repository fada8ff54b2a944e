"""Fixtures for ``fides protect``: small protect files, and an MLaaS that misbehaves on
purpose (the adversary of the query client: it answers with the session's really trained
digits model, then breaks its answers or its HTTP the way real endpoints do)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from fides.protect.config import QueryConfig
from fides.protect.query import Querier
from fides.protect.service import Service, open_service
from fides.protect.store import AnswerStore
from gateway.model_config import UpstreamOptions
from tests.gateway.test_upstream_gateway import serve_in_thread
from tests.integrity_factory import DETECTOR

KEY = "mlaas-secret"


def protect_raw(service: dict[str, Any], **over: Any) -> dict[str, Any]:
    """A protect file for the digits data, sized to train in seconds."""
    raw: dict[str, Any] = {
        "name": "protect_test",
        "seed": 0,
        "threads": 1,
        "service": service,
        "views": 1,
        "query": {"batch_size": 64, "concurrency": 2, "repeat_probe": 32},
        "data": {
            "source": "digits",
            "val_fraction": 0.1,
            "test_fraction": 0.4,
            "augment": {"crop_padding": 1},
        },
        "verifier": {
            "max_flops": 300_000,
            "candidates": [{"widths": [8, 16, 32]}],
            "pretrain": {"task": "rotation", "train": {"epochs": 1, "batch_size": 64}},
            "step": {"epochs": 3, "batch_size": 64, "lr": 0.004},
            "fidelity_target": 0.97,
        },
        "export": {
            "service_name": "digits",
            "verifier_name": "digits_verifier",
            "max_batch_size": 64,
            "latency_repeats": 5,
        },
        "detector": {**DETECTOR, "target_fpr": 0.02},
    }
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and key in raw else value
    return raw


@dataclass
class MLaaS:
    """The trained digits model behind a deliberately unreliable OIP endpoint."""

    session: ort.InferenceSession
    url: str = ""
    mode: str = "ok"  # ok | nan | short | logits | noisy | top2 | label | index | image
    fail_with: int | None = None  # answer this HTTP status (a 3xx: to ``location``) ...
    fail_times: int = 0  # ... this many times (then answer normally)
    location: str = ""  # where a 3xx sends the client
    classes: int = 10  # classes answered: more than 10 pads the rows with zero probabilities
    declared: int | None = None  # classes its metadata declares (None: ``classes``; -1: any)
    on_infer: Callable[[np.ndarray], None] | None = None  # called with each request's inputs
    delay_s: Callable[[np.ndarray], float] | None = None  # how long to think about a request
    bad_mode: str = "short"  # answer in this mode instead ...
    bad_times: int = 0  # ... the next this many requests (then as ``mode`` says)
    rows_answered: int = 0  # inputs answered with 200, as the provider bills them
    basic_auth: str | None = None  # "user:password" also accepted (as basic auth)
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, x: np.ndarray, mode: str | None = None) -> np.ndarray:
        p: np.ndarray = self.session.run(None, {"input": x})[0]  # [n, 10] probabilities
        mode = mode or self.mode
        if mode == "nan":
            p[0] = np.nan
        elif mode == "short":
            p = p[:-1]
        elif mode == "logits":
            p = np.log(np.clip(p, 1e-6, None)) + 3.0
        elif mode == "noisy":  # a different answer each time it is asked
            p = p + self.rng.uniform(0, 0.5, p.shape).astype(np.float32)
            p /= p.sum(1, keepdims=True)
        elif mode == "top2":
            cut = np.sort(p, 1)[:, -2:-1]
            p = np.where(p >= cut, p, 0.0).astype(np.float32)
        elif mode == "label":
            p = np.eye(10, dtype=np.float32)[p.argmax(1)]
        elif mode == "index":
            p = p.argmax(1).astype(np.int64)
        if p.ndim == 2 and self.classes > p.shape[1]:  # a model with more classes
            pad = np.zeros((len(p), self.classes - p.shape[1]), np.float32)
            p = np.concatenate([p, pad], 1)
        return p

    def app(self) -> FastAPI:
        app = FastAPI()

        def authorised(request: Request) -> JSONResponse | None:
            allowed = {f"Bearer {KEY}"}
            if self.basic_auth is not None:  # user:password, as basic auth
                allowed.add("Basic " + base64.b64encode(self.basic_auth.encode()).decode())
            if request.headers.get("authorization") not in allowed:
                return JSONResponse({"error": "invalid API key"}, status_code=401)
            return None

        @app.get("/v2/models/digits")
        def meta(request: Request) -> Any:
            return authorised(request) or {
                "name": "digits",
                "platform": "onnx",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
                "outputs": [
                    {"name": "probabilities", "datatype": "INT64", "shape": [-1]}
                    if self.mode == "index"
                    else {"name": "denoised", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
                    if self.mode == "image"  # an image-to-image model, not a classifier
                    else {
                        "name": "probabilities",
                        "datatype": "FP32",
                        "shape": [-1, self.classes if self.declared is None else self.declared],
                    }
                ],
            }

        @app.post("/v2/models/digits/infer")
        async def infer(request: Request) -> Any:
            if (denied := authorised(request)) is not None:
                return denied
            with self.lock:
                if self.fail_times > 0 and self.fail_with is not None:
                    self.fail_times -= 1
                    if 300 <= self.fail_with < 400:  # moved: the answer is somewhere else
                        return Response(
                            status_code=self.fail_with, headers={"Location": self.location}
                        )
                    if self.fail_with == 204:  # done, with nothing to say
                        return Response(status_code=204)
                    return JSONResponse(
                        {"error": f"HTTP {self.fail_with} on purpose"},
                        status_code=self.fail_with,
                        headers={"Retry-After": "0"} if self.fail_with == 429 else {},
                    )
            with self.lock:
                mode = self.bad_mode if self.bad_times > 0 else self.mode
                self.bad_times = max(0, self.bad_times - 1)
            body = json.loads(await request.body())
            t = body["inputs"][0]
            x = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            if self.on_infer is not None:
                self.on_infer(x)
            if self.delay_s is not None:  # other requests are answered meanwhile
                await asyncio.sleep(self.delay_s(x))
            p = self.answer(x, mode)
            with self.lock:
                self.rows_answered += len(x)
            dt = "INT64" if p.dtype == np.int64 else "FP32"
            # NaN goes out as JSON null, as orjson (the gateway's encoder) writes it
            data = [None if v != v else v for v in p.ravel().tolist()]
            out = {"name": "probabilities", "datatype": dt, "shape": list(p.shape), "data": data}
            return JSONResponse({"model_name": "digits", "outputs": [out]})

        return app


@pytest.fixture
def mlaas(trained_repository: tuple[Path, dict[str, Any]]) -> Iterator[MLaaS]:
    onnx = trained_repository[0] / "digits" / "1" / "model.onnx"
    service = MLaaS(ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"]))
    with serve_in_thread(service.app()) as (url, _):
        service.url = url
        yield service


def upstream(url: str, **over: Any) -> dict[str, Any]:
    return {
        "upstream": {
            "url": url,
            "model_name": "digits",
            "headers_from_env": {"Authorization": "PROTECT_TEST_AUTH"},
            "timeout_s": 5,
            "retries": 2,
            "backoff_s": 0.01,
            **over,
        }
    }


# -- query clients of the MLaaS (tests of fides.protect.query) ------------------------------

_T = TypeVar("_T", Service, AnswerStore)
_OPEN: list[Service | AnswerStore] = []  # what a test opened: closed after it


def closing(opened: _T) -> _T:
    """``opened`` (a service connection or an answer store), closed after the test by
    :func:`protect_clients`."""
    _OPEN.append(opened)
    return opened


@pytest.fixture
def protect_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The MLaaS key in the environment the upstream options read it from, and every service
    and store opened with :func:`closing` closed after the test (sockets, databases)."""
    monkeypatch.setenv("PROTECT_TEST_AUTH", f"Bearer {KEY}")
    yield
    while _OPEN:
        _OPEN.pop().close()


def open_upstream(url: str, **over: Any) -> Service:
    """The MLaaS at ``url`` as ``fides protect`` opens it (``over``: upstream options)."""
    options = UpstreamOptions.model_validate(upstream(url, **over)["upstream"])
    return closing(
        open_service(repository=None, model=None, upstream=options, output=None, max_batch_size=64)
    )


def open_querier(
    mlaas: MLaaS,
    store_path: Path,
    budget: int | None = None,
    up: dict[str, Any] | None = None,
    *,
    url: str | None = None,
    **cfg: Any,
) -> Querier:
    """A new run's query client: its own service connection (``up``: upstream options over
    the defaults; ``url``: another address of the MLaaS) and store handle."""
    service = open_upstream(url or mlaas.url, **(up or {}))
    store = closing(AnswerStore(store_path, service.identity))
    cfg = {"batch_size": 32, "concurrency": 3, **cfg}
    return Querier(service, store, QueryConfig(**cfg), max_queries=budget)

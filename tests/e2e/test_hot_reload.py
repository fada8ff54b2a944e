"""Hot reload under load, against the real gateway process.

While concurrent clients keep sending inference requests to "tiny", an admin adds version 3
and reloads (the default version becomes 3), then adds a corrupt version 4 and reloads (400,
version 3 keeps serving), and a user key is refused on unload (403). Not one request may fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ADMIN_KEY, USER_KEY
from tests.e2e.conftest import GatewayProcess, running_gateway
from tests.model_factory import TINY_B, TINY_W, make_repository, tiny_classifier

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

WORKERS = 8  # concurrent clients; WORKERS_V2 of them pin version 2 explicitly
WORKERS_V2 = 2
MAX_REQUESTS_PER_WORKER = 4000  # bounds the run by count ...
MAX_RUN_S = 30.0  # ... and by time (the scenario itself takes a few seconds)
MIN_REQUESTS = 500  # the run must have actually exercised the server
PHASE_REQUESTS = 100  # between steps, at least this many requests ...
PHASE_MIN_S = 0.6  # ... and this long, so that each step happens under load


@pytest.fixture(scope="module")
def reload_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A server of its own: this module changes its repository on disk."""
    base = tmp_path_factory.mktemp("e2e-reload")
    repository = make_repository(base / "repo", ("FP32",))
    with running_gateway(repository, base / "logs") as gw:
        yield gw


def expected_logits(x: np.ndarray, version: int) -> np.ndarray:
    # tiny version v was built with tiny_classifier(scale=v) (v1: 1.0, v2: 2.0, v3: 3.0)
    return x.astype(np.float32) @ (TINY_W * float(version)) + TINY_B


@dataclass
class Outcome:
    started: float
    pinned: bool
    version: str | None = None
    answered: float = float("inf")  # when the answer arrived
    error: str | None = None


@dataclass
class LoadRun:
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    outcomes: list[Outcome] = field(default_factory=list)

    def ok(self) -> int:
        return sum(1 for o in self.outcomes if o.error is None)

    def failures(self) -> list[str]:
        return [o.error for o in self.outcomes if o.error is not None]

    async def wait_for_more(
        self, n: int = PHASE_REQUESTS, min_s: float = PHASE_MIN_S, timeout_s: float = 15.0
    ) -> None:
        """Let the load run for ``n`` more requests and at least ``min_s`` seconds."""
        target = len(self.outcomes) + n
        start = time.monotonic()
        deadline = start + timeout_s
        while len(self.outcomes) < target or time.monotonic() - start < min_s:
            if self.stop.is_set() or time.monotonic() > deadline:
                pytest.fail(f"load stalled: {len(self.outcomes)} of {target} requests done")
            await asyncio.sleep(0.01)


async def worker(client: httpx.AsyncClient, run: LoadRun, k: int, pinned: str | None) -> None:
    rows = 1 + k % 3  # mixed batch sizes, so the dynamic batcher merges requests
    rng = np.random.default_rng(k)
    path = "/v2/models/tiny/infer" if pinned is None else f"/v2/models/tiny/versions/{pinned}/infer"
    for i in range(MAX_REQUESTS_PER_WORKER):
        if run.stop.is_set():
            return
        x = rng.uniform(-1, 1, size=(rows, 4)).astype(np.float32)
        rid = f"w{k}-{i}"
        body = {
            "id": rid,
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, 4],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ],
            "outputs": [{"name": "logits"}],
        }
        outcome = Outcome(started=time.monotonic(), pinned=pinned is not None)
        try:
            r = await client.post(path, json=body)
            outcome.answered = time.monotonic()
            if r.status_code != 200:
                outcome.error = f"{path} -> {r.status_code}: {r.text}"
            else:
                doc = r.json()
                version = doc["model_version"]
                outcome.version = version
                (out,) = doc["outputs"]
                got = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
                if doc.get("id") != rid:
                    outcome.error = f"id {doc.get('id')!r} != {rid!r}"
                elif pinned is not None and version != pinned:
                    outcome.error = f"asked version {pinned}, got {version}"
                elif out["name"] != "logits" or got.shape != (rows, 3):
                    outcome.error = f"bad output {out['name']} {out['shape']}"
                elif not np.allclose(got, expected_logits(x, int(version)), rtol=1e-4, atol=1e-4):
                    outcome.error = f"version {version}: wrong values {got.tolist()}"
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            outcome.error = f"{path}: {type(exc).__name__}: {exc}"
        run.outcomes.append(outcome)


async def test_hot_reload_under_load(reload_gateway: GatewayProcess) -> None:
    gw = reload_gateway
    tiny_dir = gw.repository / "tiny"
    limits = httpx.Limits(max_connections=WORKERS + 4, max_keepalive_connections=WORKERS + 4)
    user = {"Authorization": f"Bearer {USER_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    run = LoadRun()
    t_start = time.monotonic()

    async with (
        httpx.AsyncClient(base_url=gw.base_url, headers=user, timeout=15.0, limits=limits) as c,
        httpx.AsyncClient(base_url=gw.base_url, timeout=60.0) as ctl,
    ):
        tasks = [
            asyncio.create_task(worker(c, run, k, "2" if k < WORKERS_V2 else None))
            for k in range(WORKERS)
        ]
        try:
            await run.wait_for_more()
            assert {o.version for o in run.outcomes if o.version} <= {"2"}

            # (a) a new version 3, loaded under load: the default version becomes 3
            tiny_classifier(tiny_dir / "3" / "model.onnx", scale=3.0)
            t_load_sent = time.monotonic()
            r = await ctl.post("/v2/repository/models/tiny/load", headers=admin)
            t_loaded = time.monotonic()
            assert r.status_code == 200, r.text
            assert r.json() == {"name": "tiny", "versions": ["1", "2", "3"], "loaded": True}
            await run.wait_for_more()
            r = await ctl.get("/v2/models/tiny", headers=user)
            assert r.json()["versions"] == ["1", "2", "3"]

            # (b) a corrupt version 4: 400 naming the model and the file; 3 keeps serving
            bad = tiny_dir / "4" / "model.onnx"
            bad.parent.mkdir()
            bad.write_bytes(b"\x00garbage, not an ONNX protobuf\xff" * 8)
            r = await ctl.post("/v2/repository/models/tiny/load", headers=admin)
            t_failed = time.monotonic()
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert "tiny" in error
            assert "model.onnx" in error
            assert str(Path("4") / "model.onnx") in error
            await run.wait_for_more()
            r = await ctl.get("/v2/models/tiny", headers=user)
            assert r.json()["versions"] == ["1", "2", "3"]
            r = await ctl.get("/v2/models/tiny/ready", headers=user)
            assert r.status_code == 200
            index = (await ctl.get("/v2/repository/index", headers=user)).json()
            tiny_rows = [row for row in index if row["name"] == "tiny"]
            assert [row["version"] for row in tiny_rows] == ["1", "2", "3"]
            assert all(row["state"] == "READY" for row in tiny_rows)
            assert "last load failed" in tiny_rows[0]["reason"]

            # (c) a user key may not unload
            r = await ctl.post("/v2/repository/models/tiny/unload", headers=user)
            assert r.status_code == 403, r.text
            assert "admin" in r.json()["error"]
            r = await ctl.post("/v2/repository/models/tiny/unload")
            assert r.status_code == 401, r.text
            await run.wait_for_more()
        finally:
            run.stop.set()
            done, pending = await asyncio.wait(tasks, timeout=MAX_RUN_S)
            for t in pending:
                t.cancel()
        for t in done:
            t.result()  # a worker that crashed is a test bug: show it
        assert not pending, "workers did not stop"

    elapsed = time.monotonic() - t_start
    # (d) not one failed request, and enough of them to mean something
    failures = run.failures()
    assert failures == [], f"{len(failures)} of {len(run.outcomes)} requests failed: {failures[:5]}"
    assert run.ok() >= MIN_REQUESTS, f"only {run.ok()} requests in {elapsed:.1f}s"

    default = [o for o in run.outcomes if not o.pinned]
    pinned = [o for o in run.outcomes if o.pinned]
    assert {o.version for o in pinned} == {"2"}  # pinned requests never move
    # answered before the load was even sent: version 2 (a request sent just before the load
    # may reach the server after it, under a loaded CPU: started < t_load_sent proves nothing)
    assert {o.version for o in default if o.answered < t_load_sent} == {"2"}
    after_load = {o.version for o in default if o.started > t_loaded}
    after_failed = {o.version for o in default if o.started > t_failed}
    # every default-version request that started after the load answered ran on version 3,
    # and the broken version 4 never served anything
    assert after_load == {"3"}
    assert after_failed == {"3"}

    log = gw.log()
    assert "unhandled error" not in log, log

    # after all that: the default version is 3 and version 4 never became visible
    x = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    body = {
        "inputs": [
            {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    async with httpx.AsyncClient(base_url=gw.base_url, headers=user) as c:
        r = await c.post("/v2/models/tiny/infer", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model_version"] == "3"
        logits = next(o for o in r.json()["outputs"] if o["name"] == "logits")["data"]
        np.testing.assert_allclose(logits, expected_logits(x, 3)[0], rtol=1e-5)
        r = await c.post("/v2/models/tiny/versions/4/infer", json=body)
        assert r.status_code == 404
        assert "version 4" in r.json()["error"]

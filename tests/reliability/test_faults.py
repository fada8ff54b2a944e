"""Fault injection, each fault with its expected behaviour asserted.

What other tests already inject, and so is not repeated here (docs/reliability.md maps them):
the enclave killed under load (tests/e2e/test_alerting.py: 503 in the gaps under fail_closed,
FidesEnclaveRestarting fires; tests/gateway/test_enclave_client.py: supervisor restart and
re-attestation; tests/gateway/integrity/test_client.py: one new handshake after a restart), a
hung enclave under fail_open (tests/gateway/integrity/test_pipeline.py), the upstream MLaaS
down (502, then the circuit opens: tests/gateway/test_upstream_gateway.py), a corrupt model
version in a hot
reload under load (tests/e2e/test_hot_reload.py) and SIGTERM with requests in the batcher
(tests/e2e/test_shutdown.py).

Added here: a hung enclave under fail_closed and the timeout's timing under both policies; the
upstream slow, erroring, refusing and recovering (retries, timeouts, circuit breaker half-open
and closed again); unreadable model files and a full disk at start in the real process;
SIGTERM under a steady open-loop load in the real process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from fides.bench.load import Phase, build_load_repository, run_phases
from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import USER_KEY
from tests.e2e.conftest import REPO_ROOT, _server_env, free_port, running_gateway
from tests.gateway.integrity.conftest import EXAMPLE, integrity_gateway, set_integrity
from tests.gateway.integrity.test_pipeline import metric
from tests.gateway.test_upstream_gateway import serve_in_thread
from tests.integrity_factory import Digits
from tests.model_factory import TINY_CONFIG, make_repository, write_config
from tests.processes import stop_process

USER = {"Authorization": f"Bearer {USER_KEY}"}


# -- the enclave hangs ----------------------------------------------------------------------


@pytest.fixture
def integrity_repo(tmp_path: Path, trained_repository: tuple[Path, dict[str, Any]]) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(trained_repository[0], dst)
    return dst


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_a_hung_enclave_times_out_under_either_policy(
    integrity_repo: Path, policy: str, digits: Digits
) -> None:
    cfg = integrity_repo / "digits" / "config.yaml"
    cfg.write_text(
        cfg.read_text().replace("max_batch_size: 64}", "max_batch_size: 64, timeout_s: 2.0}")
    )
    set_integrity(integrity_repo, failure_policy=policy)
    async with integrity_gateway(integrity_repo) as (client, fakes):
        # well past timeout_s (the hung call is waited for at shutdown: not longer); timeout_s
        # itself leaves a loaded machine time for the normal verification (ORT and signing)
        # of the recovery request below
        fakes.by_model["digits"].delay_s = 10.0
        t0 = time.monotonic()
        r = await client.post("/v2/models/digits/infer", json=EXAMPLE)
        elapsed = time.monotonic() - t0
        assert elapsed < 8, f"the enclave timeout (2 s) did not fire: {elapsed:.2f}s"
        if policy == "fail_closed":
            assert r.status_code == 503, r.text
            assert "could not be verified" in r.json()["error"]
            assert r.headers["retry-after"] == "1"
        else:
            assert r.status_code == 200, r.text
            params = r.json()["parameters"]
            assert params["integrity_verdict"] == "unverified"
            assert params["integrity_reason"].startswith("enclave_timeout")
            assert "integrity_evidence" not in params
        assert (
            await metric(client, "fides_integrity_unverified_total", reason="enclave_timeout") == 1
        )
        assert await metric(client, "fides_integrity_verdicts_total", verdict="verified") == 0
        # the enclave answers again: verified again, nothing to restart by hand
        fakes.by_model["digits"].delay_s = 0.0
        r = await client.post("/v2/models/digits/infer", json=digits.body())
        assert r.json()["parameters"]["integrity_verdict"] == "verified"


# -- the upstream MLaaS is slow, errs, refuses ----------------------------------------------


class FaultyUpstream:
    """ASGI middleware in front of a real MLaaS gateway: ``mode`` decides what ``/infer``
    calls get (``ok``, ``slow``, ``500``, ``400``); ``hits`` counts the calls that arrived."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.mode = "ok"
        self.hits = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/infer"):
            await self.app(scope, receive, send)
            return
        self.hits += 1
        if self.mode == "slow":
            # until the test moves on (at most 30 s): the gateway gave up long ago, the
            # answer goes nowhere
            for _ in range(600):
                if self.mode != "slow":
                    break
                await asyncio.sleep(0.05)
        if self.mode in ("slow", "500", "400"):
            body = b'{"error": "injected fault ' + self.mode.encode() + b'"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 503 if self.mode == "slow" else int(self.mode),
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


@dataclass
class UpstreamRig:
    proxy: httpx.AsyncClient
    upstream: FaultyUpstream


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[UpstreamRig]:
    mlaas_repo = make_repository(tmp_path / "mlaas", datatypes=())
    mlaas = FaultyUpstream(
        create_app(Settings(model_repository=mlaas_repo, api_keys=["mlaas"], log_json=False))
    )
    with serve_in_thread(mlaas) as (url, _):  # type: ignore[arg-type]
        repo = tmp_path / "proxy"
        write_config(
            repo / "remote",
            {
                "platform": "upstream",
                "max_batch_size": 16,
                "dynamic_batching": TINY_CONFIG["dynamic_batching"],
                "upstream": {
                    "url": url,
                    "model_name": "tiny",
                    "headers": {"Authorization": "Bearer mlaas"},
                    # per attempt: long enough that a stall of this in-process MLaaS on a
                    # loaded machine is not a timeout (and a retry the counts below miss)
                    "timeout_s": 2.0,
                    "retries": 2,
                    "backoff_s": 0.01,
                    "circuit_breaker": {"failure_threshold": 3, "reset_timeout_s": 1.0},
                },
            },
        )
        (repo / "remote" / "1").mkdir()
        app = create_app(Settings(model_repository=repo, api_keys=[USER_KEY], log_json=False))
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://proxy", headers=USER
            ) as proxy,
        ):
            yield UpstreamRig(proxy, mlaas)


BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


async def timed_infer(rig: UpstreamRig) -> tuple[httpx.Response, float, int]:
    hits = rig.upstream.hits
    t0 = time.monotonic()
    r = await rig.proxy.post("/v2/models/remote/infer", json=BODY)
    return r, time.monotonic() - t0, rig.upstream.hits - hits


async def test_upstream_slow_erroring_refusing_then_recovering(rig: UpstreamRig) -> None:
    r, _, hits = await timed_infer(rig)
    assert r.status_code == 200, r.text
    assert hits == 1

    # slow: each attempt times out at 2 s, retried twice, then a clear 504 (the upstream
    # would hang for 30 s)
    rig.upstream.mode = "slow"
    r, elapsed, hits = await timed_infer(rig)
    assert r.status_code == 504, r.text
    assert "timed out" in r.json()["error"] or "timeout" in r.json()["error"]
    assert hits == 3
    assert elapsed < 20, f"3 attempts of 2 s took {elapsed:.2f}s"

    # a 4xx from the upstream: reported as 502 with its message, not retried; the upstream
    # answered, so the breaker counts it as alive (its failure count starts again)
    rig.upstream.mode = "400"
    r, _, hits = await timed_infer(rig)
    assert r.status_code == 502, r.text
    assert "injected fault 400" in r.json()["error"]
    assert hits == 1

    # erroring: 500s are retried, then 502; three failed calls in a row open the breaker
    rig.upstream.mode = "500"
    for _ in range(3):
        r, _, hits = await timed_infer(rig)
        assert r.status_code == 502, r.text
        assert "500" in r.json()["error"]
        assert hits == 3
    r, elapsed, hits = await timed_infer(rig)
    assert r.status_code == 503, r.text
    assert "circuit" in r.json()["error"].lower()
    assert int(r.headers["retry-after"]) >= 1
    assert hits == 0, "an open circuit must not call the upstream"
    assert elapsed < 2.0  # refused at once, not after an attempt's timeout

    # the upstream heals; after reset_timeout_s one trial call goes through and closes it
    rig.upstream.mode = "ok"
    await asyncio.sleep(1.1)
    r, _, hits = await timed_infer(rig)
    assert r.status_code == 200, r.text
    assert hits == 1
    metrics = (await rig.proxy.get("/metrics")).text
    assert 'fides_upstream_circuit_open{model="remote"} 0.0' in metrics
    assert 'reason="upstream_timeout"' in metrics
    assert 'reason="circuit_open"' in metrics
    assert 'fides_upstream_retries_total{model="remote"} 8.0' in metrics  # 2 + 3 x 2


# -- unreadable model files at start (the real process) ------------------------------------


@contextlib.contextmanager
def started(
    repo: Path,
    workdir: Path,
    *,
    prefix: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """The real gateway, waited for until live (it is not expected to be ready). ``prefix``
    runs it under another command that ends by exec-ing it (so the pid stays the server's)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
            cwd=REPO_ROOT,
            env={**_server_env(repo), **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/v2/health/live", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, "not live after 60 s"
            time.sleep(0.1)
        yield proc, base, log_path
    finally:
        stop_process(proc)


@pytest.mark.e2e
def test_unreadable_model_files_at_start_are_a_clear_error_and_not_ready(
    tmp_path: Path,
) -> None:
    repo = make_repository(tmp_path / "repo", datatypes=())
    # a model file that cannot be read as a file
    write_config(repo / "dir_model", {"platform": "onnx"})
    (repo / "dir_model" / "1" / "model.onnx").mkdir(parents=True)
    # a config.yaml saved in Latin-1 (before its fix: the gateway did not start at all)
    (repo / "latin1").mkdir()
    (repo / "latin1" / "config.yaml").write_bytes(b"platform: onnx\nlabels: [caf\xe9]\n")
    (repo / "latin1" / "1").mkdir()
    with started(repo, tmp_path / "logs") as (_, base, log_path):
        r = httpx.get(f"{base}/v2/health/ready", timeout=5)
        assert r.status_code == 503
        # which models and why: behind the key (the open probe says only not ready)
        r = httpx.post(f"{base}/v2/repository/index", headers=USER, timeout=5)
        reasons = {row["name"]: row["reason"] for row in r.json()}
        assert "model.onnx" in reasons["dir_model"]
        assert "not UTF-8" in reasons["latin1"]
        r = httpx.post(f"{base}/v2/models/dir_model/infer", json=BODY, headers=USER, timeout=5)
        assert r.status_code == 503, r.text
        assert "model.onnx" in r.json()["error"]
        r = httpx.post(f"{base}/v2/models/latin1/infer", json=BODY, headers=USER, timeout=5)
        assert r.status_code == 503, r.text
        assert "not UTF-8" in r.json()["error"]
        # the healthy model serves meanwhile
        r = httpx.post(f"{base}/v2/models/tiny/infer", json=BODY, headers=USER, timeout=5)
        assert r.status_code == 200, r.text
        log = log_path.read_text(errors="replace")
        assert "model dir_model failed to load" in log
        assert "model latin1 failed to load" in log


# -- a full disk at start (the real process) ------------------------------------------------


def full_tmpfs_over(path: Path) -> list[str]:
    """A command prefix that runs the rest in a private mount namespace (an unprivileged user
    namespace: no root needed) where ``path`` is a 256 KiB tmpfs filled to the last block.
    Skips the test, saying why, where the kernel or the container forbids user namespaces."""
    script = (
        'mount -t tmpfs -o size=256k fides-full "$1" || exit 97; '
        'dd if=/dev/zero of="$1/fill" bs=4k 2>/dev/null; shift; exec "$@"'
    )
    prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) (util-linux) to mount a small tmpfs")
    probe = subprocess.run(
        [*prefix, str(path), "sh", "-c", '[ "$(df --output=avail "$0" | tail -1)" -eq 0 ]', path],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a full tmpfs in a user namespace here: {probe.stderr.strip()}")
    return [*prefix, str(path)]


@pytest.mark.e2e
def test_a_full_disk_at_start_is_a_clear_error_and_not_ready(
    integrity_repo: Path, tmp_path: Path
) -> None:
    """The enclave runtime dir (where the gateway seals the verifier at start) is on a full
    filesystem: the process is live, not ready, and says why and where; the model with the
    integrity block refuses (fail_closed) instead of serving unverified; the other models
    serve; no torn sealed file is left behind."""
    runtime = tmp_path / "enclave-run"
    runtime.mkdir()
    env = {
        "FIDES_ENCLAVE_PLATFORM_DIR": str(tmp_path / "platform"),
        "FIDES_ENCLAVE_RUNTIME_DIR": str(runtime),
        "FIDES_ENCLAVE_INIT_PLATFORM": "1",
        "FIDES_ENCLAVE_ALLOW_SIMULATED": "1",
    }
    sealed = runtime / "digits.sealed"
    with started(integrity_repo, tmp_path / "logs", prefix=full_tmpfs_over(runtime), env=env) as (
        proc,
        base,
        log_path,
    ):
        r = httpx.get(f"{base}/v2/health/ready", timeout=5)
        assert r.status_code == 503, r.text
        assert "digits" not in r.text  # the open probe names no model and no path
        r = httpx.get(f"{base}/v2/models/digits/ready", headers=USER, timeout=5)
        assert r.status_code == 503
        error = r.json()["error"]
        assert "digits" in error
        assert f"cannot write {sealed}" in error
        assert "No space left on device" in error
        r = httpx.post(f"{base}/v2/models/digits/infer", json=EXAMPLE, headers=USER, timeout=5)
        assert r.status_code == 503, r.text
        assert "cannot be verified" in r.json()["error"]
        assert "integrity_verdict" not in r.text
        # a model without an integrity block serves meanwhile
        r = httpx.post(f"{base}/v2/models/digits_lite/infer", json=EXAMPLE, headers=USER, timeout=5)
        assert r.status_code == 200, r.text
        r = httpx.get(f"{base}/v2/models/digits_lite/ready", headers=USER, timeout=5)
        assert r.status_code == 200
        # the tmpfs is private to the server's mount namespace: look through its /proc
        inside = Path(f"/proc/{proc.pid}/root{runtime}")
        seen = sorted(p.name for p in inside.iterdir())
        # no digits.sealed, no .digits.sealed.<pid> left; the alarm state's directory, made
        # when `fides serve` checked it can be written (an empty file fits a full disk), empty
        assert seen == ["alarm", "fill"], seen
        assert not any((inside / "alarm").iterdir())
        log = log_path.read_text(errors="replace")
        assert f"integrity for digits cannot be set up: cannot write {sealed}" in log


# -- SIGTERM under load (the real process) --------------------------------------------------


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_sigterm_under_load_finishes_in_flight_and_exits_within_grace(tmp_path: Path) -> None:
    repo = build_load_repository(tmp_path / "repo")
    with running_gateway(repo, tmp_path / "logs") as gw:

        async def load_then_term() -> tuple[Any, float]:
            task = asyncio.create_task(
                run_phases(gw.host, gw.port, [Phase("load", 40, 6.0)], key=USER_KEY, timeout_s=10)
            )
            await asyncio.sleep(2.0)
            t_term = time.perf_counter()
            os.kill(gw.pid, signal.SIGTERM)
            run = await task
            return run, t_term

        t_start = time.perf_counter()
        run, t_term = asyncio.run(load_then_term())
        term_at = t_term - t_start  # close to the run's own clock (started just before)
        gw.process.wait(timeout=15)
        exited_after = time.perf_counter() - t_term
        assert exited_after < 5 + 5, f"exit {exited_after:.1f}s after SIGTERM (grace 5 s)"
        assert gw.process.returncode in (0, -signal.SIGTERM)

    before = [o for o in run.outcomes if o.sent < term_at - 0.2]
    after = [o for o in run.outcomes if o.sent > term_at + 0.2]
    assert len(before) > 40, "the load ran before the signal"
    # every request sent before the signal got its answer, and the right one
    assert {o.status for o in before} == {200}, {o.status for o in before}
    assert all(o.id_ok for o in before)
    # afterwards: drained requests finish (200), new ones are refused (503 or no connection);
    # never another 5xx, never a wrong answer
    assert {o.status for o in after} <= {0, 200, 503}, {o.status for o in after}
    assert any(o.status == 0 for o in after), "nothing was refused after the signal"
    assert all(o.id_ok for o in after if o.status)
    log = gw.log()
    assert "shutting down" in log
    assert "unhandled error" not in log

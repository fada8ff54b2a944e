"""``fides protect`` end to end, over HTTP, with real gateway processes and enclaves:

* gateway A serves the session's trained digits model (the provider); the kit protects it as
  a black box; gateway B fronts it as ``platform: upstream`` with the produced integrity block;
  a drill on A (the provider turns dishonest) makes B flag the answers, and the evidence of
  B's answers checks out in the client SDK;
* the kit killed mid-run (SIGTERM) and run again pays for no answer twice, counted by A."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from enclave_sim.pki import ROOT_CERT
from fides.protect.config import parse_protect_config
from fides.protect.run import protect
from fides_client import FidesClient, IntegrityModels
from tests.conftest import ADMIN_KEY, USER_KEY
from tests.e2e.conftest import REPO_ROOT, GatewayProcess, running_gateway
from tests.fides.protect.conftest import protect_raw
from tests.integrity_factory import Digits
from tests.processes import stop_process

pytestmark = [pytest.mark.e2e]

AUTH_VAR = "PROTECT_E2E_AUTH"
DRILL = "/v2/admin/models/digits/drill"


@contextlib.contextmanager
def _gateway(repo: Path, base: Path) -> Iterator[GatewayProcess]:
    """A real gateway process with its own simulated enclave platform."""
    runtime = Path(tempfile.mkdtemp(prefix="fprot-", dir="/tmp"))  # socket paths are short
    env = {
        "FIDES_ENCLAVE_PLATFORM_DIR": str(base / "platform"),
        "FIDES_ENCLAVE_RUNTIME_DIR": str(runtime),
        "FIDES_ENCLAVE_INIT_PLATFORM": "1",
        "FIDES_ENCLAVE_ALLOW_SIMULATED": "1",
        AUTH_VAR: f"Bearer {USER_KEY}",  # gateway B reaches A with it (headers_from_env)
    }
    try:
        with running_gateway(repo, base / "logs", env=env) as gw:
            yield gw
    finally:
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture(scope="module")
def provider(
    tmp_path_factory: pytest.TempPathFactory, trained_repository: tuple[Path, dict[str, Any]]
) -> Iterator[GatewayProcess]:
    """Gateway A: the MLaaS, serving the trained digits model (with integrity of its own,
    so that its admin API can run drills)."""
    base = tmp_path_factory.mktemp("provider")
    shutil.copytree(trained_repository[0], base / "repo")
    with _gateway(base / "repo", base) as gw:
        yield gw


def _served_rows(gw: GatewayProcess) -> int:
    """Inputs gateway A has answered for digits (the rows of every batch it ran)."""
    text = httpx.get(f"{gw.base_url}/metrics", headers={"X-API-Key": USER_KEY}).text
    m = re.search(
        r'^fides_inference_batch_size_sum\{model="digits",version="1"\} (\S+)$', text, re.M
    )
    return int(float(m.group(1))) if m else 0


def _raw(url: str, **query: Any) -> dict[str, Any]:
    service = {
        "upstream": {
            "url": url,
            "model_name": "digits",
            "headers_from_env": {"Authorization": AUTH_VAR},
            "timeout_s": 10,
        }
    }
    raw = protect_raw(service)
    raw["query"] = {**raw["query"], **query}
    return raw


def test_protect_a_black_box_then_front_it_and_catch_a_drill(
    provider: GatewayProcess,
    tmp_path: Path,
    digits: Digits,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(AUTH_VAR, f"Bearer {USER_KEY}")
    repo = tmp_path / "front"
    before = _served_rows(provider)
    result = protect(
        parse_protect_config(_raw(provider.base_url)), repository=repo, run_dir=tmp_path / "run"
    )
    report = result.report
    q = report["protect"]["queries"]
    assert q["paid_for_in_all"] == q["asked_by_this_run"] == _served_rows(provider) - before
    assert report["protect"]["answer_kind"] == "probabilities"
    assert report["protect"]["determinism"]["top1_changed"] == 0
    # quality with tolerances (a small verifier trained for seconds on any CPU)
    assert report["protect"]["verifier"]["test_fidelity_top1"] >= 0.85
    assert report["mean_detection_accuracy"] >= 0.8
    assert report["clean_fpr"] <= 0.06

    config = yaml.safe_load((repo / "digits" / "config.yaml").read_text())
    assert config["platform"] == "upstream"
    assert config["upstream"]["headers_from_env"] == {"Authorization": AUTH_VAR}
    assert config["integrity"]["detector"] == "digits_detector"

    with _gateway(repo, tmp_path / "front-gw") as front:
        models = IntegrityModels.from_repository(repo, "digits")
        assert models.measurement is not None
        client = FidesClient(
            front.base_url,
            "digits",
            root=tmp_path / "front-gw" / "platform" / ROOT_CERT,
            measurements=[models.measurement],
            allow_simulated=True,
            models=models,
            api_key=USER_KEY,
        )
        x = digits.take(20, seed=3)
        with client:
            honest = [client.infer({"input": x[i : i + 1]}) for i in range(len(x))]
            assert all(r.trusted for r in honest), [r.mismatches for r in honest]
            assert sum(r.verdict == "verified" for r in honest) >= 17
            with httpx.Client(
                base_url=provider.base_url, headers={"X-API-Key": ADMIN_KEY}
            ) as admin:
                r = admin.put(DRILL, json={"attack": "switch", "rate": 1.0})
                assert r.status_code == 200, r.text
                try:
                    drilled = [client.infer({"input": x[i : i + 1]}) for i in range(len(x))]
                finally:
                    assert admin.delete(DRILL).status_code == 200
        assert not any(r.mismatch for r in drilled), [r.mismatches for r in drilled]
        flagged = [r for r in drilled if r.verdict == r.gateway_verdict == "attack"]
        assert len(flagged) >= 17
        # the re-classifier gives the honest answer back for most flagged ones
        back = sum(
            int(r.reclassified[0]) == int(h.probabilities.argmax())
            for r, h in zip(drilled, honest, strict=True)
            if r.reclassified is not None
        )
        assert back >= 14


def _spent(store: Path) -> int:
    if not store.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(store, timeout=5)) as db:
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'spent'").fetchone()
        except sqlite3.OperationalError:
            return 0
    return int(row[0]) if row else 0


def _kit(config: Path, repo: Path, run_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, AUTH_VAR: f"Bearer {USER_KEY}", "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fides.cli",
                "protect",
                str(config),
                "--repository",
                str(repo),
                "--run-dir",
                str(run_dir),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def test_a_killed_run_resumes_without_paying_twice(
    provider: GatewayProcess, tmp_path: Path
) -> None:
    store = tmp_path / "run" / "answers.sqlite"
    slow = tmp_path / "slow.yaml"  # 10 requests of 16 inputs per second: time to kill it
    slow.write_text(yaml.safe_dump(_raw(provider.base_url, batch_size=16, rate_limit=10.0)))
    log = tmp_path / "kit.log"
    before = _served_rows(provider)
    kit = _kit(slow, tmp_path / "repo", tmp_path / "run", log)
    try:
        deadline = time.monotonic() + 120
        while _spent(store) < 300:
            assert kit.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        kit.send_signal(signal.SIGTERM)
        assert kit.wait(timeout=60) == 130, log.read_text()
    finally:
        stop_process(kit)
    paid = _spent(store)
    assert "every answer paid for is recorded" in log.read_text()
    assert _served_rows(provider) - before == paid  # in-flight answers were kept too

    fast = tmp_path / "fast.yaml"  # the same run, without the rate limit
    fast.write_text(yaml.safe_dump(_raw(provider.base_url)))
    kit = _kit(fast, tmp_path / "repo", tmp_path / "run", log)
    try:
        assert kit.wait(timeout=600) == 0, log.read_text()
    finally:
        stop_process(kit)
    served = _served_rows(provider) - before
    with contextlib.closing(sqlite3.connect(store)) as db:
        distinct = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert _spent(store) == served  # every input A answered is recorded as paid for
    assert served == distinct + 32  # each input asked once; 32 more: the determinism probe
    assert served > paid

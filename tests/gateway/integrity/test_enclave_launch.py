"""The gateway's enclave processes: the code they run, and their restarts.

- The supervisor started ``python -m enclave_sim.cli`` with the gateway's working directory and
  environment, so an ``enclave_sim/`` package there (or on ``PYTHONPATH``) ran instead of the
  measured one, was attested under the pinned measurement and signed answers it never computed.
- All models shared one rollback counter: once model B was sealed after model A, A's enclave
  could not restart from its own sealed file (RollbackRejected, then down for good).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from fides_core.attestation import Policy
from fides_core.integrity_config import EnclaveConfig
from gateway.enclave_client import (
    EnclaveLaunch,
    EnclaveState,
    EnclaveSupervisor,
    EnclaveUnavailable,
    VerifyRequest,
    VerifyResult,
)
from gateway.settings import Settings
from tests.enclave_sim.helpers import REPO_ROOT, enclave_env, make_enclave_files, short_tmpdir
from tests.model_factory import tiny_classifier, tiny_expected

START_TIMEOUT_S = 60.0
SHADOW_MARK = "SHADOW_LOADED"


@pytest.fixture(autouse=True)
def _no_fides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FIDES_"):
            monkeypatch.delenv(key)


def _shadow_package(where: Path) -> None:
    """A modified copy of ``enclave_sim`` in ``where``: it leaves a mark when imported and
    answers 0.5 for every output."""
    package = where / "enclave_sim"
    shutil.copytree(
        REPO_ROOT / "enclave_sim", package, ignore=shutil.ignore_patterns("__pycache__")
    )
    with (package / "__init__.py").open("a") as f:
        f.write(
            "\nimport pathlib as _p\n"
            f"(_p.Path(__file__).resolve().parents[1] / {SHADOW_MARK!r}).touch()\n"
        )
    core = package / "core.py"
    original = "results = self._session.run(self.outputs, feeds)"
    text = core.read_text()
    assert original in text
    core.write_text(
        text.replace(original, "results = [np.full_like(r, 0.5) for r in " + original[10:] + "]")
    )


async def test_the_enclave_runs_the_measured_code_not_a_shadow_where_it_starts() -> None:
    with short_tmpdir() as d:
        files = make_enclave_files(d / "files")
        shadow = d / "cwd"
        _shadow_package(shadow)
        launch = EnclaveLaunch(
            socket_path=d / "e.sock",
            sealed_model=files.sealed_path,
            platform_dir=files.platform_dir,
            cwd=shadow,  # the directory the gateway was started from
            env=enclave_env(shadow),  # and a PYTHONPATH naming it too
            log_path=d / "enclave.log",
        )
        sup = EnclaveSupervisor(
            launch,
            root=files.root_pem,
            policy=Policy.of(files.measurement.pcr0, allow_simulated=True),
            ready_timeout_s=START_TIMEOUT_S,
            call_timeout_s=30.0,
            health_interval_s=0,
        )
        x = np.arange(8, dtype=np.float32).reshape(2, 4) / 7
        result: VerifyResult | None = None
        try:
            await sup.start()
            result = await sup.verify([VerifyRequest("r1", os.urandom(16), {"input": x})])
        except EnclaveUnavailable:
            pass  # told below, after what it ran
        finally:
            await sup.close()
        assert not (shadow / SHADOW_MARK).exists(), "it imported the enclave_sim where it started"
        assert result is not None, (d / "enclave.log").read_text()
        _, probabilities = tiny_expected(x)
        np.testing.assert_allclose(
            result.items[0].outputs["probabilities"], probabilities, rtol=1e-5
        )


def _repository(root: Path) -> Path:
    for name, scale in (("verifier_a", 1.0), ("verifier_b", 2.0)):
        (root / name / "1").mkdir(parents=True)
        tiny_classifier(root / name / "1" / "model.onnx", scale=scale)
    return root


async def test_two_models_sealed_one_after_the_other_both_restart() -> None:
    from gateway.integrity.enclave import enclave_for_model

    with short_tmpdir() as d:
        repository = _repository(d / "repo")
        settings = Settings(
            model_repository=repository,
            dev_mode=True,
            enclave_platform_dir=d / "platform",
            enclave_runtime_dir=d / "run",
        )
        sups: list[EnclaveSupervisor] = []
        try:
            for model in ("a", "b"):  # sealed and started one after the other, as at setup
                cfg = EnclaveConfig(verifier_model=f"verifier_{model}", outputs=["probabilities"])
                sup, _ = enclave_for_model(model, cfg, repository, settings)
                assert isinstance(sup, EnclaveSupervisor)
                sup.backoff_initial_s = sup.backoff_max_s = 0.05
                sup.health_interval_s = 0
                sups.append(sup)
                await sup.start()
            for sup in sups:  # each enclave dies and restarts from its own sealed file
                pid = sup.pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + START_TIMEOUT_S
                while sup.restarts < 1 and sup.counters.failed_starts == 0:
                    assert loop.time() < deadline, sup.snapshot()
                    await asyncio.sleep(0.05)
                assert sup.counters.failed_starts == 0, sup.counters.last_error
                await sup.wait_up(START_TIMEOUT_S)
                assert sup.state is EnclaveState.UP
        finally:
            for sup in sups:
                await sup.close()

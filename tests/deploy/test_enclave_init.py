"""deploy/enclave-init.sh run for real, then the enclave booted with the compose command line
(paths moved under a temporary directory): what the containers do, without containers."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fides_core import enclave_wire as protocol
from fides_core.attestation import NonceStore, Policy, verify_attestation
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.integrity_config import EnclaveConfig
from fides_core.measurement import measure
from tests.deploy.conftest import DEPLOY, ROOT
from tests.enclave_sim.helpers import call, connect, ping_ok, short_tmpdir
from tests.model_factory import tiny_classifier
from tests.processes import stop_process

SCRIPT = DEPLOY / "enclave-init.sh"
SEAL_CONFIG = DEPLOY / "enclave" / "verifier.yaml"
PLATFORM_FILES = ("root.pem", "root.key", "platform.pem", "platform.key", "platform_secret")


@pytest.fixture
def base() -> Iterator[Path]:
    with short_tmpdir() as path:  # Unix socket paths must stay short
        yield path


def _env(base: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIDES_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["FIDES_ENCLAVE_PLATFORM_DIR"] = str(base / "platform")
    env["FIDES_ENCLAVE_TRUST_DIR"] = str(base / "trust")
    env.update(extra)
    return env


def _init(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _gateway_verifier_config() -> EnclaveModelConfig:
    """The config the gateway measures a model's verifier with, for the integrity.enclave
    defaults (as gateway/integrity/enclave.py builds it)."""
    cfg = EnclaveConfig(verifier_model="digits_verifier")
    return EnclaveModelConfig(outputs=tuple(cfg.outputs), max_batch_size=cfg.max_batch_size)


def test_the_deployments_seal_config_is_the_one_the_gateway_measures_with() -> None:
    deployed = EnclaveModelConfig.load(SEAL_CONFIG)
    assert deployed.canonical_bytes() == _gateway_verifier_config().canonical_bytes()
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    assert "COPY deploy/enclave/verifier.yaml /opt/fides/enclave/verifier.yaml" in dockerfile


def test_compose_path_creates_platform_seals_and_the_enclave_boots_and_attests(
    base: Path,
) -> None:
    model = base / "verifier.onnx"
    tiny_classifier(model)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    init_env = compose["services"]["enclave-init"]["environment"]
    sealed = base / "sealed" / Path(init_env["FIDES_ENCLAVE_SEALED_MODEL"]).name
    env = _env(
        base,
        FIDES_ENCLAVE_SEAL_MODEL=str(model),
        FIDES_ENCLAVE_SEAL_CONFIG=str(SEAL_CONFIG),
        FIDES_ENCLAVE_SEALED_MODEL=str(sealed),
        FIDES_ENCLAVE_SEAL_MODEL_NAME=init_env["FIDES_ENCLAVE_SEAL_MODEL_NAME"],
    )

    first = _init(env)
    assert first.returncode == 0, first.stderr
    platform = base / "platform"
    assert _mode(platform) == 0o700
    for name in PLATFORM_FILES:
        assert _mode(platform / name) & 0o077 == 0, name
    root_pem = (platform / "root.pem").read_bytes()
    assert (base / "trust" / "root.pem").read_bytes() == root_pem
    assert _mode(base / "trust" / "root.pem") == 0o644
    assert sorted(p.name for p in (base / "trust").iterdir()) == ["root.pem"]
    assert sealed.is_file()
    # against the served model's own rollback counter, as the gateway seals (a counter
    # shared by every model lets one model's upgrade refuse another's restart)
    name = init_env["FIDES_ENCLAVE_SEAL_MODEL_NAME"]
    assert f"as version 1 (model {name!r}'s counter)" in first.stdout

    # the compose command line, with the container paths moved under base
    moves = {
        "/run/fides": str(base / "run"),
        "/var/lib/fides/enclave-sealed": str(base / "sealed"),
        "/var/lib/fides/enclave-platform": str(platform),
    }
    command = list(compose["services"]["enclave"]["command"])
    for i, arg in enumerate(command):
        for old, new in moves.items():
            if arg.startswith(old):
                command[i] = new + arg[len(old) :]
    (base / "run").mkdir()
    socket_path = Path(command[command.index("--socket") + 1])
    process = subprocess.Popen(
        [shutil.which("fides", path=env["PATH"]) or "fides", *command],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (socket_path.exists() and ping_ok(socket_path)):
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "enclave not ready in 60 s"
            time.sleep(0.05)
        assert _mode(socket_path) == 0o600  # only the same uid (the gateway's) may connect
        nonces = NonceStore(ttl_s=60)
        nonce = nonces.issue()
        with connect(socket_path) as s:
            evidence = call(s, protocol.request(1, "attest", nonce=nonce))["result"]["evidence"]
        # what the gateway does: its root from the trust volume, its measurement from the
        # verifier and the model's integrity.enclave config
        expected = measure(model.read_bytes(), _gateway_verifier_config())
        attested = verify_attestation(
            evidence,
            root=(base / "trust" / "root.pem").read_bytes(),
            policy=Policy.of(expected.pcr0, allow_simulated=True),
            nonce=nonce,
            nonce_store=nonces,
        )
        assert attested.measurement == expected.pcr0
    finally:
        stop_process(process)
        if process.stderr:
            process.stderr.close()
    # a restart of the stack keeps the platform (clients keep their pinned root) and seals a
    # version above the rollback counter the boot recorded
    again = _init(env)
    assert again.returncode == 0, again.stderr
    assert (platform / "root.pem").read_bytes() == root_pem
    assert "as version 2" in again.stdout
    assert (platform / "model_counters" / name).read_text(encoding="utf-8").strip() == "1"


def test_kubernetes_path_copies_a_secret_platform_with_private_modes(base: Path) -> None:
    made = _init(_env(base))  # make a platform to play the Secret
    assert made.returncode == 0, made.stderr
    secret = base / "secret"
    secret.mkdir()
    for name in PLATFORM_FILES:
        shutil.copyfile(base / "platform" / name, secret / name)
        (secret / name).chmod(0o644)  # Secret volumes are often group/world readable
    env = _env(base, FIDES_ENCLAVE_PLATFORM_SOURCE=str(secret))
    env["FIDES_ENCLAVE_PLATFORM_DIR"] = str(base / "pod-platform")
    copied = _init(env)
    assert copied.returncode == 0, copied.stderr
    for name in PLATFORM_FILES:
        target = base / "pod-platform" / name
        assert target.read_bytes() == (secret / name).read_bytes()
        assert _mode(target) == 0o600


def test_kubernetes_path_refuses_an_incomplete_secret(base: Path) -> None:
    secret = base / "secret"
    secret.mkdir()
    (secret / "root.pem").write_text("not enough")
    result = _init(_env(base, FIDES_ENCLAVE_PLATFORM_SOURCE=str(secret)))
    assert result.returncode == 2
    assert "has no platform.pem" in result.stderr

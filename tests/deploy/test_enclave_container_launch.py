"""The enclave containers (Helm chart, compose) start the enclave as the gateway's supervisor
does: :meth:`gateway.enclave_client.EnclaveLaunch.command` (``python -I``, the measured code
root first on ``sys.path``).

Their command is the image's entrypoint (``fides``, the console script of ``fides:main``) with
the arguments ``enclave run ...``; ``fides enclave run`` replaces itself with that launch.
Before, it ran the enclave inside the ``fides`` process, with the container's environment: the
boot check covered it, the isolated launch did not. The chart is rendered by Helm (helm-sdkpy,
as in test_helm.py); the launch itself is tested end to end in
tests/enclave_sim/test_launch_paths.py.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from fides_core.measurement import CODE_ROOT
from gateway.enclave_client import EnclaveLaunch
from tests.deploy.conftest import CHART, DEPLOY, ROOT
from tests.deploy.helm_tool import HelmUnavailable, run_helm
from tests.enclave_sim.test_launch_paths import fides_enclave_exec

RENDERS: dict[str, dict[str, Any]] = {
    "default": {},
    "extra_args": {
        "enclave": {
            "models": [
                {
                    "name": "digits",
                    "sealModel": "/models/digits_verifier/1/model.onnx",
                    "args": ["--transition-us", "5", "--memory-budget-mb", "128"],
                },
                {"name": "digits_heavy", "sealedModel": "/models/heavy/1/verifier.sealed"},
            ]
        },
        "modelRepository": {"source": "pvc", "pvc": {"claimName": "models"}},
    },
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    try:
        helm = run_helm({"chart": str(CHART), "lint": False, "renders": RENDERS})
    except HelmUnavailable as exc:
        pytest.fail(f"{exc}: run `make deploy-tools` (helm-sdkpy)", pytrace=False)
    out = {}
    for name, render in helm["renders"].items():
        assert "error" not in render, render.get("error")
        out[name] = [doc for doc in yaml.safe_load_all(render["manifest"]) if doc]
    return out


def _image_entrypoint() -> list[str]:
    """The runtime stage's ENTRYPOINT in deploy/Dockerfile, and what its ``fides`` runs."""
    stage: str | None = None
    entrypoints: dict[str | None, list[str]] = {}
    for line in (DEPLOY / "Dockerfile").read_text(encoding="utf-8").splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            stage = words[-1] if len(words) >= 4 and words[-2].upper() == "AS" else None
        elif words[:1] == ["ENTRYPOINT"]:
            entrypoints[stage] = json.loads(line.split(None, 1)[1])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["fides"] == "fides:main"  # which calls fides.cli.main: the app tested below
    return entrypoints["runtime"]


def _enclave_containers(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    (workload,) = [o for o in objects if o["kind"] in {"Deployment", "StatefulSet"}]
    pod = workload["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"] if c["name"].startswith("enclave-")}


def _expected(args: list[str]) -> list[str]:
    """The supervisor's launch for a ``run`` with these arguments."""
    value = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    extra = [
        a
        for i, a in enumerate(args)
        if a not in {"--socket", "--sealed-model", "--platform-dir"}
        and (i == 0 or args[i - 1] not in {"--socket", "--sealed-model", "--platform-dir"})
    ]
    return EnclaveLaunch(
        socket_path=Path(value["--socket"]),
        sealed_model=Path(value["--sealed-model"]),
        platform_dir=Path(value["--platform-dir"]),
        extra_args=(*extra, "--no-exit-with-parent"),
    ).command()


@pytest.mark.parametrize("render", list(RENDERS))
def test_the_charts_enclave_containers_run_the_isolated_launch(
    rendered: dict[str, list[dict[str, Any]]], render: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    entrypoint = _image_entrypoint()
    assert entrypoint == ["fides"]
    containers = _enclave_containers(rendered[render])
    assert containers
    for name, container in containers.items():
        assert "command" not in container, f"{name} replaces the image's entrypoint"
        args = container["args"]
        assert args[:2] == ["enclave", "run"], name
        argv = fides_enclave_exec(monkeypatch, args)
        assert argv == _expected(args[2:]), name
        assert argv[1:3] == ["-I", "-c"]
        assert argv[4] == str(CODE_ROOT)
    if render == "extra_args":  # the model's own `run` options reach the enclave
        argv = fides_enclave_exec(monkeypatch, containers["enclave-digits"]["args"])
        assert argv[argv.index("run") :][-5:] == [
            "--transition-us",
            "5",
            "--memory-budget-mb",
            "128",
            "--no-exit-with-parent",
        ]


def test_the_compose_enclave_runs_the_isolated_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))["services"]
    enclave = services["enclave"]
    assert "entrypoint" not in enclave  # the image's: fides
    assert _image_entrypoint() == ["fides"]
    args = enclave["command"]
    assert args[:2] == ["enclave", "run"]
    assert fides_enclave_exec(monkeypatch, args) == _expected(args[2:])

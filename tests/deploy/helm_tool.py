"""Lint and render a Helm chart with helm-sdkpy (the Helm 4 library), in a child process.

Run as ``python -m tests.deploy.helm_tool`` with a JSON request on stdin::

    {"chart": "helm/fides-gateway", "lint": true, "renders": {"name": {values...}, ...}}

and it prints ``{"lint": [...], "renders": {"name": {"manifest": str} | {"error": str}}}``.

Why a child process: Helm's Go runtime reads its environment once, when the shared library
is loaded, and the release store must be ``HELM_DRIVER=memory`` (the fake API server below
does not speak protobuf, which the Secret store uses). helm-sdkpy has no ``helm template``,
so a render is an install into :mod:`tests.deploy.fake_kube`, which keeps nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


class HelmUnavailable(RuntimeError):
    pass


def run_helm(request: dict[str, Any], timeout_s: float = 240.0) -> dict[str, Any]:
    """Run a request in a child process (see the module docstring)."""
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="helm-home-") as home:
        env = {
            **os.environ,
            "HELM_DRIVER": "memory",
            # Helm's cache, config and data in a throw-away place, not the user's
            "HELM_CACHE_HOME": f"{home}/cache",
            "HELM_CONFIG_HOME": f"{home}/config",
            "HELM_DATA_HOME": f"{home}/data",
            "KUBECONFIG": f"{home}/no-kubeconfig",  # lint must not read a real cluster's
        }
        proc = subprocess.run(
            [sys.executable, "-m", "tests.deploy.helm_tool"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            cwd=root,
            env=env,
            timeout=timeout_s,
            check=False,
        )
    if proc.returncode == 3:
        raise HelmUnavailable(proc.stderr.strip())
    if proc.returncode != 0:
        raise RuntimeError(f"helm_tool failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _lint(helm: Any, chart: str) -> list[dict[str, str]]:
    result = asyncio.run(helm.Lint(helm.Configuration()).run(chart))
    # helm-sdkpy serialises each message's Go error as {}: only severity and path survive
    return [
        {"severity": SEVERITY.get(m["Severity"], str(m["Severity"])), "path": m["Path"]}
        for m in result.get("Messages") or []
    ]


def _render(helm: Any, kubeconfig: str, chart: str, values: dict[str, Any]) -> dict[str, str]:
    config = helm.Configuration(namespace="fides", kubeconfig=kubeconfig)
    try:
        release = asyncio.run(
            helm.Install(config).run("demo", chart, values=values, wait=False, timeout=60)
        )
    except helm.HelmError as exc:
        return {"error": str(exc)}
    return {"manifest": release["manifest"]}


def main() -> int:
    if os.environ.get("HELM_DRIVER") != "memory":
        print("run with HELM_DRIVER=memory (use run_helm)", file=sys.stderr)
        return 2
    try:
        import helm_sdkpy as helm
    except ImportError as exc:
        print(f"helm-sdkpy is not installed: {exc}", file=sys.stderr)
        return 3
    request = json.load(sys.stdin)
    chart = request["chart"]
    out: dict[str, Any] = {"renders": {}}
    if request.get("lint"):
        out["lint"] = _lint(helm, chart)
    renders = request.get("renders") or {}
    if renders:
        from tests.deploy.fake_kube import fake_kube_api

        with fake_kube_api() as (kubeconfig, kube):
            for name, values in renders.items():
                kube.objects.clear()  # each render installs into an empty cluster
                out["renders"][name] = _render(helm, kubeconfig, chart, values)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

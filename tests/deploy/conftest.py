"""Deployment checks: static, because no Docker engine or Kubernetes cluster runs here.

The tools come from ``make deploy-tools`` (scripts/install_deploy_tools.sh), which `make test`
runs first. A missing tool is a failure that says how to install it, never a skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "fides-gateway"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not on PATH: run `make deploy-tools` (Debian packages prometheus and "
            "prometheus-alertmanager)",
            pytrace=False,
        )
    return path


def run_tool(
    *args: str, cwd: Path = ROOT, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
    )

"""The client SDK installs without the server: `pip install fides-gateway` (no extra) into a new
virtualenv gives fides_client and fides_core, and neither torch, transformers, onnxruntime nor
a web server; the SDK's local detector then runs on onnx's reference evaluator and scores what
onnxruntime scores."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROBE = """
import importlib.util, json, sys
import numpy as np
import fides_client
from fides_client.client import IntegrityModels, _LocalDetector
absent = [m for m in ("torch", "transformers", "onnxruntime", "fastapi", "uvicorn", "sklearn")
          if importlib.util.find_spec(m) is not None]
repo = sys.argv[1]
local = _LocalDetector(IntegrityModels.from_repository(repo, "digits"))
p = np.asarray(json.loads(sys.argv[2]), dtype=np.float32)
q = np.asarray(json.loads(sys.argv[3]), dtype=np.float32)
print(json.dumps({"present": absent, "scores": local.scores(p, q).tolist(),
                  "threshold": local.threshold, "version": fides_client.__name__}))
"""


def test_the_sdk_installs_and_judges_without_the_server(
    tmp_path: Path, trained_repository: tuple[Path, dict[str, Any]]
) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    constraints = ROOT / "requirements.lock"
    pip = [str(py), "-m", "pip", "install", "-q", "-c", str(constraints)]
    subprocess.run([*pip, "setuptools", "wheel"], check=True, timeout=600)
    done = subprocess.run(
        [*pip, "--no-build-isolation", str(ROOT)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), size=6).astype(np.float32)
    q = rng.dirichlet(np.ones(10), size=6).astype(np.float32)
    repo = trained_repository[0]
    out = subprocess.run(
        [str(py), "-c", PROBE, str(repo), json.dumps(p.tolist()), json.dumps(q.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # not the checkout: import what was installed
    )
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout)
    assert found["present"] == [], f"the base install pulled in {found['present']}"
    session = ort.InferenceSession(str(repo / "digits_detector" / "1" / "model.onnx"))
    want = session.run(None, {"service_probs": p, "verifier_probs": q})[0].reshape(-1)
    np.testing.assert_allclose(found["scores"], want, rtol=1e-5, atol=1e-6)

"""deploy/Dockerfile read statically (no Docker engine here): stages, user, health check, and
every file it copies present in the build context."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import pytest
import yaml

from tests.deploy.conftest import DEPLOY, ROOT, require_tool, run_tool

DOCKERFILE = DEPLOY / "Dockerfile"


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


def _instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending = f"{pending} {line}" if pending else line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        keyword, _, rest = pending.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "dangling line continuation"
    return out


def _stages() -> list[Stage]:
    stages: list[Stage] = []
    for keyword, rest in _instructions():
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?: AS (\S+))?", rest, flags=re.IGNORECASE)
            assert match, rest
            stages.append(Stage(match.group(1), match.group(2) or ""))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [p.strip() for p in lines if p.strip() and not p.startswith("#")]


def _ignored(path: str) -> bool:
    return any(
        fnmatch.fnmatch(path, pattern) or path.startswith(pattern.rstrip("/") + "/")
        for pattern in _dockerignore()
    )


def test_multi_stage_slim_build() -> None:
    stages = _stages()
    assert [s.name for s in stages] == ["build", "venv", "models", "runtime"]
    runtime = stages[-1]
    assert runtime.base == "python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}"
    # the runtime stage takes the trimmed virtualenv and the models, not the compilers, pip or
    # its caches
    copies = runtime.args("COPY")
    assert any(c.startswith("--from=venv ") for c in copies)
    trim = " ".join(stages[1].args("RUN"))
    assert "torch/test" in trim
    assert "pip uninstall" in trim
    assert any("--from=models" in c for c in copies)
    assert not runtime.args("RUN") or all("pip install" not in r for r in runtime.args("RUN"))


def test_cpu_and_gpu_variants() -> None:
    build = _stages()[0]
    text = " ".join(build.args("RUN"))
    assert 'cpu) index="$TORCH_INDEX_CPU"' in text
    assert 'gpu) index="$TORCH_INDEX_GPU"' in text
    assert "exit 2" in text  # any other VARIANT fails the build
    assert 'if [ "$VARIANT" = gpu ]' in text
    assert "onnxruntime-gpu" in text
    assert "ARG VARIANT=cpu" in " ".join(f"{k} {v}" for k, v in build.instructions)
    assert "download.pytorch.org/whl/cpu" in " ".join(build.args("ARG"))


def test_runs_as_a_fixed_non_root_user() -> None:
    runtime = _stages()[-1]
    (user,) = runtime.args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) != 0
    assert int(gid) != 0
    assert f"--uid {uid}" in " ".join(runtime.args("RUN"))
    # the last USER comes after every RUN that needs root
    keywords = [k for k, _ in runtime.instructions]
    assert max(i for i, k in enumerate(keywords) if k == "RUN") < keywords.index("USER")


def test_healthcheck_probes_liveness() -> None:
    runtime = _stages()[-1]
    (health,) = runtime.args("HEALTHCHECK")
    assert "CMD" in health
    assert "/v2/health/live" in health
    assert "127.0.0.1:8000" in health
    env = " ".join(runtime.args("ENV"))
    assert "FIDES_PORT=8000" in env
    assert "FIDES_HOST=0.0.0.0" in env
    assert runtime.args("ENTRYPOINT") == ['["fides"]']
    assert runtime.args("CMD") == ['["serve"]']


def test_every_copied_file_is_in_the_build_context() -> None:
    checked = 0
    for stage in _stages():
        for copy in stage.args("COPY"):
            parts = [p for p in copy.split() if not p.startswith("--")]
            if "--from=" in copy:
                continue
            *sources, _dest = parts
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                assert not _ignored(source), f"COPY {source}: excluded by .dockerignore"
                checked += 1
    assert checked >= 5
    for heavy in (".venv", "model_repository", ".git", "tests"):
        assert _ignored(heavy), f".dockerignore should exclude {heavy}"


def test_enclave_init_script_is_installed_and_valid_sh() -> None:
    runtime = _stages()[-1]
    assert any(
        c.endswith("deploy/enclave-init.sh /usr/local/bin/fides-enclave-init")
        for c in runtime.args("COPY")
    )
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    assert compose["services"]["enclave-init"]["entrypoint"] == ["fides-enclave-init"]
    sh = require_tool("sh")
    out = run_tool(sh, "-n", str(DEPLOY / "enclave-init.sh"))
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("mount", ["/var/lib/fides/enclave-platform", "/run/fides"])
def test_volume_mount_points_belong_to_the_runtime_user(mount: str) -> None:
    """Empty named volumes copy the image directory's owner; root-owned ones are unwritable."""
    text = " ".join(_stages()[-1].args("RUN"))
    assert re.search(r"install -d -o 10001 -g 10001 -m 0700 [^&]*" + re.escape(mount), text)


def test_every_installed_package_is_copied_into_the_build() -> None:
    """pyproject's package list and the build stage's COPYs agree (the image once lacked
    fides_core, fides_client and fides, and nothing built it to notice)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.split(".")[0].rstrip("*") for p in include}
    copied = {c.split()[0] for c in _stages()[0].args("COPY")}
    assert packages <= copied, f"not copied: {sorted(packages - copied)}"


def test_every_path_the_gateway_writes_is_a_mount_point() -> None:
    """Under --read-only, the gateway writes only to the enclave platform, the enclave's
    runtime folder (socket, sealed verifier), the alarm state and /tmp: the image points each
    setting at a folder made for a volume, owned by the runtime user."""
    runtime = _stages()[-1]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(runtime.args("ENV"))))
    text = " ".join(runtime.args("RUN"))
    for setting in (
        "FIDES_ENCLAVE_PLATFORM_DIR",
        "FIDES_ENCLAVE_RUNTIME_DIR",
        "FIDES_INTEGRITY_STATE_DIR",
    ):
        path = env[setting]
        assert re.search(r"install -d -o 10001 -g 10001 -m 0700 [^&]*" + re.escape(path), text)
    assert env["ORT_DISABLE_TELEMETRY"] == "1"  # onnxruntime writes ~/.cache otherwise

"""Reproducible installs: requirements.lock pins every dependency pyproject.toml names, and the
suite runs against exactly those versions (``make run`` / ``make test`` install from it)."""

from __future__ import annotations

import os
import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)==(?P<version>[^\s;#]+)")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[canonicalize_name(m.group("name"))] = m.group("version")
    return pins


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    reqs = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    for extra, deps in project["project"]["optional-dependencies"].items():
        if extra != "gpu":  # onnxruntime-gpu replaces onnxruntime on CUDA hosts only
            reqs += deps
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_the_lock_pins_every_declared_dependency() -> None:
    missing = sorted(_declared() - set(_pins()))
    assert not missing, f"requirements.lock lacks {missing}: run `make lock` and commit it"


def test_the_lock_satisfies_pyproject() -> None:
    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    bad = [
        f"{req.name}=={pins[canonicalize_name(req.name)]} outside {req.specifier}"
        for req in map(
            Requirement,
            [
                *project["project"]["dependencies"],
                *project["project"]["optional-dependencies"]["server"],
            ],
        )
        if not req.specifier.contains(pins[canonicalize_name(req.name)], prereleases=True)
    ]
    assert not bad, f"requirements.lock is stale: {bad}; run `make lock`"


def test_the_suite_runs_on_the_locked_versions() -> None:
    pins = _pins()
    if os.environ.get("FIDES_TORCH_SPEC"):
        pins.pop("torch")  # the user chose torch (scripts/install_torch.py)
    differ = []
    for name, pinned in sorted(pins.items()):
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # a platform-specific pin (e.g. gevent's) not needed here
        if installed.split("+")[0] != pinned:
            differ.append(f"{name} {installed} (locked {pinned})")
    assert not differ, f"installed versions differ from requirements.lock: {differ}"

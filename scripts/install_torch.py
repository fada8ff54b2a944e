"""Choose the torch requirement for this machine, and the constraints every install uses.

Every install (``make run``, ``make test``, the container image) takes its versions from the
lock file ``requirements.lock`` (``make lock`` regenerates it with pip-tools), so a new release
of a dependency does not change what a fresh machine gets. torch is locked too, but which
*build* of that version is installed depends on the machine:

- a bare ``torch`` requirement on Linux x86_64 pulls a CUDA build of several GB from PyPI;
- where pip can already see a local CPU wheel of the locked version (a ``find-links`` folder
  configured for pip, or FIDES_TORCH_WHEELHOUSE), ``torch==<locked>`` takes that file;
- FIDES_TORCH_SPEC (e.g. ``torch==2.5.1`` with PIP_INDEX_URL pointing at a CPU index) is the
  user's own choice: the torch pin is then left out of the constraints, and the versions the
  suite last passed with are no longer guaranteed for torch.

Usage (the Makefile's):
    install_torch.py                      print the torch requirement
    install_torch.py --constraints FILE   also write the constraints file pip installs with
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
WHEEL_RE = re.compile(r"^torch-(?P<ver>[0-9][^-]*\+cpu)-cp(?P<py>\d+)-")
PIN_RE = re.compile(r"^torch==(?P<ver>[^\s;#]+)")


def locked_torch(lock: Path = LOCK) -> str | None:
    """The torch version the lock file pins (without a local label such as ``+cpu``)."""
    if not lock.is_file():
        return None
    for line in lock.read_text(encoding="utf-8").splitlines():
        m = PIN_RE.match(line.strip())
        if m:
            return m.group("ver").split("+")[0]
    return None


def _find_links() -> list[Path]:
    dirs: list[str] = []
    if os.environ.get("FIDES_TORCH_WHEELHOUSE"):
        dirs.append(os.environ["FIDES_TORCH_WHEELHOUSE"])
    if os.environ.get("PIP_FIND_LINKS"):
        dirs.extend(os.environ["PIP_FIND_LINKS"].split())
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("find-links"):
            dirs.extend(value.strip().strip("'\"").split())
    # also plain pip.conf files, in case `pip config` is unavailable
    for conf in ("/etc/pip.conf", "/etc/xdg/pip/pip.conf", str(Path.home() / ".pip/pip.conf")):
        parser = configparser.ConfigParser()
        try:
            parser.read(conf)
        except configparser.Error:
            continue
        if parser.has_option("global", "find-links"):
            dirs.extend(parser.get("global", "find-links").split())
    return [Path(d.removeprefix("file://")) for d in dirs]


def local_cpu_wheels() -> list[str]:
    """Versions of local CPU torch wheels for this Python that pip can see."""
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    found = []
    for folder in _find_links():
        if folder.is_dir():
            for wheel in sorted(folder.glob("torch-*.whl")):
                m = WHEEL_RE.match(wheel.name)
                if m and m.group("py") == py:
                    found.append(m.group("ver").split("+")[0])
    return found


def torch_requirement() -> str:
    if os.environ.get("FIDES_TORCH_SPEC"):
        return os.environ["FIDES_TORCH_SPEC"]
    locked = locked_torch()
    if locked is not None:
        if locked not in local_cpu_wheels():
            print(
                f"note: no local CPU wheel of the locked torch {locked}; pip takes torch=={locked}"
                " from its index (on Linux x86_64 PyPI that is the CUDA build)",
                file=sys.stderr,
            )
        return f"torch=={locked}"
    wheels = local_cpu_wheels()  # no lock (a partial checkout): the old behaviour
    return f"torch=={wheels[0]}" if wheels else "torch"


def write_constraints(out: Path) -> None:
    """The lock as pip constraints; without the torch pin when the user chose torch."""
    if not LOCK.is_file():
        raise SystemExit(f"error: {LOCK} is missing: run `make lock` to create it")
    lines = LOCK.read_text(encoding="utf-8").splitlines()
    if os.environ.get("FIDES_TORCH_SPEC"):
        lines = [ln for ln in lines if not PIN_RE.match(ln.strip())]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--constraints", type=Path, help="write the pip constraints file here")
    args = parser.parse_args()
    if args.constraints is not None:
        write_constraints(args.constraints)
    print(torch_requirement())


if __name__ == "__main__":
    main()

"""Choose the torch requirement for this machine before installing the project.

A bare ``torch`` requirement on Linux x86_64 pulls a CUDA build of several GB from PyPI.
Where pip can already see a local CPU build of torch (a ``find-links`` folder configured for
pip, or FIDES_TORCH_WHEELHOUSE), we pin that exact version so pip takes the file on disk.
Otherwise we print the plain requirement, and users keep the freedom to pick their build
(set FIDES_TORCH_SPEC, e.g. ``torch==2.5.1`` together with PIP_INDEX_URL for a CPU index).

Prints the requirement string on stdout; used by the Makefile.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

WHEEL_RE = re.compile(r"^torch-(?P<ver>[0-9][^-]*\+cpu)-cp(?P<py>\d+)-")


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


def main() -> None:
    if os.environ.get("FIDES_TORCH_SPEC"):
        print(os.environ["FIDES_TORCH_SPEC"])
        return
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    for folder in _find_links():
        if not folder.is_dir():
            continue
        for wheel in sorted(folder.glob("torch-*.whl")):
            m = WHEEL_RE.match(wheel.name)
            if m and m.group("py") == py:
                print(f"torch=={m.group('ver').split('+')[0]}")
                return
    print("torch")


if __name__ == "__main__":
    main()

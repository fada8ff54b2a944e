"""Copy the files the Helm chart embeds from their one source in deploy/.

A chart can only read files inside its own directory (``.Files.Get``), so the chart keeps
byte-for-byte copies of the alert rules and the Grafana dashboard. Edit the files in deploy/,
then run ``make sync-deploy`` (this script). ``--check`` only reports drift (exit 1), and
tests/deploy runs the same comparison.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHART_FILES = ROOT / "helm" / "fides-gateway" / "files"

# source in deploy/ -> copy inside the chart
COPIES: dict[Path, Path] = {
    ROOT / "deploy" / "prometheus" / "alerts.yml": CHART_FILES / "alerts.yml",
    ROOT / "deploy" / "grafana" / "dashboards" / "fides-gateway.json": (
        CHART_FILES / "fides-gateway.json"
    ),
}


def drifted() -> list[tuple[Path, Path]]:
    """The (source, copy) pairs whose copy is missing or differs from the source."""
    return [
        (src, dst)
        for src, dst in COPIES.items()
        if not dst.is_file() or dst.read_bytes() != src.read_bytes()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift, change nothing")
    args = parser.parse_args(argv)
    stale = drifted()
    if args.check:
        for src, dst in stale:
            print(f"{dst.relative_to(ROOT)} differs from {src.relative_to(ROOT)}")
        return 1 if stale else 0
    for src, dst in stale:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        print(f"copied {src.relative_to(ROOT)} -> {dst.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

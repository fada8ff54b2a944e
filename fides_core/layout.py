"""The model repository's layout, read the same way everywhere: ``<root>/<model>/config.yaml``
and ``<root>/<model>/<version>/<file>``, a model's name being 1-128 ASCII letters, digits,
``_``, ``-`` or ``.`` other than the route word ``stats`` (:func:`is_model_name`) and a
version a positive integer written in ASCII digits (``1``, ``2``, ...; ``0``, ``01x`` or
``²`` are not versions)."""

from __future__ import annotations

import re
from pathlib import Path

__all__ = [
    "MAX_VERSION_DIGITS",
    "MODEL_NAME_RE",
    "MODEL_NAME_RULE",
    "RESERVED_MODEL_NAMES",
    "is_model_name",
    "is_version",
    "latest_version",
    "latest_version_file",
    "versions_on_disk",
]

# A served model's name (also its enclave's rollback counter file and its alarm state's
# ``<model>@<instance>``): what the gateway serves, the enclave seals for and the alarm names
# files after is this one rule. No ``@`` (the state files' separator) and no path separator.
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# Names that a route takes in a model's place: ``GET /v2/models/stats`` is the statistics of
# every model (Triton's and tritonclient's path), so a model named ``stats`` could be loaded
# but its metadata never reached. Route matching is case-sensitive: ``Stats`` is a model name.
RESERVED_MODEL_NAMES = frozenset({"stats"})
MODEL_NAME_RULE = (
    "use 1-128 ASCII letters, digits, '_', '-' or '.', starting with a letter or digit, "
    "without '..', and not 'stats' (GET /v2/models/stats is every model's statistics)"
)


def is_model_name(name: str) -> bool:
    """``name`` is a model name (:data:`MODEL_NAME_RE`, no ``..``: nothing that could leave
    the repository, and none of :data:`RESERVED_MODEL_NAMES`: nothing a route shadows)."""
    return (
        MODEL_NAME_RE.fullmatch(name) is not None
        and ".." not in name
        and name not in RESERVED_MODEL_NAMES
    )


# 18 digits stay below 2**63 (an int64 wherever a version is stored); the length is checked
# before int(), which refuses more than 4,300 digits with a ValueError (CPython's limit).
MAX_VERSION_DIGITS = 18


def is_version(name: str) -> bool:
    """A version directory's name: 1 to 18 ASCII digits, value >= 1 (``str.isdigit`` alone
    takes ``²``)."""
    return len(name) <= MAX_VERSION_DIGITS and name.isascii() and name.isdigit() and int(name) > 0


def versions_on_disk(entry: Path) -> list[int]:
    """The versions present in model directory ``entry``, ascending (none if it is missing)."""
    if not entry.is_dir():
        return []
    return sorted(int(p.name) for p in entry.iterdir() if p.is_dir() and is_version(p.name))


def latest_version(entry: Path) -> Path:
    """``entry/<highest version>``; FileNotFoundError when there is none."""
    versions = versions_on_disk(entry)
    if not versions:
        raise FileNotFoundError(f"{entry} has no version directory (1, 2, ...)")
    return entry / str(versions[-1])


def latest_version_file(entry: Path, filename: str = "model.onnx") -> Path:
    """``entry/<highest version>/filename``; FileNotFoundError naming what is missing."""
    path = latest_version(entry) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    return path

"""The sequential alarm's state on disk: one file per model and gateway instance, read with
every field checked, written atomically, and a lock that says which instances still run.

- ``<dir>/<model>@<instance>.alarm.npz``: arrays, no pickle (``np.savez``); ``<instance>`` is
  the host name (a StatefulSet's pod name; compose's or ``docker run --hostname``'s name).
  Gateways that share the directory each write their own file: none overwrites another's
  latched alarms. ``@`` is in no model name (``fides_core.layout.MODEL_NAME_RE``) and in no
  instance name (:func:`instance_name`), while both may hold dots: the name says whose file it
  is, and no model's monitor reads, takes over or sets aside another model's file.
- ``<dir>/<model>@<instance>.alarm.lock``: held (``flock``) while that instance runs. A state
  file whose lock is free belongs to no running gateway: a container recreated under a new
  host name, a Deployment's replaced pod, or a file of an earlier naming. A new instance takes
  such files over.
- Earlier namings, read for an upgrade: ``<model>.<instance>.alarm.npz`` (with its
  ``.alarm.lock``) and ``<model>.alarm.npz`` (before files were named per instance). Their
  names are ambiguous (model ``a`` on host ``b.c`` and model ``a.b`` on host ``c`` both wrote
  ``a.b.c.alarm.npz``): only the metadata inside says whose such a file is (:func:`model_of`).
- A write cut short leaves its temp file: its owner removes it when it starts, and any instance
  starting removes those of this model that no write has touched for an hour
  (:func:`remove_abandoned_temps`: a peer that crashed mid-write and never came back under
  its name), never a younger one (a live peer's write in flight).
- A write goes to a temporary file of its own (``mkstemp`` in the same directory), is
  ``fsync``-ed, then replaces the state (``os.replace``), and the directory is ``fsync``-ed: a
  crash leaves the old state or the new one, and concurrent writers never share a temp file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "READABLE_VERSIONS",
    "STALE_TEMP_S",
    "STATE_VERSION",
    "HeldLock",
    "SEPARATOR",
    "SavedState",
    "StateRefused",
    "check_writable",
    "instance_name",
    "is_legacy_name",
    "lock_path",
    "model_of",
    "orphan_candidates",
    "read_state",
    "remove",
    "remove_abandoned_temps",
    "remove_stale_temps",
    "set_aside",
    "state_path",
    "try_lock",
    "write_state",
]

STATE_VERSION = 2  # 2: per-instance files, untracked_requests; 1: <model>.alarm.npz
READABLE_VERSIONS = (1, 2)
SUFFIX = ".alarm.npz"
SEPARATOR = "@"  # between model and instance: in neither name (both may hold dots)
# a temp file no write has touched for this long is a write cut short (a crash, an eviction),
# whoever wrote it: a write takes milliseconds to seconds; younger ones may be a live peer's
STALE_TEMP_S = 3600.0
MAX_COUNT = 2**62  # counts are int64 on disk; anything near the limit is not a real count
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


class StateRefused(ValueError):
    """A state file read, but not one this monitor may restore (says why)."""


def instance_name(raw: str | None = None) -> str:
    """The instance's name in file names: ``raw`` or the host name, reduced to letters,
    digits, ``_ . -`` (Kubernetes pod names and host names are already)."""
    name = _UNSAFE.sub("_", raw if raw is not None else socket.gethostname())[:128]
    return name.strip(".") or "gateway"


def state_path(directory: Path, model: str, instance: str) -> Path:
    """``<directory>/<model>@<instance>.alarm.npz``: one name per model and instance, never
    another pair's (a model name or an instance name with ``@`` or ``/`` is refused)."""
    for part in (model, instance):
        if not part or SEPARATOR in part or "/" in part or part.startswith("."):
            raise ValueError(f"{part!r} cannot name an alarm state file")
    return directory / f"{model}{SEPARATOR}{instance}{SUFFIX}"


def lock_path(state: Path) -> Path:
    return state.with_name(state.name.removesuffix(".npz") + ".lock")


def orphan_candidates(directory: Path, model: str, own: Path) -> list[Path]:
    """The other state files that may be this model's: ``<model>@*.alarm.npz`` (this model's
    by their name), and those of the earlier namings, ``<model>.*.alarm.npz`` and
    ``<model>.alarm.npz`` (:func:`is_legacy_name`: a file of model ``a.b`` is listed for model
    ``a`` too; its metadata names its model, and the caller checks it before anything else)."""
    own_prefix, legacy_prefix = f"{model}{SEPARATOR}", f"{model}."

    def fits(name: str) -> bool:
        if name == own.name or not name.endswith(SUFFIX):
            return False
        if is_legacy_name(name):  # "<model>.alarm.npz" and longer
            return name.startswith(legacy_prefix) and len(name) >= len(model) + len(SUFFIX)
        return name.startswith(own_prefix) and len(name) > len(own_prefix) + len(SUFFIX)

    return sorted(p for p in directory.iterdir() if fits(p.name) and p.is_file())


def is_legacy_name(name: str) -> bool:
    """A state file named before ``<model>@<instance>``: its name alone may fit more than one
    model (dotted model and host names), only its metadata says whose it is."""
    return SEPARATOR not in name


def try_lock(path: Path) -> int | None:
    """Open and lock ``path`` (created if missing) without waiting: its descriptor, or None
    while another holder has it (a running gateway). ``flock`` locks an open file, not a
    process: two monitors in one process exclude each other as two processes do. Raises
    OSError where the file cannot be opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


class HeldLock:
    """A lock descriptor from :func:`try_lock` (or none), released once."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # the last descriptor closed releases the flock


def model_of(path: Path) -> str | None:
    """The model a state file names, where its metadata can be read at all (the file is
    opened here: ``np.load`` of a path leaks its descriptor when the zip is damaged)."""
    with (
        contextlib.suppress(Exception),
        path.open("rb") as fh,
        np.load(fh, allow_pickle=False) as z,
    ):
        meta = json.loads(str(z["meta"]))
        model = meta.get("model") if isinstance(meta, dict) else None
        if isinstance(model, str):
            return model
    return None


def set_aside(path: Path) -> str:
    """Rename a state that was refused to ``<name>.rejected``; says what happened."""
    rejected = path.with_name(path.name + ".rejected")
    try:
        os.replace(path, rejected)
    except OSError as move:  # one bad file must not stop the model's integrity
        return f"could not be set aside ({move.strerror or move})"
    return f"set aside as {rejected.name}"


def write_state(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically replace ``path`` with ``arrays`` (raises OSError; no temp file is left)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # something else in the directory's place: say that
        raise NotADirectoryError(
            errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)
        ) from exc
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def check_writable(directory: Path) -> None:
    """Whether state files can be written in ``directory`` (created if missing): a probe
    file is made there and removed. Raises OSError otherwise (read-only, not a directory,
    no permission): a gateway that cannot keep its alarms across restarts must not start as
    if it could (``fides serve`` checks this before anything loads)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix=".write-check.", suffix=".tmp")
    os.close(fd)
    os.unlink(name)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every file system opens a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(path: Path) -> None:
    """Temp files of ``path`` left by a crash mid-write (only its owner calls this)."""
    for tmp in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        remove(tmp)


def remove_abandoned_temps(directory: Path, pattern: str) -> list[Path]:
    """The temp files in ``directory`` matching ``pattern`` (a glob) that no write has touched
    for ``STALE_TEMP_S``, of any instance: a peer sharing the volume that crashed mid-write and
    never came back under its name left them, and only their owner removed them before. A
    younger one is left: it may be a live peer's write in flight. Returns those removed (best
    effort)."""
    gone = []
    cutoff = time.time() - STALE_TEMP_S
    with contextlib.suppress(OSError):
        for tmp in directory.glob(pattern):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    gone.append(tmp)
    return gone


def remove(path: Path) -> None:
    """Best effort: a file that cannot be removed is left (the next start tries again)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@dataclass
class SavedState:
    """One state file's content, every field checked (row 0: the model's stream, then one
    row per key)."""

    path: Path
    meta: dict[str, Any]
    names: list[str]
    r: np.ndarray  # [rows, components]
    answers: np.ndarray  # [rows] int64
    alarm: np.ndarray  # [rows] bool
    alarm_at: np.ndarray  # [rows] int64, -1: no alarm
    peak: np.ndarray  # [rows] float64
    same_calibration: bool
    mtime: float

    @property
    def dropped_keys(self) -> int:
        return _count(self.meta, "dropped_keys")

    @property
    def untracked_requests(self) -> int:
        return _count(self.meta, "untracked_requests")


def read_state(path: Path, model: str, fingerprint: str, components: int) -> SavedState:
    """Read and check a state file. Raises :class:`StateRefused` for a readable file that
    is not a valid state of ``model``; a damaged file raises whatever numpy and zipfile
    raise (the caller catches broadly: see ``AlarmMonitor._read``)."""
    names_needed = ("meta", "keys", "r", "answers", "alarm", "alarm_at", "peak")
    with path.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
        arrays = {name: z[name] for name in names_needed}
        mtime = os.fstat(fh.fileno()).st_mtime
    raw_meta = arrays["meta"]
    if raw_meta.dtype.kind != "U" or raw_meta.shape != ():
        raise StateRefused("its metadata is not a text")
    meta = json.loads(str(raw_meta))
    if not isinstance(meta, dict):
        raise StateRefused("its metadata is not an object")
    if meta.get("version") not in READABLE_VERSIONS or meta.get("model") != model:
        raise StateRefused(f"not a version-{STATE_VERSION} state of '{model}'")
    if not isinstance(meta.get("fingerprint"), str):
        raise StateRefused("its metadata names no calibration")
    for counter in ("dropped_keys", "untracked_requests"):
        _count(meta, counter)
    same = meta["fingerprint"] == fingerprint

    keys = arrays["keys"]
    if keys.ndim != 1 or (keys.size and keys.dtype.kind != "U"):
        raise StateRefused("its key list is not a list of names")
    names = [str(k) for k in keys]
    if len(set(names)) != len(names) or not all(names):
        raise StateRefused("its key list has empty or repeated names")
    rows = len(names) + 1

    r = arrays["r"]
    width = components if same else (r.shape[1] if r.ndim == 2 else -1)
    if (
        r.dtype.kind != "f"
        or r.shape != (rows, width)
        or width < 1
        or not np.isfinite(r).all()
        or (r < 0).any()
    ):
        raise StateRefused("a stream state of the wrong size or with invalid values")
    answers = _integers(arrays["answers"], rows, "answer counts", low=0)
    alarm_at = _integers(arrays["alarm_at"], rows, "alarm positions", low=-1)
    alarm = arrays["alarm"]
    if alarm.dtype != np.bool_ or alarm.shape != (rows,):
        raise StateRefused("its alarm flags are not one flag per stream")
    if ((alarm_at >= 0) != alarm).any() or (alarm_at > answers).any():
        raise StateRefused("an alarm position that does not match its flag or its count")
    peak = arrays["peak"]
    if (
        peak.dtype.kind != "f"
        or peak.shape != (rows,)
        or not np.isfinite(peak).all()
        or (peak < 0).any()
    ):
        raise StateRefused("a stream state with an invalid peak")
    return SavedState(
        path=path,
        meta=meta,
        names=names,
        r=r.astype(np.float64),
        answers=answers,
        alarm=alarm,
        alarm_at=alarm_at,
        peak=peak.astype(np.float64),
        same_calibration=same,
        mtime=mtime,
    )


def _integers(a: np.ndarray, rows: int, what: str, *, low: int) -> np.ndarray:
    if a.dtype.kind not in "iu" or a.shape != (rows,):
        raise StateRefused(f"its {what} are not one integer per stream")
    if a.size and (int(a.min()) < low or int(a.max()) > MAX_COUNT):
        raise StateRefused(f"its {what} are out of range")
    return a.astype(np.int64)


def _count(meta: dict[str, Any], name: str) -> int:
    value = meta.get(name, 0)
    # json gives floats for 1e3, Infinity and NaN; bool is an int to Python
    if isinstance(value, bool) or not isinstance(value, int):
        shown = value if not isinstance(value, float) or math.isfinite(value) else str(value)
        raise StateRefused(f"its count {name} is not a whole number ({shown!r})")
    if not 0 <= value <= MAX_COUNT:
        raise StateRefused(f"its count {name} is out of range ({value})")
    return value

"""The sequential integrity alarm of one verified model (issue 21): the mixture e-detector of
:mod:`fides_core.sequential` over every verified answer's detector score and KL(service ||
verifier), once over the model's whole stream and once per API key, so that a provider that
tampers with one client's answers is not diluted by everyone else's.

- Calibration: the detector's model card (``calibration_scores``, ``calibration_kl``: clean
  answers the detector never trained on). Level ``alpha``: the average run length to a false
  alarm is at least ``1 / alpha`` answers per stream (with probability ``1 - 3 delta`` over the
  calibration draw).
- An alarm latches until an admin resets it after investigating
  (``POST /v2/admin/models/{name}/integrity/alarm/reset``).
- Bounded memory: a fixed-size state per stream, at most ``max_keys`` keys (the least recently
  seen key not in alarm is dropped first, and counted: ``keys.dropped`` in the status, kept
  across restarts; ``on_dropped``: the gateway's counter
  ``fides_integrity_alarm_keys_dropped_total``, once per key this process drops). Keys in
  alarm are never dropped: when every tracked key is in alarm, a new key's answers feed the
  model's stream only, and each such request is counted (``keys.untracked_requests`` in the
  status, kept across restarts; ``on_untracked``: the gateway's counter
  ``fides_integrity_alarm_untracked_requests_total``) and logged.
- Persistence (:mod:`gateway.integrity.alarm_state`): ``<state_dir>/<model>@<instance>.alarm.npz``
  (arrays, no pickle: 10,000 keys write in milliseconds; ``<instance>``: the host name, so
  gateways sharing a directory never overwrite each other), written atomically when an alarm
  fires or is reset, every ``save_every_s`` while answers arrive, and when the pipeline closes
  (the gateway's shutdown on SIGTERM). An instance whose own file does not exist yet takes
  over the files of this model no running gateway holds (a container recreated under a new
  host name, the files of the earlier namings): the newest one's statistics, every one's
  latched alarms. A file that cannot be read or fails a check is set aside (renamed
  ``.rejected``) and the monitor starts clean; its status says so. A file of an earlier
  naming is taken only when its metadata names this model, and one that cannot be read is
  left where it is (its name may be another model's: ``a.b.c.alarm.npz``). One written for
  another calibration or level keeps its latched alarms (an alarm waits for an admin, not for
  a new model card); only the statistics start over. The periodic and alarm-time saves write
  the file from a worker thread (the arrays are taken on the event loop), so 10,000 keys do
  not hold up requests.
- A save that fails while the gateway runs (disk full, the directory gone or read-only, an
  I/O error) leaves the state in memory only: a restart now would lose it, latched alarms
  included. The monitor keeps working and says so everywhere an operator looks: the status'
  ``state.saving`` (``saved`` false, since when, the error's text), ``on_saved`` (the
  gateway's gauge ``fides_integrity_alarm_state_saved`` and counter
  ``fides_integrity_alarm_state_save_failures_total``; the alert
  FidesIntegrityAlarmStateNotSaved), an ERROR log line when saving starts failing and an INFO
  one when a save works again. While saves fail they are tried again every ``save_every_s``,
  answers or not: once the directory is fixed the state is on disk within seconds, and the
  status and the metrics say so, on an idle model too. The model stays ready: it verifies and
  the alarm fires as before; only the memory of it across a restart is at risk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fides_core.incident import alarm_detector, calibration_fingerprint
from fides_core.sequential import StreamState
from gateway.errors import NotFound
from gateway.integrity.alarm_state import (
    SEPARATOR,
    STATE_VERSION,
    SUFFIX,
    HeldLock,
    SavedState,
    StateRefused,
    glob_escape,
    instance_name,
    is_legacy_name,
    lock_path,
    model_of,
    orphan_candidates,
    read_state,
    remove,
    remove_abandoned_temps,
    remove_stale_temps,
    set_aside,
    state_path,
    try_lock,
    write_state,
)

__all__ = ["AlarmMonitor", "client_id"]

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


def client_id(api_key: str | None) -> str:
    """How a client's stream is named (never the key itself): ``key-<12 hex of SHA-256>``."""
    if not api_key:
        return ANONYMOUS
    return "key-" + hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()[:12]


class AlarmMonitor:
    def __init__(
        self,
        model: str,
        calibration_scores: np.ndarray,
        calibration_kl: np.ndarray,
        *,
        alpha: float = 1e-5,
        delta: float = 1e-5,
        max_keys: int = 10_000,
        state_dir: Path | None = None,
        save_every_s: float = 5.0,
        instance: str | None = None,
        on_untracked: Callable[[], None] | None = None,
        on_dropped: Callable[[float], None] | None = None,
        on_saved: Callable[[bool], None] | None = None,
    ) -> None:
        """``instance``: this gateway's name in the state file's name (default: the host
        name). ``on_untracked``: called once per request of a key the monitor cannot track
        (the gateway's counter), besides ``untracked_requests``. ``on_dropped``: called with
        the number of keys dropped (the gateway's counter), besides ``dropped_keys``: once per
        key this process drops, also while reading back a state saved under a larger
        ``max_keys``; never for the saved ``dropped_keys`` (the process that dropped them
        counted them). ``on_saved``: told whether each write of the state worked (the
        gateway's gauge and counter), and once when the monitor is set up (True unless the
        set-up's own write failed); never called without a state directory."""
        self.model = model
        self.calibration_scores = np.asarray(calibration_scores, dtype=np.float64)
        self.calibration_kl = np.asarray(calibration_kl, dtype=np.float64)
        self.alpha, self.delta = alpha, delta
        self.detector = alarm_detector(self.calibration_scores, self.calibration_kl, alpha, delta)
        self.max_keys = max_keys
        self.dropped_keys = 0
        self.untracked_requests = 0  # requests of keys not tracked: every tracked key in alarm
        self.on_untracked = on_untracked
        self.on_dropped = on_dropped
        self._untracked_said = False
        self.model_state = self.detector.new_state()
        self.keys: OrderedDict[str, StreamState] = OrderedDict()
        self.alarmed_keys: set[str] = set()  # kept as alarms fire and reset: no scan per request
        self.fired: list[str] = []  # the scopes the last observe() raised (for the incident)
        self.fingerprint = calibration_fingerprint(
            self.calibration_scores, self.calibration_kl, self.detector
        )
        self.instance = instance_name(instance)
        self.path = None if state_dir is None else state_path(Path(state_dir), model, self.instance)
        self.state_notes: list[str] = []  # what the status says about the state file
        self._lock = HeldLock(None)  # this instance's lock, held while it runs
        self.save_every_s = save_every_s
        self._saved_at = time.monotonic()
        self.on_saved = on_saved
        self._save_failing = False
        self._failing_since: datetime | None = None  # the first failed write of this spell
        self._failing_error = ""  # the last failed write's error (no path: the status shows it)
        self.failed_saves = 0  # writes that failed since the gateway started
        self._retry: asyncio.TimerHandle | None = None  # the next try while saves fail
        self._closed = False  # flushed: the gateway stops, no more tries
        self._writing: asyncio.Future[None] | None = None
        self._write_lock = threading.Lock()
        # snapshots are numbered; a write never replaces a newer snapshot already on disk (a
        # reset's direct save is not undone by an older periodic write finishing after it)
        self._generation = 0
        self._written_generation = 0
        self._save_pending = False  # a save asked for while one was being written
        self.restored = self._load()
        if self.path is not None and self.on_saved is not None:
            self.on_saved(not self._save_failing)  # exported from the start
        weakref.finalize(self, self._lock.release)

    # -- answers ----------------------------------------------------------------------------

    def observe(self, client: str, detector: np.ndarray, kl: np.ndarray) -> list[str]:
        """Feed one request's answers (rows); returns the scopes in alarm after them
        (``model``, ``key``)."""
        scores = {"detector": np.asarray(detector, np.float64), "kl": np.asarray(kl, np.float64)}
        e = self.detector.e_values(scores)  # once, for both streams
        model_before = self.model_state.alarm
        self.detector.update(self.model_state, scores, e)
        key_state = self._key(client)  # None: not tracked (every tracked key is in alarm)
        key_before = key_state is not None and key_state.alarm
        if key_state is not None:
            self.detector.update(key_state, scores, e)
            if key_state.alarm and not key_before:
                self.alarmed_keys.add(client)
        self.fired = [
            scope
            for scope, now, before in (
                ("model", self.model_state.alarm, model_before),
                ("key", key_state is not None and key_state.alarm, key_before),
            )
            if now and not before
        ]
        fired = bool(self.fired)
        if fired:
            log.warning(
                "integrity alarm on %s: %s",
                self.model,
                ", ".join(self._scopes(key_state)),
                extra={"model": self.model, "client": client},
            )
        if fired or time.monotonic() - self._saved_at >= self.save_every_s:
            self.save_soon()
        return self._scopes(key_state)

    def scopes(self, client: str) -> list[str]:
        """The scopes in alarm for ``client``'s requests, without feeding anything."""
        key_state = self.keys.get(client)
        key = key_state is not None and key_state.alarm
        return [s for s, on in (("model", self.model_state.alarm), ("key", key)) if on]

    def _scopes(self, key_state: StreamState | None) -> list[str]:
        key = key_state is not None and key_state.alarm
        return [s for s, on in (("model", self.model_state.alarm), ("key", key)) if on]

    def _key(self, client: str) -> StreamState | None:
        """The client's stream; None when the bound is reached and every tracked key is in
        alarm (an alarm latches until an admin resets it: none is dropped to make room)."""
        state = self.keys.get(client)
        if state is not None:
            self.keys.move_to_end(client)
            return state
        if len(self.keys) >= self.max_keys:
            # alarmed_keys is a subset of keys: equal sizes mean no key may go (no scan)
            victim = (
                None
                if len(self.alarmed_keys) >= len(self.keys)
                else next((k for k, s in self.keys.items() if not s.alarm), None)
            )
            if victim is None:
                self.untracked_requests += 1
                if self.on_untracked is not None:
                    self.on_untracked()
                if not self._untracked_said:  # once, until a key is tracked again
                    self._untracked_said = True
                    log.error(
                        "integrity alarm monitor of %s: all %d tracked keys are in alarm; "
                        "new keys are watched on the model's stream only until some are "
                        "reset (counted in the status, keys.untracked_requests, and in "
                        "fides_integrity_alarm_untracked_requests_total)",
                        self.model,
                        len(self.keys),
                        extra={"model": self.model},
                    )
                return None
            del self.keys[victim]
            self._dropped(1)
        self._untracked_said = False
        state = self.keys[client] = self.detector.new_state()
        return state

    # -- status and reset -------------------------------------------------------------------

    def in_alarm(self) -> dict[str, Any]:
        return {"model": self.model_state.alarm, "keys": sorted(self.alarmed_keys)}

    def key_statistic_max(self) -> float:
        """The largest key statistic (each key's kept by its last update: 10,000 keys in
        about half a millisecond)."""
        return max((s.last for s in self.keys.values()), default=0.0)

    def status(self) -> dict[str, Any]:
        det = self.detector

        def stream(state: StreamState) -> dict[str, Any]:
            return {
                "alarm": state.alarm,
                "alarm_at_answer": state.alarm_at,
                "answers": state.answers,
                "statistic": det.statistic(state),
                "peak": state.peak,
            }

        alarmed = {k: stream(self.keys[k]) for k in sorted(self.alarmed_keys)}
        return {
            "alpha": det.alpha,
            "threshold": det.threshold,
            "calibration": {n: c.n for n, c in det.calibrations.items()},
            "model": stream(self.model_state),
            "keys": {
                "tracked": len(self.keys),
                "max": self.max_keys,
                "dropped": self.dropped_keys,
                "untracked_requests": self.untracked_requests,
                "in_alarm": alarmed,
                "largest_statistic": self.key_statistic_max(),
            },
            "restored": self.restored,
            "state": {
                "instance": self.instance,
                "file": None if self.path is None else self.path.name,
                "notes": list(self.state_notes),
                "saving": self.saving(),
            },
        }

    def saving(self) -> dict[str, Any]:
        """Whether the state is being saved: ``saved`` false while writes fail (a restart now
        would lose the state, latched alarms included) and without a state directory;
        ``failing_since`` (UTC, the first failed write of this spell), ``error`` (the last
        failure's text), ``failed_saves`` (since the gateway started)."""
        since = self._failing_since
        return {
            "saved": self.path is not None and not self._save_failing,
            "failing_since": None if since is None else since.isoformat(),
            "error": self._failing_error or None,
            "failed_saves": self.failed_saves,
        }

    def reset(self, scope: str, key: str | None = None) -> dict[str, Any]:
        """After an investigation: ``model``, one ``key`` (``key`` names it), or ``all``."""
        if scope not in ("model", "key", "all"):
            raise ValueError(f"scope must be one of model, key, all; not {scope!r}")
        if scope == "key":
            if key is None:
                raise ValueError("a key reset needs the key's id (as the status lists it)")
            state = self.keys.get(key)
            if state is None:
                raise NotFound(f"model '{self.model}': no tracked key '{key}'")
            self.detector.reset(state)
            self.alarmed_keys.discard(key)
        if scope in ("model", "all"):
            self.detector.reset(self.model_state)
        if scope == "all":
            for state in self.keys.values():
                self.detector.reset(state)
            self.alarmed_keys.clear()
        log.warning(
            "integrity alarm of %s reset (%s%s)",
            self.model,
            scope,
            f" {key}" if key else "",
            extra={"model": self.model},
        )
        self.save()
        return self.status()

    # -- persistence ------------------------------------------------------------------------

    def save(self) -> None:
        """Write the state now (reset, shutdown, tests); waits for nothing else."""
        self._saved_at = time.monotonic()
        if self.path is not None:
            self._write(*self._snapshot())
            self._retry_later()

    def save_soon(self) -> None:
        """Write the state without holding up the event loop: the arrays are taken here (a
        few milliseconds for 10,000 keys), the file is written by a worker thread. While one
        is being written, a new save waits for it and then writes the state of that moment
        (an alarm that fires meanwhile is on disk as soon as the write before it is)."""
        self._saved_at = time.monotonic()
        if self.path is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tools, tests): write here
            self._write(*self._snapshot())
            return
        if self._writing is not None and not self._writing.done():
            self._save_pending = True
            return
        self._save_pending = False
        self._writing = loop.run_in_executor(None, self._write, *self._snapshot())
        self._writing.add_done_callback(self._after_write)

    def _after_write(self, _done: asyncio.Future[None]) -> None:
        if self._save_pending:  # on the event loop (an asyncio future's callback)
            self.save_soon()
        else:
            self._retry_later()

    def _retry_later(self) -> None:
        """While saves fail, try again in ``save_every_s`` whether answers arrive or not (on
        the event loop; without one, the next save() or answer tries again)."""
        if not self._save_failing or self._retry is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._retry = loop.call_later(self.save_every_s, self._try_again)

    def _try_again(self) -> None:
        self._retry = None
        if self._save_failing and not self._closed:
            self.save_soon()

    async def flush(self) -> None:
        """Wait for a save being written, then write the final state (the gateway's
        shutdown: nothing the alarm has seen is lost)."""
        self._save_pending = False
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._writing is not None:
            await self._writing
        self.save()
        if self._save_failing:  # the last chance: what this run saw is lost at the restart
            log.error(
                "integrity alarm state of %s not saved at shutdown (%s, failing since %s): "
                "its state, latched alarms included, is lost (in alarm now: %s)",
                self.model,
                self._failing_error,
                self.saving()["failing_since"],
                ", ".join(self._scopes(None) + sorted(self.alarmed_keys)) or "nothing",
                extra={"model": self.model},
            )
        self._lock.release()  # the instance stops: its file may be taken over from now on

    def _snapshot(self) -> tuple[int, dict[str, np.ndarray]]:
        """The state's arrays (on the event loop), with the snapshot's number."""
        self._generation += 1
        states = [self.model_state, *self.keys.values()]  # row 0: the model's stream
        meta = {
            "version": STATE_VERSION,
            "model": self.model,
            "instance": self.instance,
            "fingerprint": self.fingerprint,
            "dropped_keys": self.dropped_keys,
            "untracked_requests": self.untracked_requests,
        }
        return self._generation, {
            "meta": np.array(json.dumps(meta)),
            "keys": np.array(list(self.keys), dtype=np.str_),
            "r": np.stack([st.r for st in states]),
            "answers": np.array([st.answers for st in states], dtype=np.int64),
            "alarm_at": np.array(
                [-1 if st.alarm_at is None else st.alarm_at for st in states], dtype=np.int64
            ),
            "alarm": np.array([st.alarm for st in states], dtype=bool),
            "peak": np.array([st.peak for st in states], dtype=np.float64),
        }

    def _write(self, generation: int, arrays: dict[str, np.ndarray]) -> None:
        assert self.path is not None
        with self._write_lock:  # one write at a time: generations stay in order
            if generation <= self._written_generation:
                return  # a newer snapshot is on disk already
            try:
                write_state(self.path, arrays)
            except OSError as exc:  # the monitor keeps working in memory; say so everywhere
                self._failed(exc)
                return
            self._written_generation = generation
            if self._save_failing:
                log.info(
                    "integrity alarm state of %s saved to %s again (failing since %s, %d "
                    "saves failed)",
                    self.model,
                    self.path,
                    self.saving()["failing_since"],
                    self.failed_saves,
                    extra={"model": self.model},
                )
                self._save_failing = False
                self._failing_since = None
                self._failing_error = ""
            if self.on_saved is not None:
                self.on_saved(True)

    def _failed(self, exc: OSError) -> None:
        """A write failed: the status, the metrics (``on_saved``), and a log line once per
        spell of failures (the status and the metrics say the rest)."""
        self.failed_saves += 1
        # the error's text, not its file name: the status names the file already
        self._failing_error = exc.strerror or type(exc).__name__
        if not self._save_failing:
            self._save_failing = True
            self._failing_since = datetime.now(UTC)
            log.error(
                "integrity alarm state of %s not saved to %s: %s (the alarm keeps working in "
                "memory, but a restart now loses its state, latched alarms included: "
                "alarm.state.saving in the integrity status, "
                "fides_integrity_alarm_state_saved; said again when saving works)",
                self.model,
                self.path,
                exc,
                extra={"model": self.model},
            )
        if self.on_saved is not None:
            self.on_saved(False)

    # -- reading the state back -------------------------------------------------------------

    def _load(self) -> str:
        """Restore this instance's file; or, where it has none yet, take over the files no
        running gateway holds (their locks are free). What happened is the status'
        ``restored``; anything else to know is in ``state.notes``."""
        if self.path is None:
            return "not persisted"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = HeldLock(try_lock(lock_path(self.path)))
        except OSError as exc:
            self._note(
                f"no lock on this instance's state ({exc.strerror or exc}): no other "
                "instance's file is taken over"
            )
        else:
            if not self._lock.held:
                self._note(
                    f"another running gateway holds the instance name '{self.instance}' in "
                    f"{self.path.parent}: its saves and this one's overwrite each other (give "
                    "each gateway its own host name)"
                )
        if self._lock.held:
            remove_stale_temps(self.path)
        # a crashed peer's (any instance of this model, named <model>@<instance>): an hour old
        pattern = f".{glob_escape(self.model)}{SEPARATOR}*{SUFFIX}.*.tmp"
        for gone in remove_abandoned_temps(self.path.parent, pattern):
            self._note(f"removed {gone.name}: a write cut short over an hour ago")
        try:
            exists = self.path.exists()
        except OSError as exc:  # e.g. a directory this user may not search
            self._note(f"the state file cannot be looked up ({exc.strerror or exc})")
            return "not read; started clean"
        if exists:
            saved, refused = self._read(self.path)
            return refused if saved is None else self._restore(saved)
        return self._take_over() if self._lock.held else "new"

    def _read(self, path: Path) -> tuple[SavedState | None, str]:
        """One state file, checked; a file that fails is set aside (``.rejected``)."""
        try:
            return read_state(path, self.model, self.fingerprint, len(self.detector.components)), ""
        # Deliberately broad: a damaged zip raises whatever zipfile and numpy raise
        # (BadZipFile, NotImplementedError for an unknown compression method, RuntimeError
        # for an "encrypted" member, OverflowError, MemoryError ...). No state file may stop
        # the gateway from starting: every failure here means "refuse it and start clean".
        except Exception as exc:
            reason = str(exc) if isinstance(exc, StateRefused) else f"{type(exc).__name__}: {exc}"
            aside = set_aside(path)
            log.error(
                "integrity alarm state %s refused (%s); %s, monitor starts clean",
                path,
                reason,
                aside,
                extra={"model": self.model},
            )
            return None, f"refused ({reason}); {aside}, started clean"

    def _take_over(self) -> str:
        """A new instance name (a recreated container, a replaced pod, the first start after
        the file was named per instance): take over every state file of this model that no
        running gateway holds. The newest gives the statistics; the latched alarms of all are
        kept. They are removed once this instance's own file is written."""
        assert self.path is not None
        taken: list[tuple[SavedState, HeldLock]] = []
        said: list[str] = []
        try:
            candidates = orphan_candidates(self.path.parent, self.model, self.path)
        except OSError as exc:
            self._note(f"the state directory cannot be listed ({exc.strerror or exc})")
            candidates = []
        for path in candidates:
            try:
                lock = HeldLock(try_lock(lock_path(path)))
            except OSError:
                continue  # not ours to judge
            if not lock.held:
                continue  # a running gateway's file
            if not path.exists():  # taken over by another instance meanwhile
                lock.release()
                continue
            saved, refused = self._read_orphan(path)
            if saved is None:
                if refused:  # set aside: its lock file goes with it
                    said.append(f"{path.name} {refused}")
                    remove(lock_path(path))
                lock.release()
                continue
            taken.append((saved, lock))
        if not taken:
            if said:
                return "; ".join(said)
            return "new"
        taken.sort(key=lambda t: t[0].mtime)
        newest = taken[-1][0]
        restored = self._restore(newest)
        latched = 0
        for saved, _ in taken[:-1]:
            latched += self._merge_latches(saved)
            self.dropped_keys += saved.dropped_keys
            self.untracked_requests += saved.untracked_requests
        self.save()
        keep = self._save_failing  # not written: leave the files for the next start
        for saved, lock in taken:
            if not keep:
                remove(saved.path)
                remove_stale_temps(saved.path)
                remove(lock_path(saved.path))
            lock.release()
        names = ", ".join(saved.path.name for saved, _ in taken)
        log.warning(
            "integrity alarm state of %s: took over %s (held by no running gateway)",
            self.model,
            names,
            extra={"model": self.model},
        )
        parts = [f"took over {names} (held by no running gateway): {restored}"]
        if latched:
            parts.append(f"{latched} latched alarms of the older files kept")
        return "; ".join(parts + said)

    def _read_orphan(self, path: Path) -> tuple[SavedState | None, str]:
        """Another file of this model: set aside when damaged. A file of an earlier naming
        may be another model's (``a.b.c.alarm.npz``: model ``a`` on host ``b.c``, or model
        ``a.b`` on host ``c``): it is read only when its metadata names this model, left alone
        when they name another, and left in place when they cannot be read (whose it is, and
        so who may set it aside, cannot be told)."""
        if not is_legacy_name(path.name):
            return self._read(path)
        model = model_of(path)
        if model == self.model:
            return self._read(path)
        if model is None:
            self._note(
                f"{path.name} (named before <model>@<instance>) cannot be read and its name may "
                "be another model's: left in place, not taken over (move it away once no "
                "model needs it)"
            )
        return None, ""

    def _restore(self, saved: SavedState) -> str:
        """Put a checked state in place: everything when it was written for this calibration
        and level; otherwise only the latched alarms (the statistics start over)."""
        if not saved.same_calibration:
            self.model_state = self._latched_only(saved, 0)
            for i, name in enumerate(saved.names, start=1):
                if saved.alarm[i]:
                    self.keys[name] = self._latched_only(saved, i)
            self.alarmed_keys = set(self.keys)
            self.dropped_keys += saved.dropped_keys
            self.untracked_requests += saved.untracked_requests
            kept = ["the model's"] if self.model_state.alarm else []
            kept += [f"{len(self.keys)} keys'"] if self.keys else []
            what = " and ".join(kept) + " latched alarms kept" if kept else "no alarm was latched"
            self._note("written for another calibration or level: the statistics start over")
            log.warning(
                "integrity alarm state %s was written for another calibration or level: the "
                "statistics start over; %s",
                saved.path,
                what,
                extra={"model": self.model},
            )
            return f"recalibrated (written for another calibration or level): {what}"
        rows = [self._state(saved, i) for i in range(len(saved.names) + 1)]
        names = saved.names
        self.model_state = rows[0]
        # a state saved under a larger alarm_max_keys: keep the most recently seen keys, and
        # every key in alarm
        keep = names[-self.max_keys :] if len(names) > self.max_keys else names
        keep_set = set(keep) | {n for n, st in zip(names, rows[1:], strict=True) if st.alarm}
        self.keys = OrderedDict(
            (n, st) for n, st in zip(names, rows[1:], strict=True) if n in keep_set
        )
        self.dropped_keys += saved.dropped_keys
        self._dropped(len(names) - len(self.keys))  # dropped now, by this process
        self.untracked_requests += saved.untracked_requests
        self.alarmed_keys = {k for k, st in self.keys.items() if st.alarm}
        return f"restored {len(names)} keys and the model's stream"

    def _merge_latches(self, saved: SavedState) -> int:
        """Latch here every alarm latched in ``saved`` (a stream already tracked keeps its
        statistics; the alarm then counts from its answers so far)."""
        count = 0
        for i, name in enumerate([None, *saved.names]):
            if not saved.alarm[i]:
                continue
            count += 1
            state = self.model_state if name is None else self.keys.get(name)
            if state is None:
                assert name is not None
                self.keys[name] = self._latched_only(saved, i)
            elif not state.alarm:
                state.alarm, state.alarm_at = True, state.answers
            if name is not None:
                self.alarmed_keys.add(name)
        return count

    def _latched_only(self, saved: SavedState, i: int) -> StreamState:
        """Row ``i``'s latched alarm, with its statistics started over (no alarm: a new
        stream)."""
        if not saved.alarm[i]:
            return self.detector.new_state()
        return StreamState(
            np.zeros(len(self.detector.components)),
            answers=int(saved.answers[i]),
            alarm=True,
            alarm_at=int(saved.alarm_at[i]),
        )

    def _state(self, saved: SavedState, i: int) -> StreamState:
        """Row ``i`` as it was saved (checked by read_state: finite, in range, its shape)."""
        r = saved.r[i].copy()
        return StreamState(
            r,
            answers=int(saved.answers[i]),
            alarm=bool(saved.alarm[i]),
            alarm_at=None if saved.alarm_at[i] < 0 else int(saved.alarm_at[i]),
            peak=float(saved.peak[i]),
            last=float(r.mean()),
        )

    def _dropped(self, n: int) -> None:
        if n:
            self.dropped_keys += n
            if self.on_dropped is not None:
                self.on_dropped(n)

    def _note(self, text: str) -> None:
        self.state_notes.append(text)
        log.warning("integrity alarm state of %s: %s", self.model, text)

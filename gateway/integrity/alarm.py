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
  seen key not in alarm is dropped first, and counted; keys in alarm are kept).
- Persistence: ``<state_dir>/<model>.alarm.npz`` (arrays, no pickle: 10,000 keys write in
  milliseconds), written atomically when an alarm fires or is reset, every ``save_every_s``
  while answers arrive, and when the pipeline closes (the gateway's shutdown on SIGTERM). A
  file that cannot be read, or was written for another calibration, is set aside (renamed
  ``.rejected``) and the monitor starts clean; its status says so. The periodic and
  alarm-time saves write the file from a worker thread (the arrays are taken on the event
  loop), so 10,000 keys do not hold up requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from zipfile import BadZipFile

import numpy as np

from fides_core.incident import alarm_detector, calibration_fingerprint
from fides_core.sequential import StreamState
from gateway.errors import NotFound

__all__ = ["AlarmMonitor", "client_id"]

log = logging.getLogger(__name__)

STATE_VERSION = 1
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
    ) -> None:
        self.model = model
        self.calibration_scores = np.asarray(calibration_scores, dtype=np.float64)
        self.calibration_kl = np.asarray(calibration_kl, dtype=np.float64)
        self.alpha, self.delta = alpha, delta
        self.detector = alarm_detector(self.calibration_scores, self.calibration_kl, alpha, delta)
        self.max_keys = max_keys
        self.dropped_keys = 0
        self.model_state = self.detector.new_state()
        self.keys: OrderedDict[str, StreamState] = OrderedDict()
        self.alarmed_keys: set[str] = set()  # kept as alarms fire and reset: no scan per request
        self.fired: list[str] = []  # the scopes the last observe() raised (for the incident)
        self.fingerprint = calibration_fingerprint(
            self.calibration_scores, self.calibration_kl, self.detector
        )
        self.path = None if state_dir is None else Path(state_dir) / f"{model}.alarm.npz"
        self.save_every_s = save_every_s
        self._saved_at = time.monotonic()
        self._save_failing = False
        self._writing: asyncio.Future[None] | None = None
        self._write_lock = threading.Lock()
        # snapshots are numbered; a write never replaces a newer snapshot already on disk (a
        # reset's direct save is not undone by an older periodic write finishing after it)
        self._generation = 0
        self._written_generation = 0
        self._save_pending = False  # a save asked for while one was being written
        self.restored = self._load()

    # -- answers ----------------------------------------------------------------------------

    def observe(self, client: str, detector: np.ndarray, kl: np.ndarray) -> list[str]:
        """Feed one request's answers (rows); returns the scopes in alarm after them
        (``model``, ``key``)."""
        scores = {"detector": np.asarray(detector, np.float64), "kl": np.asarray(kl, np.float64)}
        e = self.detector.e_values(scores)  # once, for both streams
        model_before = self.model_state.alarm
        self.detector.update(self.model_state, scores, e)
        key_state = self._key(client)
        key_before = key_state.alarm
        self.detector.update(key_state, scores, e)
        if key_state.alarm and not key_before:
            self.alarmed_keys.add(client)
        self.fired = [
            scope
            for scope, now, before in (
                ("model", self.model_state.alarm, model_before),
                ("key", key_state.alarm, key_before),
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

    def _scopes(self, key_state: StreamState) -> list[str]:
        return [s for s, on in (("model", self.model_state.alarm), ("key", key_state.alarm)) if on]

    def _key(self, client: str) -> StreamState:
        state = self.keys.get(client)
        if state is not None:
            self.keys.move_to_end(client)
            return state
        if len(self.keys) >= self.max_keys:
            victim = next((k for k, s in self.keys.items() if not s.alarm), None)
            if victim is None:  # every tracked key is in alarm: keep them, drop the oldest
                victim = next(iter(self.keys))
                log.error(
                    "integrity alarm monitor of %s: %d keys, all in alarm; dropping %s",
                    self.model,
                    len(self.keys),
                    victim,
                )
            del self.keys[victim]
            self.alarmed_keys.discard(victim)
            self.dropped_keys += 1
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
                "in_alarm": alarmed,
                "largest_statistic": self.key_statistic_max(),
            },
            "restored": self.restored,
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

    async def flush(self) -> None:
        """Wait for a save being written, then write the final state (the gateway's
        shutdown: nothing the alarm has seen is lost)."""
        self._save_pending = False
        if self._writing is not None:
            await self._writing
        self.save()

    def _snapshot(self) -> tuple[int, dict[str, np.ndarray]]:
        """The state's arrays (on the event loop), with the snapshot's number."""
        self._generation += 1
        states = [self.model_state, *self.keys.values()]  # row 0: the model's stream
        meta = {
            "version": STATE_VERSION,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "dropped_keys": self.dropped_keys,
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
            "peak": np.array([st.peak for st in states]),
        }

    def _write(self, generation: int, arrays: dict[str, np.ndarray]) -> None:
        assert self.path is not None
        with self._write_lock:  # a worker's save and a direct one never share the .tmp
            if generation <= self._written_generation:
                return  # a newer snapshot is on disk already
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_name(self.path.name + ".tmp")
                with tmp.open("wb") as fh:
                    np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy stubs: **kwds
                os.replace(tmp, self.path)
            except OSError as exc:  # the monitor keeps working in memory; say so, once
                if not self._save_failing:
                    log.error(
                        "integrity alarm state of %s not saved to %s: %s (the alarm keeps "
                        "working in memory; said again when saving works)",
                        self.model,
                        self.path,
                        exc,
                    )
                self._save_failing = True
                return
            self._written_generation = generation
            if self._save_failing:
                log.warning("integrity alarm state of %s saved to %s again", self.model, self.path)
                self._save_failing = False

    def _load(self) -> str:
        if self.path is None:
            return "not persisted"
        if not self.path.exists():
            return "new"
        try:
            with self.path.open("rb") as fh, np.load(fh, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if not isinstance(meta, dict):
                    raise ValueError("its metadata is not an object")
                if meta.get("version") != STATE_VERSION or meta.get("model") != self.model:
                    raise ValueError(f"not a version-{STATE_VERSION} state of '{self.model}'")
                if meta.get("fingerprint") != self.fingerprint:
                    raise ValueError("written for another calibration or level")
                names = [str(k) for k in z["keys"]]
                r, answers, alarm = z["r"], z["answers"], z["alarm"]
                alarm_at, peak = z["alarm_at"], z["peak"]
                rows = [
                    self._state(r[i], answers[i], alarm[i], alarm_at[i], peak[i])
                    for i in range(len(names) + 1)
                ]
                dropped = int(meta.get("dropped_keys", 0))
                if dropped < 0:
                    raise ValueError("a negative count of dropped keys")
        except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError, BadZipFile) as exc:
            rejected = self.path.with_name(self.path.name + ".rejected")
            try:
                os.replace(self.path, rejected)
                aside = f"set aside as {rejected.name}"
            except OSError as move:  # one bad file must not stop the model's integrity
                aside = f"could not be set aside ({move.strerror or move})"
            log.error(
                "integrity alarm state %s refused (%s); %s, monitor starts clean",
                self.path,
                exc,
                aside,
            )
            return f"refused ({exc}); {aside}, started clean"
        self.model_state = rows[0]
        # a state saved under a larger alarm_max_keys: keep the most recently seen keys, and
        # every key in alarm
        keep = names[-self.max_keys :] if len(names) > self.max_keys else names
        keep_set = set(keep) | {n for n, st in zip(names, rows[1:], strict=True) if st.alarm}
        self.keys = OrderedDict(
            (n, st) for n, st in zip(names, rows[1:], strict=True) if n in keep_set
        )
        self.dropped_keys += len(names) - len(self.keys)
        self.alarmed_keys = {k for k, st in self.keys.items() if st.alarm}
        self.dropped_keys += dropped
        return f"restored {len(names)} keys and the model's stream"

    def _state(
        self, r: np.ndarray, answers: Any, alarm: Any, alarm_at: Any, peak: Any
    ) -> StreamState:
        r = np.asarray(r, dtype=np.float64)
        if r.shape != (len(self.detector.components),) or not np.isfinite(r).all() or (r < 0).any():
            raise ValueError("a stream state of the wrong size or with invalid values")
        if int(answers) < 0 or not np.isfinite(peak) or float(peak) < 0:
            raise ValueError("a stream state with a negative answer count or an invalid peak")
        return StreamState(
            r.copy(),
            answers=int(answers),
            alarm=bool(alarm),
            alarm_at=None if int(alarm_at) < 0 else int(alarm_at),
            peak=float(peak),
            last=float(r.mean()),
        )

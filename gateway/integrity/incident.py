"""Incident bundles of one verified model (issue 21): the evidence behind a sequential alarm.

Every verified request's part in the alarm (the enclave-signed evidence; its in-distribution
rows' service answer, detector score and KL; the indices of the rows kept out of the alarm and
why) goes into a ring of the model's last ``capacity`` requests, as each finishes judging. When
the alarm of the model or of one key fires, the bundle (:func:`fides_core.incident.build_bundle`,
which puts the answers in the enclave's signing order) is made from the ring (for a key, that
key's requests only) with the attestation document of each enclave boot that signed them, and
written to ``<state_dir>/incidents/<model>/<id>.json`` (kept in memory when there is no state
dir); the admin routes list and return them, ``fides incident export`` fetches one and the SDK
checks it offline (:func:`fides_client.verify_incident`).

Bounded: the ring holds ``capacity`` requests (about 1 KB of evidence each); at most
``max_incidents`` bundles are kept per model, the oldest deleted first. A bundle is built when an
alarm fires (rarely: an alarm latches until an admin resets it), off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fides_core.attestation import decode_attestation
from fides_core.incident import IncidentAnswer, build_bundle, evidence_module_id
from gateway.errors import NotFound
from gateway.integrity.alarm import AlarmMonitor

__all__ = ["IncidentRecorder"]

log = logging.getLogger(__name__)

MAX_BOOTS = 16  # attestation documents kept: the boots of recent answers (a few KB each)
ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z-(model|key-[0-9a-f]{12}|anonymous)(-[0-9]+)?$")


class IncidentRecorder:
    def __init__(
        self,
        model: str,
        alarm: AlarmMonitor,
        *,
        verifier_output: str,
        detector_threshold: float,
        attest: Callable[[bytes], Awaitable[bytes]],
        directory: Path | None,
        capacity: int = 2048,
        max_incidents: int = 50,
    ) -> None:
        self.model = model
        self.alarm = alarm
        self.verifier_output = verifier_output
        self.detector_threshold = detector_threshold
        self._attest = attest
        self.directory = directory
        self.ring: deque[IncidentAnswer] = deque(maxlen=capacity)
        self.max_incidents = max_incidents
        self.attestations: dict[str, bytes] = {}  # module_id -> document, the last few boots
        self._memory: dict[str, dict[str, Any]] = {}  # without a directory
        self._tasks: set[asyncio.Task[None]] = set()

    # -- recording --------------------------------------------------------------------------

    def record(self, answer: IncidentAnswer) -> None:
        self.ring.append(answer)

    def boot(self, module_id: str, document: bytes) -> None:
        """The attestation document of enclave boot ``module_id``: each boot whose evidence the
        gateway checked (the pipeline's, after every enclave call), so the document of the boot
        that signed an answer is here even when the enclave has restarted since. An answer is
        matched to its boot by the module id its evidence names; one whose boot's document is
        not here is left out of a bundle, counted (``answers_left_out``) and logged."""
        if module_id not in self.attestations:
            self.attestations[module_id] = document
            while len(self.attestations) > MAX_BOOTS:  # the oldest first
                del self.attestations[next(iter(self.attestations))]

    def forget(self, scope: str, client: str | None = None) -> None:
        """After an admin reset of ``scope`` (``model``, ``key`` with ``client``, ``all``): the
        answers that drove the old alarm leave the ring, so the next bundle holds only answers
        the restarted statistic has seen (it could otherwise prove a later alarm with the
        earlier incident's answers)."""
        if scope == "key":
            kept = [a for a in self.ring if a.client != client]
            self.ring.clear()
            self.ring.extend(kept)
        else:
            self.ring.clear()

    def fired(self, scopes: list[str], client: str, drill: dict[str, Any] | None = None) -> None:
        """The alarm just fired on ``scopes``: snapshot the ring now, build and write the
        bundle(s) in the background. ``drill``: the attack drill active then (the bundle says
        so: an exercise, not an incident)."""
        now = datetime.now(UTC)
        live = self.alarm.status()
        for scope in scopes:
            who = None if scope == "model" else client
            answers = [a for a in self.ring if who is None or a.client == who]
            task = asyncio.get_running_loop().create_task(
                self._write(scope, who, now, answers, live, drill)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write(
        self,
        scope: str,
        client: str | None,
        now: datetime,
        answers: list[IncidentAnswer],
        live: dict[str, Any],
        drill: dict[str, Any] | None = None,
    ) -> None:
        try:
            needed = {evidence_module_id(a.evidence) for a in answers} - set(self.attestations)
            needed.discard(None)
            if needed:  # the running boot's document, attested now (a client with no `attested`)
                nonce = secrets.token_bytes(32)
                doc = await self._attest(nonce)
                _, claims = decode_attestation(doc)
                self.boot(claims["module_id"], doc)
            stream = live["model"] if client is None else live["keys"]["in_alarm"].get(client)
            bundle = await asyncio.to_thread(  # up to thousands of rows: off the event loop
                build_bundle,
                model=self.model,
                scope=scope,
                client=client,
                raised_at=now.isoformat(),
                verifier_output=self.verifier_output,
                detector_threshold=self.detector_threshold,
                calibration_scores=self.alarm.calibration_scores,
                calibration_kl=self.alarm.calibration_kl,
                alpha=self.alarm.alpha,
                delta=self.alarm.delta,
                attestations=dict(self.attestations),
                answers=answers,
                live={"stream": stream, "threshold": live["threshold"]},
            )
            ident = self._new_id(now, client)
            bundle["id"] = ident
            bundle["drill"] = drill  # the gateway's word: an exercise, not a provider's fault
            await asyncio.to_thread(self._store, ident, bundle)
            left_out = bundle["answers_left_out"]["no_attestation"]
            if left_out:
                log.warning(
                    "integrity incident %s of %s: %d signed requests left out: no attestation "
                    "document of the enclave boot that signed them (the last %d boots' kept)",
                    ident,
                    self.model,
                    left_out,
                    MAX_BOOTS,
                    extra={"model": self.model, "incident": ident},
                )
            log.warning(
                "integrity incident %s of %s: %d signed requests kept (%s)",
                ident,
                self.model,
                len(bundle["answers"]),
                "the statistic reaches the threshold within them"
                if bundle["peak"] >= self.alarm.detector.threshold
                else "in the enclave's signing order the answers kept do not reach the "
                "threshold on their own",
                extra={"model": self.model, "incident": ident},
            )
        except Exception:  # an incident that cannot be kept must not stop serving; say so
            log.exception("integrity incident of %s (%s) not kept", self.model, scope)

    def _new_id(self, now: datetime, client: str | None) -> str:
        base = f"{now:%Y%m%dT%H%M%SZ}-{client or 'model'}"
        ident, n = base, 1
        while ident in self._ids():
            n += 1
            ident = f"{base}-{n}"
        return ident

    # -- storage ----------------------------------------------------------------------------

    def _dir(self) -> Path | None:
        return None if self.directory is None else self.directory / self.model

    def _ids(self) -> list[str]:
        d = self._dir()
        if d is None:
            return sorted(self._memory)
        if not d.is_dir():
            return []
        return sorted(p.stem for p in d.glob("*.json") if ID_PATTERN.match(p.stem))

    def _store(self, ident: str, bundle: dict[str, Any]) -> None:
        d = self._dir()
        if d is None:
            self._memory[ident] = bundle
            while len(self._memory) > self.max_incidents:
                del self._memory[min(self._memory)]
            return
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{ident}.json.tmp"
        with tmp.open("w") as fh:
            json.dump(bundle, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, d / f"{ident}.json")
        for old in self._ids()[: -self.max_incidents]:
            (d / f"{old}.json").unlink(missing_ok=True)

    def summaries(self) -> list[dict[str, Any]]:
        out = []
        for ident in self._ids():
            try:
                b = self.get(ident)
            except (NotFound, OSError, ValueError):
                continue
            out.append(
                {
                    "id": ident,
                    "scope": b.get("scope"),
                    "client": b.get("client"),
                    "raised_at": b.get("raised_at"),
                    "requests": len(b.get("answers", [])),
                    "peak": b.get("peak"),
                    "drill": b.get("drill"),
                }
            )
        return out

    def get(self, ident: str) -> dict[str, Any]:
        if not ID_PATTERN.match(ident):
            raise NotFound(f"model '{self.model}': '{ident}' is not an incident id")
        d = self._dir()
        if d is None:
            if ident not in self._memory:
                raise NotFound(f"model '{self.model}': no incident '{ident}'")
            return self._memory[ident]
        path = d / f"{ident}.json"
        if not path.is_file():
            raise NotFound(f"model '{self.model}': no incident '{ident}'")
        with path.open() as fh:
            bundle: dict[str, Any] = json.load(fh)
        return bundle

    async def close(self) -> None:
        """Let bundles being written finish (the gateway's shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

"""Incident bundles of one verified model (issue 21): the evidence behind a sequential alarm.

Every verified request's part in the alarm (the enclave-signed evidence; its in-distribution
rows' service answer, detector score and KL; the indices of the rows kept out of the alarm and
why) goes into a ring of the model's last ``capacity`` requests, as each finishes judging. When
the alarm of the model or of one key fires, the bundle (:func:`fides_core.incident.build_bundle`,
which puts the answers in the enclave's signing order) is made from the ring (for a key, that
key's requests only) with the attestation documents of each enclave boot that signed them.

**Sealing.** Requests signed before the alarm fired may still be being judged then (under
concurrent load: the other requests of the tripping request's signed batch, or of an earlier
one); a bundle sealed at once would show them as gaps. So the bundle waits, in the background
(the request that tripped the alarm, and every other, goes on at once), until every request of
the signed batches it holds, and of the batches within their span of sequence numbers, has been
recorded, or ``settle_s`` has passed. What is still missing then stays a gap, which the check
reports (the bundle's ``settle`` says how long it waited and how many it still missed). Answers
pushed out of the ring just before the alarm (a full ring) are kept aside a while (``SPILL``),
so the oldest signed batch of a bundle is not cut either. Requests that fed nothing to the
alarm (every row kept out of it, or signed and never judged) take no slot of the ring: they are
kept aside too, at most ``capacity`` of them; one pushed out of that buffer is counted
(``on_dropped("unfed_overflow")``, the metric), logged at the first, and a bundle names how
many were pushed out while its answers were recorded (``settle.unfed_dropped``: its gaps may
be those requests).

**Closing.** The pipeline lets the requests still being verified or judged finish before it
closes the recorder (bounded): their part is recorded, and a bundle waiting for them holds
them. One recorded after the close began (past that bound) is held by no bundle sealed at the
close: it is counted (``on_dropped("after_close")``) and logged with its request id.

**Files.** ``<state_dir>/incidents/<model>/<id>.json``, where the id names the instance:
``<UTC time>-<model|key id>[-n]@<instance>`` (``instance``: the alarm state's, the host name:
a StatefulSet's pod name), never given twice for the life of the directory, though its bundle
was pruned (an instance's ids only grow; its last is kept in ``.last-id@<instance>``).
Gateways sharing the directory (one volume claim for every pod) each write and prune their own
files, and any of them lists and returns every instance's bundles (and those of earlier
versions, named without ``@<instance>``). Kept in memory when there is no state dir. The admin
routes list and return them, ``fides incident export`` fetches one and the SDK checks it
offline (:func:`fides_client.verify_incident`).

**Attestations.** The document of every boot that signed an answer is kept (the pipeline's,
after every enclave call). An answer is proven only within its boot's attestation validity
(the time every certificate of the document's chain is valid), so the documents of a boot
that outlives its certificate are renewed before it expires: when the newest document of the
boot now signing nears its certificate's end (its last ``RENEW_FRACTION``), the running
enclave is attested again in the background and the new document kept beside the old (at
most ``MAX_DOCUMENTS`` per boot); each answer is bundled with the one covering its time.

Bounded: the ring holds ``capacity`` requests (about 1 KB of evidence each); an instance keeps
at most ``max_incidents`` bundles per model and at most ``max_bytes`` of them (a full bundle
is a few MB: the directory is the alarm state's volume, an emptyDir the kubelet evicts the pod
for overfilling), the oldest deleted first, and a shared directory at most ``SHARED_FACTOR``
times ``max_incidents`` (the oldest of any instance first: instances replaced under new names
leave theirs). The bytes are made room for before a bundle is written, so the instance's files
never exceed ``max_bytes`` even while it is written, except for a bundle over the bound on its
own: it is still kept (the evidence of the alarm that just fired), alone, and logged. A write
cut short leaves its temp file: the instance's own go at its next write, and any instance
removes those of every instance that no write has touched for ``STALE_TEMP_S`` (an hour: a
crashed peer that never came back under its name), at its start and at each write; a younger
one may be a live peer's write in flight, and is left. A bundle is built when an alarm fires
(rarely: an alarm latches until an admin resets it), off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fides_core.attestation import decode_attestation
from fides_core.incident import (
    IncidentAnswer,
    SignedPlace,
    attestation_window,
    build_bundle,
    signed_place,
)
from gateway.errors import NotFound
from gateway.integrity.alarm import AlarmMonitor
from gateway.integrity.alarm_state import (
    STALE_TEMP_S,
    glob_escape,
    instance_name,
    remove_abandoned_temps,
)

__all__ = ["IncidentRecorder"]

log = logging.getLogger(__name__)

MAX_BOOTS = 16  # enclave boots whose attestation documents are kept (a few KB each)
MAX_DOCUMENTS = 4  # documents kept per boot: its latest re-attestations
RENEW_FRACTION = 1 / 8  # re-attest the boot signing now in the last 1/8 of its certificate
SETTLE_S = 2.0  # how long a bundle waits for the requests of its signed batches being judged
SPILL = 256  # answers pushed out of a full ring, kept aside for the oldest batch of a bundle
SHARED_FACTOR = 4  # a directory shared by instances keeps at most this many times max_incidents
MAX_BYTES = 64 * 2**20  # an instance's bundles of one model (FIDES_INTEGRITY_INCIDENTS_MAX_MB)
ID_PATTERN = re.compile(
    r"^[0-9]{8}T[0-9]{6}Z-(model|key-[0-9a-f]{12}|anonymous)(-[0-9]+)?"
    r"(@[A-Za-z0-9_.\-]{1,128})?$"
)


class _Seal:
    """The answers recorded after an alarm fired, for the bundle(s) waiting for them."""

    def __init__(self) -> None:
        self.arrived: list[IncidentAnswer] = []
        self.event = asyncio.Event()


class _Batches:
    """The signed batches a bundle holds answers of, and those within their span of sequence
    numbers (per boot): which of their requests it holds, and how many it still lacks."""

    def __init__(self, places: Iterable[SignedPlace | None]) -> None:
        self.have: dict[tuple[str, int], set[int]] = {}
        self.count: dict[tuple[str, int], int] = {}
        for p in places:
            if p is not None:
                self.add(p)
        seqs: dict[str, list[int]] = {}
        for module, seq in self.have:
            seqs.setdefault(module, []).append(seq)
        self.span = {m: (min(s), max(s)) for m, s in seqs.items()}

    def wants(self, p: SignedPlace | None) -> bool:
        """A request of a batch in the span, not held yet."""
        if p is None or p.module_id not in self.span:
            return False
        lo, hi = self.span[p.module_id]
        return lo <= p.seq <= hi and p.index not in self.have.get((p.module_id, p.seq), ())

    def add(self, p: SignedPlace) -> None:
        self.have.setdefault((p.module_id, p.seq), set()).add(p.index)
        self.count[p.module_id, p.seq] = p.count

    def missing(self) -> int:
        """Requests still lacking: each held batch's unheld ones, and at least one of every
        batch in the span none of whose requests is held."""
        n = 0
        for module, (lo, hi) in self.span.items():
            held = [k for k in self.count if k[0] == module]
            n += max(0, hi - lo + 1 - len(held))
            n += sum(max(0, self.count[k] - len(self.have[k])) for k in held)
        return n


def _places(answers: Sequence[IncidentAnswer]) -> list[SignedPlace | None]:
    return [signed_place(a.evidence) for a in answers]


def _age(ident: str) -> tuple[str, int, str]:
    """Sorts one instance's ids oldest first: by time, then ``-n`` (``-2`` follows the id
    without a number, which a plain sort puts after it)."""
    m = ID_PATTERN.fullmatch(ident)
    n = int(m.group(2)[1:]) if m and m.group(2) else 1
    return ident[:16], n, ident


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
        max_bytes: int = MAX_BYTES,
        settle_s: float | None = None,
        instance: str | None = None,
        on_dropped: Callable[[str], None] | None = None,
    ) -> None:
        """``instance``: this gateway's name in its incidents' ids and files (default: the
        alarm monitor's, the host name). ``settle_s``: how long a bundle waits, after its
        alarm fired, for the requests of its signed batches still being judged (default
        ``SETTLE_S``). ``max_bytes``: the most this instance's bundles of the model take,
        together (serialized). ``on_dropped``: told the reason of each signed request not
        kept for the bundles it belongs in (``unfed_overflow``, ``after_close``: a metric)."""
        self.model = model
        self.alarm = alarm
        self.verifier_output = verifier_output
        self.detector_threshold = detector_threshold
        self._attest = attest
        self.directory = directory
        self.instance = instance_name(
            instance if instance is not None else getattr(alarm, "instance", None)
        )
        self.ring: deque[IncidentAnswer] = deque(maxlen=capacity)
        self._spill: deque[IncidentAnswer] = deque(maxlen=SPILL)
        # requests judged with no row fed to the alarm: no slot of the ring, but a bundle
        # waiting for the requests of its signed batches takes them as judged (and holds them).
        # As many as the ring (no rows: about 1 KB each), so they cover its span unless most
        # requests feed nothing; one pushed out is counted, and named in the bundles it is in
        self._unfed: deque[IncidentAnswer] = deque(maxlen=capacity)
        self.on_dropped = on_dropped
        self.unfed_dropped = 0  # pushed out of _unfed since the start
        # fed requests recorded so far, and a lower bound of the number of the oldest still
        # held (ring or spill): a request pushed out of _unfed after that one was recorded may
        # belong in a bundle of the answers held, as a gap
        self._fed = 0
        self._held_from = 1
        self._unfed_drops: deque[list[int]] = deque()  # [_fed at the drop, drops], oldest first
        self.after_close = 0  # recorded after close() began, held by no bundle sealed then
        self.max_incidents = max_incidents
        self.max_bytes = max_bytes
        self.settle_s = SETTLE_S if settle_s is None else settle_s
        # module_id -> its documents, oldest first, and each one's validity (None: unreadable)
        self.attestations: dict[str, list[bytes]] = {}
        self._validity: dict[str, list[tuple[float, float] | None]] = {}
        self._renew_at: dict[str, float] = {}  # module_id -> when to attest it again
        self._seen: dict[str, bytes] = {}  # module_id -> the document the pipeline last gave
        self._renewing = False
        self._memory: dict[str, dict[str, Any]] = {}  # without a directory
        self._memory_bytes: dict[str, int] = {}  # their serialized sizes
        # one write (and its pruning) at a time, off the loop; the admin routes' reads (also in
        # worker threads) take it too for the bundles kept in memory
        self._storing = threading.RLock()
        self._reserved: set[str] = set()  # ids being written
        self._last: str | None = None  # the newest id given (_new_id: ids are never reused)
        self._seals: list[_Seal] = []
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweep()  # at the start: a crashed peer's temp files, if any

    def _sweep(self) -> None:
        """Remove the temp files of this model's bundles that no write has touched for
        ``STALE_TEMP_S``, of any instance sharing the directory: a peer that crashed mid-write
        and never came back under its name left them (its own are removed at its next
        write). A younger one may be a live peer's write in flight: it is left."""
        d = self._dir()
        if d is None:
            return
        for gone in remove_abandoned_temps(d, ".*.tmp"):
            log.warning(
                "integrity incidents of %s: removed %s, a write cut short over %d min ago",
                self.model,
                gone.name,
                STALE_TEMP_S // 60,
                extra={"model": self.model},
            )

    # -- recording --------------------------------------------------------------------------

    def record(self, answer: IncidentAnswer) -> None:
        """On the serving path: an append (and, while a bundle is being sealed, a wake-up).
        A request with no row fed to the alarm takes no slot of the ring: it is kept aside
        (at most ``capacity``) for the bundles whose signed batches hold it. One recorded once
        :meth:`close` began is counted and logged: no bundle sealed at the close holds it."""
        if not len(answer.rows):
            if len(self._unfed) == self._unfed.maxlen:
                self._count_unfed_drop()
            self._unfed.append(answer)
        else:
            self._fed += 1
            if len(self.ring) == self.ring.maxlen:
                if len(self._spill) == self._spill.maxlen:
                    self._held_from += 1  # the oldest held answer leaves
                self._spill.append(self.ring[0])
            self.ring.append(answer)
        if self._closing:  # the bundles being sealed take nothing more; an alarm firing now
            self._recorded_after_close(answer)  # (after close) holds it, in the ring
            return
        for seal in self._seals:
            seal.arrived.append(answer)
            seal.event.set()

    def _count_unfed_drop(self) -> None:
        """The oldest request kept aside with no row fed leaves the full buffer: counted (the
        bundles of the answers held then name it), logged at the first."""
        self.unfed_dropped += 1
        if self.on_dropped is not None:
            self.on_dropped("unfed_overflow")
        drops = self._unfed_drops
        while drops and drops[0][0] < self._held_from:  # before every answer held: in no bundle
            drops.popleft()
        if drops and drops[-1][0] == self._fed:
            drops[-1][1] += 1
        else:
            drops.append([self._fed, 1])
        if self.unfed_dropped == 1:
            log.warning(
                "integrity incidents of %s: more than %d requests that fed nothing to the alarm "
                "(every row kept out of it, or signed and never judged) kept aside for incident "
                "bundles; the oldest are pushed out, counted (%s, reason unfed_overflow), and a "
                "bundle whose signed batches held them names how many (settle.unfed_dropped) "
                "and shows them as gaps",
                self.model,
                self._unfed.maxlen,
                "fides_integrity_incident_requests_dropped_total",
                extra={"model": self.model},
            )

    def _unfed_dropped_since(self, held_from: int) -> int:
        """Requests with no row fed pushed out of the buffer since the fed answer numbered
        ``held_from`` was recorded (the oldest a bundle holds, or a lower bound of it)."""
        return sum(n for at, n in self._unfed_drops if at >= held_from)

    def _recorded_after_close(self, answer: IncidentAnswer) -> None:
        self.after_close += 1
        if self.on_dropped is not None:
            self.on_dropped("after_close")
        log.warning(
            "integrity incidents of %s: request %s (signed by the enclave) recorded after the "
            "incident record closed (the gateway shuts down or the model unloads, past the wait "
            "for the requests in flight): no bundle sealed at the close holds it",
            self.model,
            answer.request_id,
            extra={"model": self.model, "request_id": answer.request_id},
        )

    def boot(self, module_id: str, document: bytes) -> None:
        """The attestation document of enclave boot ``module_id``: each boot whose evidence the
        gateway checked (the pipeline's, after every enclave call), so the document of the boot
        that signed an answer is here even when the enclave has restarted since. An answer is
        matched to its boot by the module id its evidence names; one whose boot has no document
        here, or none whose validity covers the answer's signed time, is left out of a bundle,
        counted (``answers_left_out``) and logged. Called for the boot signing now: when its
        newest document nears its certificate's end, the enclave is attested again."""
        if self._seen.get(module_id) is not document:  # once per document, not per call
            self._seen[module_id] = document
            if not any(d == document for d in self.attestations.get(module_id, ())):
                self._keep_document(module_id, document)
        due = self._renew_at.get(module_id)
        if due is not None and not self._renewing and time.time() >= due:
            self._renew(module_id)

    def _keep_document(self, module_id: str, document: bytes) -> None:
        window = attestation_window(document)
        if window is None:  # no answer can be dated within it: it would only fail a check
            log.warning(
                "integrity incidents of %s: an attestation document of enclave boot %s does "
                "not decode (its certificate chain's validity cannot be read): not kept",
                self.model,
                module_id,
                extra={"model": self.model},
            )
            return
        held = self._validity.get(module_id, [])
        if held and window is not None and all(w is not None and window[1] <= w[1] for w in held):
            return  # covers no time the documents held do not (a re-attestation, same leaf)
        docs = self.attestations.setdefault(module_id, [])
        validity = self._validity.setdefault(module_id, [])
        docs.append(document)
        validity.append(window)
        while len(docs) > MAX_DOCUMENTS:  # the boot's oldest document first
            del docs[0], validity[0]
        if window is not None:
            lo, hi = window
            self._renew_at[module_id] = hi - (hi - lo) * RENEW_FRACTION
        while len(self.attestations) > MAX_BOOTS:  # the oldest boot first
            oldest = next(iter(self.attestations))
            del self.attestations[oldest], self._validity[oldest]
            self._renew_at.pop(oldest, None)
            self._seen.pop(oldest, None)

    def _renew(self, module_id: str) -> None:
        window = next((w for w in reversed(self._validity[module_id]) if w is not None), None)
        life = 0.0 if window is None else window[1] - window[0]
        # once per retry interval: an enclave that hands out the same certificate again
        # (not near enough its end for it) is asked later, not on every call
        self._renew_at[module_id] = time.time() + max(60.0, life / 64)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._renewing = True
        task = loop.create_task(self._renew_document(module_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renew_document(self, module_id: str) -> None:
        try:
            doc = await self._attest(secrets.token_bytes(32))
            _, claims = decode_attestation(doc)
            if claims["module_id"] == module_id:  # else the enclave restarted: a new boot
                self._keep_document(module_id, doc)
                log.info(
                    "integrity incidents of %s: enclave boot %s attested again (its "
                    "certificate nears its end; answers are proven within its validity)",
                    self.model,
                    module_id,
                    extra={"model": self.model},
                )
        except Exception as exc:  # noqa: BLE001 - retried later; serving goes on
            log.warning(
                "integrity incidents of %s: could not attest enclave boot %s again: %s",
                self.model,
                module_id,
                exc,
                extra={"model": self.model},
            )
        finally:
            self._renewing = False

    def forget(self, scope: str, client: str | None = None) -> None:
        """After an admin reset of ``scope`` (``model``, ``key`` with ``client``, ``all``): the
        answers that drove the old alarm leave the ring, so the next bundle holds only answers
        the restarted statistic has seen (it could otherwise prove a later alarm with the
        earlier incident's answers)."""
        for held in (self.ring, self._spill, self._unfed):
            kept = [a for a in held if scope == "key" and a.client != client]
            held.clear()
            held.extend(kept)
        if not self.ring and not self._spill:  # (a key's reset: _held_from stays a lower bound)
            self._held_from = self._fed + 1

    def fired(self, scopes: list[str], client: str, drill: dict[str, Any] | None = None) -> None:
        """The alarm just fired on ``scopes``: snapshot the ring now; seal (wait for the
        requests of its signed batches still being judged, at most ``settle_s``), build and
        write the bundle(s) in the background: nothing here waits. ``drill``: the attack drill
        active then (the bundle says so: an exercise, not an incident)."""
        now = datetime.now(UTC)
        live = self.alarm.status()
        if self._closing:
            log.warning(
                "integrity alarm of %s fired while the gateway shuts down: its bundle is "
                "written at once, without waiting for the requests of its signed batches "
                "still being judged (they show as gaps)",
                self.model,
                extra={"model": self.model},
            )
        seal = _Seal()
        self._seals.append(seal)
        task = asyncio.get_running_loop().create_task(
            self._seal_and_write(
                scopes,
                client,
                now,
                list(self.ring),
                [*self._spill, *self._unfed],
                seal,
                live,
                drill,
                self._unfed_dropped_since(self._held_from),
            )
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _seal_and_write(
        self,
        scopes: list[str],
        client: str,
        now: datetime,
        ring: list[IncidentAnswer],
        spill: list[IncidentAnswer],
        seal: _Seal,
        live: dict[str, Any],
        drill: dict[str, Any] | None,
        unfed_dropped: int = 0,
    ) -> None:
        try:
            # the widest scope's answers say which batches to wait for (a key's bundle then
            # takes its own requests among them)
            held = ring if "model" in scopes else [a for a in ring if a.client == client]
            # the other clients' requests in the ring are judged already: of the signed
            # batches a key's requests are in, they are not waited for (nor bundled: below)
            others = [] if "model" in scopes else [a for a in ring if a.client != client]
            extra, settle = await self._settle(held, [*spill, *others], seal)
        except Exception:  # noqa: BLE001 - sealed as it stands rather than not at all
            log.exception("integrity incident of %s: waiting for its batches failed", self.model)
            extra, settle = [], {"waited_s": 0.0, "bound_s": self.settle_s, "missing": None}
        finally:
            self._seals.remove(seal)
        # requests with no row fed pushed out of the buffer while the answers held were
        # recorded: gaps of the bundle if its batches held them (the gateway's word)
        settle["unfed_dropped"] = unfed_dropped
        for scope in scopes:
            who = None if scope == "model" else client
            answers = [a for a in [*ring, *extra] if who is None or a.client == who]
            await self._write(scope, who, now, answers, live, drill, settle)

    async def _settle(
        self, held: list[IncidentAnswer], spill: list[IncidentAnswer], seal: _Seal
    ) -> tuple[list[IncidentAnswer], dict[str, Any]]:
        """The answers to add to ``held``: those of ``spill`` (pushed out of the ring before the
        alarm, kept aside with no row fed, or, for a key, the other clients' in the ring) and
        those recorded after it, of the signed batches ``held`` holds or spans, waiting for
        them at most ``settle_s``; and what the wait was (``settle``)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        places = await asyncio.to_thread(_places, held)
        batches = _Batches(places)
        extra: list[IncidentAnswer] = []

        def take(answers: Sequence[IncidentAnswer], at: Sequence[SignedPlace | None]) -> None:
            for a, p in zip(answers, at, strict=True):
                if batches.wants(p):
                    assert p is not None
                    batches.add(p)
                    extra.append(a)

        take(spill, await asyncio.to_thread(_places, spill))
        deadline = start + self.settle_s
        while True:
            new, seal.arrived = seal.arrived, []
            seal.event.clear()
            # a few requests: on the loop; many (heavy load): off it
            take(new, _places(new) if len(new) <= 32 else await asyncio.to_thread(_places, new))
            left = deadline - loop.time()
            if not batches.missing() or left <= 0 or self._closing:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seal.event.wait(), left)
        return extra, {
            "waited_s": round(loop.time() - start, 3),
            "bound_s": self.settle_s,
            "missing": batches.missing(),
        }

    async def _write(
        self,
        scope: str,
        client: str | None,
        now: datetime,
        answers: list[IncidentAnswer],
        live: dict[str, Any],
        drill: dict[str, Any] | None = None,
        settle: dict[str, Any] | None = None,
    ) -> None:
        ident = None
        try:
            # thousands of evidences to decode: off the event loop
            places = await asyncio.to_thread(_places, answers)
            needed = {p.module_id for p in places if p is not None} - set(self.attestations)
            if needed:  # the running boot's document, attested now (a client with no `attested`)
                nonce = secrets.token_bytes(32)
                doc = await self._attest(nonce)
                _, claims = decode_attestation(doc)
                self._keep_document(claims["module_id"], doc)
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
                attestations={m: list(d) for m, d in self.attestations.items()},
                answers=answers,
                live={"stream": stream, "threshold": live["threshold"]},
            )
            ident = self._new_id(now, client)
            bundle["id"] = ident
            bundle["instance"] = self.instance
            bundle["drill"] = drill  # the gateway's word: an exercise, not a provider's fault
            # the gateway's word on its wait for the requests being judged when it fired
            bundle["settle"] = settle
            await asyncio.to_thread(self._store, ident, bundle)
            left_out = bundle["answers_left_out"]
            if left_out["no_attestation"]:
                log.warning(
                    "integrity incident %s of %s: %d signed requests left out: no attestation "
                    "document of the enclave boot that signed them (the last %d boots' kept)",
                    ident,
                    self.model,
                    left_out["no_attestation"],
                    MAX_BOOTS,
                    extra={"model": self.model, "incident": ident},
                )
            if left_out["outside_attestation"]:
                log.warning(
                    "integrity incident %s of %s: %d signed requests left out: signed outside "
                    "the validity of every attestation document kept of their boot",
                    ident,
                    self.model,
                    left_out["outside_attestation"],
                    extra={"model": self.model, "incident": ident},
                )
            if settle and settle.get("missing"):
                log.warning(
                    "integrity incident %s of %s: %s requests of its signed batches (or of "
                    "batches within their span) not judged within %.1f s: the bundle shows "
                    "them as gaps",
                    ident,
                    self.model,
                    settle["missing"],
                    self.settle_s,
                    extra={"model": self.model, "incident": ident},
                )
            if settle and settle.get("unfed_dropped"):
                log.warning(
                    "integrity incident %s of %s: %d requests that fed nothing to the alarm "
                    "were pushed out of the %d kept aside while its answers were recorded: "
                    "those of its signed batches are among its gaps",
                    ident,
                    self.model,
                    settle["unfed_dropped"],
                    self._unfed.maxlen,
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
        finally:
            if ident is not None:
                self._reserved.discard(ident)

    def _new_id(self, now: datetime, client: str | None) -> str:
        """``<time>-<scope>[-n]@<instance>``, never given before for the life of the state
        directory (of the process without one): an exported or referenced id names one bundle
        only, though the bounds pruned it. This instance's ids only grow: within a second, ``n``
        follows the last id's (whatever its scope); a clock set back keeps the last id's second
        (the bundle's ``raised_at`` is the time). The last id is kept on disk beside the
        bundles (:meth:`_remember`); another instance's carry its own name."""
        stamp = f"{now:%Y%m%dT%H%M%SZ}"
        n = 1
        last = self._last_id()
        if last is not None and last[:16] >= stamp:
            stamp, n = last[:16], _age(last)[1] + 1
        taken = set(self._ids()) | self._reserved
        base = f"{stamp}-{client or 'model'}"
        ident = f"{base}@{self.instance}" if n == 1 else f"{base}-{n}@{self.instance}"
        while ident in taken:  # a file no record of ours names (written by hand, say)
            n += 1
            ident = f"{base}-{n}@{self.instance}"
        self._last = ident
        self._reserved.add(ident)
        return ident

    def _last_id(self) -> str | None:
        """The newest id this instance gave: in memory once known; at the first bundle, the
        one :meth:`_remember` kept on disk or the newest of this instance's bundles kept,
        whichever is newer."""
        if self._last is not None:
            return self._last
        d = self._dir()
        if d is None:
            return None
        found = [i for i in self._ids() if i.endswith(f"@{self.instance}")]
        with contextlib.suppress(OSError, UnicodeDecodeError):
            kept = (d / f".last-id@{self.instance}").read_text().strip()
            if ID_PATTERN.fullmatch(kept) and kept.endswith(f"@{self.instance}"):
                found.append(kept)
        self._last = max(found, key=_age, default=None)
        return self._last

    def _remember(self, d: Path, ident: str) -> None:
        """Keep ``ident`` as this instance's last id (``.last-id@<instance>``, written
        atomically) before its bundle is written: after a restart no id is given again, even
        with every bundle pruned or deleted."""
        marker = d / f".last-id@{self.instance}"
        tmp = marker.with_name(marker.name + ".tmp")
        try:
            with tmp.open("w") as fh:
                fh.write(ident + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, marker)
        except OSError as exc:  # the bundle is still written; ids stay unique while it runs
            tmp.unlink(missing_ok=True)
            log.error(
                "integrity incidents of %s: the last id given (%s) not kept in %s: %s (after a "
                "restart within the same second an id may be given again)",
                self.model,
                ident,
                marker,
                exc,
                extra={"model": self.model},
            )

    # -- storage ----------------------------------------------------------------------------

    def _dir(self) -> Path | None:
        return None if self.directory is None else self.directory / self.model

    def _ids(self) -> list[str]:
        """Every bundle kept, of every instance sharing the directory, oldest first."""
        d = self._dir()
        if d is None:
            with self._storing:
                return list(self._memory)  # as written
        if not d.is_dir():
            return []
        # by time, then -n as a number (a plain sort puts "-2@i" before "@i" and "-10" before
        # "-2"): the newest listed last, which `fides incident export` takes by default
        return sorted((p.stem for p in d.glob("*.json") if ID_PATTERN.fullmatch(p.stem)), key=_age)

    def _store(self, ident: str, bundle: dict[str, Any]) -> None:
        data = json.dumps(bundle).encode()
        with self._storing:
            d = self._dir()
            if d is None:
                own = list(self._memory_bytes.items())  # oldest first: as written
                for i in self._make_room(ident, own, len(data)):
                    del self._memory[i], self._memory_bytes[i]
                self._memory[ident], self._memory_bytes[ident] = bundle, len(data)
                while len(self._memory) > self.max_incidents:
                    oldest = next(iter(self._memory_bytes))
                    del self._memory[oldest], self._memory_bytes[oldest]
                return
            d.mkdir(parents=True, exist_ok=True)
            self._remember(d, max(ident, self._last or ident, key=_age))
            # a write cut short (a crash, a full disk) left its temp file: this instance's only
            for stale in d.glob(f".*@{glob_escape(self.instance)}.json.tmp"):
                stale.unlink(missing_ok=True)
            self._sweep()  # and a crashed peer's, an hour old
            for i in self._make_room(ident, self._own(d), len(data)):
                (d / f"{i}.json").unlink(missing_ok=True)
            tmp = d / f".{ident}.json.tmp"  # the id names this instance: no other writes it
            try:
                with tmp.open("wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, d / f"{ident}.json")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            old = {i for i, _ in self._own(d)[: -self.max_incidents]}
            rest = [i for i in self._ids() if i not in old]
            old.update(rest[: -self.max_incidents * SHARED_FACTOR])
            for i in old:
                (d / f"{i}.json").unlink(missing_ok=True)

    def _own(self, d: Path) -> list[tuple[str, int]]:
        """This instance's bundles in ``d`` with their sizes in bytes, oldest first: in the
        order written (their ids too: an instance's ids only grow, :meth:`_new_id`)."""
        own = []
        for ident in self._ids():
            if ident.endswith(f"@{self.instance}"):
                with contextlib.suppress(FileNotFoundError):
                    st = (d / f"{ident}.json").stat()
                    own.append((st.st_mtime_ns, _age(ident), ident, st.st_size))
        return [(ident, size) for *_, ident, size in sorted(own)]

    def _make_room(self, ident: str, own: list[tuple[str, int]], size: int) -> list[str]:
        """Which of this instance's bundles ``own`` (oldest first, with their sizes) to delete
        so that they and the new bundle ``ident`` of ``size`` bytes take at most ``max_bytes``:
        the oldest first; all of them when the new one alone is over it (it is still kept)."""
        total = sum(n for _, n in own) + size
        drop = []
        for i, n in own:
            if total <= self.max_bytes:
                break
            drop.append(i)
            total -= n
        if size > self.max_bytes:
            log.warning(
                "integrity incident %s of %s: its bundle alone is %.1f MiB, over the bound of "
                "%.1f MiB (FIDES_INTEGRITY_INCIDENTS_MAX_MB) on this instance's bundles of the "
                "model: kept, and every older bundle of this instance deleted (%d)",
                ident,
                self.model,
                size / 2**20,
                self.max_bytes / 2**20,
                len(drop),
                extra={"model": self.model, "incident": ident},
            )
        elif drop:
            log.info(
                "integrity incidents of %s: %d oldest bundles of this instance deleted (%.1f "
                "MiB) to keep them within %.1f MiB (FIDES_INTEGRITY_INCIDENTS_MAX_MB) with %s",
                self.model,
                len(drop),
                sum(n for i, n in own if i in drop) / 2**20,
                self.max_bytes / 2**20,
                ident,
                extra={"model": self.model, "incident": ident},
            )
        return drop

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
                    "instance": ident.partition("@")[2] or None,
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
        if not ID_PATTERN.fullmatch(ident):
            raise NotFound(f"model '{self.model}': '{ident}' is not an incident id")
        d = self._dir()
        if d is None:
            with self._storing:
                bundle_kept = self._memory.get(ident)
            if bundle_kept is None:
                raise NotFound(f"model '{self.model}': no incident '{ident}'")
            return bundle_kept
        path = d / f"{ident}.json"
        if not path.is_file():
            raise NotFound(f"model '{self.model}': no incident '{ident}'")
        with path.open() as fh:
            bundle: dict[str, Any] = json.load(fh)
        return bundle

    async def close(self) -> None:
        """Seal the bundles waiting for their batches now and let those being written finish,
        those of an alarm firing meanwhile too (the gateway's shutdown, the model's unload).
        The pipeline lets its requests in flight record first (bounded); one recorded after
        this began is counted and logged with its request id (:meth:`record`)."""
        self._closing = True
        for seal in self._seals:
            seal.event.set()
        while self._tasks:  # and those a request finishing meanwhile started (an alarm fired)
            await asyncio.gather(*set(self._tasks), return_exceptions=True)

"""Incident bundles (issue 21): the proof behind a sequential integrity alarm, checkable offline
by anyone who trusts the enclave's root certificate and measurement, not the gateway.

When the alarm of a model or of one API key fires, the gateway keeps the answers that drove it
(the alarmed stream's most recent verified answers), and writes a bundle::

    {"type": "fides-incident/2", "model", "scope": "model" | "key", "client": key id or null,
     "raised_at", "verifier_output", "detector_threshold",
     "monitor": {"alpha", "delta", "calibration": {"detector": [...], "kl": [...]}},
     "attestations": {module_id: base64 attestation document, or a list of documents of
                      that boot (re-attested: a later certificate covering later answers)},
     "answers": [{"request_id", "client", "module_id", "evidence": base64 per-request evidence,
                  "rows": [row indices fed to the alarm], "service": [[p...] per row],
                  "detector": [score per row], "kl": [KL per row],
                  "excluded": {reason: [row indices the gateway kept out of the alarm]}}],
     "trajectory": [the statistic after each row, in signing order, from zero at the first],
     "answers_left_out": {"no_attestation": n, "outside_attestation": n},
     "live": {the gateway's statistic when it fired, over the whole stream},
     "drill": the attack drill active when it fired (an exercise), or null,
     "id", "instance": the gateway instance that wrote it,
     "settle": {"waited_s", "bound_s", "missing", "unfed_dropped"}: how long it waited for the
               requests of its signed batches still being judged, how many it still missed,
               and how many requests that fed nothing were pushed out of the gateway's buffer
               while its answers were recorded (unsigned)}

What :func:`check_incident` proves from it:

- each enclave boot is attested (chain to the pinned root, a measurement the policy expects),
  by a document whose certificate chain is valid at the VERIFICATION time (``at``: now
  unless the checker names a time), never at a time the bundle claims: a document under a
  leaked or expired key, dated back to when its certificate was valid, is refused
  (:class:`AttestationExpired`, which names the way out: an explicit ``at`` for an auditor
  who trusts the chain as of an earlier time). A boot's earlier documents (re-attested under
  a renewed certificate) may have expired: they bind the same boot and key as its current
  one, and date its earlier answers;
- every document is genuine as of its own date, which lies in its chain's validity and not
  after the verification time; every signed answer was signed within the validity of one of
  its boot's documents' chains and not after the verification time
  (:class:`AttestationTimeError`). The answers' dates are the enclave key's word: these
  checks bound them to the times the platform certified the boot, no more;
- each answer's verifier output ``q`` is the one the attested enclave signed for that request id
  (signature, boot, measurement, Merkle proof into the signed batch);
- KL(service || verifier) is recomputed from the recorded service answers and the SIGNED ``q``;
  the detector scores are recomputed too when the checker has the detector (the SDK does, from
  the repository's detector model), otherwise they are the gateway's and the check says so;
- the statistic is recomputed from those scores and the calibration in the enclave's signing
  order (:func:`signing_order`), from zero at the first answer, and must reach the alarm
  threshold within the bundle in that order; the level is the checker's (a bundle claiming a
  looser ``alpha`` or ``delta`` than the checker accepts is refused), and the calibration the
  detector card's when the checker has the card (otherwise the bundle's, and the check says so);
- no signed answer counts twice: an answer is its signed leaf (enclave boot, signed batch
  sequence number, place in the batch), and no leaf, and no row of one, is held twice. The
  request id is the client's (it need not be unique) and only information here;
- every signed row of a request held is either fed to the statistic or named by the gateway as
  kept out of the alarm (``excluded``: ``out_of_distribution``, ``invalid_answer`` when the
  service's answer was not numbers, ``enclave_timeout`` or ``not_judged`` when the enclave
  signed a request the gateway never judged), the gateway's word, which the check counts and
  reports: a request's rows cannot be picked.

What it does not prove: that the answers are every answer of the stream over that stretch. A
gateway could leave requests out, whole signed batches or requests of a batch (the check reports
the requests held out of those their signed batches hold, and the batches held out of the span
of sequence numbers they cover, so gaps show; a key's alarm has them by nature: other clients'
requests; the requests the gateway says it left out, ``answers_left_out``, are reported as its
word); and clients choose their inputs, so a client that picks inputs the detector finds
unusual can push an honest stream toward an alarm (docs/integrity.md, "What the alarm assumes").

Nor does it prove that the provider served exactly these service answers. The recorded
``service`` rows are what the gateway saw; a client holding its own responses compares them
(the request ids tie both together). Binding the provider to its answers needs the provider to
sign them, which the Open Inference Protocol does not do.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy as np
from cryptography import x509

from fides_core import cose
from fides_core.attestation import (
    AttestationError,
    AttestedEnclave,
    Policy,
    check_verification,
    decode_attestation,
    decode_result_evidence,
    verify_attestation,
)
from fides_core.integrity import INVALID_ANSWER, OUT_OF_DISTRIBUTION
from fides_core.plain_cbor import check_plain
from fides_core.sequential import SequentialDetector, calibrate_scores
from fides_core.stats import kl_divergence

__all__ = [
    "ENCLAVE_TIMEOUT",
    "EXCLUDED_REASONS",
    "INCIDENT_TYPE",
    "LEFT_OUT_REASONS",
    "LEGACY_TYPE",
    "MAX_ALPHA",
    "MAX_DELTA",
    "NOT_JUDGED",
    "UNLISTED",
    "AttestationExpired",
    "AttestationTimeError",
    "IncidentAnswer",
    "IncidentCheck",
    "IncidentError",
    "SignedPlace",
    "alarm_detector",
    "attestation_window",
    "build_bundle",
    "calibration_fingerprint",
    "check_incident",
    "evidence_module_id",
    "signed_place",
    "signing_order",
]

INCIDENT_TYPE = "fides-incident/2"
# bundles written before 2026-12-07 list no `excluded` rows: their unlisted rows are a gap
# reported under UNLISTED (not a refusal), and their answers were recorded in stream order
LEGACY_TYPE = "fides-incident/1"
UNLISTED = "unlisted_in_a_version_1_bundle"
TAILS: dict[str, tuple[Any, ...]] = {"detector": ("upper",), "kl": ("upper", "lower")}
TRAJECTORY_RTOL = 1e-9
KL_RTOL = 1e-6
SCORE_ATOL = 1e-4  # the detector recomputed on another CPU: float32 rounding, not tampering
# the loosest level a check accepts by default: the gateway's (integrity.alarm_alpha, and the
# calibration risk delta of gateway.integrity.alarm.AlarmMonitor)
MAX_ALPHA = 1e-5
MAX_DELTA = 1e-5
# why the gateway kept a signed row out of the alarm (its word: the checker cannot recompute
# it): the novelty check found the input unlike the calibration's, or the service's answer was
# not numbers (no detector score); or the request was never judged though the enclave signed
# it: the gateway stopped waiting for the enclave (answered without a verdict), or the request
# failed or was cancelled before judging (its service answer failed, its client went away)
ENCLAVE_TIMEOUT = "enclave_timeout"
NOT_JUDGED = "not_judged"
EXCLUDED_REASONS = (OUT_OF_DISTRIBUTION, INVALID_ANSWER, ENCLAVE_TIMEOUT, NOT_JUDGED)
MAX_DOCUMENTS = 8  # attestation documents of one boot a bundle may carry (re-attestations)
# why the gateway left a request out of a bundle (``answers_left_out``, its word): no
# attestation document of the boot that signed it (or evidence naming none), or signed outside
# the validity of every document of its boot kept
LEFT_OUT_REASONS = ("no_attestation", "outside_attestation")


class IncidentError(Exception):
    """The bundle does not prove the alarm; ``part`` names what is broken (``format``,
    ``calibration``, ``attestation <module>``, ``answer <i> (request <id>)``, ``statistic``)."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(f"{part}: {message}")
        self.part = part


class AttestationTimeError(IncidentError):
    """The bundle's times do not fit its attestations: an answer signed outside its boot's
    attestation validity or after the verification time, a document dated outside its own
    chain's validity or after the verification time, or a chain not yet valid then."""


class AttestationExpired(AttestationTimeError):
    """A certificate of an attestation's chain is no longer valid at the verification time
    (default now): the bundle is older than its certificates' lifetime, or the document was
    made under an expired (or leaked) key and dated back to when it was valid. An auditor who
    trusts the chain as of an earlier time re-checks with that time named explicitly
    (``fides incident verify --at``, ``verify_incident(at=...)``)."""


def _utc(seconds: float) -> str:
    try:
        return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:.0f} s since 1970"


def _chain_window(certificate: bytes, cabundle: Sequence[bytes]) -> tuple[float, float]:
    """[not before, not after] (seconds since 1970) in which every certificate of a
    document's chain is valid: its leaf and cabundle. Raises ValueError when one does not
    parse."""
    certs = [x509.load_der_x509_certificate(bytes(d)) for d in (certificate, *cabundle)]
    return (
        max(c.not_valid_before_utc.timestamp() for c in certs),
        min(c.not_valid_after_utc.timestamp() for c in certs),
    )


def attestation_window(document: bytes) -> tuple[float, float] | None:
    """The validity of an attestation document: the time (seconds since 1970) in which every
    certificate of its chain is valid; None when it does not decode. Unverified: for the
    gateway, choosing which of a boot's documents covers an answer (the check verifies)."""
    try:
        _, claims = decode_attestation(document)
        return _chain_window(claims["certificate"], claims["cabundle"])
    except (AttestationError, ValueError, TypeError):
        return None


def alarm_detector(
    calibration_scores: np.ndarray, calibration_kl: np.ndarray, alpha: float, delta: float
) -> SequentialDetector:
    """The alarm's e-detector over the detector score (upper tail) and KL(service || verifier)
    (both tails), calibrated on clean answers: the gateway's and the checker's, the same."""
    return SequentialDetector(
        {
            "detector": calibrate_scores(calibration_scores, delta),
            "kl": calibrate_scores(calibration_kl, delta),
        },
        TAILS,
        alpha=alpha,
    )


def calibration_fingerprint(
    calibration_scores: np.ndarray, calibration_kl: np.ndarray, detector: SequentialDetector
) -> str:
    """16 hex naming the calibration and level (a persisted alarm state is only restored
    under the same)."""
    delta = next(iter(detector.calibrations.values())).delta
    return hashlib.sha256(
        np.ascontiguousarray(np.sort(calibration_scores), dtype=np.float64).tobytes()
        + np.ascontiguousarray(np.sort(calibration_kl), dtype=np.float64).tobytes()
        + json.dumps([detector.alpha, delta, len(detector.components)]).encode()
    ).hexdigest()[:16]


@dataclass(frozen=True)
class SignedPlace:
    """Where the enclave signed one answer: its boot, its batch's sequence number and signed
    timestamp, and its place (Merkle leaf index) among the batch's ``count`` requests. The
    triple (module_id, seq, index) names one signed leaf: the identity of an answer."""

    module_id: str
    seq: int
    index: int
    timestamp_ms: int
    count: int


def signed_place(evidence: bytes) -> SignedPlace | None:
    """The place a per-request evidence names (unverified: for the gateway, which checked it
    when the enclave answered; :func:`check_incident` takes it from the checked result)."""
    try:
        doc = decode_result_evidence(evidence)
        _, payload = cose.split_sign1(doc["result"], alg=None)
        check_plain(payload, what="the verification result payload")
        result = cbor2.loads(payload)
        place = SignedPlace(
            result.get("module_id"),
            result.get("seq"),
            doc["entry"]["index"],
            result.get("timestamp"),
            result.get("count"),
        )
    except (AttestationError, cose.CoseError, ValueError, AttributeError, cbor2.CBORDecodeError):
        return None
    if not isinstance(place.module_id, str) or not all(
        isinstance(v, int) and not isinstance(v, bool)
        for v in (place.seq, place.index, place.timestamp_ms, place.count)
    ):
        return None
    return place


def evidence_module_id(evidence: bytes) -> str | None:
    """The enclave boot a per-request evidence names (unverified: for choosing the key)."""
    place = signed_place(evidence)
    return None if place is None else place.module_id


def signing_order(places: Sequence[SignedPlace]) -> list[int]:
    """The positions of ``places`` in the enclave's signing order: the answers of one enclave
    boot by signed batch sequence number, then by place in the batch (the order the enclave
    fixed when it signed, before any answer was scored); the boots one after the other, in the
    order of their earliest signed timestamp among ``places`` (ties: by module id). The gateway
    builds a bundle in this order and the checker recomputes the statistic in it."""
    first: dict[str, int] = {}
    for p in places:
        first[p.module_id] = min(first.get(p.module_id, p.timestamp_ms), p.timestamp_ms)
    return sorted(
        range(len(places)),
        key=lambda i: (
            first[places[i].module_id],
            places[i].module_id,
            places[i].seq,
            places[i].index,
        ),
    )


@dataclass(frozen=True)
class IncidentAnswer:
    """One verified request's part in an alarmed stream: the rows fed to the alarm, and the
    others by why the gateway kept them out (``excluded``, reason -> row indices)."""

    request_id: str  # the client's (need not be unique): information, not identity
    client: str
    evidence: bytes
    rows: np.ndarray  # [m] row indices of the request fed to the alarm
    service: np.ndarray  # [m, C] float32, the service's answer as the gateway saw it
    detector: np.ndarray  # [m] detector scores
    kl: np.ndarray  # [m] KL(service || verifier)
    excluded: Mapping[str, np.ndarray] = field(default_factory=dict)  # EXCLUDED_REASONS


def build_bundle(
    *,
    model: str,
    scope: str,
    client: str | None,
    raised_at: str,
    verifier_output: str,
    detector_threshold: float,
    calibration_scores: np.ndarray,
    calibration_kl: np.ndarray,
    alpha: float,
    delta: float,
    attestations: Mapping[str, bytes | Sequence[bytes]],
    answers: Sequence[IncidentAnswer],
    live: Mapping[str, Any],
) -> dict[str, Any]:
    """The bundle (a JSON-able dict) over ``answers``, put in the enclave's signing order
    (:func:`signing_order`: the gateway records answers as they finish judging, which under
    concurrent load is another order). ``attestations``: each boot's document, or its
    documents (re-attestations); an answer takes the one whose validity covers its signed
    time (:func:`attestation_window`; the latest such; one that does not decode only when no
    readable one does), and each boot's document valid latest is carried too (a check at a
    time past the chosen ones' validity needs it: a boot re-attested under a renewed
    certificate after its answers were signed). Answers of a boot with no document
    are left out and counted (``no_attestation``), and so are answers signed outside the
    validity of every document of their boot (``outside_attestation``: a check refuses them)."""
    documents: dict[str, list[tuple[bytes, tuple[float, float] | None]]] = {}
    for module, docs in attestations.items():
        listed = [docs] if isinstance(docs, bytes | bytearray) else list(docs)
        documents[module] = sorted(  # the latest validity first; one that does not decode
            # last (taken only for an answer no readable one covers: the check names it)
            ((bytes(d), attestation_window(bytes(d))) for d in listed),
            key=lambda dw: (dw[1] is None, -dw[1][1] if dw[1] is not None else 0.0),
        )
    placed, unattested, outside = [], 0, 0
    chosen: dict[str, dict[bytes, float]] = {}  # module -> document -> its validity's start
    for a in answers:
        place = signed_place(a.evidence)
        if place is None or not documents.get(place.module_id):
            unattested += 1
            continue
        t = place.timestamp_ms / 1000
        doc = next(
            ((d, w) for d, w in documents[place.module_id] if w is None or w[0] <= t <= w[1]),
            None,
        )
        if doc is None:
            outside += 1
            continue
        chosen.setdefault(place.module_id, {})[doc[0]] = -math.inf if doc[1] is None else doc[1][0]
        placed.append((place, a))
    kept = [(placed[i][0].module_id, placed[i][1]) for i in signing_order([p for p, _ in placed])]
    detector = alarm_detector(calibration_scores, calibration_kl, alpha, delta)
    state = detector.new_state()
    trajectory: list[float] = []
    for _, a in kept:
        if len(a.rows):
            trajectory += detector.update(state, {"detector": a.detector, "kl": a.kl})
    used = sorted({m for m, _ in kept})

    def encoded(module: str) -> str | list[str]:
        # the boot's document valid latest too (room permitting), though it covers no answer:
        # a check runs at the verification time, which may lie past the chosen ones' validity
        # (a boot re-attested under a renewed certificate after its answers were signed)
        starts = dict(chosen[module])
        latest = documents[module][0]
        if latest[1] is not None and latest[0] not in starts and len(starts) < MAX_DOCUMENTS:
            starts[latest[0]] = latest[1][0]
        docs = sorted(starts, key=lambda d: starts[d])
        b64 = [base64.b64encode(d).decode("ascii") for d in docs]
        return b64[0] if len(b64) == 1 else b64

    return {
        "type": INCIDENT_TYPE,
        "model": model,
        "scope": scope,
        "client": client,
        "raised_at": raised_at,
        "verifier_output": verifier_output,
        "detector_threshold": detector_threshold,
        "monitor": {
            "alpha": alpha,
            "delta": delta,
            "threshold": detector.threshold,
            "fingerprint": calibration_fingerprint(calibration_scores, calibration_kl, detector),
            "calibration": {
                "detector": [float(x) for x in np.asarray(calibration_scores, np.float64)],
                "kl": [float(x) for x in np.asarray(calibration_kl, np.float64)],
            },
        },
        "attestations": {m: encoded(m) for m in used},
        "answers": [
            {
                "request_id": a.request_id,
                "client": a.client,
                "module_id": module,
                "evidence": base64.b64encode(a.evidence).decode("ascii"),
                "rows": [int(r) for r in a.rows],
                "service": [[float(v) for v in row] for row in np.asarray(a.service, np.float32)],
                "detector": [float(x) for x in np.asarray(a.detector, np.float64)],
                "kl": [float(x) for x in np.asarray(a.kl, np.float64)],
                "excluded": {
                    why: [int(r) for r in rows] for why, rows in a.excluded.items() if len(rows)
                },
            }
            for module, a in kept
        ],
        "answers_left_out": {"no_attestation": unattested, "outside_attestation": outside},
        "trajectory": trajectory,
        "peak": max(trajectory, default=0.0),
        "live": dict(live),
    }


@dataclass(frozen=True)
class IncidentCheck:
    """What an incident bundle proved."""

    model: str
    scope: str
    client: str | None
    requests: int  # signed requests held (each its own signed leaf; client ids may repeat)
    answers: int  # rows fed to the statistic
    modules: list[str]
    simulated: bool
    threshold: float
    peak: float  # the recomputed statistic's largest value (>= threshold)
    alarm_at: int  # the row (1-based, within the bundle) where it first reached the threshold
    scores_recomputed: bool  # the detector scores came from our detector, not the gateway
    calibration_pinned: bool = False  # the calibration is the detector card's, not the bundle's
    alpha: float = 0.0  # the false-alarm level the statistic was checked at
    signed_batches: int = 0  # distinct (boot, signed batch) the answers come from
    batch_span: int = 0  # the signed batches the answers' sequence numbers span, per boot
    drill: bool = False  # the gateway says an attack drill was on (unsigned)
    batch_requests: int = 0  # the requests those signed batches hold (signed counts)
    signed_rows: int = 0  # the signed rows of the requests held
    excluded: Mapping[str, int] = field(default_factory=dict)  # rows kept out, by reason
    checked_at: float = 0.0  # the verification time (s since 1970): a chain per boot valid
    at_chosen: bool = False  # the checker named that time (an auditor's), rather than now
    # requests the gateway says it left out of the bundle, by reason (``answers_left_out``,
    # LEFT_OUT_REASONS; its word: unsigned); None when the bundle does not say (older ones)
    left_out: Mapping[str, int] | None = None

    def gaps(self) -> list[str]:
        """What the bundle holds less of than the signed data shows, plainly (empty when it
        holds every request of its signed batches, every batch of their span and feeds every
        signed row): the reader judges whether a selection could have made the alarm."""
        out = []
        if self.requests < self.batch_requests:
            out.append(
                f"{self.batch_requests - self.requests} requests of the signed batches held "
                "are not in the bundle"
            )
        if self.signed_batches < self.batch_span:
            out.append(
                f"{self.batch_span - self.signed_batches} signed batches within the span are "
                "not in the bundle"
            )
        kept_out = sum(self.excluded.values())
        if kept_out:
            out.append(f"{kept_out} signed rows kept out of the alarm by the gateway's word")
        if self.left_out and sum(self.left_out.values()):
            out.append(
                f"{sum(self.left_out.values())} requests left out of the bundle by the gateway's "
                f"word ({self._left_out_reasons()})"
            )
        return out

    def _left_out_reasons(self) -> str:
        return ", ".join(
            f"{n} {reason.replace('_', ' ')}" for reason, n in (self.left_out or {}).items() if n
        )

    def summary(self) -> str:
        scores = (
            "detector scores recomputed with the repository's detector"
            if self.scores_recomputed
            else "detector scores as the gateway reported them (no detector given)"
        )
        calibration = (
            "the detector card's calibration"
            if self.calibration_pinned
            else "the calibration the bundle carries (no detector card given)"
        )
        who = f"{self.scope} {self.client}" if self.client else self.scope
        simulated = " (SIMULATED)" if self.simulated else ""
        drill = "; the gateway says an attack drill was on: an exercise" if self.drill else ""
        kept_out = ""
        if sum(self.excluded.values()):
            reasons = ", ".join(
                f"{n} {reason.replace('_', ' ')}" for reason, n in self.excluded.items() if n
            )
            kept_out = (
                f", the other {sum(self.excluded.values())} kept out of the alarm by the "
                f"gateway's word ({reasons})"
            )
        when = (
            f"at {_utc(self.checked_at)}, the time the checker chose"
            if self.at_chosen
            else f"now ({_utc(self.checked_at)})"
        )
        left_out = ""
        if self.left_out and sum(self.left_out.values()):
            left_out = (
                f"; the gateway says it left {sum(self.left_out.values())} requests out "
                f"of the bundle ({self._left_out_reasons()}): its word, not checked"
            )
        return (
            f"incident on {self.model} ({who}): {self.requests} signed requests from "
            f"{len(self.modules)} attested enclave boot(s){simulated}, {self.requests} of the "
            f"{self.batch_requests} requests their signed batches hold, {self.signed_batches} of "
            f"the {self.batch_span} signed batches their sequence numbers span; {self.answers} "
            f"answers: {self.answers} of the {self.signed_rows} signed rows of those requests"
            f"{kept_out}; the statistic recomputed from them in the enclave's signing order at "
            f"alpha {self.alpha:g} with {calibration} reaches {self.peak:.3g} >= "
            f"{self.threshold:.3g} at answer {self.alarm_at}; KL recomputed from the signed "
            f"verifier outputs; {scores}; every boot attested by a document whose "
            f"certificates are valid {when} (its earlier documents may have expired: they "
            f"date its earlier answers), every answer signed within its boot's attestation "
            f"validity{left_out}{drill}"
        )


def _b64(value: Any, part: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise IncidentError(part, f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise IncidentError(part, f"{what} is not valid base64") from None


def _floats(value: Any, part: str, what: str, ndim: int = 1) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise IncidentError(part, f"{what} must be numbers") from None
    if a.ndim != ndim or not np.isfinite(a).all():
        raise IncidentError(part, f"{what} must be a {ndim}-d array of finite numbers")
    return a


def _row_list(value: Any, n: int, part: str, what: str) -> list[int]:
    """Row indices of a request's ``n`` signed rows, strictly increasing (none twice)."""
    if not isinstance(value, list) or not all(
        isinstance(r, int) and not isinstance(r, bool) and 0 <= r < n for r in value
    ):
        raise IncidentError(part, f"'{what}' must be row indices of the {n} signed")
    if any(b <= a for a, b in zip(value, value[1:], strict=False)):
        raise IncidentError(part, f"'{what}' repeat or are out of order: no row counts twice")
    return list(value)


def _close(a: np.ndarray, b: np.ndarray, rtol: float, atol: float = 0.0) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=rtol, atol=atol))


def check_incident(
    bundle: Mapping[str, Any],
    *,
    root: x509.Certificate | bytes | str,
    policy: Policy,
    detector_scores: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    calibration: tuple[np.ndarray, np.ndarray] | None = None,
    max_alpha: float = MAX_ALPHA,
    max_delta: float = MAX_DELTA,
    at: float | dt.datetime | None = None,
) -> IncidentCheck:
    """Check ``bundle`` offline (see the module docstring); raises :class:`IncidentError`
    naming the broken part. ``detector_scores(p, q)``: the detector, to recompute the scores;
    ``calibration``: the detector card's clean ``(scores, kl)``, which the bundle's must equal
    (a provider could otherwise ship a calibration that makes anything an alarm);
    ``max_alpha`` / ``max_delta``: the loosest false-alarm level and calibration risk the
    checker accepts (the bundle's own could otherwise make clean answers an alarm).

    ``at``: the verification time (seconds since 1970 or an aware datetime; a naive one is
    UTC), default now. A chain of each boot's documents must be valid then, and nothing in the
    bundle may be dated after it (``policy.max_clock_skew_s`` allowed). A bundle older than
    its certificates' lifetime fails now with :class:`AttestationExpired`; an auditor who
    trusts the chain as of an earlier time names it here, a decision the bundle cannot make
    for them (its own times are the gateway's and the enclave key's word)."""
    if at is None:
        at_s, at_chosen = time.time(), False
    elif isinstance(at, dt.datetime):
        at_s = (at if at.tzinfo is not None else at.replace(tzinfo=dt.UTC)).timestamp()
        at_chosen = True
    else:
        at_s, at_chosen = float(at), True
    if not math.isfinite(at_s):
        raise ValueError("the verification time must be a finite time")
    skew = policy.max_clock_skew_s
    if not isinstance(bundle, Mapping) or bundle.get("type") not in (INCIDENT_TYPE, LEGACY_TYPE):
        raise IncidentError("format", f"not a {INCIDENT_TYPE} (or {LEGACY_TYPE}) bundle")
    legacy = bundle["type"] == LEGACY_TYPE
    for key, kind in (
        ("model", str),
        ("scope", str),
        ("verifier_output", str),
        ("monitor", dict),
        ("attestations", dict),
        ("answers", list),
        ("trajectory", list),
    ):
        if not isinstance(bundle.get(key), kind):
            raise IncidentError("format", f"'{key}' is missing or not a {kind.__name__}")
    if not bundle["answers"]:
        raise IncidentError("format", "the bundle holds no answers")
    left_out = _left_out(bundle)

    # the calibration and level the statistic is computed with
    mon = bundle["monitor"]
    cal = mon.get("calibration")
    if not isinstance(cal, dict):
        raise IncidentError("calibration", "'monitor.calibration' is missing")
    cal_scores = _floats(cal.get("detector"), "calibration", "calibration.detector")
    cal_kl = _floats(cal.get("kl"), "calibration", "calibration.kl")
    alpha, delta = mon.get("alpha"), mon.get("delta")
    if not all(isinstance(v, float) and 0 < v < 1 for v in (alpha, delta)):
        raise IncidentError("calibration", "alpha and delta must be numbers in (0, 1)")
    assert isinstance(alpha, float)
    assert isinstance(delta, float)
    if alpha > max_alpha or delta > max_delta:
        raise IncidentError(
            "calibration",
            f"the bundle's level (alpha {alpha:g}, delta {delta:g}) is looser than this check "
            f"accepts (alpha <= {max_alpha:g}, delta <= {max_delta:g})",
        )
    if calibration is not None and not (
        _close(np.sort(cal_scores), np.sort(np.asarray(calibration[0], np.float64)), 0.0)
        and _close(np.sort(cal_kl), np.sort(np.asarray(calibration[1], np.float64)), 0.0)
    ):
        raise IncidentError(
            "calibration", "the bundle's calibration is not the detector card's clean calibration"
        )
    try:
        detector = alarm_detector(cal_scores, cal_kl, alpha, delta)
    except ValueError as exc:
        raise IncidentError("calibration", str(exc)) from None

    # every enclave boot, attested, with the times its answers may be signed in
    attested: dict[str, AttestedEnclave] = {}
    validity: dict[str, list[tuple[float, float]]] = {}
    for module, docs_b64 in bundle["attestations"].items():
        part = f"attestation {module}"
        listed = [docs_b64] if isinstance(docs_b64, str) else docs_b64
        if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_DOCUMENTS:
            raise IncidentError(
                part, f"a boot's attestation is a document or a list of 1 to {MAX_DOCUMENTS}"
            )
        for doc_b64 in listed:
            enclave, window = _attested_at(
                _b64(doc_b64, part, "the document"), part, root, policy, at_s, at_chosen
            )
            if enclave.module_id != module:
                raise IncidentError(part, f"the document attests {enclave.module_id}, not {module}")
            first = attested.setdefault(module, enclave)
            if (
                enclave.claims["public_key"] != first.claims["public_key"]
                or enclave.measurement != first.measurement
                or enclave.simulated != first.simulated
            ):
                raise IncidentError(
                    part, "its documents attest different keys or measurements: not one boot"
                )
            validity.setdefault(module, []).append(window)
        _current_at(part, validity[module], at_s, at_chosen)

    # every answer: signed verifier output, recomputed KL (and scores)
    out = bundle["verifier_output"]
    places: list[SignedPlace] = []
    scores_all, kl_all = [], []
    held: dict[tuple[str, int, int], int] = {}  # signed leaf -> the answer holding it
    batches: dict[tuple[str, int], int] = {}  # (boot, seq) -> the requests it holds (signed)
    signed_rows = 0
    excluded = dict.fromkeys(EXCLUDED_REASONS, 0)
    for i, ans in enumerate(bundle["answers"]):
        rid = ans.get("request_id") if isinstance(ans, dict) else None
        part = f"answer {i} (request {rid})"
        if not isinstance(ans, dict) or not isinstance(rid, str):
            raise IncidentError(part, "not an answer record with a request_id")
        module = ans.get("module_id")
        if not isinstance(module, str) or module not in attested:
            raise IncidentError(part, f"its enclave boot {module!r} has no attestation here")
        evidence = _b64(ans.get("evidence"), part, "evidence")
        try:
            decode_result_evidence(evidence)
            checked = check_verification(
                evidence,
                attested=attested[module],
                inputs=None,
                nonce=None,
                request_id=rid,  # the signed entry's: the client's id, which may repeat
                max_age_s=None,
            )
        except AttestationError as exc:
            raise IncidentError(part, f"{type(exc).__name__}: {exc}") from None
        if out not in checked.outputs:
            raise IncidentError(part, f"the signed result has no output '{out}'")
        signed_at = checked.timestamp_ms / 1000
        if not any(lo <= signed_at <= hi for lo, hi in validity[module]):
            windows = ", ".join(f"{_utc(lo)} to {_utc(hi)}" for lo, hi in validity[module])
            raise AttestationTimeError(
                part,
                f"signed at {_utc(signed_at)}, outside its boot's attestation validity "
                f"({windows}): an answer is proven only within the time its boot's "
                "certificates were valid",
            )
        if signed_at > at_s + skew:
            raise AttestationTimeError(
                part, f"signed at {_utc(signed_at)}, after the verification time {_utc(at_s)}"
            )
        leaf = (module, checked.seq, checked.index)
        if leaf in held:
            raise IncidentError(
                part,
                f"the signed answer of answer {held[leaf]} again (boot {module}, batch "
                f"{checked.seq}, place {checked.index}): no answer counts twice",
            )
        held[leaf] = i
        batches[module, checked.seq] = checked.count
        places.append(
            SignedPlace(module, checked.seq, checked.index, checked.timestamp_ms, checked.count)
        )
        q_all = np.asarray(checked.outputs[out], dtype=np.float32)
        rows = _row_list(ans.get("rows"), len(q_all), part, "rows")
        kept_out = ans.get("excluded", {})
        if not isinstance(kept_out, dict) or set(kept_out) - set(EXCLUDED_REASONS):
            raise IncidentError(
                part, f"'excluded' must map {' or '.join(EXCLUDED_REASONS)} to row indices"
            )
        named = list(rows)
        for reason, listed in kept_out.items():
            kept = _row_list(listed, len(q_all), part, f"excluded.{reason}")
            excluded[reason] += len(kept)
            named += kept
        if len(set(named)) != len(named):
            raise IncidentError(part, "a row is both fed and kept out: no row counts twice")
        if len(named) != len(q_all) and legacy:  # rows it could not list: a gap, said
            excluded[UNLISTED] = excluded.get(UNLISTED, 0) + len(q_all) - len(named)
        elif len(named) != len(q_all):
            missing = sorted(set(range(len(q_all))) - set(named))
            raise IncidentError(
                part,
                f"signed rows {missing} of its {len(q_all)} are neither fed to the statistic nor "
                "kept out by the gateway: a bundle holds every signed row of its requests",
            )
        signed_rows += len(q_all)
        q = q_all[rows]
        service = ans.get("service")
        if not rows and service == []:  # every row kept out: nothing fed
            p = np.zeros(q.shape, np.float32)
        else:
            p = _floats(service, part, "service", ndim=2).astype(np.float32)
        if p.shape != q.shape:
            raise IncidentError(
                part, f"service answer {list(p.shape)} and signed verifier {list(q.shape)} differ"
            )
        kl = kl_divergence(p, q)
        if not _close(kl, _floats(ans.get("kl"), part, "kl"), KL_RTOL, 1e-12):
            raise IncidentError(part, "KL(service || verifier) does not match the signed output")
        scores = _floats(ans.get("detector"), part, "detector")
        if len(scores) != len(rows):
            raise IncidentError(part, "one detector score per row is needed")
        if detector_scores is not None and rows:
            ours = np.asarray(detector_scores(p, q), dtype=np.float64).reshape(-1)
            if not _close(ours, scores, 0.0, SCORE_ATOL):
                worst = float(np.abs(ours - scores).max())
                raise IncidentError(
                    part, f"the detector scores differ from our detector's (by up to {worst:.3g})"
                )
            scores = ours
        scores_all.append(scores)
        kl_all.append(kl)

    # the statistic, recomputed from zero at the first answer in the enclave's signing order
    # (not the bundle's listing order, nor the order the gateway's live statistic took them)
    order = signing_order(places)
    state = detector.new_state()
    trajectory = np.asarray(
        detector.update(
            state,
            {
                "detector": np.concatenate([scores_all[i] for i in order]),
                "kl": np.concatenate([kl_all[i] for i in order]),
            },
        )
    )
    recorded = _floats(bundle["trajectory"], "statistic", "trajectory")
    if detector_scores is None and not _close(trajectory, recorded, TRAJECTORY_RTOL):
        raise IncidentError("statistic", "the recorded trajectory is not what the answers give")
    if state.alarm_at is None:
        raise IncidentError(
            "statistic",
            f"recomputed from these answers the statistic peaks at {state.peak:.3g}, below the "
            f"alarm threshold {detector.threshold:.3g}: the bundle does not prove the alarm",
        )
    seqs: dict[str, set[int]] = {}
    for module, seq in batches:
        seqs.setdefault(module, set()).add(seq)
    return IncidentCheck(
        model=bundle["model"],
        scope=bundle["scope"],
        client=bundle.get("client"),
        requests=len(bundle["answers"]),
        answers=len(trajectory),
        modules=sorted(attested),
        simulated=any(e.simulated for e in attested.values()),
        threshold=detector.threshold,
        peak=state.peak,
        alarm_at=state.alarm_at,
        scores_recomputed=detector_scores is not None,
        calibration_pinned=calibration is not None,
        alpha=alpha,
        signed_batches=len(batches),
        batch_span=sum(max(v) - min(v) + 1 for v in seqs.values()),
        drill=bool(bundle.get("drill")),
        batch_requests=sum(batches.values()),
        signed_rows=signed_rows,
        excluded=excluded,
        checked_at=at_s,
        at_chosen=at_chosen,
        left_out=left_out,
    )


def _left_out(bundle: Mapping[str, Any]) -> dict[str, int] | None:
    """The requests the gateway says it left out of the bundle, by reason (its word, reported:
    none may go unsaid); None when the bundle does not say (older bundles)."""
    if "answers_left_out" not in bundle:
        return None
    said = bundle["answers_left_out"]
    if (
        not isinstance(said, dict)
        or set(said) - set(LEFT_OUT_REASONS)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in said.values())
    ):
        raise IncidentError(
            "format",
            f"'answers_left_out' must map {' or '.join(LEFT_OUT_REASONS)} to a count of requests",
        )
    return {reason: said.get(reason, 0) for reason in LEFT_OUT_REASONS}


def _attested_at(
    doc: bytes,
    part: str,
    root: x509.Certificate | bytes | str,
    policy: Policy,
    at_s: float,
    at_chosen: bool,
) -> tuple[AttestedEnclave, tuple[float, float]]:
    """One attestation document: itself (signature, chain to the pinned root, measurement,
    simulation policy) verified at its own date, which must lie in its chain's validity and
    not after the verification time ``at_s``. Its chain's validity is returned (whether it
    holds at ``at_s`` is the boot's question: :func:`_current_at`)."""
    try:
        _, claims = decode_attestation(doc)
        dated = claims["timestamp"] / 1000
        try:
            lo, hi = _chain_window(claims["certificate"], claims["cabundle"])
        except ValueError:
            lo, hi = -math.inf, math.inf  # verify_attestation names what does not parse
        if not lo <= dated <= hi:
            raise AttestationTimeError(
                part,
                f"dated {_utc(dated)}, outside its own certificate chain's validity "
                f"({_utc(lo)} to {_utc(hi)})",
            )
        enclave = verify_attestation(
            doc,
            root=root,
            policy=policy,
            nonce=claims["nonce"],  # the gateway's challenge, not ours: replay is moot here
            now=dated,  # the document as of its date; the chain as of ``at_s``: the boot's
        )
    except AttestationError as exc:
        raise IncidentError(part, f"{type(exc).__name__}: {exc}") from None
    if dated > at_s + policy.max_clock_skew_s:
        when = "the time you chose" if at_chosen else "now"
        raise AttestationTimeError(
            part, f"dated {_utc(dated)}, after the verification time {_utc(at_s)} ({when})"
        )
    return enclave, (lo, hi)


def _current_at(
    part: str, windows: Sequence[tuple[float, float]], at_s: float, at_chosen: bool
) -> None:
    """A boot is attested at the verification time when one of its documents' chains is
    valid then (its other documents, the same boot and key, may have expired since: they
    date its earlier answers)."""
    if any(lo <= at_s <= hi for lo, hi in windows):
        return
    when = "the time you chose" if at_chosen else "now"
    lo, hi = max(windows, key=lambda w: w[1])
    if at_s > hi:
        raise AttestationExpired(
            part,
            f"its certificate chain was valid from {_utc(lo)} to {_utc(hi)}, not at the "
            f"verification time {_utc(at_s)} ({when}): the bundle is older than its "
            "certificates' lifetime, or the document was made under an expired or leaked key "
            "and dated back. To re-check an old bundle, name a time at which you trust the "
            "chain (fides incident verify --at, verify_incident(at=...))",
        )
    raise AttestationTimeError(
        part,
        f"no certificate chain of its documents is valid at the verification time "
        f"{_utc(at_s)} ({when}): the earliest is valid from "
        f"{_utc(min(w[0] for w in windows))}",
    )

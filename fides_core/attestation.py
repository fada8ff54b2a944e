"""Client-side evidence checks: is this a genuine enclave, running the expected code, that
answered MY challenge, and is this verification result bound to MY input and output?

The relying party (the gateway in the verifying-proxy deployment, the client SDK in the
verifiable-service deployment) calls :func:`verify_attestation` once per enclave boot and
:func:`check_verification` for every signed result. The checks follow the order of real TEE
verifiers (reference/tee.md):

1. decode the envelope; check required fields, types and sizes      -> MalformedEvidence
2. the certificate chain to the PINNED root                          -> ChainError
   and the COSE signature by the leaf                                -> SignatureError
3. the measurement against the expected-measurement policy           -> MeasurementMismatch
4. the nonce: ours, single use, short lifetime                        -> NonceError (Unknown,
                                                                         Replayed, Expired)
   and the evidence timestamp close to now                            -> TimestampError
5. the binding of a result to the exact input bytes, output and nonce -> BindingError
6. simulated evidence, unless the policy allows it                    -> SimulatedEvidenceRejected

Every failure raises a distinct subclass of :class:`AttestationError`; nothing here returns
"false" (a caller cannot forget to look at a return value).
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import cbor2
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID
from cwt.cose_key_interface import COSEKeyInterface

from fides_core import cose
from fides_core.evidence import (
    EVIDENCE_VERSION,
    MAX_NONCE,
    MAX_USER_DATA,
    RESULT_TYPE,
    leaf_hash,
    merkle_root_from_proof,
)
from fides_core.measurement import DIGEST_SIZE
from fides_core.plain_cbor import UnsafeCbor, check_plain
from fides_core.tensors import Array, decode_tensor, raw_bytes, tensor_digest

# -- errors ---------------------------------------------------------------------------------


class AttestationError(Exception):
    """Evidence was not accepted. Never treat a result as verified after one of these."""


class MalformedEvidence(AttestationError):
    """Not decodable, a required field missing, or a field of the wrong type or size."""


class ChainError(AttestationError):
    """The certificate chain does not lead to the pinned root (or a certificate is invalid)."""


class SignatureError(AttestationError):
    """The COSE signature does not verify with the certified (or attested) key."""


class MeasurementMismatch(AttestationError):
    """The enclave runs other code, model or config than the policy expects."""


class NonceError(AttestationError):
    """The nonce is not one we issued and have not used yet, within its lifetime."""


class NonceUnknown(NonceError):
    pass


class NonceReplayed(NonceError):
    pass


class NonceExpired(NonceError):
    pass


class TimestampError(AttestationError):
    """The evidence timestamp is too far from now (stale evidence, or a broken clock)."""


class BindingError(AttestationError):
    """A signed result does not commit to this exact input, output, nonce or request."""


class SequenceError(BindingError):
    """A result's sequence number did not increase (a replayed or reordered result)."""


class SimulatedEvidenceRejected(AttestationError):
    """The evidence comes from the simulated enclave and the policy does not allow that."""


# -- policy and nonces ----------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    """What a relying party accepts. There is no wildcard: at least one measurement is named.

    ``expected_measurements``: pcr0 values (48 bytes, or 96 hex characters) from
    ``fides enclave measure``. ``allow_simulated`` must be turned on explicitly for the
    simulated enclave. ``nonce_max_age_s``: how long an issued nonce stays valid.
    ``max_clock_skew_s``: tolerated difference between the enclave's and our clock.
    """

    expected_measurements: frozenset[bytes]
    allow_simulated: bool = False
    nonce_max_age_s: float = 60.0
    max_clock_skew_s: float = 30.0

    def __post_init__(self) -> None:
        values = set()
        for m in self.expected_measurements:
            value = bytes.fromhex(m) if isinstance(m, str) else m
            if not isinstance(value, bytes) or len(value) != DIGEST_SIZE:
                raise ValueError(f"expected measurements are {DIGEST_SIZE}-byte SHA-384 values")
            values.add(value)
        if not values:
            raise ValueError("a policy names at least one expected measurement (no 'any')")
        if not isinstance(self.allow_simulated, bool):  # "false" would be truthy
            raise TypeError(f"allow_simulated must be True or False, not {self.allow_simulated!r}")
        object.__setattr__(self, "expected_measurements", frozenset(values))
        if self.nonce_max_age_s <= 0 or self.max_clock_skew_s < 0:
            raise ValueError("nonce_max_age_s must be > 0 and max_clock_skew_s >= 0")

    @classmethod
    def of(cls, *measurements: bytes | str, **kwargs: Any) -> Policy:
        return cls(
            frozenset(bytes.fromhex(m) if isinstance(m, str) else m for m in measurements), **kwargs
        )


class NonceStore:
    """Nonces this relying party issued: each may be consumed once, within ``ttl_s``.

    Consumed nonces are remembered until they would have expired, so a replay is told apart
    from a nonce we never issued; after that both are refused as unknown. Thread-safe.
    """

    def __init__(
        self,
        ttl_s: float = 60.0,
        *,
        max_outstanding: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_outstanding = max_outstanding
        self._clock = clock
        self._issued: dict[bytes, float] = {}
        self._used: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def _purge(self, now: float) -> None:
        for table in (self._issued, self._used):
            for nonce in [n for n, t in table.items() if now - t > self.ttl_s]:
                del table[nonce]

    def issue(self, size: int = 32) -> bytes:
        nonce = secrets.token_bytes(size)
        with self._lock:
            now = self._clock()
            if len(self._issued) >= self.max_outstanding:
                self._purge(now)
                if len(self._issued) >= self.max_outstanding:
                    raise NonceError("too many outstanding nonces")
            self._issued[nonce] = now
        return nonce

    def consume(self, nonce: bytes) -> None:
        with self._lock:
            now = self._clock()
            if nonce in self._used:
                raise NonceReplayed("this nonce was already used: replayed evidence")
            issued = self._issued.pop(nonce, None)
            if issued is None:
                raise NonceUnknown("this nonce was not issued by us (or expired long ago)")
            self._used[nonce] = issued
            if now - issued > self.ttl_s:
                raise NonceExpired(f"the nonce is older than {self.ttl_s:.0f} s")
            if len(self._used) > self.max_outstanding:
                self._purge(now)


# -- attestation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AttestedEnclave:
    """An enclave boot that passed :func:`verify_attestation`."""

    module_id: str
    measurement: bytes
    pcrs: dict[int, bytes]
    public_key: ec.EllipticCurvePublicKey  # signs verification results
    timestamp_ms: int
    simulated: bool
    user_data: bytes | None
    claims: dict[str, Any] = field(repr=False)
    document: bytes = field(default=b"", repr=False)  # the attestation document as checked

    @functools.cached_property
    def result_key(self) -> COSEKeyInterface:
        """The COSE form of ``public_key``, built once (it is on every result's path)."""
        return cose.public_key(self.public_key)


def _require(claims: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in claims:
        raise MalformedEvidence(f"missing field {name!r}")
    value = claims[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise MalformedEvidence(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def load_root(root: x509.Certificate | bytes | str) -> x509.Certificate:
    """The pinned root from a certificate object or PEM text."""
    if isinstance(root, x509.Certificate):
        return root
    data = root.encode("ascii") if isinstance(root, str) else root
    return x509.load_pem_x509_certificate(data)


_CHAIN_SIGNATURES = frozenset(
    {
        x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256,
        x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384,
        x509.SignatureAlgorithmOID.ECDSA_WITH_SHA512,
    }
)

#: The last millisecond of the year 9999, the last a ``datetime`` holds.
MAX_TIMESTAMP_MS = 253_402_300_799_999

#: What the simulated platform writes into the name of every certificate it issues
#: (enclave_sim/pki.py); evidence under such a certificate is simulated whatever it claims.
SIMULATION_MARK = "SIMULATED"


def _marked_simulated(cert: x509.Certificate) -> bool:
    return any(SIMULATION_MARK in str(a.value) for a in cert.subject)


#: The extensions whose meaning :func:`_check_chain` enforces: basic constraints (CA or end
#: entity, path length) and key usage (keyCertSign for issuers, digitalSignature for the leaf).
#: RFC 5280 4.2: a certificate with any other extension marked critical must be rejected, since
#: its issuer said "do not use me unless you understand this" (name constraints, policies, ...).
_PROCESSED_EXTENSIONS = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})


def _refuse_unprocessed_critical(cert: x509.Certificate) -> None:
    try:
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise MalformedEvidence(
            f"certificate {cert.subject.rfc4514_string()} has malformed extensions: {exc}"
        ) from None
    for ext in extensions:
        if ext.critical and ext.oid not in _PROCESSED_EXTENSIONS:
            raise ChainError(
                f"certificate {cert.subject.rfc4514_string()} carries the critical extension "
                f"{type(ext.value).__name__} ({ext.oid.dotted_string}), which this verifier "
                "does not process (RFC 5280 4.2)"
            )


def _check_chain(
    leaf_der: bytes, cabundle: list[Any], root: x509.Certificate, at: dt.datetime
) -> list[x509.Certificate]:
    """Nitro's procedure: cabundle[0] is the pinned root, each next certificate is issued by
    the previous one, the leaf by the last; every certificate valid at ``at``; issuers are CAs
    within their path length; the leaf is an end entity allowed to sign; no certificate, the
    pinned root included, carries a critical extension outside ``_PROCESSED_EXTENSIONS``.
    Returns the path, root first, leaf last."""
    try:
        chain = [x509.load_der_x509_certificate(der) for der in cabundle]
        leaf = x509.load_der_x509_certificate(leaf_der)
    except (ValueError, TypeError) as exc:
        raise MalformedEvidence(f"certificate does not parse: {exc}") from None
    if not chain:
        raise ChainError("empty cabundle")
    pinned = root.public_bytes(serialization.Encoding.DER)
    if chain[0].public_bytes(serialization.Encoding.DER) != pinned:
        raise ChainError("the chain does not start at the pinned root certificate")
    path = [*chain, leaf]
    # the root too: its basic constraints and key usage are enforced below like any issuer's,
    # so a critical constraint of it that is not understood would be silently dropped
    for cert in path:
        _refuse_unprocessed_critical(cert)
    for depth, (issuer, cert) in enumerate(itertools.pairwise(path)):
        try:
            cert.verify_directly_issued_by(issuer)
        except Exception as exc:
            raise ChainError(
                f"certificate {cert.subject.rfc4514_string()} is not issued by "
                f"{issuer.subject.rfc4514_string()}: {type(exc).__name__} {exc}"
            ) from None
        try:
            bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise ChainError(f"issuer {issuer.subject.rfc4514_string()} is not a CA") from None
        below = len(path) - depth - 2  # CA certificates between this issuer and the leaf
        if not bc.ca or (bc.path_length is not None and below > bc.path_length):
            raise ChainError(f"issuer {issuer.subject.rfc4514_string()} may not issue this")
        try:
            may_sign = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            may_sign = None  # no key usage: unrestricted (RFC 5280 4.2.1.3)
        if may_sign is not None and not may_sign.key_cert_sign:
            raise ChainError(f"issuer {issuer.subject.rfc4514_string()} may not sign certificates")
        if cert.signature_algorithm_oid not in _CHAIN_SIGNATURES:
            raise ChainError(
                f"certificate {cert.subject.rfc4514_string()} is signed with "
                f"{cert.signature_algorithm_oid.dotted_string}, not ECDSA with SHA-2"
            )
    for cert in path:
        if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
            raise ChainError(f"certificate {cert.subject.rfc4514_string()} is not valid now")
    try:
        leaf_bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise ChainError("the leaf certificate lacks basic constraints or key usage") from None
    if leaf_bc.ca or not usage.digital_signature:
        raise ChainError("the leaf certificate is not an end-entity signing certificate")
    return path  # the pinned root first, the leaf last


def decode_attestation(evidence: bytes) -> tuple[bytes, dict[str, Any]]:
    """Step 1: the payload claims, checked for fields, types and sizes (no trust yet)."""
    if not isinstance(evidence, bytes):
        raise MalformedEvidence("evidence must be bytes")
    try:
        _, payload = cose.split_sign1(evidence)
        check_plain(payload, what="the attestation payload")
        claims = cbor2.loads(payload)
    except (cose.CoseError, UnsafeCbor) as exc:
        raise MalformedEvidence(str(exc)) from None
    except Exception as exc:
        raise MalformedEvidence(f"payload is not CBOR: {type(exc).__name__}") from None
    if not isinstance(claims, dict):
        raise MalformedEvidence("the attestation payload must be a map")
    module_id = _require(claims, "module_id", str)
    if not module_id:
        raise MalformedEvidence("empty module_id")
    timestamp = _require(claims, "timestamp", int)
    if not 0 <= timestamp <= MAX_TIMESTAMP_MS:  # milliseconds since 1970
        raise MalformedEvidence("timestamp is out of range (milliseconds since 1970)")
    if _require(claims, "digest", str) != "SHA384":
        raise MalformedEvidence("digest must be SHA384")
    pcrs = _require(claims, "pcrs", dict)
    if not pcrs or not all(
        isinstance(k, int)
        and not isinstance(k, bool)
        and isinstance(v, bytes)
        and len(v) == DIGEST_SIZE
        for k, v in pcrs.items()
    ):
        raise MalformedEvidence("pcrs must map indexes to 48-byte values")
    if 0 not in pcrs:
        raise MalformedEvidence("pcrs lacks PCR0 (the measurement)")
    _require(claims, "certificate", bytes)
    bundle = _require(claims, "cabundle", list)
    if not all(isinstance(c, bytes) for c in bundle):
        raise MalformedEvidence("cabundle must be a list of DER certificates")
    _require(claims, "public_key", bytes)
    nonce = _require(claims, "nonce", bytes)
    if not 0 < len(nonce) <= MAX_NONCE:
        raise MalformedEvidence(f"nonce must be 1..{MAX_NONCE} bytes")
    user_data = claims.get("user_data")
    if user_data is not None and (not isinstance(user_data, bytes) or len(user_data) > 512):
        raise MalformedEvidence(f"user_data must be at most {MAX_USER_DATA} bytes")
    simulated = claims.get("simulated", False)
    if not isinstance(simulated, bool):
        raise MalformedEvidence("simulated must be a boolean")
    return payload, claims


def verify_attestation(
    evidence: bytes,
    *,
    root: x509.Certificate | bytes | str,
    policy: Policy,
    nonce: bytes,
    nonce_store: NonceStore | None = None,
    expected_user_data: bytes | None = None,
    now: float | None = None,
) -> AttestedEnclave:
    """Check an attestation document; return the attested enclave or raise.

    ``nonce`` is the challenge we sent. With a ``nonce_store`` it is also consumed there (single
    use, ``ttl``); without one the caller vouches it was issued just now and used once.
    """
    _, claims = decode_attestation(evidence)
    now_s = time.time() if now is None else now
    at = dt.datetime.fromtimestamp(now_s, dt.UTC)
    # 2. chain and signature
    root_cert = load_root(root)
    path = _check_chain(claims["certificate"], claims["cabundle"], root_cert, at)
    leaf = path[-1]
    names = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if [n.value for n in names] != [claims["module_id"]]:
        issued_to = ", ".join(str(n.value) for n in names) or "no common name"
        raise ChainError(
            f"the leaf certificate is issued to {issued_to}, not to the module "
            f"{claims['module_id']!r} the document names"
        )
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or not isinstance(
        leaf_key.curve, ec.SECP384R1
    ):
        raise ChainError("the leaf key is not an ECDSA P-384 key (ES384)")
    try:
        cose.verify1(evidence, cose.public_key(leaf_key))
    except cose.CoseError as exc:
        raise SignatureError(f"attestation document signature: {exc}") from None
    # 3. measurement
    measurement = claims["pcrs"][0]
    if measurement not in policy.expected_measurements:
        raise MeasurementMismatch(
            f"enclave measurement {measurement.hex()[:16]}... is not one the policy expects"
        )
    # 4. nonce and freshness
    if not secrets.compare_digest(claims["nonce"], nonce):
        raise NonceUnknown("the evidence answers another challenge than ours")
    if nonce_store is not None:
        nonce_store.consume(nonce)
    age_s = now_s - claims["timestamp"] / 1000
    if age_s > policy.nonce_max_age_s + policy.max_clock_skew_s or age_s < -policy.max_clock_skew_s:
        raise TimestampError(f"evidence timestamp is {age_s:.1f} s from now")
    # 5. binding: the key that will sign results, and the caller's user data
    try:
        result_key = serialization.load_der_public_key(claims["public_key"])
    except (ValueError, TypeError) as exc:
        raise MalformedEvidence(f"public_key is not a DER public key: {exc}") from None
    if not isinstance(result_key, ec.EllipticCurvePublicKey) or not isinstance(
        result_key.curve, ec.SECP256R1 | ec.SECP384R1
    ):
        # P-256 (ES256) since the verification cost work (issue 25); P-384 before it
        raise MalformedEvidence("public_key must be an ECDSA P-256 or P-384 key")
    if expected_user_data is not None and claims.get("user_data") != expected_user_data:
        raise BindingError("user_data does not match what we asked the enclave to bind")
    # 6. simulation
    # simulated when the document says so, or when any certificate on its chain (the pinned
    # root included) is the simulated platform's: whoever holds that platform's key (on the
    # host's disk) can issue a leaf and write any claim, so the claim alone proves nothing
    simulated = (
        claims.get("simulated") is True
        or claims["module_id"].startswith("sim-")
        or any(_marked_simulated(c) for c in path)
    )
    if simulated and not policy.allow_simulated:
        raise SimulatedEvidenceRejected(
            "the evidence comes from the SIMULATED enclave (no hardware protection); "
            "a strict policy rejects it (allow_simulated=True only for development)"
        )
    return AttestedEnclave(
        module_id=claims["module_id"],
        measurement=measurement,
        pcrs=dict(claims["pcrs"]),
        public_key=result_key,
        timestamp_ms=claims["timestamp"],
        simulated=simulated,
        user_data=claims.get("user_data"),
        claims=claims,
        document=evidence,
    )


# -- verification results -------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedResult:
    """A verification result bound to our request, from an attested enclave."""

    request_id: str
    outputs: dict[str, Array]
    seq: int
    timestamp_ms: int
    module_id: str
    index: int = 0  # the request's place in its signed batch (its Merkle leaf)
    count: int = 1  # the requests the signed batch holds


def decode_result_evidence(evidence: bytes) -> dict[str, Any]:
    """Per-request evidence -> its map (``v``, ``result``, ``entry``, ``proof``), shape-checked."""
    try:
        check_plain(evidence, what="evidence")  # its signed result is a byte string in it
        doc = cbor2.loads(evidence)
    except UnsafeCbor as exc:
        raise MalformedEvidence(str(exc)) from None
    except Exception as exc:
        raise MalformedEvidence(f"evidence is not CBOR: {type(exc).__name__}") from None
    if not isinstance(doc, dict) or doc.get("v") != EVIDENCE_VERSION:
        raise MalformedEvidence(f"evidence must be a version {EVIDENCE_VERSION} map")
    _require(doc, "result", bytes)
    entry = _require(doc, "entry", dict)
    proof = _require(doc, "proof", list)
    if not all(isinstance(p, bytes) and len(p) == 32 for p in proof):
        raise MalformedEvidence("proof must be a list of 32-byte hashes")
    _require(entry, "index", int)
    _require(entry, "id", str)
    _require(entry, "nonce", bytes)
    for name in ("inputs", "outputs"):
        if not isinstance(_require(entry, name, dict), dict) or not entry[name]:
            raise MalformedEvidence(f"entry.{name} must be a non-empty map")
    return doc


def _result_payload(payload: bytes) -> dict[str, Any]:
    try:
        check_plain(payload, what="the verification result payload")
        result = cbor2.loads(payload)
    except UnsafeCbor as exc:
        raise MalformedEvidence(str(exc)) from None
    except Exception:
        raise MalformedEvidence("verification result payload is not CBOR") from None
    if not isinstance(result, dict) or result.get("type") != RESULT_TYPE:
        raise MalformedEvidence(f"not a {RESULT_TYPE} payload")
    return result


def accept_authenticated_result(
    signed: bytes, attested: AttestedEnclave, verified_results: dict[bytes, dict[str, Any]]
) -> None:
    """Enter a batch's signed result in ``verified_results`` (see :func:`check_verification`)
    WITHOUT checking its signature, for a caller that authenticated these exact bytes another
    way: the gateway, by its session MAC (:mod:`fides_core.session`). The shape and alg are
    checked as for a signature; every per-item check (boot, measurement, Merkle proof, input
    bytes, nonce, id, outputs) still runs in check_verification. Never call it for bytes that
    a third party handed over: only a signature proves anything to a third party."""
    try:
        _, payload = cose.split_sign1(signed, alg=attested.result_key.alg)
    except cose.CoseError as exc:
        raise MalformedEvidence(f"verification result: {exc}") from None
    verified_results[signed] = _result_payload(payload)


def check_verification(
    evidence: bytes,
    *,
    attested: AttestedEnclave,
    inputs: Mapping[str, Array] | None,
    nonce: bytes | None,
    request_id: str | None = None,
    outputs: Mapping[str, Array] | None = None,
    nonce_store: NonceStore | None = None,
    after_seq: int | None = None,
    max_age_s: float | None = 60.0,
    max_clock_skew_s: float = 30.0,
    now: float | None = None,
    verified_results: dict[bytes, dict[str, Any]] | None = None,
) -> CheckedResult:
    """Check that ``evidence`` is a result signed by the attested enclave for exactly these
    input tensors (their canonical bytes are re-hashed here), this nonce and request id, and,
    when ``outputs`` is given, exactly these output values. ``after_seq``: the last sequence
    number seen from this enclave (results must come in increasing order).

    ``verified_results``: when checking every item of one batch, pass the same empty dict to
    each call; the batch's signed result is then verified once instead of once per item. Use
    a dict with one ``attested`` enclave only.

    ``inputs=None`` and ``nonce=None`` (with ``max_age_s=None``): a third party's check of
    evidence it did not ask for (an incident bundle, :mod:`fides_core.incident`): the signature,
    the enclave boot, the Merkle binding and the request id are checked; the inputs' hashes and
    the nonce are taken as signed, since only the requester knows the inputs and its nonce."""
    doc = decode_result_evidence(evidence)
    signed: bytes = doc["result"]
    cached = verified_results.get(signed) if verified_results is not None else None
    if cached is not None:
        result = cached
    else:
        try:
            payload = cose.verify1(signed, attested.result_key)
        except cose.CoseError as exc:
            raise SignatureError(f"verification result signature: {exc}") from None
        result = _result_payload(payload)
        if verified_results is not None:
            verified_results[signed] = result
    seq = _require(result, "seq", int)
    timestamp = _require(result, "timestamp", int)
    count = _require(result, "count", int)
    root = _require(result, "root", bytes)
    if result.get("module_id") != attested.module_id:
        raise BindingError("the result comes from another enclave boot than the attested one")
    if result.get("measurement") != attested.measurement:
        raise MeasurementMismatch("the result names another measurement than the attested one")
    if (result.get("simulated") is True) != attested.simulated:
        raise BindingError("the result's simulated flag differs from the attestation's")
    entry, proof = doc["entry"], doc["proof"]
    try:
        if merkle_root_from_proof(leaf_hash(entry), entry["index"], count, proof) != root:
            raise BindingError("the entry is not part of the signed result (Merkle root)")
    except ValueError as exc:
        raise BindingError(f"bad Merkle proof: {exc}") from None
    # the exact input bytes
    if inputs is not None and set(entry["inputs"]) != set(inputs):
        raise BindingError(
            f"the result covers inputs {sorted(entry['inputs'])}, we sent {sorted(inputs)}"
        )
    for name, x in (inputs or {}).items():
        if not secrets.compare_digest(entry["inputs"][name], tensor_digest(np.asarray(x))):
            raise BindingError(f"input hash mismatch for {name!r}: the enclave saw other bytes")
    if request_id is not None and entry["id"] != request_id:
        raise BindingError(f"the result is for request {entry['id']!r}, not {request_id!r}")
    if nonce is not None and not secrets.compare_digest(entry["nonce"], nonce):
        raise BindingError("the result is bound to another nonce than ours")
    if nonce_store is not None and nonce is not None:
        nonce_store.consume(nonce)
    try:
        signed_outputs = {
            str(name): decode_tensor(t, what=f"output {name}")
            for name, t in entry["outputs"].items()
        }
    except Exception as exc:
        raise MalformedEvidence(f"signed outputs do not decode: {exc}") from None
    if outputs is not None:
        if set(outputs) != set(signed_outputs):
            raise BindingError(
                f"reported outputs {sorted(outputs)} differ from signed {sorted(signed_outputs)}"
            )
        for name, reported in outputs.items():
            expected = signed_outputs[name]
            value = np.asarray(reported)
            if value.shape != expected.shape or raw_bytes(
                value.astype(expected.dtype)
            ) != raw_bytes(expected):
                raise BindingError(f"output {name!r} differs from the enclave-signed output")
    if after_seq is not None and seq <= after_seq:
        raise SequenceError(f"sequence number {seq} does not follow {after_seq}")
    now_s = time.time() if now is None else now
    age_s = now_s - timestamp / 1000
    if max_age_s is not None and (
        age_s > max_age_s + max_clock_skew_s or age_s < -max_clock_skew_s
    ):
        raise TimestampError(f"result timestamp is {age_s:.1f} s from now")
    return CheckedResult(
        entry["id"], signed_outputs, seq, timestamp, attested.module_id, entry["index"], count
    )


def expected_measurements(values: Iterable[str]) -> frozenset[bytes]:
    """Hex strings (e.g. from ``fides enclave measure``) to a policy's measurement set."""
    return frozenset(bytes.fromhex(v.strip()) for v in values)

"""Attestation evidence and the client-side checks: each attack fails with its own error."""

from __future__ import annotations

import time
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclave_sim.core import EnclaveCore
from enclave_sim.pki import PlatformIdentity, create_identity, issue_leaf, new_key
from fides_core import cose
from fides_core.attestation import (
    AttestationError,
    BindingError,
    ChainError,
    MalformedEvidence,
    MeasurementMismatch,
    NonceExpired,
    NonceReplayed,
    NonceStore,
    NonceUnknown,
    Policy,
    SignatureError,
    SimulatedEvidenceRejected,
    TimestampError,
    verify_attestation,
)
from fides_core.measurement import measure
from tests.enclave_sim.helpers import EnclaveFiles, copy_enclave_code


@pytest.fixture(scope="module")
def policy(core: EnclaveCore) -> Policy:
    return Policy.of(core.measurement.pcr0, allow_simulated=True)


def _claims(evidence: bytes) -> dict[str, object]:
    _, payload = cose.split_sign1(evidence)
    claims = cbor2.loads(payload)
    assert isinstance(claims, dict)
    return claims


def test_evidence_has_the_nitro_shape_and_says_simulated(core: EnclaveCore) -> None:
    nonce = b"n" * 32
    claims = _claims(core.attest(nonce, b"hello"))
    assert set(claims) >= {
        "module_id",
        "timestamp",
        "digest",
        "pcrs",
        "certificate",
        "cabundle",
        "public_key",
        "user_data",
        "nonce",
        "simulated",
    }
    assert claims["simulated"] is True
    assert str(claims["module_id"]).startswith("sim-")
    assert claims["digest"] == "SHA384"
    assert claims["pcrs"] == core.measurement.pcrs()
    assert claims["nonce"] == nonce
    assert claims["user_data"] == b"hello"
    assert abs(int(claims["timestamp"]) / 1000 - time.time()) < 300  # type: ignore[call-overload]


def test_valid_evidence_passes(
    core: EnclaveCore, module_files: EnclaveFiles, policy: Policy
) -> None:
    store = NonceStore()
    nonce = store.issue()
    attested = verify_attestation(
        core.attest(nonce, b"channel"),
        root=module_files.root_pem,
        policy=policy,
        nonce=nonce,
        nonce_store=store,
        expected_user_data=b"channel",
    )
    assert attested.module_id == core.module_id
    assert attested.measurement == core.measurement.pcr0
    assert attested.simulated
    der = attested.public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert der == core.result_public_key


def test_strict_policy_rejects_simulated_evidence(
    core: EnclaveCore, module_files: EnclaveFiles
) -> None:
    strict = Policy.of(core.measurement.pcr0)  # allow_simulated defaults to False
    nonce = b"s" * 32
    with pytest.raises(SimulatedEvidenceRejected, match="SIMULATED"):
        verify_attestation(
            core.attest(nonce), root=module_files.root_pem, policy=strict, nonce=nonce
        )


def test_policy_has_no_wildcard() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Policy(frozenset())
    with pytest.raises(ValueError, match="48-byte"):
        Policy.of(b"short")


def test_other_measurement_is_rejected(core: EnclaveCore, module_files: EnclaveFiles) -> None:
    nonce = b"m" * 32
    with pytest.raises(MeasurementMismatch):
        verify_attestation(
            core.attest(nonce),
            root=module_files.root_pem,
            policy=Policy.of(b"\x01" * 48, allow_simulated=True),
            nonce=nonce,
        )


def test_modified_code_is_rejected_by_the_policy(
    module_files: EnclaveFiles, identity: PlatformIdentity, tmp_path: Path, policy: Policy
) -> None:
    """An enclave built from a modified code file reports another measurement."""
    code = copy_enclave_code(tmp_path)
    (code / "enclave_sim" / "core.py").write_text(
        (code / "enclave_sim" / "core.py").read_text() + "\n# evil\n"
    )
    modified = measure(module_files.model_bytes, module_files.config, code)
    evil = EnclaveCore(module_files.model_bytes, module_files.config, modified, identity)
    nonce = b"c" * 32
    with pytest.raises(MeasurementMismatch):
        verify_attestation(evil.attest(nonce), root=identity.root_pem, policy=policy, nonce=nonce)


def test_replayed_unknown_and_expired_nonces(
    core: EnclaveCore, module_files: EnclaveFiles, policy: Policy
) -> None:
    store = NonceStore(ttl_s=60)
    nonce = store.issue()
    evidence = core.attest(nonce)
    kwargs = {"root": module_files.root_pem, "policy": policy, "nonce_store": store}
    verify_attestation(evidence, nonce=nonce, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(NonceReplayed):
        verify_attestation(evidence, nonce=nonce, **kwargs)  # type: ignore[arg-type]
    stranger = b"x" * 32
    with pytest.raises(NonceUnknown):
        verify_attestation(core.attest(stranger), nonce=stranger, **kwargs)  # type: ignore[arg-type]
    # evidence for another challenge than the one we sent
    mine = store.issue()
    with pytest.raises(NonceUnknown, match="another challenge"):
        verify_attestation(core.attest(b"y" * 32), nonce=mine, **kwargs)  # type: ignore[arg-type]
    # an old nonce (the store's clock moved past its lifetime)
    now = [1000.0]
    aging = NonceStore(ttl_s=5, clock=lambda: now[0])
    old = aging.issue()
    now[0] += 6
    with pytest.raises(NonceExpired):
        verify_attestation(
            core.attest(old),
            root=module_files.root_pem,
            policy=policy,
            nonce=old,
            nonce_store=aging,
        )


def test_stale_evidence_is_rejected(
    core: EnclaveCore, module_files: EnclaveFiles, policy: Policy
) -> None:
    nonce = b"t" * 32
    evidence = core.attest(nonce)
    with pytest.raises(TimestampError):
        verify_attestation(
            evidence,
            root=module_files.root_pem,
            policy=policy,
            nonce=nonce,
            now=time.time() + 3600,
        )


def test_evidence_from_another_root_is_rejected(
    module_files: EnclaveFiles, identity: PlatformIdentity, policy: Policy, core: EnclaveCore
) -> None:
    """A whole fake platform (its own root CA) does not chain to the pinned root."""
    fake = EnclaveCore(module_files.model_bytes, module_files.config, core.measurement, identity)
    nonce = b"r" * 32
    with pytest.raises(ChainError, match="pinned root"):
        verify_attestation(
            fake.attest(nonce), root=module_files.root_pem, policy=policy, nonce=nonce
        )


def test_signature_by_a_key_outside_the_chain_is_rejected(
    core: EnclaveCore, module_files: EnclaveFiles, policy: Policy
) -> None:
    """Genuine chain and leaf copied from real evidence, claims re-signed by another key."""
    nonce = b"k" * 32
    claims = _claims(core.attest(nonce))
    claims["pcrs"] = {0: b"\x02" * 48}
    forged = cose.sign1(cbor2.dumps(claims), cose.private_key(new_key()))
    with pytest.raises(SignatureError):
        verify_attestation(forged, root=module_files.root_pem, policy=policy, nonce=nonce)


def test_leaf_issued_by_another_platform_is_rejected(
    core: EnclaveCore, module_files: EnclaveFiles, policy: Policy
) -> None:
    """The pinned root in the bundle, but a leaf from an attacker's own platform CA."""
    _, attacker = create_identity()
    key = new_key()
    leaf = issue_leaf(attacker, key.public_key(), "sim-attacker")
    nonce = b"l" * 32
    claims = _claims(core.attest(nonce))
    claims["certificate"] = leaf.public_bytes(serialization.Encoding.DER)
    claims["cabundle"] = [claims["cabundle"][0], attacker.cabundle[1]]  # type: ignore[index]
    forged = cose.sign1(cbor2.dumps(claims), cose.private_key(key))
    with pytest.raises(ChainError, match="not issued by"):
        verify_attestation(forged, root=module_files.root_pem, policy=policy, nonce=nonce)


def _host_forgery(
    core: EnclaveCore,
    platform: PlatformIdentity,
    nonce: bytes,
    module_id: str,
    leaf_name: str | None = None,
) -> bytes:
    """What a host holding the simulated platform's key (it is on the host's disk) can sign:
    a leaf of its own (issued to ``leaf_name``, by default the module), any claims."""
    key = new_key()
    claims = _claims(core.attest(nonce))
    claims.pop("simulated")
    claims["module_id"] = module_id
    leaf = issue_leaf(platform, key.public_key(), leaf_name or module_id)
    claims["certificate"] = leaf.public_bytes(serialization.Encoding.DER)
    return cose.sign1(cbor2.dumps(claims), cose.private_key(key))


def test_evidence_under_the_simulated_platform_is_simulated_whatever_it_claims(
    core: EnclaveCore, module_files: EnclaveFiles, platform_identity: PlatformIdentity
) -> None:
    """A document that drops the ``simulated`` claim and names a Nitro-like module, signed
    under a leaf the host issued with the simulated platform's key: a strict policy still
    rejects it, since the chain (the pinned root included) is the simulated platform's."""
    strict = Policy.of(core.measurement.pcr0)
    nonce = b"h" * 32
    forged = _host_forgery(core, platform_identity, nonce, "i-0123456789abcdef")
    with pytest.raises(SimulatedEvidenceRejected):
        verify_attestation(forged, root=module_files.root_pem, policy=strict, nonce=nonce)
    lenient = Policy.of(core.measurement.pcr0, allow_simulated=True)
    assert verify_attestation(
        forged, root=module_files.root_pem, policy=lenient, nonce=nonce
    ).simulated


def test_the_leaf_certificate_names_the_attested_module(
    core: EnclaveCore,
    module_files: EnclaveFiles,
    platform_identity: PlatformIdentity,
    policy: Policy,
) -> None:
    nonce = b"m" * 32
    forged = _host_forgery(core, platform_identity, nonce, "sim-other", leaf_name="sim-mine")
    with pytest.raises(ChainError, match="issued to sim-mine, not to the module 'sim-other'"):
        verify_attestation(forged, root=module_files.root_pem, policy=policy, nonce=nonce)


#: A private-enterprise OID no verifier knows (RFC 5280 4.2: refused when critical).
_PRIVATE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.7.1")


def _with_extension(
    cert: x509.Certificate, signer: ec.EllipticCurvePrivateKey, critical: bool
) -> x509.Certificate:
    """``cert`` re-issued by ``signer`` (its issuer's key) with the private extension added."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    builder = builder.add_extension(
        x509.UnrecognizedExtension(_PRIVATE_OID, b"\x05\x00"), critical=critical
    )
    return builder.sign(signer, hashes.SHA384())


def _chain_with_extension(
    core: EnclaveCore, nonce: bytes, where: int, critical: bool
) -> tuple[bytes, x509.Certificate]:
    """Evidence under a fresh root -> platform -> leaf chain whose certificate at ``where``
    (0 the root, 1 the platform CA, 2 the leaf) carries the private extension; and its root."""
    root_key, platform = create_identity()
    key = new_key()
    claims = _claims(core.attest(nonce))
    module_id = claims["module_id"]
    assert isinstance(module_id, str)
    path = [platform.root_cert, platform.platform_cert]
    path.append(issue_leaf(platform, key.public_key(), module_id))
    signers = [root_key, root_key, platform.platform_key]
    path[where] = _with_extension(path[where], signers[where], critical)
    claims["cabundle"] = [c.public_bytes(serialization.Encoding.DER) for c in path[:2]]
    claims["certificate"] = path[2].public_bytes(serialization.Encoding.DER)
    return cose.sign1(cbor2.dumps(claims), cose.private_key(key)), path[0]


@pytest.mark.parametrize(("where", "subject"), [(0, "Root CA"), (1, "Platform CA"), (2, "sim-")])
def test_an_unknown_critical_extension_is_refused(
    core: EnclaveCore, policy: Policy, where: int, subject: str
) -> None:
    """RFC 5280 4.2: a critical extension the verifier does not process refuses the
    certificate, wherever it is on the chain (the pinned root included)."""
    nonce = b"x" * 32
    evidence, root = _chain_with_extension(core, nonce, where, critical=True)
    with pytest.raises(
        ChainError, match=rf"{subject}.*critical extension.*1\.3\.6\.1\.4\.1\.55555"
    ):
        verify_attestation(evidence, root=root, policy=policy, nonce=nonce)


@pytest.mark.parametrize("where", [0, 1, 2])
def test_an_unknown_non_critical_extension_is_accepted(
    core: EnclaveCore, policy: Policy, where: int
) -> None:
    nonce = b"y" * 32
    evidence, root = _chain_with_extension(core, nonce, where, critical=False)
    assert verify_attestation(evidence, root=root, policy=policy, nonce=nonce).simulated


def test_strange_header_and_field_types_are_named_errors(
    core: EnclaveCore, module_files: EnclaveFiles, policy: Policy
) -> None:
    """A protected alg that is a list or a map, timestamps no clock can hold, PCR indexes that
    are booleans, a policy flag that is a string: refused as evidence errors, never as a
    TypeError, ValueError or OverflowError from underneath."""
    nonce = b"t" * 32
    evidence = core.attest(nonce)
    msg = cbor2.loads(evidence)
    body = msg.value if isinstance(msg, cbor2.CBORTag) else msg
    for alg in ([], {}, [-7], True):
        bad = cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: alg}), *body[1:]]))
        with pytest.raises(MalformedEvidence, match="alg"):
            verify_attestation(bad, root=module_files.root_pem, policy=policy, nonce=nonce)
    for field, value, named in (
        ("timestamp", 10**15, "timestamp"),
        ("timestamp", 2**1100, "CBOR tag 2"),  # a bignum: refused before cbor2 builds it
        ("timestamp", -1, "timestamp"),
        ("pcrs", {False: core.measurement.pcr0}, "pcrs"),
    ):
        claims = _claims(evidence)
        claims[field] = value
        resigned = cose.sign1(cbor2.dumps(claims), cose.private_key(new_key()))
        with pytest.raises(MalformedEvidence, match=named):
            verify_attestation(resigned, root=module_files.root_pem, policy=policy, nonce=nonce)
    with pytest.raises(TypeError, match="allow_simulated"):
        Policy.of(core.measurement.pcr0, allow_simulated="false")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "evidence",
    [
        b"",
        b"\xff\xff",
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b"x", b"y"])),
    ],
)
def test_malformed_evidence(evidence: bytes, module_files: EnclaveFiles, policy: Policy) -> None:
    with pytest.raises(MalformedEvidence):
        verify_attestation(evidence, root=module_files.root_pem, policy=policy, nonce=b"n" * 32)


def test_truncated_or_fieldless_evidence(
    core: EnclaveCore, module_files: EnclaveFiles, policy: Policy
) -> None:
    nonce = b"f" * 32
    evidence = core.attest(nonce)
    for cut in (1, len(evidence) // 2, len(evidence) - 1):
        with pytest.raises(MalformedEvidence):
            verify_attestation(
                evidence[:cut], root=module_files.root_pem, policy=policy, nonce=nonce
            )
    claims = _claims(evidence)
    del claims["public_key"]
    stripped = cose.sign1(cbor2.dumps(claims), cose.private_key(new_key()))
    with pytest.raises(MalformedEvidence, match="public_key"):
        verify_attestation(stripped, root=module_files.root_pem, policy=policy, nonce=nonce)


def test_user_data_binding(core: EnclaveCore, module_files: EnclaveFiles, policy: Policy) -> None:
    nonce = b"u" * 32
    with pytest.raises(BindingError):
        verify_attestation(
            core.attest(nonce, b"a"),
            root=module_files.root_pem,
            policy=policy,
            nonce=nonce,
            expected_user_data=b"b",
        )


def test_every_error_is_an_attestation_error() -> None:
    for exc in (
        MalformedEvidence,
        ChainError,
        SignatureError,
        MeasurementMismatch,
        NonceReplayed,
        NonceUnknown,
        NonceExpired,
        TimestampError,
        BindingError,
        SimulatedEvidenceRejected,
    ):
        assert issubclass(exc, AttestationError)

"""COSE_Sign1 (RFC 9052) with ECDSA, on top of ``cwt``: ES384 (P-384) for attestation
documents, as in AWS Nitro, and ES256 (P-256) for the per-batch verification results, whose
signing and checking sit on every verified answer's path (ES256 signs about 4x and verifies
about 5x faster than ES384 here; see docs/enclave.md).

Why ``cwt`` rather than ``pycose``: cwt is maintained (releases in 2026), typed, and signs
through ``cryptography`` (OpenSSL); pycose 1.1.0 signs ECDSA with the pure-Python ``ecdsa``
package (slow and not constant-time), pulls the unmaintained ``certvalidator``, and breaks with
cbor2 6.x. cwt also pins cbor2 below 6, so the project pins ``cbor2>=5.6,<6`` either way.

Message: CBOR tag 18, ``[protected: bstr(CBOR {1: alg}), unprotected: {}, payload: bstr,
signature: bstr(r || s)]``; the alg is the key's (its curve's), never the message's choice:
a message whose alg is not the verifying key's is refused before any signature check.
"""

from __future__ import annotations

from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cwt import COSE, COSEKey
from cwt.cose_key_interface import COSEKeyInterface

from fides_core.plain_cbor import UnsafeCbor, check_plain

ES384 = -35
ES256 = -7
SIGN1_TAG = 18
_SIGN1_ONLY = frozenset({SIGN1_TAG})  # the one tag evidence may carry (plain_cbor)
# COSE alg -> (its name, its curve's name, the r || s signature's size)
ALGORITHMS: dict[int, tuple[str, str, int]] = {
    ES384: ("ES384", "secp384r1", 96),
    ES256: ("ES256", "secp256r1", 64),
}
SIGNATURE_SIZE = 96  # P-384 (ES384), the attestation document's


class CoseError(ValueError):
    """Not a COSE_Sign1 we accept, or its signature does not verify."""


_COSE = COSE.new()


def _alg_of(curve: ec.EllipticCurve) -> int:
    for alg, (_, curve_name, _) in ALGORITHMS.items():
        if curve.name == curve_name:
            return alg
    raise CoseError(f"no COSE algorithm here for an ECDSA {curve.name} key (P-256 or P-384)")


def private_key(key: ec.EllipticCurvePrivateKey) -> COSEKeyInterface:
    """ES384 for a P-384 key, ES256 for a P-256 key."""
    name = ALGORITHMS[_alg_of(key.curve)][0]
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return COSEKey.from_pem(pem, alg=name)


def public_key(key: ec.EllipticCurvePublicKey) -> COSEKeyInterface:
    """ES384 for a P-384 key, ES256 for a P-256 key."""
    name = ALGORITHMS[_alg_of(key.curve)][0]
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return COSEKey.from_pem(pem, alg=name)


def sign1(payload: bytes, key: COSEKeyInterface) -> bytes:
    if key.alg not in ALGORITHMS:
        raise CoseError(f"COSE alg {key.alg} is not one this project signs with")
    data = _COSE.encode_and_sign(payload, key, protected={1: key.alg})
    assert isinstance(data, bytes)
    return data


def split_sign1(data: bytes, alg: int | None = ES384) -> tuple[dict[Any, Any], bytes]:
    """Protected header and payload of a COSE_Sign1, WITHOUT verifying the signature
    (a verifier needs the payload's certificate to find the key). Checks the shape, that the
    alg is ``alg`` (None: either of :data:`ALGORITHMS`) and the signature's size for it."""
    try:
        check_plain(data, what="COSE_Sign1", allowed_tags=_SIGN1_ONLY)
        msg = cbor2.loads(data)
    except UnsafeCbor as exc:
        raise CoseError(str(exc)) from None
    except Exception as exc:
        raise CoseError(f"not CBOR: {type(exc).__name__}: {exc}") from None
    if isinstance(msg, cbor2.CBORTag):
        if msg.tag != SIGN1_TAG:
            raise CoseError(f"CBOR tag {msg.tag} is not COSE_Sign1 (18)")
        msg = msg.value
    if not (isinstance(msg, list) and len(msg) == 4):
        raise CoseError("COSE_Sign1 must be an array of 4 items")
    protected_raw, unprotected, payload, signature = msg
    if not all(isinstance(x, bytes) for x in (protected_raw, payload, signature)):
        raise CoseError("COSE_Sign1 protected header, payload and signature must be bytes")
    if not isinstance(unprotected, dict):
        raise CoseError("COSE_Sign1 unprotected header must be a map")
    try:
        if protected_raw:
            check_plain(protected_raw, what="COSE_Sign1 protected header")
        protected = cbor2.loads(protected_raw) if protected_raw else {}
    except UnsafeCbor as exc:
        raise CoseError(str(exc)) from None
    except Exception:
        raise CoseError("COSE_Sign1 protected header is not CBOR") from None
    got = protected.get(1) if isinstance(protected, dict) else None
    if not isinstance(got, int) or isinstance(got, bool):  # a list or map is not hashable
        got = None
    if got not in ALGORITHMS or (alg is not None and got != alg) or 1 in unprotected:
        want = " or ".join(
            f"{ALGORITHMS[a][0]} ({a})" for a in ((alg,) if alg is not None else ALGORITHMS)
        )
        raise CoseError(f"COSE_Sign1 must carry alg {want} in its protected header")
    name, _, size = ALGORITHMS[got]
    if len(signature) != size:
        raise CoseError(f"{name} signature must be {size} bytes")
    assert isinstance(protected, dict)
    return protected, payload


def verify1(data: bytes, key: COSEKeyInterface) -> bytes:
    """The payload, once the signature verifies with ``key`` under the key's own alg (ES384 or
    ES256); CoseError otherwise."""
    split_sign1(data, alg=key.alg)
    try:
        msg = cbor2.loads(data)
        if not isinstance(msg, cbor2.CBORTag):
            msg = cbor2.CBORTag(SIGN1_TAG, msg)
        payload = _COSE.decode(msg, key)
    except Exception as exc:
        raise CoseError(f"signature does not verify: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, bytes):
        raise CoseError("COSE_Sign1 payload must be bytes")
    return payload

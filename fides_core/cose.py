"""COSE_Sign1 (RFC 9052) with ES384, as in AWS Nitro attestation documents, on top of ``cwt``.

Why ``cwt`` rather than ``pycose``: cwt is maintained (releases in 2026), typed, and signs
through ``cryptography`` (OpenSSL); pycose 1.1.0 signs ECDSA with the pure-Python ``ecdsa``
package (slow and not constant-time), pulls the unmaintained ``certvalidator``, and breaks with
cbor2 6.x. cwt also pins cbor2 below 6, so the project pins ``cbor2>=5.6,<6`` either way.

Message: CBOR tag 18, ``[protected: bstr(CBOR {1: -35}), unprotected: {}, payload: bstr,
signature: bstr(r || s, 96 bytes)]``.
"""

from __future__ import annotations

from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cwt import COSE, COSEKey
from cwt.cose_key_interface import COSEKeyInterface

ES384 = -35
SIGN1_TAG = 18
SIGNATURE_SIZE = 96  # P-384: r || s


class CoseError(ValueError):
    """Not a COSE_Sign1 we accept, or its signature does not verify."""


_COSE = COSE.new()


def private_key(key: ec.EllipticCurvePrivateKey) -> COSEKeyInterface:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return COSEKey.from_pem(pem, alg="ES384")


def public_key(key: ec.EllipticCurvePublicKey) -> COSEKeyInterface:
    if not isinstance(key.curve, ec.SECP384R1):
        raise CoseError(f"ES384 needs a P-384 key, not {key.curve.name}")
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return COSEKey.from_pem(pem, alg="ES384")


def sign1(payload: bytes, key: COSEKeyInterface) -> bytes:
    data = _COSE.encode_and_sign(payload, key, protected={1: ES384})
    assert isinstance(data, bytes)
    return data


def split_sign1(data: bytes) -> tuple[dict[Any, Any], bytes]:
    """Protected header and payload of a COSE_Sign1, WITHOUT verifying the signature
    (a verifier needs the payload's certificate to find the key). Checks the shape and alg."""
    try:
        msg = cbor2.loads(data)
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
        protected = cbor2.loads(protected_raw) if protected_raw else {}
    except Exception:
        raise CoseError("COSE_Sign1 protected header is not CBOR") from None
    if not isinstance(protected, dict) or protected.get(1) != ES384 or 1 in unprotected:
        raise CoseError("COSE_Sign1 must carry alg ES384 (-35) in its protected header")
    if len(signature) != SIGNATURE_SIZE:
        raise CoseError(f"ES384 signature must be {SIGNATURE_SIZE} bytes")
    return protected, payload


def verify1(data: bytes, key: COSEKeyInterface) -> bytes:
    """The payload, once the ES384 signature verifies with ``key``; CoseError otherwise."""
    split_sign1(data)
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

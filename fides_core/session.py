"""A MAC session between the gateway and the enclave it attested (issue 25).

Every verified batch carries an ES256 signature (COSE_Sign1) that anyone holding the pinned
root can check: that is the evidence clients keep. The gateway checked the same signature
before it reported an answer verified, which cost it about 150 µs of its event loop per batch
(the ECDSA verify and ``cwt``'s decoding). It does not need a signature for itself: a MAC under
a key only it and the attested enclave know proves the same to it, for about 2 µs. This is how
attested TLS channels work too: attestation authenticates a key exchange, the channel's MAC
does the rest.

The exchange, on top of the attestation the gateway already does at every enclave boot:

1. the gateway makes an X25519 key pair and sends its public half with its attestation
   challenge (``session_key``);
2. the enclave makes its own X25519 key pair, derives the session key, and puts both public
   halves in the attestation document (``fides.session``), which its attested key signs, bound
   to the gateway's nonce; a host that swapped the gateway's public half in transit is caught
   there, since the document then names another initiator;
3. both derive ``HKDF-SHA256(X25519 shared secret, salt=nonce, info=label || module_id ||
   initiator public || enclave public)``; the enclave MACs (HMAC-SHA256) each signed batch
   result it returns under that session, and the gateway checks the MAC instead of the
   signature.

What each proves, and to whom: the signature proves the result to anyone (a client, an
auditor, an incident bundle); the MAC proves it to the gateway alone. The gateway holds the
key and could forge a MAC, so a MAC is never evidence for anybody else and never leaves the
gateway: the evidence in every answer is the signed one, unchanged. A result without a MAC (an
enclave that predates sessions, or one that restarted and lost the session) is checked by its
signature, as before.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "MAC_SIZE",
    "PUBLIC_KEY_SIZE",
    "SESSION_ID_SIZE",
    "SessionError",
    "SessionKey",
    "SessionOffer",
    "accept_offer",
]

LABEL = b"fides-gateway enclave session v1"
PUBLIC_KEY_SIZE = 32  # a raw X25519 public key
SESSION_ID_SIZE = 16
KEY_SIZE = 32
MAC_SIZE = 32  # HMAC-SHA256


class SessionError(ValueError):
    """A session offer or answer that cannot be used (wrong size, not a key, not ours)."""


def _raw(public: X25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _peer(public: Any, what: str) -> X25519PublicKey:
    if not isinstance(public, bytes) or len(public) != PUBLIC_KEY_SIZE:
        raise SessionError(f"{what} must be a {PUBLIC_KEY_SIZE}-byte X25519 public key")
    try:
        return X25519PublicKey.from_public_bytes(public)
    except ValueError as exc:
        raise SessionError(f"{what} is not an X25519 public key: {exc}") from None


def session_id(initiator_public: bytes, enclave_public: bytes) -> bytes:
    """The name both sides use for a session: a hash of both public keys. Not of the
    initiator's alone: anyone who can reach the socket could then offer the gateway's public
    key again and put a session the gateway cannot use in place of its own under its name
    (every MAC would then fail the gateway's check, a denial of service). The enclave's half
    is new at every offer, so a second offer makes a second session beside the first."""
    digest = hashlib.sha256(LABEL + initiator_public + enclave_public).digest()
    return digest[:SESSION_ID_SIZE]


def _derive(
    private: X25519PrivateKey,
    peer: X25519PublicKey,
    *,
    nonce: bytes,
    module_id: str,
    initiator_public: bytes,
    enclave_public: bytes,
) -> bytes:
    try:
        shared = private.exchange(peer)
    except ValueError as exc:  # a low-order point: the shared secret would be all zeros
        raise SessionError(f"no key agreement with that public key: {exc}") from None
    info = LABEL + module_id.encode() + initiator_public + enclave_public
    return HKDF(hashes.SHA256(), KEY_SIZE, salt=nonce, info=info).derive(shared)


@dataclass(frozen=True)
class SessionKey:
    """One side's copy of an agreed session key, named by :attr:`id`."""

    id: bytes
    key: bytes = field(repr=False)

    def mac(self, data: bytes) -> bytes:
        return hmac.digest(self.key, data, "sha256")

    def check(self, data: bytes, mac: Any) -> bool:
        """Whether ``mac`` is this session's MAC of ``data`` (constant time)."""
        return isinstance(mac, bytes) and hmac.compare_digest(self.mac(data), mac)


@dataclass(frozen=True)
class SessionOffer:
    """The gateway's half: send :attr:`public` with the attestation challenge, then
    :meth:`complete` with the attested document's ``fides.session``."""

    private: X25519PrivateKey = field(repr=False)
    public: bytes

    @classmethod
    def new(cls) -> SessionOffer:
        private = X25519PrivateKey.generate()
        return cls(private, _raw(private.public_key()))

    def complete(self, answer: Any, *, nonce: bytes, module_id: str) -> SessionKey:
        """The session key, from the ``fides.session`` map of an attestation document that
        was checked (chain, signature, measurement, nonce) for ``nonce``."""
        if not isinstance(answer, dict):
            raise SessionError("the attestation document carries no session")
        initiator = answer.get("initiator")
        if not isinstance(initiator, bytes) or not hmac.compare_digest(initiator, self.public):
            raise SessionError("the attestation document's session answers another offer")
        enclave_public = answer.get("public_key")
        peer = _peer(enclave_public, "the enclave's session key")
        assert isinstance(enclave_public, bytes)  # _peer checked it
        key = _derive(
            self.private,
            peer,
            nonce=nonce,
            module_id=module_id,
            initiator_public=self.public,
            enclave_public=enclave_public,
        )
        return SessionKey(session_id(self.public, enclave_public), key)


def accept_offer(
    initiator_public: Any, *, nonce: bytes, module_id: str
) -> tuple[SessionKey, dict[str, bytes]]:
    """The enclave's half: the session key for an offer, and the ``fides.session`` map to put
    in the attestation document it signs."""
    peer = _peer(initiator_public, "session_key")
    private = X25519PrivateKey.generate()
    enclave_public = _raw(private.public_key())
    key = _derive(
        private,
        peer,
        nonce=nonce,
        module_id=module_id,
        initiator_public=initiator_public,
        enclave_public=enclave_public,
    )
    answer = {"initiator": initiator_public, "public_key": enclave_public}
    return SessionKey(session_id(initiator_public, enclave_public), key), answer

"""Errors raised inside the enclave process (boot, sealing, resources, protocol).

Each carries a short ``code`` that travels in error frames (``{"error": {"code", "message"}}``)
so that the gateway can tell a bad request from an enclave that cannot serve. Client-side
evidence checks have their own hierarchy in :mod:`fides_core.attestation`.
"""

from __future__ import annotations


class EnclaveFailure(Exception):
    """Base class of every enclave-side failure; ``code`` is the wire error code."""

    code: str = "internal"


# -- boot: sealed model, platform ---------------------------------------------------------


class BootError(EnclaveFailure):
    """The enclave refuses to start; the message says why and what to do."""

    code = "boot_failed"


class PlatformError(BootError):
    """The simulated platform (secret, keys, counter) is missing or unsafe."""

    code = "platform"


class SealError(BootError):
    """A sealed model cannot be opened; the enclave never runs an unverified model."""

    code = "sealed_model"


class SealedFileMalformed(SealError):
    code = "sealed_malformed"


class SealedFileTampered(SealError):
    """AES-GCM authentication failed: the file (header or ciphertext) was modified."""

    code = "sealed_tampered"


class SealedForOtherMeasurement(SealError):
    """Sealed under another measurement (other code, model or config): MRENCLAVE policy."""

    code = "sealed_other_measurement"


class RollbackRejected(SealError):
    """The sealed model is older than the platform's counter (a rollback attempt)."""

    code = "sealed_rollback"


# -- resources ------------------------------------------------------------------------------


class ModelTooLarge(BootError):
    """The verifier's estimated footprint exceeds the enclave memory budget (no paging)."""

    code = "model_too_large"


# -- requests and protocol ------------------------------------------------------------------


class ProtocolError(EnclaveFailure):
    """A frame that cannot be served; ``request_id`` is echoed when it could be read."""

    code = "protocol"

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class MalformedFrame(ProtocolError):
    code = "malformed_frame"


class UnsupportedVersion(ProtocolError):
    code = "unsupported_version"


class FrameTooLarge(ProtocolError):
    """Bigger than the maximum frame size: the connection is closed after the answer."""

    code = "frame_too_large"


class UnknownOperation(ProtocolError):
    code = "unknown_op"


class InvalidRequest(EnclaveFailure):
    """A well-formed frame whose arguments are wrong (tensor shapes, dtypes, sizes)."""

    code = "bad_request"


class BatchTooLarge(InvalidRequest):
    code = "batch_too_large"

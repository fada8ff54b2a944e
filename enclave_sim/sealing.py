"""Sealing: the verifier model encrypted for one measurement on one (simulated) platform.

Key (MRENCLAVE policy: only an enclave with the same measurement derives it)::

    key = HKDF-SHA384(ikm=platform_secret, salt=header.salt,
                      info=b"fides-seal/1" + measurement, length=32)      # AES-256-GCM

File layout (all integers big-endian); the whole header is AES-GCM associated data, so any
flipped header byte fails authentication like a flipped ciphertext byte::

    magic        8   b"FIDESSL1"
    format       2   1
    version      8   model version (monotonic; see rollback below)
    measurement 48   pcr0 the file was sealed for
    model_pcr   48   pcr2 (model + config digest), lets the enclave compute pcr0 before opening
    salt        16   random
    nonce       12   random
    ciphertext  ...  AES-GCM(CBOR {"model": bytes, "config": map}) with its 16-byte tag

Boot: pcr0 = combine(pcr1 of the running code, header.model_pcr); a header measurement other
than pcr0 is "sealed for another measurement"; a failed tag is "tampered"; after opening, the
model and config are re-hashed and must give header.model_pcr.

Rollback: sealed data has no freshness; an old sealed file opens as well as a new one. A
monotonic counter in the platform directory (``model_counter``) records the highest version
booted; a lower version is refused. SIMULATED: the host can edit that file, so this stops
accidents and naive replays only; real protection needs a hardware monotonic counter (TPM NV
index) or a remote counter service.
"""

from __future__ import annotations

import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from enclave_sim.pki import load_platform_secret
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import (
    BootError,
    PlatformError,
    RollbackRejected,
    SealedFileMalformed,
    SealedFileTampered,
    SealedForOtherMeasurement,
)
from fides_core.measurement import CODE_ROOT, Measurement, code_digest, measure, model_digest

MAGIC = b"FIDESSL1"
FORMAT_VERSION = 1
COUNTER_FILE = "model_counter"
_HEADER = struct.Struct(">8sHQ48s48s16s12s")
TAG_SIZE = 16


@dataclass(frozen=True)
class SealedHeader:
    format: int
    version: int
    measurement: bytes
    model_pcr: bytes
    salt: bytes
    nonce: bytes
    raw: bytes

    @classmethod
    def parse(cls, data: bytes) -> SealedHeader:
        if len(data) < _HEADER.size + TAG_SIZE:
            raise SealedFileMalformed(f"sealed file too short ({len(data)} bytes)")
        magic, fmt, version, meas, model_pcr, salt, nonce = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise SealedFileMalformed("not a Fides sealed model (bad magic)")
        if fmt != FORMAT_VERSION:
            raise SealedFileMalformed(f"sealed format {fmt} is not supported")
        return cls(fmt, version, meas, model_pcr, salt, nonce, data[: _HEADER.size])


@dataclass(frozen=True)
class UnsealedModel:
    model: bytes
    config: EnclaveModelConfig
    version: int
    measurement: Measurement


def derive_key(secret: bytes, salt: bytes, measurement: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA384(), length=32, salt=salt, info=b"fides-seal/1" + measurement
    ).derive(secret)


def read_counter(platform_dir: Path) -> int:
    path = platform_dir / COUNTER_FILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        raise PlatformError(f"{path} is corrupt; it must hold one non-negative integer")
    return int(text)


def write_counter(platform_dir: Path, value: int) -> None:
    """Atomic replace, so a crash leaves the old or the new value, never a torn file."""
    tmp = platform_dir / f".{COUNTER_FILE}.{os.getpid()}"
    tmp.write_text(f"{value}\n", encoding="ascii")
    os.replace(tmp, platform_dir / COUNTER_FILE)


def seal(
    model: bytes,
    config: EnclaveModelConfig,
    platform_dir: Path,
    *,
    version: int | None = None,
    code_root: Path = CODE_ROOT,
) -> tuple[bytes, Measurement, int]:
    """Seal ``model`` for the measurement of this code with it. ``version`` defaults to the
    platform counter + 1. Returns the file bytes, the measurement and the version."""
    if version is None:
        version = read_counter(platform_dir) + 1
    if not 0 <= version < 2**63:
        raise BootError("model version must be in 0..2**63-1")
    measurement = measure(model, config, code_root)
    secret = load_platform_secret(platform_dir)
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, version, measurement.pcr0, measurement.pcr2, salt, nonce
    )
    plaintext = cbor2.dumps({"model": model, "config": config.as_dict()})
    key = derive_key(secret, salt, measurement.pcr0)
    return header + AESGCM(key).encrypt(nonce, plaintext, header), measurement, version


def unseal(
    data: bytes,
    platform_dir: Path,
    *,
    code_root: Path = CODE_ROOT,
    update_counter: bool = True,
) -> UnsealedModel:
    """Open a sealed model for the code at ``code_root``; fails closed with a named error."""
    header = SealedHeader.parse(data)
    measurement = Measurement.from_parts(code_digest(code_root), header.model_pcr)
    if header.measurement != measurement.pcr0:
        raise SealedForOtherMeasurement(
            f"the sealed model was sealed for measurement {header.measurement.hex()[:16]}..., "
            f"this enclave measures {measurement.hex[:16]}... (other enclave code, or an altered "
            "header); re-seal it with `fides enclave seal` for this build"
        )
    key = derive_key(load_platform_secret(platform_dir), header.salt, measurement.pcr0)
    try:
        plaintext = AESGCM(key).decrypt(header.nonce, data[len(header.raw) :], header.raw)
    except InvalidTag:
        raise SealedFileTampered(
            "the sealed model failed authentication: it was modified, or sealed on another "
            "platform (another platform_secret)"
        ) from None
    try:
        body = cbor2.loads(plaintext)
        model, config = body["model"], EnclaveModelConfig.from_dict(body["config"])
    except Exception as exc:  # authenticated but unreadable: a sealing bug, still fail closed
        raise SealedFileMalformed(f"sealed payload cannot be read: {exc}") from None
    if not isinstance(model, bytes) or model_digest(model, config) != header.model_pcr:
        raise SealedFileTampered("the sealed model does not match its measured digest")
    counter = read_counter(platform_dir)
    if header.version < counter:
        raise RollbackRejected(
            f"sealed model version {header.version} is older than the platform counter "
            f"{counter}: refusing a rollback (seal a newer version)"
        )
    if update_counter and header.version > counter:
        write_counter(platform_dir, header.version)
    return UnsealedModel(model, config, header.version, measurement)

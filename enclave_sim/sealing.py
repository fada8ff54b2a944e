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
monotonic counter in the platform directory records the highest version booted; a lower version
is refused. There is one counter per model identity (the gateway's model name), carried inside
the sealed payload (authenticated, so a file cannot be moved to another model's counter):
``model_counters/<identity>``. Keyed by the name, not by pcr2: a rollback replays an *older*
verifier of the same model, whose pcr2 differs from the current one's, so a counter per pcr2
would let it boot under its own, lower counter. One counter per model also lets each model's
enclave restart from its own sealed file whatever other models were sealed since (a single
platform-wide counter refused model A's restart once model B had been sealed after it).

Files sealed without an identity (``fides enclave seal``, and every file sealed before the
counters were per model) use the platform-wide counter ``model_counter`` as before. Migration:
a model without a counter of its own starts from ``model_counter`` (it is at least every
version booted on the platform), fixed when its first named file is sealed (so that other
models' boots in between do not refuse that file), and every boot raises ``model_counter`` to
its version too, so an older file sealed without an identity stays refused after its model got
its own counter.
SIMULATED: the host can edit these files, so this stops accidents and naive replays only; real
protection needs a hardware monotonic counter (TPM NV index) or a remote counter service.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import struct
from collections.abc import Iterator
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
COUNTER_FILE = "model_counter"  # platform-wide: files sealed without a model identity
COUNTER_DIR = "model_counters"  # one file per model identity
# held (flock) around every read-check-write of the counters: enclaves of several models boot
# at once, and two boots reading then raising the platform-wide counter could write the lower
# version last (the counter going down)
COUNTER_LOCK = ".counters.lock"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
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


def _counter_path(platform_dir: Path, model_id: str | None) -> Path:
    if model_id is None:
        return platform_dir / COUNTER_FILE
    if not model_id:
        raise BootError("a model identity for the rollback counter must not be empty")
    name = model_id if _SAFE_NAME.fullmatch(model_id) else None
    if name is None:  # any other name: a fixed-length file name that cannot leave the folder
        name = "sha256-" + hashlib.sha256(model_id.encode("utf-8")).hexdigest()
    return platform_dir / COUNTER_DIR / name


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise PlatformError(f"{path} is corrupt; it must hold one non-negative integer")
    return int(text)


@contextlib.contextmanager
def counters_locked(platform_dir: Path) -> Iterator[None]:
    """The platform's rollback counters held by this process until the block ends (an
    advisory ``flock`` every seal and boot of this code takes, across processes and the
    containers sharing the platform volume)."""
    # read-only and readable by all: flock needs no write access, and the lock file holds
    # nothing, so a boot under another uid than the one that sealed can take it too
    fd = os.open(platform_dir / COUNTER_LOCK, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_counter(platform_dir: Path, model_id: str | None = None) -> int:
    """The rollback counter of ``model_id`` (None: the platform-wide one). A model without a
    counter of its own starts from the platform-wide one (platforms from before per-model
    counters keep their protection)."""
    own = _read_int(_counter_path(platform_dir, model_id)) if model_id is not None else None
    return own if own is not None else _read_int(platform_dir / COUNTER_FILE) or 0


def write_counter(platform_dir: Path, value: int, model_id: str | None = None) -> None:
    """Atomic replace, so a crash leaves the old or the new value, never a torn file."""
    path = _counter_path(platform_dir, model_id)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{value}\n", encoding="ascii")
    os.replace(tmp, path)


def seal(
    model: bytes,
    config: EnclaveModelConfig,
    platform_dir: Path,
    *,
    version: int | None = None,
    code_root: Path = CODE_ROOT,
    model_id: str | None = None,
) -> tuple[bytes, Measurement, int]:
    """Seal ``model`` for the measurement of this code with it. ``model_id``: the model's
    identity, whose rollback counter the file is checked against at boot (None: the
    platform-wide counter). ``version`` defaults to that counter + 1. Returns the file bytes,
    the measurement and the version."""
    if version is None:
        with counters_locked(platform_dir):
            version = read_counter(platform_dir, model_id) + 1
    if not 0 <= version < 2**63:
        raise BootError("model version must be in 0..2**63-1")
    measurement = measure(model, config, code_root)
    secret = load_platform_secret(platform_dir)
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, version, measurement.pcr0, measurement.pcr2, salt, nonce
    )
    body: dict[str, object] = {"model": model, "config": config.as_dict()}
    if model_id is not None:
        own = _counter_path(platform_dir, model_id)  # refuses an empty identity before sealing
        with counters_locked(platform_dir):
            if _read_int(own) is None:
                # the model's counter starts where it inherits from now: boots of other
                # models that raise the platform-wide counter before this file first boots do
                # not make it a rollback
                write_counter(platform_dir, read_counter(platform_dir, model_id), model_id)
        body["counter"] = model_id
    plaintext = cbor2.dumps(body)
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
        model_id = body.get("counter")  # None: sealed without a model identity
        if model_id is not None and not (isinstance(model_id, str) and model_id):
            raise ValueError("the model identity is not a non-empty string")
    except Exception as exc:  # authenticated but unreadable: a sealing bug, still fail closed
        raise SealedFileMalformed(f"sealed payload cannot be read: {exc}") from None
    if not isinstance(model, bytes) or model_digest(model, config) != header.model_pcr:
        raise SealedFileTampered("the sealed model does not match its measured digest")
    with counters_locked(platform_dir):
        counter = read_counter(platform_dir, model_id)
        whose = f"model {model_id!r}'s counter" if model_id is not None else "the platform counter"
        if header.version < counter:
            raise RollbackRejected(
                f"sealed model version {header.version} is older than {whose} "
                f"{counter}: refusing a rollback (seal a newer version)"
            )
        if update_counter:
            if model_id is not None and (
                header.version > counter or _read_int(_counter_path(platform_dir, model_id)) is None
            ):
                write_counter(platform_dir, header.version, model_id)
            # the platform-wide counter stays the highest version booted, so that a file
            # sealed without an identity (before per-model counters) cannot roll a model back
            if header.version > read_counter(platform_dir):
                write_counter(platform_dir, header.version)
    return UnsealedModel(model, config, header.version, measurement)

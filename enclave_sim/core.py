"""The enclave's logic, free of any transport: keys, attestation, verification.

The server (:mod:`enclave_sim.server`) runs one of these behind the Unix socket; the gateway's
in-process fake runs one directly. Both therefore run the real model and really sign.

Keys, both new at every boot (nothing signed by a previous boot verifies against this one's
attestation):

- the attestation key (P-384, ES384), certified by the platform CA in a per-boot leaf
  certificate (the role of the Nitro Security Module's key): it signs attestation documents;
- the result key (P-256, ES256), whose public half the attestation document carries in
  ``public_key`` (the role of an enclave application's key): it signs verification results.
  ES256 because its signature is on every verified answer's path;
- a session key per relying party that offers one when it attests (X25519, HKDF, HMAC-SHA256,
  :mod:`fides_core.session`): results verified under it carry a MAC the relying party checks
  instead of the signature; the signature stays for everybody else.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import onnxruntime as ort
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from enclave_sim.pki import (
    PlatformIdentity,
    issue_leaf,
    load_identity,
    new_key,
    new_result_key,
)
from enclave_sim.resources import (
    Footprint,
    ResourceSettings,
    busy_wait_us,
    estimate_footprint,
    paging_penalty_us,
)
from enclave_sim.sealing import unseal
from fides_core import cose
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import BatchTooLarge, BootError, InvalidRequest
from fides_core.enclave_wire import PROTOCOL_VERSION
from fides_core.evidence import (
    EVIDENCE_VERSION,
    MAX_NONCE,
    MAX_USER_DATA,
    MIN_NONCE,
    RESULT_TYPE,
    leaf_hash,
    merkle_tree,
)
from fides_core.measurement import CODE_ROOT, Measurement
from fides_core.session import SessionError, SessionKey, accept_offer
from fides_core.tensors import Array, encode_tensor, tensor_digest
from fides_core.verify import (
    InputSpec,
    RejectedItem,
    VerifiedItem,
    VerifyRequest,
    check_request,
)

log = logging.getLogger(__name__)

BANNER = (
    "SIMULATED ENCLAVE: no hardware isolation. Memory is plaintext, keys live on the host, "
    "evidence is marked simulated=true and a strict verifier rejects it."
)
LEAF_RENEW_BEFORE = dt.timedelta(days=1)
# MAC sessions kept at once (one per attesting gateway; the least recently used is dropped
# beyond this, and its gateway falls back to checking signatures)
MAX_SESSIONS = 16

# onnxruntime type string -> OIP datatype
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
}


@dataclass(frozen=True)
class VerifyOutput:
    seq: int  # the signed result's sequence number (unchanged when every request was refused)
    items: list[VerifiedItem | RejectedItem]  # one per request, in request order
    result: bytes  # the signed batch result (COSE_Sign1), also inside each item's evidence;
    # empty when every request was refused (nothing was signed)


@dataclass
class _Counters:
    calls: int = 0
    rows: int = 0
    errors: int = 0


def _now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


class EnclaveCore:
    """A booted enclave: a loaded verifier, a measurement and per-boot keys."""

    def __init__(
        self,
        model: bytes,
        config: EnclaveModelConfig,
        measurement: Measurement,
        identity: PlatformIdentity,
        *,
        model_version: int = 0,
        resources: ResourceSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.measurement = measurement
        self.model_version = model_version
        self.resources = resources or ResourceSettings()
        self._clock = clock
        self.footprint: Footprint = estimate_footprint(model, config.max_batch_size)
        self.penalty_us = paging_penalty_us(self.footprint, self.resources)  # may refuse
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = config.intra_op_threads
        opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                model, sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise BootError(f"the verifier model does not load in onnxruntime: {exc}") from None
        self.inputs = self._input_specs()
        model_outputs = [o.name for o in self._session.get_outputs()]
        wanted = list(config.outputs) if config.outputs is not None else model_outputs
        missing = [o for o in wanted if o not in model_outputs]
        if missing:
            raise BootError(f"verifier config names outputs {missing} the model does not have")
        self.outputs = wanted
        self.module_id = "sim-" + secrets.token_hex(8)
        self._identity = identity
        self._attestation_key = new_key()
        self._leaf = issue_leaf(identity, self._attestation_key.public_key(), self.module_id)
        self._attestation_cose = cose.private_key(self._attestation_key)
        result_key = new_result_key()
        self._result_cose = cose.private_key(result_key)
        self.result_public_key = result_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._seq = 0
        self._lock = threading.Lock()
        self._sessions: OrderedDict[bytes, SessionKey] = OrderedDict()
        self.counters = _Counters()

    # -- boot ----------------------------------------------------------------------------

    @classmethod
    def boot(
        cls,
        sealed_model: Path,
        platform_dir: Path,
        *,
        resources: ResourceSettings | None = None,
        code_root: Path = CODE_ROOT,
    ) -> EnclaveCore:
        """Unseal the verifier for this code's measurement and load it; fails closed."""
        log.warning(BANNER)
        try:
            data = sealed_model.read_bytes()
        except OSError as exc:
            raise BootError(f"cannot read the sealed model {sealed_model}: {exc}") from None
        identity = load_identity(platform_dir)
        unsealed = unseal(data, platform_dir, code_root=code_root)
        core = cls(
            unsealed.model,
            unsealed.config,
            unsealed.measurement,
            identity,
            model_version=unsealed.version,
            resources=resources,
        )
        log.warning(
            "enclave %s booted: measurement %s, model version %d, footprint %.2f MB of %.1f MB%s",
            core.module_id,
            core.measurement.hex,
            core.model_version,
            core.footprint.total_bytes / 1e6,
            core.resources.memory_budget_bytes / 1e6,
            f", paging penalty {core.penalty_us:.0f} us/call" if core.penalty_us else "",
        )
        return core

    def _input_specs(self) -> list[InputSpec]:
        specs = []
        for arg in self._session.get_inputs():
            datatype = _ORT_TYPES.get(arg.type)
            if datatype is None:
                raise BootError(f"verifier input {arg.name} has unsupported type {arg.type}")
            shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
            if not shape:
                raise BootError(f"verifier input {arg.name} must have a batch axis")
            specs.append(InputSpec(arg.name, datatype, shape))
        return specs

    # -- info and attestation ----------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "module_id": self.module_id,
            "simulated": True,
            "protocol": PROTOCOL_VERSION,
            "measurement": self.measurement.pcr0,
            "model_version": self.model_version,
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}
                for s in self.inputs
            ],
            "outputs": list(self.outputs),
            "max_batch_size": self.config.max_batch_size,
            "footprint_bytes": self.footprint.total_bytes,
            "memory_budget_bytes": self.resources.memory_budget_bytes,
            "paging_penalty_us": self.penalty_us,
            "transition_us": self.resources.transition_us,
            "seq": self._seq,
        }

    def _leaf_der(self) -> bytes:
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        if self._leaf.not_valid_after_utc - now < LEAF_RENEW_BEFORE:
            self._leaf = issue_leaf(
                self._identity, self._attestation_key.public_key(), self.module_id
            )
        return self._leaf.public_bytes(serialization.Encoding.DER)

    def attest(
        self, nonce: bytes, user_data: bytes | None = None, session_key: bytes | None = None
    ) -> bytes:
        """An attestation document (COSE_Sign1) binding ``nonce`` to this boot's identity.

        ``session_key``: a relying party's X25519 public key (:mod:`fides_core.session`); the
        document then carries this enclave's half of the exchange, and results verified under
        that session carry a MAC besides their signature."""
        if not isinstance(nonce, bytes) or not MIN_NONCE <= len(nonce) <= MAX_NONCE:
            raise InvalidRequest(f"nonce must be {MIN_NONCE}..{MAX_NONCE} bytes")
        if user_data is not None and (
            not isinstance(user_data, bytes) or len(user_data) > MAX_USER_DATA
        ):
            raise InvalidRequest(f"user_data must be at most {MAX_USER_DATA} bytes")
        session_answer: dict[str, bytes] | None = None
        if session_key is not None:
            try:
                session, session_answer = accept_offer(
                    session_key, nonce=nonce, module_id=self.module_id
                )
            except SessionError as exc:
                raise InvalidRequest(str(exc)) from None
            with self._lock:
                self._sessions[session.id] = session
                self._sessions.move_to_end(session.id)
                while len(self._sessions) > MAX_SESSIONS:
                    self._sessions.popitem(last=False)
        busy_wait_us(self.resources.transition_us)
        claims: dict[str, Any] = {
            "module_id": self.module_id,
            "timestamp": _now_ms(self._clock),
            "digest": "SHA384",
            "pcrs": self.measurement.pcrs(),
            "certificate": self._leaf_der(),
            "cabundle": self._identity.cabundle,
            "public_key": self.result_public_key,
            "user_data": user_data,
            "nonce": nonce,
            "simulated": True,
            "fides": {
                "protocol": PROTOCOL_VERSION,
                "model_version": self.model_version,
                "memory_budget_bytes": self.resources.memory_budget_bytes,
                "model_footprint_bytes": self.footprint.total_bytes,
                "paging": self.penalty_us > 0,
                "transition_us": self.resources.transition_us,
            },
        }
        if session_answer is not None:
            claims["fides"]["session"] = session_answer
        return cose.sign1(cbor2.dumps(claims), self._attestation_cose)

    def session_mac(self, session_id: bytes, signed_result: bytes) -> bytes | None:
        """The MAC of a signed result under a session this boot agreed, or None when it
        does not know the session (another boot's, or dropped): the relying party then
        checks the signature, which it always can."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                self._sessions.move_to_end(session_id)  # the least recently used goes first
        return session.mac(signed_result) if session is not None else None

    # -- verification --------------------------------------------------------------------

    def verify(self, requests: Sequence[VerifyRequest | RejectedItem]) -> VerifyOutput:
        """Run the verifier on a batch and sign its result, bound to each request's exact
        input bytes, nonce and id (see fides_core.evidence for the format).

        Each request is checked on its own (:func:`check_request`): a bad one gets a
        :class:`RejectedItem` in its place and the others are verified and signed without it,
        so one request never fails the others of its batch. Only what concerns the whole call
        refuses it whole: no request at all, or more rows than ``max_batch_size``."""
        if not requests:
            raise InvalidRequest("verify needs at least one request")
        items: list[VerifiedItem | RejectedItem | None] = [None] * len(requests)
        accepted: list[tuple[int, VerifyRequest, int]] = []  # (position, request, rows)
        for i, r in enumerate(requests):
            if isinstance(r, RejectedItem):
                items[i] = r
                continue
            try:
                accepted.append((i, r, check_request(r, self.inputs)))
            except InvalidRequest as exc:
                items[i] = RejectedItem(r.id if isinstance(r.id, str) else None, exc.code, str(exc))
        rejected = len(requests) - len(accepted)
        if rejected:
            with self._lock:
                self.counters.errors += rejected
        rows = sum(n for _, _, n in accepted)
        if rows > self.config.max_batch_size:
            raise BatchTooLarge(
                f"{rows} rows in one call; the verifier takes at most {self.config.max_batch_size}"
            )
        if not accepted:
            return VerifyOutput(self._seq, [it for it in items if it is not None], b"")
        signed = self._verify_signed([r for _, r, _ in accepted], rows)
        for (i, _, _), item in zip(accepted, signed.items, strict=True):
            items[i] = item
        return VerifyOutput(signed.seq, [it for it in items if it is not None], signed.result)

    def _verify_signed(self, requests: Sequence[VerifyRequest], rows: int) -> VerifyOutput:
        """Run the verifier on checked requests and sign one result over all of them."""
        busy_wait_us(self.resources.transition_us + self.penalty_us)
        feeds = {
            s.name: np.concatenate([np.asarray(r.inputs[s.name]) for r in requests], axis=0)
            for s in self.inputs
        }  # name -> [rows, ...]
        results = self._session.run(self.outputs, feeds)
        bounds = np.cumsum([0] + [next(iter(r.inputs.values())).shape[0] for r in requests])
        entries: list[dict[str, Any]] = []
        per_request: list[dict[str, Array]] = []
        for i, r in enumerate(requests):
            outputs = {
                name: np.ascontiguousarray(value[bounds[i] : bounds[i + 1]])
                for name, value in zip(self.outputs, results, strict=True)
            }
            per_request.append(outputs)
            entries.append(
                {
                    "index": i,
                    "id": r.id,
                    "nonce": r.nonce,
                    "inputs": {name: tensor_digest(x) for name, x in r.inputs.items()},
                    "outputs": {name: encode_tensor(v) for name, v in outputs.items()},
                }
            )
        root, proofs = merkle_tree([leaf_hash(e) for e in entries])
        with self._lock:  # seq order == signing order
            self._seq += 1
            seq = self._seq
            payload = {
                "type": RESULT_TYPE,
                "module_id": self.module_id,
                "measurement": self.measurement.pcr0,
                "seq": seq,
                "timestamp": _now_ms(self._clock),
                "count": len(entries),
                "root": root,
                "simulated": True,
            }
            result = cose.sign1(cbor2.dumps(payload), self._result_cose)
            self.counters.calls += 1
            self.counters.rows += rows
        items: list[VerifiedItem | RejectedItem] = [
            VerifiedItem(
                r.id,
                per_request[i],
                cbor2.dumps(
                    {
                        "v": EVIDENCE_VERSION,
                        "result": result,
                        "entry": entries[i],
                        "proof": proofs[i],
                    }
                ),
            )
            for i, r in enumerate(requests)
        ]
        return VerifyOutput(seq, items, result)

    def leaf_certificate(self) -> x509.Certificate:
        return self._leaf

"""Client SDK for the verifiable-service deployment: a client that does not trust the gateway.

The gateway says whether an answer was verified. A provider that lies could say "verified" for
a tampered answer, so this client checks everything itself::

    handshake   GET /v2/models/{m}/attestation?nonce=<ours>  -> attestation document
                verify_attestation: chain to OUR pinned root, OUR expected measurement,
                OUR nonce (single use), simulated only if we said so  -> the enclave's result key
    inference   POST /v2/models/{m}/infer with our request id and integrity_nonce
                check_verification: signed by the attested key, bound to the exact input
                bytes we sent, our nonce and our id (a Merkle proof into the signed batch)
                q = the verifier's outputs FROM THE SIGNED EVIDENCE (never unsigned fields)
                detector(p_served, q) > threshold ?  re-classifier(p_served, q)  (onnxruntime)
    result      our verdict next to the gateway's claim; ``mismatch`` when they differ

Our verdict is about the answer AS SERVED to us:

- ``verified``: the served answer agrees with the enclave-signed verifier (detector score at
  or below the threshold for every row);
- ``attack``: it does not (``reclassified`` says what the re-classifier makes of it);
- ``unverified``: the response carried no evidence (the gateway said "unverified", e.g. its
  enclave was down under ``fail_open``, or the request was not sampled). Never "verified".

Enforce mode: the gateway says "attack" with ``integrity_replaced`` and serves the
re-classifier's answer instead. We never saw the original answer, so we cannot re-check that
it was attacked; we check what we hold: the replacement must pass our detector against the
signed verifier output (our verdict is then "verified") and say the class the gateway claims.

Evidence that does not check out raises the specific :class:`AttestationError` subclass from
``fides_core.attestation`` (never swallowed). A result is checked against the handshake in
force when its request was sent, then against the latest one (another caller may have renewed
the handshake after an enclave restart while the answer was on its way: the answer signed by
the boot we sent it to is as authentic as it was). A result signed by neither (the enclave
restarted since) triggers one new handshake; if the result still does not verify,
:class:`SignatureError` is raised. Callers that start together share one handshake.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import anyio
import httpx
import numpy as np
import yaml
from pydantic import ValidationError

from fides_client.transport import (
    ACCEPT_ENCODING,
    DEFAULT_MAX_RESPONSE_BYTES,
    Exchange,
    FidesClientError,
    FidesHTTPError,
    FidesTransportError,
    check_limits,
    warn_cleartext,
)
from fides_core.attestation import (
    AttestedEnclave,
    CheckedResult,
    MalformedEvidence,
    NonceStore,
    Policy,
    SignatureError,
    check_verification,
    load_root,
    verify_attestation,
)
from fides_core.config import format_validation_error
from fides_core.integrity import (
    DETECTOR_OUTPUT,
    NOVELTY_OUTPUT,
    P_INPUT,
    Q_INPUT,
    RECLASSIFIER_OUTPUT,
    VERDICTS,
    Verdict,
    answer_score,
    decide,
    judged_scores,
)
from fides_core.integrity_config import IntegrityConfig
from fides_core.layout import latest_version
from fides_core.oip import TensorError, decode_json_tensor, encode_json_tensor
from fides_core.tensors import DATATYPES, Array, datatype_of

__all__ = [
    "AsyncFidesClient",
    "CheckedInference",
    "FidesClient",
    "FidesClientError",
    "FidesHTTPError",
    "FidesTransportError",
    "IntegrityModels",
    "Verdict",
]

NONCE_BYTES = 32
# the detector's and re-classifier's ONNX interface (verifier/ exports them so)


# -- the local models -------------------------------------------------------------------------


@dataclass(frozen=True)
class IntegrityModels:
    """What the provider publishes for one model so that clients can check it themselves.

    ``detector`` and ``reclassifier``: ONNX files (inputs ``service_probs`` and
    ``verifier_probs`` [n, C] float32). ``threshold``: None reads ``threshold`` from the
    ``model_card.json`` beside the detector. ``output``: the service output holding the class
    probabilities; ``verifier_output``: the signed verifier output. ``measurement``: the
    expected enclave measurement (hex), when known; the client pins what it is given.
    ``novelty``: the out-of-distribution check, when the model has one (an answer whose input
    it calls novel is "unverified", as the gateway says; see fides_core.integrity).
    """

    detector: Path
    reclassifier: Path
    threshold: float | None = None
    output: str = "probabilities"
    verifier_output: str = "probabilities"
    measurement: str | None = None
    novelty: Path | None = None  # the out-of-distribution check (ONNX; threshold in its card)

    @classmethod
    def from_repository(cls, repository: str | Path, model: str) -> IntegrityModels:
        """Read a model repository (e.g. the provider's published copy): the ``integrity:``
        block of ``<model>/config.yaml`` names the detector and re-classifier; the expected
        measurement is pinned there or computed from the verifier (``fides enclave measure``)."""
        from fides_core.enclave_config import from_enclave_block
        from fides_core.measurement import measure

        repo = Path(repository)
        block = read_integrity_block(repo / model / "config.yaml")
        measurement = block.enclave.measurement
        if measurement is None:
            verifier = latest_version(repo / block.enclave.verifier_model) / "model.onnx"
            vcfg = from_enclave_block(block.enclave.model_dump())
            measurement = measure(verifier.read_bytes(), vcfg).pcr0.hex()
        return cls(
            detector=latest_version(repo / block.detector) / "model.onnx",
            reclassifier=latest_version(repo / block.reclassifier) / "model.onnx",
            threshold=block.threshold,
            output=block.output,
            verifier_output=block.enclave.outputs[0],
            measurement=measurement,
            novelty=None
            if block.novelty is None
            else latest_version(repo / block.novelty) / "model.onnx",
        )


def read_integrity_block(path: Path) -> IntegrityConfig:
    """The ``integrity:`` block of a served model's ``config.yaml`` (validated as the gateway
    validates it; the rest of the file is the gateway's business)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    block = raw.get("integrity") if isinstance(raw, dict) else None
    if block is None:
        raise ValueError(f"{path} has no integrity block")
    try:
        return IntegrityConfig.model_validate(block)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, path, "integrity")) from None


def _card(model: Path) -> dict[str, Any]:
    """The ``model_card.json`` beside an ONNX file; it must carry a threshold."""
    path = model.parent / "model_card.json"
    card = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(card, dict) or "threshold" not in card:
        raise ValueError(f"{path} has no 'threshold'")
    return card


class _Session:
    """One ONNX model run on this machine: onnxruntime when it is installed, else onnx's own
    reference evaluator (numpy; slower, but the SDK then needs neither onnxruntime nor torch)."""

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            from onnx.reference import ReferenceEvaluator

            self._reference: Any = ReferenceEvaluator(str(path))
            self._ort: Any = None
            self.input_names = list(self._reference.input_names)
            return
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self._ort = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._ort.get_inputs()]

    def run(self, output: str, feed: Mapping[str, Array]) -> Array:
        if self._ort is not None:
            return np.asarray(self._ort.run([output], dict(feed))[0])
        return np.asarray(self._reference.run([output], dict(feed))[0])


class _LocalDetector:
    """The detector, the re-classifier and the novelty check, run here (see :class:`_Session`)."""

    def __init__(self, models: IntegrityModels) -> None:
        self.detector = _Session(models.detector)
        self.reclassifier = _Session(models.reclassifier)
        if models.threshold is not None:
            self.threshold = float(models.threshold)
        else:
            self.threshold = float(_card(models.detector)["threshold"])
        self.novelty: _Session | None = None
        self.novelty_threshold: float | None = None
        if models.novelty is not None:
            self.novelty = _Session(models.novelty)
            self.novelty_threshold = float(_card(models.novelty)["threshold"])

    def novelty_scores(self, inputs: Mapping[str, Array]) -> Array | None:
        """The inputs' novelty ``[n]`` (None without a novelty check)."""
        if self.novelty is None:
            return None
        feed = {name: np.asarray(inputs[name]) for name in self.novelty.input_names}
        return self.novelty.run(NOVELTY_OUTPUT, feed).astype(np.float64).reshape(-1)

    def scores(self, p: Array, q: Array) -> Array:
        out = self.detector.run(DETECTOR_OUTPUT, {P_INPUT: p, Q_INPUT: q})
        return out.astype(np.float64).reshape(len(p))  # [n]

    def reclassify(self, p: Array, q: Array) -> Array:
        out = self.reclassifier.run(RECLASSIFIER_OUTPUT, {P_INPUT: p, Q_INPUT: q})
        return out.astype(np.float32)  # [n, C]


# -- the result -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedInference:
    """One answer, what the gateway claims about it, and what we found ourselves."""

    model: str
    request_id: str
    outputs: dict[str, Array]  # every output as served
    probabilities: Array  # [n, C] the served class probabilities
    verdict: Verdict  # OUR verdict on the served answer
    scores: Array | None  # [n] our detector scores (None: no evidence)
    threshold: float  # our threshold
    reclassified: tuple[int, ...] | None  # per row, -1 where not flagged; None: no attack
    verifier_probabilities: Array | None  # [n, C] q, from the signed evidence
    evidence: CheckedResult | None  # the checked signed result
    gateway_verdict: str | None  # the gateway's claims (unsigned)
    gateway_score: float | None
    gateway_threshold: float | None
    gateway_reclassified: tuple[int, ...] | None
    replaced: bool  # the gateway says it replaced an attacked answer (enforce mode)
    reason: str | None  # the gateway's reason for "unverified"
    mismatches: tuple[str, ...]  # where the gateway's claims differ from our findings
    parameters: dict[str, Any] = field(repr=False)  # the response parameters as received

    @property
    def mismatch(self) -> bool:
        """The gateway's claimed result differs from ours: do not trust this gateway."""
        return bool(self.mismatches)

    @property
    def score(self) -> float | None:
        """Our detector score: the largest over the rows, as the gateway reports it."""
        return float(self.scores.max()) if self.scores is not None else None

    @property
    def trusted(self) -> bool:
        """Verified by us, and the gateway said the same."""
        return self.verdict == "verified" and not self.mismatch


# -- the checks, shared by the sync and async clients -----------------------------------------


@dataclass
class _Prepared:
    request_id: str
    nonce: bytes
    inputs: dict[str, Array]
    body: dict[str, Any]


@dataclass
class _Served:
    outputs: dict[str, Array]
    parameters: dict[str, Any]
    evidence: bytes | None


def _as_arrays(inputs: Mapping[str, Any]) -> dict[str, Array]:
    arrays: dict[str, Array] = {}
    for name, value in inputs.items():
        a = np.ascontiguousarray(value)
        if (a.dtype.kind, a.dtype.itemsize) not in {
            (d.kind, d.itemsize) for d in DATATYPES.values()
        }:
            raise TypeError(f"input {name!r}: unsupported dtype {a.dtype}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"input {name!r} holds NaN or infinity, which JSON cannot carry")
        arrays[name] = a
    if not arrays:
        raise ValueError("at least one input tensor is needed")
    return arrays


def _json_input(name: str, array: Array) -> dict[str, Any]:
    tensor = encode_json_tensor(name, array, datatype_of(array))
    tensor["data"] = np.asarray(tensor["data"]).tolist()  # httpx sends with the json module
    return tensor


def _decode_output(raw: Any) -> tuple[str, Array]:
    try:
        return decode_json_tensor(raw, "output")
    except TensorError as exc:
        raise FidesClientError(f"the answer's {exc}") from None


def _per_row(value: Any, rows: int) -> tuple[int, ...] | None:
    """``integrity_reclassified``: an int for one row, "3,-1,7" for several."""
    if value is None:
        return None
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            classes: tuple[int, ...] = (value,)
        elif isinstance(value, str):
            classes = tuple(int(v) for v in value.split(","))
        else:
            raise ValueError(type(value).__name__)
    except ValueError:
        raise FidesClientError(f"integrity_reclassified {value!r} is not a class list") from None
    if len(classes) != rows:
        raise FidesClientError(f"integrity_reclassified has {len(classes)} rows, not {rows}")
    return classes


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer past float's range: JSON allows it
            return math.inf if value > 0 else -math.inf
    return None


def _segment(what: str, value: Any) -> str:
    """A model name or version as one URL path segment: ``?``, ``#`` or ``/`` in it would
    send the request to another endpoint of the gateway, so they travel percent-encoded."""
    if isinstance(value, int) and not isinstance(value, bool):  # version=2
        value = str(value)
    if not isinstance(value, str) or value in ("", ".", ".."):
        raise ValueError(f"{what} must be a name, not {value!r}")
    return quote(value, safe="")


class _Core:
    """Handshake state, request building and the checks; no I/O."""

    def __init__(
        self,
        model: str,
        *,
        root: bytes | str | Path,
        measurements: Iterable[str | bytes],
        allow_simulated: bool,
        models: IntegrityModels,
        version: str | None,
        nonce_ttl_s: float,
        score_tolerance: float,
    ) -> None:
        if not isinstance(allow_simulated, bool):
            raise TypeError("allow_simulated must be True or False, said explicitly")
        self.model = model
        self.root = load_root(Path(root).read_bytes() if isinstance(root, Path) else root)
        if isinstance(measurements, str | bytes):  # one value, not its characters
            measurements = (measurements,)
        self.policy = Policy.of(
            *measurements, allow_simulated=allow_simulated, nonce_max_age_s=nonce_ttl_s
        )
        self.models = models
        self.local = _LocalDetector(models)
        self.nonces = NonceStore(ttl_s=nonce_ttl_s)
        self.score_tolerance = score_tolerance
        name = _segment("model", model)
        base = f"/v2/models/{name}" + (
            f"/versions/{_segment('version', version)}" if version else ""
        )
        self.infer_path = f"{base}/infer"
        self.attestation_path = f"/v2/models/{name}/attestation"
        self.attested: AttestedEnclave | None = None
        self.handshakes = 0
        self._lock = threading.Lock()

    # handshake

    def challenge(self) -> tuple[bytes, dict[str, str]]:
        nonce = self.nonces.issue(NONCE_BYTES)
        return nonce, {"nonce": base64.urlsafe_b64encode(nonce).decode("ascii")}

    def accept_attestation(self, nonce: bytes, payload: Any) -> AttestedEnclave:
        if not isinstance(payload, dict) or not isinstance(payload.get("attestation"), str):
            raise MalformedEvidence("the handshake answer has no 'attestation' (base64)")
        try:
            document = base64.b64decode(payload["attestation"], validate=True)
        except (binascii.Error, ValueError):
            raise MalformedEvidence("the attestation document is not valid base64") from None
        attested = verify_attestation(
            document, root=self.root, policy=self.policy, nonce=nonce, nonce_store=self.nonces
        )
        with self._lock:
            self.attested = attested
            self.handshakes += 1
        return attested

    # inference

    def prepare(
        self,
        inputs: Mapping[str, Any],
        request_id: str | None,
        parameters: Mapping[str, Any] | None,
    ) -> _Prepared:
        arrays = _as_arrays(inputs)
        rid = request_id or uuid.uuid4().hex
        nonce = self.nonces.issue(NONCE_BYTES)
        params = dict(parameters or {})
        params["integrity_nonce"] = base64.b64encode(nonce).decode("ascii")
        body = {
            "id": rid,
            "inputs": [_json_input(name, a) for name, a in arrays.items()],
            "parameters": params,
        }
        return _Prepared(rid, nonce, arrays, body)

    def parse(self, payload: Any) -> _Served:
        if not isinstance(payload, dict) or not isinstance(payload.get("outputs"), list):
            raise FidesClientError("the inference answer has no outputs")
        outputs: dict[str, Array] = {}
        for raw_output in payload["outputs"]:
            name, array = _decode_output(raw_output)
            if name in outputs:  # which one would a user be given, which one checked?
                raise FidesClientError(f"the answer names output {name!r} twice")
            outputs[name] = array
        params = payload.get("parameters") or {}
        if not isinstance(params, dict):
            raise FidesClientError("the inference answer's parameters are not an object")
        raw = params.get("integrity_evidence")
        evidence = None
        if raw is not None:
            if not isinstance(raw, str):
                raise MalformedEvidence("integrity_evidence must be a base64 string")
            try:
                evidence = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise MalformedEvidence("integrity_evidence is not valid base64") from None
        return _Served(outputs, params, evidence)

    def check_sent(
        self, prepared: _Prepared, evidence: bytes, sent_under: AttestedEnclave | None
    ) -> tuple[CheckedResult | None, AttestedEnclave | None]:
        """``evidence`` checked against ``sent_under`` (the handshake in force when the request
        was sent), then against the latest handshake when another caller renewed it since.
        ``(result, None)``, or ``(None, latest)`` when neither key signed it: a new handshake
        is due unless another caller has replaced ``latest`` meanwhile."""
        tried: list[AttestedEnclave] = []
        for attested in (sent_under, self.attested):
            if attested is None or any(attested is t for t in tried):
                continue
            tried.append(attested)
            try:
                return self.check_evidence(prepared, evidence, attested), None
            except SignatureError:
                pass
        return None, tried[-1] if tried else None

    def check_evidence(
        self, prepared: _Prepared, evidence: bytes, attested: AttestedEnclave | None = None
    ) -> CheckedResult:
        """Raises SignatureError when not signed by the attested key (caller re-attests once).
        ``attested``: the handshake to check against (default: the latest)."""
        if attested is None:
            attested = self.attested
        if attested is None:
            raise SignatureError("no attested enclave to check the result against")
        return check_verification(
            evidence,
            attested=attested,
            inputs=prepared.inputs,
            nonce=prepared.nonce,
            request_id=prepared.request_id,
            nonce_store=self.nonces,
            max_age_s=self.policy.nonce_max_age_s,
            max_clock_skew_s=self.policy.max_clock_skew_s,
        )

    def judge(
        self, prepared: _Prepared, served: _Served, checked: CheckedResult | None
    ) -> CheckedInference:
        name = self.models.output
        if name not in served.outputs:
            raise FidesClientError(f"the answer has no output {name!r}")
        served_p = served.outputs[name]
        if served_p.dtype.kind not in "iuf":
            raise FidesClientError(
                f"output {name!r} holds {served_p.dtype} values, not class probabilities"
            )
        p = np.asarray(served_p, dtype=np.float32)  # [n, C]
        if p.ndim != 2:
            raise FidesClientError(f"output {name!r} is {list(p.shape)}, not [batch, classes]")
        params = served.parameters
        claimed = params.get("integrity_verdict")
        claimed_verdict = claimed if isinstance(claimed, str) else None
        replaced = params.get("integrity_replaced") is True
        claimed_classes = _per_row(params.get("integrity_reclassified"), len(p))
        mismatches: list[str] = []

        q: Array | None = None
        scores: Array | None = None
        ours: tuple[int, ...] | None = None
        verdict: Verdict = "unverified"
        if checked is not None:
            qname = self.models.verifier_output
            if qname not in checked.outputs:
                raise MalformedEvidence(f"the signed result has no output {qname!r}")
            q = np.asarray(checked.outputs[qname], dtype=np.float32)  # [n, C]
            if q.shape != p.shape:
                raise FidesClientError(
                    f"served answer {list(p.shape)} and signed verifier answer {list(q.shape)} "
                    "differ in shape"
                )
            scores = judged_scores(self.local.scores(p, q), p)  # NaN where p is not numbers
            novelty = self.local.novelty_scores(prepared.inputs)
            novel = None
            if novelty is not None and self.local.novelty_threshold is not None:
                novel = novelty > self.local.novelty_threshold
            verdict, flagged = decide(scores, self.local.threshold, novel)
            if flagged.any():
                classes = self.local.reclassify(p, q).argmax(1)
                ours = tuple(int(c) if f else -1 for c, f in zip(classes, flagged, strict=True))
        elif claimed_verdict in ("verified", "attack"):
            mismatches.append(
                f"evidence: the gateway says {claimed_verdict!r} but sent no evidence"
            )

        rid = params.get("integrity_request_id")
        if rid is not None and rid != prepared.request_id:
            mismatches.append(
                f"request_id: the gateway names {rid!r}, we sent {prepared.request_id!r}"
            )
        if checked is not None and claimed_verdict is not None:
            if replaced:
                mismatches.extend(
                    self._replaced_mismatches(claimed_verdict, verdict, p, claimed_classes)
                )
            else:
                mismatches.extend(
                    self._claim_mismatches(
                        claimed_verdict, verdict, scores, ours, claimed_classes, params
                    )
                )
        elif claimed_verdict is not None and claimed_verdict not in VERDICTS:
            mismatches.append(f"verdict: unknown verdict {claimed_verdict!r}")
        return CheckedInference(
            model=self.model,
            request_id=prepared.request_id,
            outputs=served.outputs,
            probabilities=p,
            verdict=verdict,
            scores=scores,
            threshold=self.local.threshold,
            reclassified=ours,
            verifier_probabilities=q,
            evidence=checked,
            gateway_verdict=claimed_verdict,
            gateway_score=_number(params.get("integrity_score")),
            gateway_threshold=_number(params.get("integrity_threshold")),
            gateway_reclassified=claimed_classes,
            replaced=replaced,
            reason=params.get("integrity_reason")
            if isinstance(params.get("integrity_reason"), str)
            else None,
            mismatches=tuple(mismatches),
            parameters=params,
        )

    def _claim_mismatches(
        self,
        claimed: str,
        verdict: Verdict,
        scores: Array | None,
        ours: tuple[int, ...] | None,
        claimed_classes: tuple[int, ...] | None,
        params: Mapping[str, Any],
    ) -> list[str]:
        out = []
        if claimed != verdict:
            out.append(f"verdict: the gateway says {claimed!r}, the evidence says {verdict!r}")
        score = _number(params.get("integrity_score"))
        ours_score = None if scores is None else answer_score(scores)
        if scores is not None and (
            (score is None) != (ours_score is None)
            or (
                score is not None
                and ours_score is not None
                and (not math.isfinite(score) or abs(score - ours_score) > self.score_tolerance)
            )
        ):
            out.append(f"score: the gateway says {score}, we compute {ours_score}")
        if claimed == verdict == "attack" and claimed_classes != ours:
            out.append(f"reclassified: the gateway says {claimed_classes}, we compute {ours}")
        return out

    def _replaced_mismatches(
        self, claimed: str, verdict: Verdict, p: Array, claimed_classes: tuple[int, ...] | None
    ) -> list[str]:
        # we never saw the original answer; we check the replacement we hold
        out = []
        if claimed != "attack":
            out.append(f"verdict: a replaced answer must say 'attack', not {claimed!r}")
        if verdict != "verified":
            out.append("replaced: the replacement answer does not agree with the signed verifier")
        if claimed_classes is None or all(c < 0 for c in claimed_classes):
            out.append("reclassified: a replaced answer names no re-classified class")
        else:
            served = p.argmax(1)
            if any(c >= 0 and c != int(s) for c, s in zip(claimed_classes, served, strict=True)):
                out.append(
                    f"reclassified: the gateway says {claimed_classes}, the replacement says "
                    f"{tuple(int(s) for s in served)}"
                )
        return out


# -- the clients ------------------------------------------------------------------------------


class _ClientBase:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        root: bytes | str | Path,
        measurements: Iterable[str | bytes],
        allow_simulated: bool,
        models: IntegrityModels,
        api_key: str | None,
        version: str | None,
        nonce_ttl_s: float,
        score_tolerance: float,
        timeout_s: float,
        max_response_bytes: int,
    ) -> None:
        check_limits(timeout_s, max_response_bytes)
        self.base_url = base_url
        self.model = model
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self._core = _Core(
            model,
            root=root,
            measurements=measurements,
            allow_simulated=allow_simulated,
            models=models,
            version=version,
            nonce_ttl_s=nonce_ttl_s,
            score_tolerance=score_tolerance,
        )
        self._headers = {"Accept-Encoding": ACCEPT_ENCODING}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def _exchange(self, method: str, path: str) -> Exchange:
        return Exchange(method, path, self.timeout_s, self.max_response_bytes)

    @property
    def attested(self) -> AttestedEnclave | None:
        """The enclave boot of our last successful handshake."""
        return self._core.attested

    @property
    def handshakes(self) -> int:
        """Successful handshakes so far (one more after each enclave restart)."""
        return self._core.handshakes

    @property
    def threshold(self) -> float:
        return self._core.local.threshold


class FidesClient(_ClientBase):
    """Synchronous client (httpx). Thread-safe for concurrent ``infer`` calls.

    ``root``: the pinned root certificate (PEM bytes or text, or a Path to the file).
    ``measurements``: the expected enclave measurements (hex or 48 bytes; at least one).
    ``allow_simulated``: accept the SIMULATED enclave; say True only for development.
    ``models``: the detector and re-classifier to run locally (:class:`IntegrityModels`).
    ``timeout_s``: each connect, read and write, and each answer as a whole (a trickled answer
    is cut off: :class:`FidesTransportError`). ``max_response_bytes``: the most an answer may
    hold once decoded (a larger one, a compression bomb included, is refused).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        root: bytes | str | Path,
        measurements: Iterable[str | bytes],
        allow_simulated: bool,
        models: IntegrityModels,
        api_key: str | None = None,
        version: str | None = None,
        timeout_s: float = 30.0,
        nonce_ttl_s: float = 60.0,
        score_tolerance: float = 1e-3,
        transport: httpx.BaseTransport | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(
            base_url,
            model,
            root=root,
            measurements=measurements,
            allow_simulated=allow_simulated,
            models=models,
            api_key=api_key,
            version=version,
            nonce_ttl_s=nonce_ttl_s,
            score_tolerance=score_tolerance,
            timeout_s=timeout_s,
            max_response_bytes=max_response_bytes,
        )
        if api_key and transport is None:  # a transport of one's own decides where bytes go
            warn_cleartext(base_url)
        self._handshake_lock = threading.Lock()
        self._http = httpx.Client(
            base_url=base_url, headers=self._headers, timeout=timeout_s, transport=transport
        )

    def attest(self) -> AttestedEnclave:
        """The handshake: our nonce, the gateway's attestation document, all checks."""
        nonce, query = self._core.challenge()
        payload = self._request("GET", self._core.attestation_path, params=query)
        return self._core.accept_attestation(nonce, payload)

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        exchange = self._exchange(method, path)
        try:
            with self._http.stream(method, path, **kw) as response:
                if exchange.start(response):
                    for chunk in response.iter_raw():
                        exchange.feed(chunk)
        except httpx.TransportError as exc:
            raise exchange.failed(exc) from exc
        return exchange.result(response)

    def infer(
        self,
        inputs: Mapping[str, Any],
        *,
        request_id: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> CheckedInference:
        """One OIP inference (``inputs``: name -> array, batch first), checked."""
        prepared = self._core.prepare(inputs, request_id, parameters)  # bad input: no request
        if self._core.attested is None:
            self._handshake(None)
        sent_under = self._core.attested
        served = self._core.parse(self._request("POST", self._core.infer_path, json=prepared.body))
        checked = None
        if served.evidence is not None:
            checked, stale = self._core.check_sent(prepared, served.evidence, sent_under)
            if checked is None:
                self._handshake(stale)  # the enclave may have restarted: one new handshake
                checked = self._core.check_evidence(prepared, served.evidence)
        return self._core.judge(prepared, served, checked)

    def _handshake(self, stale: AttestedEnclave | None) -> None:
        """One handshake for all the threads that need it: none when another thread has
        replaced ``stale`` (no handshake yet, or one whose key did not verify) meanwhile."""
        with self._handshake_lock:
            if self._core.attested is stale:
                self.attest()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncFidesClient(_ClientBase):
    """The same client on ``httpx.AsyncClient``. The local checks (one ES256 verification and
    two small ONNX models) run in the event loop: about a millisecond per request."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        root: bytes | str | Path,
        measurements: Iterable[str | bytes],
        allow_simulated: bool,
        models: IntegrityModels,
        api_key: str | None = None,
        version: str | None = None,
        timeout_s: float = 30.0,
        nonce_ttl_s: float = 60.0,
        score_tolerance: float = 1e-3,
        transport: httpx.AsyncBaseTransport | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        super().__init__(
            base_url,
            model,
            root=root,
            measurements=measurements,
            allow_simulated=allow_simulated,
            models=models,
            api_key=api_key,
            version=version,
            nonce_ttl_s=nonce_ttl_s,
            score_tolerance=score_tolerance,
            timeout_s=timeout_s,
            max_response_bytes=max_response_bytes,
        )
        if api_key and transport is None:  # a transport of one's own decides where bytes go
            warn_cleartext(base_url)
        # anyio's lock serves asyncio and trio alike (httpx runs on both)
        self._handshake_lock = anyio.Lock()
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=self._headers, timeout=timeout_s, transport=transport
        )

    async def attest(self) -> AttestedEnclave:
        nonce, query = self._core.challenge()
        payload = await self._request("GET", self._core.attestation_path, params=query)
        return self._core.accept_attestation(nonce, payload)

    async def _request(self, method: str, path: str, **kw: Any) -> Any:
        exchange = self._exchange(method, path)
        try:
            async with self._http.stream(method, path, **kw) as response:
                if exchange.start(response):
                    async for chunk in response.aiter_raw():
                        exchange.feed(chunk)
        except httpx.TransportError as exc:
            raise exchange.failed(exc) from exc
        return exchange.result(response)

    async def infer(
        self,
        inputs: Mapping[str, Any],
        *,
        request_id: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> CheckedInference:
        prepared = self._core.prepare(inputs, request_id, parameters)  # bad input: no request
        if self._core.attested is None:
            await self._handshake(None)
        sent_under = self._core.attested
        payload = await self._request("POST", self._core.infer_path, json=prepared.body)
        served = self._core.parse(payload)
        checked = None
        if served.evidence is not None:
            checked, stale = self._core.check_sent(prepared, served.evidence, sent_under)
            if checked is None:
                await self._handshake(stale)  # the enclave may have restarted: one new handshake
                checked = self._core.check_evidence(prepared, served.evidence)
        return self._core.judge(prepared, served, checked)

    async def _handshake(self, stale: AttestedEnclave | None) -> None:
        """One handshake for all the tasks that need it (see FidesClient._handshake)."""
        async with self._handshake_lock:
            if self._core.attested is stale:
                await self.attest()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

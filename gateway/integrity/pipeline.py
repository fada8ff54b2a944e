"""The integrity pipeline of one served model.

For each verified request::

    service model (local runtime or upstream MLaaS) ─┐  run concurrently
    enclave: sealed verifier, signs its answer ──────┘
        -> (attack drill, when one is on: tamper with the service answer)
        -> detector(p, q) > threshold ?  -> re-classifier(p, q) when attacked
        -> verdict + evidence in the response parameters, metrics, substitution window

A verification that did not complete is never reported as verified: with ``fail_closed`` the
request fails (503), with ``fail_open`` it is answered with verdict ``unverified`` and a reason.
The detector and re-classifier are ordinary repository models (batched like any other).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.enclave_client import (
    EnclaveClient,
    EnclaveError,
    EnclaveUnavailable,
    VerifyRequest,
)
from gateway.errors import BadRequest, GatewayError, Unavailable
from gateway.integrity.drills import ActiveDrill, tamper
from gateway.integrity.enclave import EnclaveBatcher
from gateway.integrity.metrics import IntegrityMetrics
from gateway.integrity.stats import kl_divergence
from gateway.integrity.substitution import SubstitutionMonitor
from gateway.model_config import DrillConfig, IntegrityConfig
from gateway.repository import ModelRepository, ModelVersion
from gateway.runtimes import Tensors

log = logging.getLogger(__name__)

__all__ = [
    "IntegrityOutcome",
    "IntegrityPipeline",
    "UnavailableIntegrity",
    "VerificationFailed",
    "read_detector_card",
]

DETECTOR_OUTPUT = "attack_probability"
RECLASSIFIER_OUTPUT = "probabilities"
P_INPUT, Q_INPUT = "service_probs", "verifier_probs"
NONCE_PARAMETER = "integrity_nonce"
MIN_NONCE, MAX_NONCE = 8, 512


class VerificationFailed(Unavailable):
    """fail_closed: the answer could not be verified, so it is not given (503)."""

    reason = "unverified"


@dataclass
class IntegrityOutcome:
    results: dict[str, np.ndarray]  # the outputs the client gets
    parameters: dict[str, Any]  # integrity_* response parameters


def read_detector_card(repository: Path, name: str) -> dict[str, Any]:
    """The model card of the detector's latest version (threshold, calibration scores)."""
    root = repository / name
    versions = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ValueError(f"detector '{name}' has no version in {repository}")
    card = json.loads((root / str(versions[-1]) / "model_card.json").read_text(encoding="utf-8"))
    for key in ("threshold", "calibration_scores", "calibration_kl"):
        if key not in card:
            raise ValueError(f"detector '{name}': model card has no '{key}'")
    if not isinstance(card, dict):
        raise ValueError(f"detector '{name}': model card is not a JSON object")
    return card


def parse_nonce(value: Any) -> bytes | None:
    """The client's ``integrity_nonce`` parameter (base64), or None when absent."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"parameter '{NONCE_PARAMETER}' must be a base64 string")
    try:
        nonce = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"parameter '{NONCE_PARAMETER}' is not valid base64") from None
    if not MIN_NONCE <= len(nonce) <= MAX_NONCE:
        raise BadRequest(
            f"parameter '{NONCE_PARAMETER}' must decode to {MIN_NONCE}..{MAX_NONCE} bytes, "
            f"not {len(nonce)}"
        )
    return nonce


class IntegrityPipeline:
    def __init__(
        self,
        model: str,
        cfg: IntegrityConfig,
        repository: ModelRepository,
        enclave: EnclaveClient,
        metrics: IntegrityMetrics,
        *,
        measurement: str | None = None,
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.repository = repository
        self.enclave = enclave
        self.metrics = metrics
        self.measurement = measurement
        card = read_detector_card(repository.root, cfg.detector)
        self.threshold = float(cfg.threshold if cfg.threshold is not None else card["threshold"])
        reference = card[
            "calibration_kl" if cfg.substitution_score == "kl" else "calibration_scores"
        ]
        self.monitor = SubstitutionMonitor(
            np.asarray(reference, dtype=np.float64),
            window=cfg.substitution_window,
            alpha=cfg.substitution_alpha,
        )
        e = cfg.enclave
        self.batcher = EnclaveBatcher(
            enclave, e.max_batch_size, e.max_queue_delay_microseconds / 1e6
        )
        self.rng = np.random.default_rng(seed)
        self.drill: ActiveDrill | None = None
        self._restarts_seen = 0
        m = metrics
        self._verdict = {
            v: m.verdicts.labels(model, v) for v in ("verified", "attack", "unverified")
        }
        self._attacks = m.attacks.labels(model)
        self._score = m.score.labels(model)
        self._duration = m.duration.labels(model)
        m.enclave_up.labels(model).set_function(self._enclave_up)
        m.enclave_restarts.labels(model)  # exported from 0, so increase() sees the first restart
        m.substitution_statistic.labels(model).set(0.5)
        m.substitution_suspected.labels(model).set(0)
        if cfg.drill is not None:
            self.set_drill(cfg.drill)

    # -- state ------------------------------------------------------------------------------

    def _enclave_up(self) -> float:
        state = getattr(self.enclave, "state", None)
        if state is None:  # an in-process client: up unless told to fail
            return 0.0 if getattr(self.enclave, "fail", None) is not None else 1.0
        restarts = int(getattr(self.enclave, "restarts", 0))
        if restarts > self._restarts_seen:  # counted when Prometheus looks
            self.metrics.enclave_restarts.labels(self.model).inc(restarts - self._restarts_seen)
            self._restarts_seen = restarts
        return 1.0 if getattr(state, "value", state) == "up" else 0.0

    def set_drill(self, drill: DrillConfig | None) -> ActiveDrill | None:
        """Start (or replace, or with None stop) an attack drill; returns the old one."""
        if drill is not None and drill.attack == "substitution":
            assert drill.substitute is not None  # checked by DrillConfig
            if drill.substitute == self.model:
                raise BadRequest("a substitution drill needs a model other than the served one")
            self.repository.get(drill.substitute, None)  # 404 / 503 when it cannot serve
        old = self.drill
        if old is not None:
            self.metrics.drill_active.labels(self.model, old.config.attack).set(0)
        self.drill = ActiveDrill(drill) if drill is not None else None
        if drill is not None:
            self.metrics.drill_active.labels(self.model, drill.attack).set(1)
            log.warning(
                "attack drill ON for %s: %s at rate %.2f",
                self.model,
                drill.attack,
                drill.rate,
                extra={"model": self.model, "drill": drill.model_dump()},
            )
        elif old is not None:
            log.warning("attack drill OFF for %s", self.model, extra={"model": self.model})
        self.monitor.reset()  # the window must not mix before and after
        return old

    def status(self) -> dict[str, Any]:
        snap = getattr(self.enclave, "snapshot", None)
        last = self.monitor.last
        return {
            "model": self.model,
            "mode": self.cfg.mode,
            "failure_policy": self.cfg.failure_policy,
            "sampling_rate": self.cfg.sampling_rate,
            "threshold": self.threshold,
            "detector": self.cfg.detector,
            "reclassifier": self.cfg.reclassifier,
            "measurement": self.measurement,
            "enclave": snap() if callable(snap) else {"state": "in-process"},
            "drill": self.drill.as_dict() if self.drill is not None else None,
            "substitution": {
                "window": self.cfg.substitution_window,
                "score": self.cfg.substitution_score,
                "alpha": self.cfg.substitution_alpha,
                "scores_in_window": len(self.monitor.scores),
                "statistic": last.statistic if last else None,
                "p_value": last.p_value if last else None,
                "suspected": last.flagged if last else False,
            },
        }

    async def attest(self, nonce: bytes) -> bytes:
        return await self.enclave.attest(nonce)

    async def close(self) -> None:
        await self.batcher.close()

    # -- one request ------------------------------------------------------------------------

    async def run(
        self,
        mv: ModelVersion,
        tensors: Tensors,
        *,
        request_id: str | None,
        parameters: dict[str, Any],
        deadline: float,
    ) -> IntegrityOutcome:
        nonce = parse_nonce(parameters.get(NONCE_PARAMETER)) or secrets.token_bytes(16)
        rid = request_id or uuid.uuid4().hex
        rows = len(next(iter(tensors.values())))
        drill = self.drill
        service = mv
        if drill is not None and drill.config.attack == "substitution":
            assert drill.config.substitute is not None
            if self.rng.random() < drill.config.rate:  # this request goes to the cheap model
                service = self.repository.get(drill.config.substitute, None)
                drill.tampered += rows
                self.metrics.drill_tampered.labels(self.model, "substitution").inc(rows)
        sampled = self.cfg.sampling_rate >= 1 or self.rng.random() < self.cfg.sampling_rate
        if not sampled:
            results = self._tampered(await service.batcher.submit(tensors, deadline), drill)
            return IntegrityOutcome(
                results,
                self._unverified("not_sampled", f"sampling_rate is {self.cfg.sampling_rate:g}"),
            )

        t0 = time.perf_counter()
        verify = asyncio.ensure_future(
            asyncio.wait_for(
                self.batcher.verify(VerifyRequest(rid, nonce, tensors), rows),
                self.cfg.enclave.timeout_s,
            )
        )
        try:
            results = await service.batcher.submit(tensors, deadline)
        except BaseException:
            verify.cancel()
            raise
        results = self._tampered(results, drill)
        try:
            item = await verify
        except TimeoutError:
            return self._failed(results, "enclave_timeout", "the enclave did not answer in time")
        except EnclaveUnavailable as exc:
            return self._failed(results, "enclave_unavailable", exc.message)
        except EnclaveError as exc:
            return self._failed(results, "enclave_error", exc.message)

        p = _probabilities(results, self.cfg.output, "service")  # [n, C]
        q = _probabilities(item.outputs, self.cfg.enclave.outputs[0], "verifier")  # [n, C]
        if p.shape != q.shape:
            raise GatewayError(
                f"service answer {list(p.shape)} and verifier answer {list(q.shape)} differ "
                "in shape: the integrity block pairs the wrong models"
            )
        pair = {P_INPUT: p, Q_INPUT: q}
        det = await self.repository.get(self.cfg.detector, None).batcher.submit(pair, deadline)
        scores = np.asarray(det[DETECTOR_OUTPUT], dtype=np.float64).reshape(len(p))  # [n]
        flagged = scores > self.threshold
        params: dict[str, Any] = {
            "integrity_verdict": "attack" if flagged.any() else "verified",
            "integrity_score": round(float(scores.max()), 6),
            "integrity_threshold": self.threshold,
            "integrity_evidence": base64.b64encode(item.evidence).decode("ascii"),
            "integrity_request_id": rid,
        }
        if flagged.any():
            rec = await self.repository.get(self.cfg.reclassifier, None).batcher.submit(
                pair, deadline
            )
            rec_p = np.asarray(rec[RECLASSIFIER_OUTPUT], dtype=np.float32)  # [n, C]
            classes = np.where(flagged, rec_p.argmax(1), -1)
            params["integrity_reclassified"] = (
                int(classes[0]) if rows == 1 else ",".join(str(int(c)) for c in classes)
            )
            if self.cfg.mode == "enforce":
                replaced = p.copy()
                replaced[flagged] = rec_p[flagged]
                results = {**results, self.cfg.output: replaced}
                params["integrity_replaced"] = True
            self._attacks.inc(int(flagged.sum()))
            log.warning(
                "integrity: attack detected on %s (score %.4f, threshold %.4f)",
                self.model,
                float(scores.max()),
                self.threshold,
                extra={"model": self.model, "request_id": rid, "drill": drill is not None},
            )
        for s in scores:
            self._score.observe(float(s))
        self._verdict[params["integrity_verdict"]].inc()
        self._duration.observe(time.perf_counter() - t0)
        tested = self.monitor.add(
            scores if self.cfg.substitution_score == "detector" else kl_divergence(p, q)
        )
        if tested is not None:
            self.metrics.substitution_statistic.labels(self.model).set(tested.statistic)
            self.metrics.substitution_p_value.labels(self.model).set(tested.p_value)
            self.metrics.substitution_suspected.labels(self.model).set(1 if tested.flagged else 0)
        return IntegrityOutcome(results, params)

    def _tampered(
        self, results: dict[str, np.ndarray], drill: ActiveDrill | None
    ) -> dict[str, np.ndarray]:
        """The compromised service's answer, while an output-attack drill is on."""
        if drill is None or drill.config.attack == "substitution":
            return results
        p = _probabilities(results, self.cfg.output, "service")
        tampered, rows = tamper(drill.config, p, self.rng)
        n = int(rows.sum())
        if n:
            drill.tampered += n
            self.metrics.drill_tampered.labels(self.model, drill.config.attack).inc(n)
        return {**results, self.cfg.output: tampered}

    def _unverified(self, reason: str, message: str) -> dict[str, Any]:
        self._verdict["unverified"].inc()
        self.metrics.unverified.labels(self.model, reason).inc()
        return {
            "integrity_verdict": "unverified",
            "integrity_reason": f"{reason}: {message}",
        }

    def _failed(
        self, results: dict[str, np.ndarray], reason: str, message: str
    ) -> IntegrityOutcome:
        if self.cfg.failure_policy == "fail_closed":
            self._verdict["unverified"].inc()
            self.metrics.unverified.labels(self.model, reason).inc()
            raise VerificationFailed(
                f"model '{self.model}': the answer could not be verified ({reason}: {message}); "
                "failure_policy is fail_closed"
            )
        return IntegrityOutcome(results, self._unverified(reason, message))


def _probabilities(outputs: dict[str, np.ndarray], name: str, what: str) -> np.ndarray:
    if name not in outputs:
        raise GatewayError(f"the {what} answer has no output '{name}' (integrity.output)")
    a = np.asarray(outputs[name], dtype=np.float32)
    if a.ndim != 2:
        raise GatewayError(f"the {what} output '{name}' is {list(a.shape)}, not [batch, classes]")
    return a


class UnavailableIntegrity:
    """Stands in for a pipeline that could not be set up (no verifier, no pinned root, no
    detector card, ...): every request meets the failure policy with the setup error as its
    reason, so the model is never served as if it had no integrity block."""

    def __init__(
        self, model: str, cfg: IntegrityConfig, metrics: IntegrityMetrics, error: str
    ) -> None:
        self.model, self.cfg, self.metrics, self.error = model, cfg, metrics, error
        self.measurement: str | None = None
        metrics.enclave_up.labels(model).set(0)

    async def run(
        self,
        mv: ModelVersion,
        tensors: Tensors,
        *,
        request_id: str | None,
        parameters: dict[str, Any],
        deadline: float,
    ) -> IntegrityOutcome:
        parse_nonce(parameters.get(NONCE_PARAMETER))  # bad input is still a 400
        self.metrics.verdicts.labels(self.model, "unverified").inc()
        self.metrics.unverified.labels(self.model, "integrity_setup").inc()
        message = f"integrity could not be set up: {self.error}"
        if self.cfg.failure_policy == "fail_closed":
            raise VerificationFailed(
                f"model '{self.model}': the answer cannot be verified ({message}); "
                "failure_policy is fail_closed"
            )
        results = await mv.batcher.submit(tensors, deadline)
        return IntegrityOutcome(
            results,
            {"integrity_verdict": "unverified", "integrity_reason": f"integrity_setup: {message}"},
        )

    def status(self) -> dict[str, Any]:
        return {"model": self.model, "mode": self.cfg.mode, "error": self.error}

    def set_drill(self, drill: DrillConfig | None) -> None:
        raise Unavailable(f"model '{self.model}': integrity is not running: {self.error}")

    async def attest(self, nonce: bytes) -> bytes:
        raise Unavailable(f"model '{self.model}': integrity is not running: {self.error}")

    async def close(self) -> None:
        return None

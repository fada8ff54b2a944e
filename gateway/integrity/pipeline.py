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
import contextlib
import json
import logging
import secrets
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fides_core.attestation import AttestedEnclave
from fides_core.enclave_errors import InvalidRequest as EnclaveRefusal
from fides_core.incident import ENCLAVE_TIMEOUT, NOT_JUDGED, IncidentAnswer
from fides_core.integrity import (
    DETECTOR_OUTPUT,
    INVALID_ANSWER,
    NOVELTY_OUTPUT,
    OUT_OF_DISTRIBUTION,
    P_INPUT,
    Q_INPUT,
    RECLASSIFIER_OUTPUT,
    answer_score,
    decide,
    invalid_reason,
    judged_scores,
    novelty_reason,
)
from fides_core.integrity_config import DrillConfig, IntegrityConfig
from fides_core.layout import latest_version_file
from fides_core.stats import kl_divergence
from fides_core.verify import MAX_REQUEST_ID, InputSpec, check_request, input_specs
from gateway.enclave_client import (
    EnclaveClient,
    EnclaveError,
    EnclaveState,
    EnclaveSupervisor,
    EnclaveUnavailable,
    VerifiedItem,
    VerifyRequest,
)
from gateway.errors import BadRequest, GatewayError, Unavailable
from gateway.integrity.alarm import ANONYMOUS, AlarmMonitor
from gateway.integrity.drills import ActiveDrill, tamper
from gateway.integrity.enclave import EnclaveBatcher, verifier_file
from gateway.integrity.incident import MAX_BYTES as INCIDENTS_MAX_BYTES
from gateway.integrity.incident import IncidentRecorder
from gateway.integrity.metrics import IntegrityMetrics
from gateway.integrity.substitution import SubstitutionMonitor
from gateway.model_config import read_platform
from gateway.repository import ModelRepository
from gateway.runtimes import Tensors, TensorSpec
from gateway.servables import InferContext, Inferred, ModelSlot, TensorServable

log = logging.getLogger(__name__)

__all__ = [
    "IntegrityPipeline",
    "UnavailableIntegrity",
    "VerificationFailed",
    "read_detector_card",
]

NONCE_PARAMETER = "integrity_nonce"
MIN_NONCE, MAX_NONCE = 8, 512
# fides_integrity_stage_duration_seconds and fides_enclave_call_duration_seconds labels
STAGES = ("service", "enclave", "judge", "reclassify", "monitor")
ENCLAVE_PARTS = ("batching", "round_trip", "check")
CLOSE_GRACE_S = 20.0  # close() waits this long for the requests in flight (FIDES_SHUTDOWN_GRACE_S)


class VerificationFailed(Unavailable):
    """fail_closed: the answer could not be verified, so it is not given (503)."""

    reason = "unverified"


def read_card(repository: Path, name: str, keys: Sequence[str]) -> dict[str, Any]:
    """The model card of entry ``name``'s latest version, which must hold ``keys``."""
    try:
        path = latest_version_file(repository / name, "model_card.json")
    except FileNotFoundError as exc:
        raise ValueError(f"model '{name}': {exc}") from None
    card = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(card, dict):
        raise ValueError(f"model '{name}': model card is not a JSON object")
    for key in keys:
        if key not in card:
            raise ValueError(f"model '{name}': model card has no '{key}'")
    return card


def read_detector_card(repository: Path, name: str) -> dict[str, Any]:
    """The model card of the detector's latest version (threshold, calibration scores)."""
    return read_card(repository, name, ("threshold", "calibration_scores", "calibration_kl"))


def read_novelty_threshold(
    repository: ModelRepository, model: str, name: str, service_inputs: Sequence[TensorSpec]
) -> float:
    """The novelty check's threshold (its model card), after checking that it takes inputs
    the model's requests carry."""
    card = read_card(repository.root, name, ("threshold",))
    served = {t.name for t in service_inputs}
    wanted = {t.name for t in repository.slot(name).latest().runtime.inputs}
    if not wanted <= served:
        raise ValueError(
            f"novelty check '{name}' takes inputs {sorted(wanted)}; '{model}' has {sorted(served)}"
        )
    return float(card["threshold"])


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
        service_inputs: Sequence[TensorSpec],
        measurement: str | None = None,
        verifier_inputs: Sequence[InputSpec] | None = None,
        seed: int | None = None,
        state_dir: Path | None = None,
        incidents_max_bytes: int = INCIDENTS_MAX_BYTES,
        close_grace_s: float = CLOSE_GRACE_S,
    ) -> None:
        """``close_grace_s``: how long :meth:`close` waits for the requests still being
        verified or judged (FIDES_SHUTDOWN_GRACE_S)."""
        self.model = model
        # what the enclave checks requests against; default: read from the verifier's graph
        self.verifier_inputs = list(
            verifier_inputs
            if verifier_inputs is not None
            else input_specs(
                verifier_file(repository.root, cfg.enclave.verifier_model).read_bytes()
            )
        )
        self.cfg = cfg
        self.repository = repository
        self.enclave = enclave
        self.metrics = metrics
        self.measurement = measurement
        card = read_detector_card(repository.root, cfg.detector)
        self.threshold = float(cfg.threshold if cfg.threshold is not None else card["threshold"])
        self.novelty_threshold: float | None = None
        if cfg.novelty is not None:
            self.novelty_threshold = read_novelty_threshold(
                repository, model, cfg.novelty, service_inputs
            )
        # the pair models and the novelty check, held by slot: no lookup per request
        self.detector = repository.slot(cfg.detector)
        self.reclassifier = repository.slot(cfg.reclassifier)
        self.novelty = None if cfg.novelty is None else repository.slot(cfg.novelty)
        self.substitute: ModelSlot | None = None  # the substitution drill's model
        reference = card[
            "calibration_kl" if cfg.substitution_score == "kl" else "calibration_scores"
        ]
        self.monitor = SubstitutionMonitor(
            np.asarray(reference, dtype=np.float64),
            window=cfg.substitution_window,
            alpha=cfg.substitution_alpha,
        )
        self.alarm = AlarmMonitor(
            model,
            np.asarray(card["calibration_scores"], dtype=np.float64),
            np.asarray(card["calibration_kl"], dtype=np.float64),
            alpha=cfg.alarm_alpha,
            max_keys=cfg.alarm_max_keys,
            state_dir=state_dir,
            on_untracked=metrics.alarm_untracked.labels(model, "key").inc,
            on_dropped=metrics.alarm_keys_dropped.labels(model).inc,
            on_saved=metrics.alarm_state_saving(model),
        )
        self.incidents = IncidentRecorder(
            model,
            self.alarm,
            verifier_output=cfg.enclave.outputs[0],
            detector_threshold=self.threshold,
            attest=self.attest,
            directory=None if state_dir is None else state_dir / "incidents",
            capacity=cfg.alarm_incident_requests,
            max_bytes=incidents_max_bytes,
            on_dropped=lambda reason: metrics.incident_dropped.labels(model, reason).inc(),
        )
        for reason in ("unfed_overflow", "after_close"):  # exported from 0: increase() works
            metrics.incident_dropped.labels(model, reason)
        self.close_grace_s = close_grace_s
        # the requests being verified or judged (their ids): close() lets them finish first
        self._in_flight: dict[object, str] = {}
        self._drained: asyncio.Event | None = None
        e = cfg.enclave
        part = {p: metrics.enclave_call.labels(model, p) for p in ENCLAVE_PARTS}
        self.batcher = EnclaveBatcher(
            enclave,
            e.max_batch_size,
            e.max_queue_delay_microseconds / 1e6,
            on_wait=part["batching"].observe,
            when_idle=e.dispatch_when_idle,
            on_boot=self._signed_by,
        )
        if isinstance(enclave, EnclaveSupervisor):

            def timing(round_trip_s: float, check_s: float) -> None:
                part["round_trip"].observe(round_trip_s)
                part["check"].observe(check_s)

            enclave.on_timing = timing
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
        self._stage = {s: m.stage.labels(model, s) for s in STAGES}
        m.enclave_up.labels(model).set_function(self._enclave_up)
        self._keys_gauged_at = float("-inf")
        self._window_test_soon = False  # a substitution window test is scheduled
        self._alarm_children = {  # looked up once, not per request
            "model": m.alarm.labels(model, "model"),
            "key": m.alarm.labels(model, "key"),
            "model_statistic": m.alarm_statistic.labels(model, "model"),
            "key_statistic": m.alarm_statistic.labels(model, "key"),
            "keys": m.alarm_keys.labels(model),
        }
        self._alarm_gauges()
        m.enclave_restarts.labels(model)  # exported from 0, so increase() sees the first restart
        self._reset_window()
        if cfg.drill is not None:
            self.set_drill(cfg.drill)

    # -- state ------------------------------------------------------------------------------

    def _enclave_up(self) -> float:
        health = self.enclave.health()
        if health.restarts > self._restarts_seen:  # counted when Prometheus looks
            self.metrics.enclave_restarts.labels(self.model).inc(
                health.restarts - self._restarts_seen
            )
            self._restarts_seen = health.restarts
        return 1.0 if health.up else 0.0

    def readiness_error(self) -> str | None:
        """Why this model cannot answer now, for readiness: under ``fail_closed`` an enclave
        that is not up (down: failed to start, refused by the attestation policy, gave up
        restarting; starting; restarting) refuses every request. A restart is counted too:
        restarts that keep failing back off for minutes before the enclave is marked down,
        and a ready server would answer all that while with 503 (a restart that succeeds
        lasts a second or two, below a readiness probe's failure threshold). Under
        ``fail_open`` the model answers (unverified)."""
        if self.cfg.failure_policy != "fail_closed":
            return None
        health = self.enclave.health()
        if health.state is not EnclaveState.UP:
            return f"its enclave is {health.state.value}: {health.reason or 'no reason given'}"
        return None

    def set_drill(self, drill: DrillConfig | None) -> ActiveDrill | None:
        """Start (or replace, or with None stop) an attack drill; returns the old one."""
        if drill is not None and drill.attack == "substitution":
            assert drill.substitute is not None  # checked by DrillConfig
            if drill.substitute == self.model:
                raise BadRequest("a substitution drill needs a model other than the served one")
            if drill.substitute != self.cfg.enclave.verifier_model:  # the verifier: see run()
                self._check_substitute(drill.substitute)
        self.substitute = (
            self.repository.slot(drill.substitute)
            if drill is not None and drill.substitute is not None
            else None
        )
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
        self._reset_window()  # the window must not mix before and after
        return old

    def _check_substitute(self, name: str) -> None:
        """A substitute must be a served classifier with the output the service answers in."""
        config = self.repository.model_dir(name) / "config.yaml"
        if read_platform(config) == "causal_lm":
            raise BadRequest(
                f"model '{name}' is a text model (platform causal_lm); a substitution drill "
                f"serves a classifier in place of '{self.model}'"
            )
        substitute = self.repository.get(name, None)  # 404 / 503 when it cannot serve
        outputs = [o.name for o in substitute.outputs]
        if self.cfg.output not in outputs:
            raise BadRequest(
                f"model '{name}' has no output '{self.cfg.output}' (it has {outputs}): it "
                f"cannot answer in place of '{self.model}'"
            )

    def _reset_window(self) -> None:
        """Empty the substitution window and show it as such (no stale alarm left firing)."""
        self.monitor.reset()
        m = self.metrics
        m.substitution_statistic.labels(self.model).set(0.5)
        m.substitution_p_value.labels(self.model).set(1.0)
        m.substitution_suspected.labels(self.model).set(0)

    def _alarm_gauges(self, every_s: float = 1.0) -> None:
        """The alarm's gauges: the alarm flags and the model's statistic at once; the largest
        key statistic (a scan over every tracked key) at most once per ``every_s``."""
        g, a = self._alarm_children, self.alarm
        g["model"].set(1 if a.model_state.alarm else 0)
        g["key"].set(1 if a.alarmed_keys else 0)
        stat = a.detector.statistic(a.model_state)
        g["model_statistic"].set(np.log10(stat) if stat > 0 else -1.0)
        now = time.monotonic()
        if now - self._keys_gauged_at >= every_s:
            self._keys_gauged_at = now
            top = a.key_statistic_max()
            g["key_statistic"].set(np.log10(top) if top > 0 else -1.0)
            g["keys"].set(len(a.keys))

    def reset_alarm(self, scope: str, key: str | None) -> dict[str, Any]:
        """After an investigation (the admin route): the alarm of the model, a key, or all."""
        try:
            status = self.alarm.reset(scope, key)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        self.incidents.forget(scope, key)
        self._keys_gauged_at = float("-inf")  # show the reset at once
        self._alarm_gauges()
        return status

    def status(self) -> dict[str, Any]:
        self._test_window()  # a test due but not yet run: the status shows its result
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
            "enclave": self.enclave.snapshot(),
            "drill": self.drill.as_dict() if self.drill is not None else None,
            "substitution": {
                "window": self.cfg.substitution_window,
                "score": self.cfg.substitution_score,
                "alpha": self.cfg.substitution_alpha,
                "scores_in_window": len(self.monitor.scores),
                "statistic": last.statistic if last else None,
                "p_value": last.p_value if last else None,
                "suspected": last.flagged if last else False,
                "direction": last.direction if last else None,
            },
            "alarm": self.alarm.status(),
        }

    async def attest(self, nonce: bytes) -> bytes:
        return await self.enclave.attest(nonce)

    def incident_list(self) -> list[dict[str, Any]]:
        return self.incidents.summaries()

    def incident(self, ident: str) -> dict[str, Any]:
        return self.incidents.get(ident)

    async def close(self) -> None:
        """At shutdown or unload (no new request reaches this pipeline): the requests still
        being verified or judged finish first (at most ``close_grace_s``), so their part is in
        the incident record, in a bundle waiting for them, and in the alarm's saved state;
        then the enclave calls in flight end (their late answers recorded), the bundles are
        sealed and written, and the alarm saved. A request still in flight after the bound
        is logged by id, and counted if it records later (the recorder); an enclave call still
        out when the bound has passed (a hung enclave) is abandoned, its requests logged."""
        ends = time.monotonic() + self.close_grace_s
        await self._drain()
        await self.batcher.close(max(0.0, ends - time.monotonic()))
        await self.incidents.close()
        await self.alarm.flush()  # nothing the alarm has seen is lost at shutdown

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        self._drained = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.close_grace_s)
        if self._in_flight:
            ids = list(self._in_flight.values())
            log.warning(
                "integrity of %s closes with %d requests still being verified or judged after "
                "%.1f s (%s): bundles sealed now show them as gaps, and each recorded later is "
                "counted (fides_integrity_incident_requests_dropped_total, reason after_close)",
                self.model,
                len(ids),
                self.close_grace_s,
                ", ".join(ids[:20]) + (", ..." if len(ids) > 20 else ""),
                extra={"model": self.model, "request_ids": ids[:100]},
            )

    # -- one request ------------------------------------------------------------------------

    async def run(self, service: TensorServable, tensors: Tensors, ctx: InferContext) -> Inferred:
        """One verified request; :meth:`close` waits for it (bounded) while it is in flight."""
        rid = ctx.request_id or uuid.uuid4().hex
        ticket = object()
        self._in_flight[ticket] = rid
        try:
            return await self._run(service, tensors, ctx, rid)
        finally:
            del self._in_flight[ticket]
            if not self._in_flight and self._drained is not None:
                self._drained.set()

    async def _run(
        self, service: TensorServable, tensors: Tensors, ctx: InferContext, rid: str
    ) -> Inferred:
        deadline = ctx.deadline
        nonce = parse_nonce(ctx.parameters.get(NONCE_PARAMETER)) or secrets.token_bytes(16)
        rows = self._check_verifiable(VerifyRequest(rid, nonce, tensors))
        drill = self.drill
        service, copy_verifier = self._substituted(service, drill, rows)
        sampled = self.cfg.sampling_rate >= 1 or self.rng.random() < self.cfg.sampling_rate
        if not sampled:
            results = self._tampered(await service.predict(tensors, deadline), drill)
            return Inferred(
                results,
                self._unverified("not_sampled", f"sampling_rate is {self.cfg.sampling_rate:g}"),
            )

        t0 = time.perf_counter()
        verify = asyncio.ensure_future(
            self._verify(VerifyRequest(rid, nonce, tensors), rows, ctx.client)
        )
        try:
            results = await service.predict(tensors, deadline)
        except BaseException:
            verify.cancel()
            raise
        t_service = time.perf_counter()
        results = self._tampered(results, drill)
        try:
            item = await verify
        except TimeoutError:
            return self._failed(results, "enclave_timeout", "the enclave did not answer in time")
        except EnclaveUnavailable as exc:
            return self._failed(results, "enclave_unavailable", exc.message)
        except EnclaveError as exc:
            return self._failed(results, "enclave_error", exc.message)

        q = _probabilities(item.outputs, self.cfg.enclave.outputs[0], "verifier")  # [n, C]
        if copy_verifier and drill is not None:
            results = {**results, self.cfg.output: q.copy()}
            self._count_substituted(drill, rows)
        p = _probabilities(results, self.cfg.output, "service")  # [n, C]
        if p.shape != q.shape:
            raise GatewayError(
                f"service answer {list(p.shape)} and verifier answer {list(q.shape)} differ "
                "in shape: the integrity block pairs the wrong models"
            )
        pair = {P_INPUT: p, Q_INPUT: q}
        t_enclave = time.perf_counter()
        try:
            scores, novelty = await self._judge(pair, tensors, deadline)  # [n], [n] or None
        except BaseException:  # cancelled (its client went away), past its deadline, failed
            self._keep_unjudged(rid, ctx.client, item, NOT_JUDGED)  # it was signed all the same
            raise
        t_judge = time.perf_counter()
        scores = judged_scores(scores, p)  # NaN where the service's answer is not numbers
        novel = None if novelty is None else novelty > self.novelty_threshold
        verdict, flagged = decide(scores, self.threshold, novel)
        score = answer_score(scores)
        params: dict[str, Any] = {
            "integrity_verdict": verdict,
            "integrity_score": None if score is None else round(score, 6),
            "integrity_threshold": self.threshold,
            "integrity_evidence": base64.b64encode(item.evidence).decode("ascii"),
            "integrity_request_id": rid,
        }
        if verdict == "unverified":  # rows nobody could judge: nothing to say about the provider
            reasons = []
            invalid = invalid_reason(scores)
            if invalid is not None:
                reasons.append(invalid)
                self.metrics.unverified.labels(self.model, INVALID_ANSWER).inc()
            if novel is not None and novel.any():
                assert novelty is not None
                assert self.novelty_threshold is not None
                reasons.append(novelty_reason(novelty, self.novelty_threshold))
                self.metrics.unverified.labels(self.model, OUT_OF_DISTRIBUTION).inc()
            params["integrity_reason"] = "; ".join(reasons)
        # the stream checks take this answer now, before the one await that depends on its
        # scores (the re-classifier, for attacked rows only): answers then reach the alarm in an
        # order that does not depend on their scores, near the enclave's signing order in which
        # an incident bundle is checked (fides_core.incident.signing_order). Their rows are the
        # in-distribution ones (their calibration is); KL(service || verifier) computed once
        known = np.isfinite(scores) if novel is None else np.isfinite(scores) & ~novel
        kl = kl_divergence(p[known], q[known])  # [known rows]
        self._watch(scores[known], kl)
        # every signed request, also one with no row fed (the recorder keeps those aside, out
        # of the ring): a bundle waiting for its signed batches knows it was judged
        self._keep_for_incidents(rid, ctx.client, item.evidence, known, novel, p, scores, kl)
        scopes = self._sequential(ctx.client, scores[known], kl)
        params["integrity_alarm"] = bool(scopes)
        if scopes:
            params["integrity_alarm_scope"] = ",".join(scopes)
        t_monitor = time.perf_counter()
        t_reclassify = t_monitor
        if flagged.any():
            rec = await self.reclassifier.latest().predict(pair, deadline)
            t_reclassify = time.perf_counter()
            rec_p = np.asarray(rec[RECLASSIFIER_OUTPUT], dtype=np.float32)  # [n, C]
            results = self._on_attack(results, p, rec_p, flagged, params)
            log.warning(
                "integrity: attack detected on %s (score %.4f, threshold %.4f)",
                self.model,
                float(scores[flagged].max()),
                self.threshold,
                extra={"model": self.model, "request_id": rid, "drill": drill is not None},
            )
        for s in scores[np.isfinite(scores)]:
            self._score.observe(float(s))
        self._verdict[verdict].inc()
        self._duration.observe(time.perf_counter() - t0)
        stage = self._stage
        stage["service"].observe(t_service - t0)
        stage["enclave"].observe(t_enclave - t_service)
        stage["judge"].observe(t_judge - t_enclave)
        stage["monitor"].observe(t_monitor - t_judge)
        if t_reclassify > t_monitor:
            stage["reclassify"].observe(t_reclassify - t_monitor)
        return Inferred(results, params)

    async def _verify(self, request: VerifyRequest, rows: int, client: str | None) -> VerifiedItem:
        """The enclave's answer within ``enclave.timeout_s`` (TimeoutError otherwise); one task
        per request (``asyncio.wait_for`` would add a second). One that comes after this wait
        was given up (the timeout, or the request failed or was cancelled meanwhile) was signed
        in a batch with others: it is kept for incident bundles, never judged (its rows named
        as kept out of the alarm: ``enclave_timeout``, ``not_judged``), so the batch is whole
        and nothing the enclave signed is missing without a word."""
        timer = asyncio.timeout(self.cfg.enclave.timeout_s)

        def late(item: VerifiedItem) -> None:
            why = ENCLAVE_TIMEOUT if timer.expired() else NOT_JUDGED
            self._keep_unjudged(request.id, client, item, why)

        async with timer:
            return await self.batcher.verify(request, rows, late=late)

    def _keep_unjudged(self, rid: str, client: str | None, item: VerifiedItem, why: str) -> None:
        """A signed request never judged (``why``): for incident bundles, every row kept out of
        the alarm by that reason (it fed nothing; the recorder keeps it aside, out of the ring)."""
        q = np.asarray(item.outputs.get(self.cfg.enclave.outputs[0], ()))  # [n, C] when sound
        n = len(q) if q.ndim == 2 else 0
        self.incidents.record(
            IncidentAnswer(
                rid,
                client or ANONYMOUS,
                item.evidence,
                np.zeros(0, np.int64),
                np.zeros((0, q.shape[1] if q.ndim == 2 else 0), np.float32),
                np.zeros(0),
                np.zeros(0),
                {why: np.arange(n)},
            )
        )

    def _sequential(self, client: str | None, scores: np.ndarray, kl: np.ndarray) -> list[str]:
        """Feed the sequential alarm the in-distribution rows' detector scores and KL; the
        scopes in alarm for this request (``model``, ``key``)."""
        if len(scores):
            scopes = self.alarm.observe(client or ANONYMOUS, scores, kl)
            if self.alarm.fired:
                drill = self.drill.as_dict() if self.drill is not None else None
                self.incidents.fired(self.alarm.fired, client or ANONYMOUS, drill)
        else:
            scopes = self.alarm.scopes(client or ANONYMOUS)
        self._alarm_gauges()
        return scopes

    def _keep_for_incidents(
        self,
        rid: str,
        client: str | None,
        evidence: bytes,
        known: np.ndarray,
        novel: np.ndarray | None,
        p: np.ndarray,
        scores: np.ndarray,
        kl: np.ndarray,
    ) -> None:
        """This request's part in the alarm, for an incident bundle should it fire: the rows
        fed to it, and the others by why they were not (every signed row is accounted for, so a
        bundle's checker sees that none was dropped). The boot that signed it is the one its
        evidence names, whose document :meth:`_signed_by` kept when the enclave call returned:
        not the supervisor's boot now, which is another one if the enclave restarted while this
        request was judged. Recorded as judging ends (not in signing order: the bundle is put
        in signing order when it is built)."""
        unscored = ~np.isfinite(scores)
        self.incidents.record(
            IncidentAnswer(
                rid,
                client or ANONYMOUS,
                evidence,
                np.flatnonzero(known),
                p[known],
                scores[known],
                kl,
                {
                    INVALID_ANSWER: np.flatnonzero(unscored),
                    OUT_OF_DISTRIBUTION: np.flatnonzero(
                        ~unscored & (np.zeros_like(unscored) if novel is None else novel)
                    ),
                },
            )
        )

    def _signed_by(self, attested: AttestedEnclave) -> None:
        """An enclave call's evidence was checked against boot ``attested`` (the batcher's
        ``on_boot``): keep its attestation document for incident bundles."""
        if attested.document:
            self.incidents.boot(attested.module_id, attested.document)

    def _substituted(
        self, service: TensorServable, drill: ActiveDrill | None, rows: int
    ) -> tuple[TensorServable, bool]:
        """Under a substitution drill, who answers this request: the cheap model instead of the
        service, or (True) the enclave's own verifier answer, taken after verification."""
        if drill is None or drill.config.attack != "substitution":
            return service, False
        if self.rng.random() >= drill.config.rate:  # this request is served honestly
            return service, False
        if drill.config.substitute == self.cfg.enclave.verifier_model:
            # the cheapest substitute of all: a provider that runs the verifier. It is not
            # served here, so the drill takes its answer from the enclave's.
            return service, True
        if self.substitute is None:
            return service, False
        self._count_substituted(drill, rows)
        return self.substitute.latest(), False

    def _on_attack(
        self,
        results: dict[str, np.ndarray],
        p: np.ndarray,
        rec_p: np.ndarray,
        flagged: np.ndarray,
        params: dict[str, Any],
    ) -> dict[str, np.ndarray]:
        """The re-classified classes in the parameters; in enforce mode, the answer replaced."""
        classes = np.where(flagged, rec_p.argmax(1), -1)  # [n], -1 where not flagged
        params["integrity_reclassified"] = (
            int(classes[0]) if len(classes) == 1 else ",".join(str(int(c)) for c in classes)
        )
        self._attacks.inc(int(flagged.sum()))
        if self.cfg.mode != "enforce":
            return results
        replaced = p.copy()
        replaced[flagged] = rec_p[flagged]
        params["integrity_replaced"] = True
        return {**results, self.cfg.output: replaced}

    def _watch(self, scores: np.ndarray, kl: np.ndarray) -> None:
        """Feed the substitution window the in-distribution rows' score (its clean reference
        is in-distribution)."""
        if not len(scores):
            return
        due = self.monitor.record(scores if self.cfg.substitution_score == "detector" else kl)
        if due and not self._window_test_soon:
            # the rank test over the clean reference (hundreds of µs) only moves gauges and
            # the status: run it after this answer is on its way, not in its latency
            self._window_test_soon = True
            asyncio.get_running_loop().call_soon(self._test_window)

    def _test_window(self) -> None:
        """The scheduled window test, unless it ran already (:meth:`status` runs it)."""
        if not self._window_test_soon:
            return
        self._window_test_soon = False
        tested = self.monitor.test()
        if tested is not None:
            m = self.metrics
            m.substitution_statistic.labels(self.model).set(tested.statistic)
            m.substitution_p_value.labels(self.model).set(tested.p_value)
            m.substitution_suspected.labels(self.model).set(1 if tested.flagged else 0)

    async def _judge(
        self, pair: Tensors, tensors: Tensors, deadline: float
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The detector's scores ``[n]`` and, with a novelty check, the inputs' novelty ``[n]``
        (both repository models, batched like any other; run side by side)."""
        detector = self.detector.latest().predict(pair, deadline)
        if self.novelty is None:
            det = await detector
            return np.asarray(det[DETECTOR_OUTPUT], dtype=np.float64).reshape(-1), None
        novelty_model = self.novelty.latest()
        feed = {t.name: tensors[t.name] for t in novelty_model.runtime.inputs}
        det, nov = await asyncio.gather(detector, novelty_model.predict(feed, deadline))
        scores = np.asarray(det[DETECTOR_OUTPUT], dtype=np.float64).reshape(-1)
        return scores, np.asarray(nov[NOVELTY_OUTPUT], dtype=np.float64).reshape(-1)

    def _check_verifiable(self, request: VerifyRequest) -> int:
        """Refuse (400) what the enclave would refuse, before the request joins a shared
        enclave call: there one bad request would fail every request of the call. Returns the
        request's rows."""
        if not 0 < len(request.id) <= MAX_REQUEST_ID:
            raise BadRequest(
                f"model '{self.model}' is verified: its request 'id' must be 1..{MAX_REQUEST_ID} "
                f"characters (the enclave binds it into the evidence), not {len(request.id)}"
            )
        try:
            rows = check_request(request, self.verifier_inputs)
        except EnclaveRefusal as exc:
            raise BadRequest(
                f"model '{self.model}': the verifier cannot take this input: {exc}"
            ) from None
        limit = self.cfg.enclave.max_batch_size
        if rows > limit:
            raise BadRequest(
                f"model '{self.model}': {rows} rows in one request; its enclave verifies at most "
                f"{limit} (integrity.enclave.max_batch_size)"
            )
        return rows

    def _count_substituted(self, drill: ActiveDrill, rows: int) -> None:
        drill.tampered += rows
        self.metrics.drill_tampered.labels(self.model, "substitution").inc(rows)

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

    def _failed(self, results: dict[str, np.ndarray], reason: str, message: str) -> Inferred:
        if self.cfg.failure_policy == "fail_closed":
            self._verdict["unverified"].inc()
            self.metrics.unverified.labels(self.model, reason).inc()
            raise VerificationFailed(
                f"model '{self.model}': the answer could not be verified ({reason}: {message}); "
                "failure_policy is fail_closed"
            )
        return Inferred(results, self._unverified(reason, message))


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

    async def run(self, service: TensorServable, tensors: Tensors, ctx: InferContext) -> Inferred:
        parse_nonce(ctx.parameters.get(NONCE_PARAMETER))  # bad input is still a 400
        self.metrics.verdicts.labels(self.model, "unverified").inc()
        self.metrics.unverified.labels(self.model, "integrity_setup").inc()
        message = f"integrity could not be set up: {self.error}"
        if self.cfg.failure_policy == "fail_closed":
            raise VerificationFailed(
                f"model '{self.model}': the answer cannot be verified ({message}); "
                "failure_policy is fail_closed"
            )
        results = await service.predict(tensors, ctx.deadline)
        return Inferred(
            results,
            {"integrity_verdict": "unverified", "integrity_reason": f"integrity_setup: {message}"},
        )

    def status(self) -> dict[str, Any]:
        return {"model": self.model, "mode": self.cfg.mode, "error": self.error}

    def readiness_error(self) -> str | None:
        """Under ``fail_closed`` every request is refused: not ready, and why."""
        if self.cfg.failure_policy != "fail_closed":
            return None
        return f"integrity could not be set up: {self.error}"

    def set_drill(self, drill: DrillConfig | None) -> None:
        raise Unavailable(f"model '{self.model}': integrity is not running: {self.error}")

    def reset_alarm(self, scope: str, key: str | None) -> dict[str, Any]:
        raise Unavailable(f"model '{self.model}': integrity is not running: {self.error}")

    async def attest(self, nonce: bytes) -> bytes:
        raise Unavailable(f"model '{self.model}': integrity is not running: {self.error}")

    def incident_list(self) -> list[dict[str, Any]]:
        raise Unavailable(f"model '{self.model}': integrity is not running: {self.error}")

    def incident(self, ident: str) -> dict[str, Any]:
        raise Unavailable(f"model '{self.model}': integrity is not running: {self.error}")

    async def close(self) -> None:
        return None

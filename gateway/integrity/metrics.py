"""Integrity metrics (``fides_integrity_*``, ``fides_enclave_*``), in the app's registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["IntegrityMetrics"]

SCORE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
STAGE_BUCKETS = (0.0001, 0.00025, *DURATION_BUCKETS)  # stages take tens of microseconds up


class IntegrityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.verdicts = Counter(
            "fides_integrity_verdicts",
            "Integrity verdicts by model: verified, attack or unverified.",
            ["model", "verdict"],
            registry=r,
        )
        self.attacks = Counter(
            "fides_integrity_attacks_detected",
            "Answers (rows) the detector flagged as attacked.",
            ["model"],
            registry=r,
        )
        self.score = Histogram(
            "fides_integrity_detector_score",
            "Detector probability that an answer was tampered with, per row.",
            ["model"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "fides_integrity_verification_duration_seconds",
            "Enclave verification plus detector (and re-classifier) per verified request.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "fides_integrity_stage_duration_seconds",
            "Where a verified request's time goes, per stage: service (the model's answer, "
            "queue included), enclave (waiting for the enclave after the service answered: "
            "they run side by side), judge (detector and novelty check), reclassify (flagged "
            "answers only), monitor (substitution window, alarm, incident record, response).",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.enclave_call = Histogram(
            "fides_enclave_call_duration_seconds",
            "The enclave boundary, by part: batching (per request, waiting for its enclave "
            "call to start), round_trip (per call: framing, socket, the enclave's verifier, "
            "hashing and signing, decoding), check (per call: the gateway's check of the "
            "signed evidence).",
            ["model", "part"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.unverified = Counter(
            "fides_integrity_unverified",
            "Answers returned without verification, by reason (not_sampled, enclave_unavailable, "
            "enclave_timeout, enclave_error, integrity_setup, out_of_distribution).",
            ["model", "reason"],
            registry=r,
        )
        self.substitution_statistic = Gauge(
            "fides_integrity_substitution_statistic",
            "Windowed substitution test: P(recent row score > clean score); 0.5 when honest.",
            ["model"],
            registry=r,
        )
        self.substitution_p_value = Gauge(
            "fides_integrity_substitution_p_value",
            "p-value of the windowed substitution test (two-sided Mann-Whitney U).",
            ["model"],
            registry=r,
        )
        self.substitution_suspected = Gauge(
            "fides_integrity_substitution_suspected",
            "1 while the windowed two-sided test rejects an honest service at its level, else 0.",
            ["model"],
            registry=r,
        )
        self.alarm = Gauge(
            "fides_integrity_alarm",
            "1 while the sequential alarm is raised: scope model (the model's whole answer "
            "stream) or key (any API key's stream), until an admin resets it.",
            ["model", "scope"],
            registry=r,
        )
        self.alarm_statistic = Gauge(
            "fides_integrity_alarm_statistic",
            "log10 of the sequential alarm's e-detector statistic (the alarm fires at "
            "log10(1/alpha)); scope key: the largest over the tracked keys.",
            ["model", "scope"],
            registry=r,
        )
        self.alarm_keys = Gauge(
            "fides_integrity_alarm_keys_tracked",
            "API keys the sequential alarm tracks (at most integrity.alarm_max_keys).",
            ["model"],
            registry=r,
        )
        self.alarm_keys_dropped = Counter(
            "fides_integrity_alarm_keys_dropped",
            "API keys the sequential alarm dropped since the gateway started to stay within "
            "integrity.alarm_max_keys (the least recently seen key not in alarm first): a "
            "dropped key's evidence is gone, its stream starts over from zero when it returns, "
            "so a tampering aimed at a client whose key keeps being dropped is not watched per "
            "key. The integrity status' alarm.keys.dropped keeps the count across restarts.",
            ["model"],
            registry=r,
        )
        self.alarm_untracked = Counter(
            "fides_integrity_alarm_untracked_requests",
            "Requests since the gateway started whose API key the sequential alarm could not "
            "track (scope key): every one of its integrity.alarm_max_keys tracked keys was in "
            "alarm, latched until an admin resets it, so the request fed the model's stream "
            "only and no stream of its own key (a tampering aimed at that client is not "
            "watched per key). The integrity status' alarm.keys.untracked_requests keeps the "
            "count across restarts.",
            ["model", "scope"],
            registry=r,
        )
        self.alarm_state_saved = Gauge(
            "fides_integrity_alarm_state_saved",
            "1 while the sequential alarm's state is saved to FIDES_INTEGRITY_STATE_DIR (its "
            "last write worked), 0 while writes fail (disk full, the directory gone or "
            "read-only, an I/O error): the alarm works in memory, but a restart now loses its "
            "state, latched alarms included. The integrity status' alarm.state.saving says "
            "since when and why.",
            ["model"],
            registry=r,
        )
        self.alarm_state_save_failures = Counter(
            "fides_integrity_alarm_state_save_failures",
            "Writes of the sequential alarm's state that failed since the gateway started "
            "(the state stayed in memory only until a later write worked).",
            ["model"],
            registry=r,
        )
        self.incident_dropped = Counter(
            "fides_integrity_incident_requests_dropped",
            "Signed requests since the gateway started that the incident record could not keep "
            "for the bundles they belong in, by reason: unfed_overflow (a request that fed "
            "nothing to the alarm pushed out of the integrity.alarm_incident_requests kept "
            "aside: a bundle whose signed batches held it shows it as a gap, and its "
            "settle.unfed_dropped counts these), after_close (recorded after the model's "
            "incident record closed at shutdown or unload, past the wait for the requests in "
            "flight: no bundle sealed then holds it; logged with its request id).",
            ["model", "reason"],
            registry=r,
        )
        self.enclave_up = Gauge(
            "fides_enclave_up",
            "1 while the model's enclave is up and attested, else 0.",
            ["model"],
            registry=r,
        )
        self.enclave_restarts = Counter(
            "fides_enclave_restarts",
            "Enclave restarts after a crash or a hang.",
            ["model"],
            registry=r,
        )
        self.drill_active = Gauge(
            "fides_integrity_drill_active",
            "1 while an attack drill is active on the model, by attack.",
            ["model", "attack"],
            registry=r,
        )
        self.drill_tampered = Counter(
            "fides_integrity_drill_tampered",
            "Answers (rows) an attack drill tampered with.",
            ["model", "attack"],
            registry=r,
        )

    def alarm_state_saving(self, model: str) -> Callable[[bool], None]:
        """The alarm monitor's ``on_saved`` for ``model``: the gauge and the counter, both
        exported from the set-up (so that ``increase()`` sees the first failure)."""
        saved = self.alarm_state_saved.labels(model)
        failures = self.alarm_state_save_failures.labels(model)

        def on_saved(ok: bool) -> None:
            saved.set(1 if ok else 0)
            if not ok:
                failures.inc()

        return on_saved

"""The metric names the alert rules and the dashboard may use, from the gateway's own code."""

from __future__ import annotations

import re

from gateway.metrics import GatewayMetrics

# Integrity metrics agreed for the integrity pipeline (issue 6), used by deploy/prometheus/
# alerts.yml and the dashboard before the gateway exports them. Once the gateway registers a
# name it is taken from the code like every other; delete it here then.
PENDING_INTEGRITY = {
    "fides_integrity_verdicts_total",
    "fides_integrity_attacks_detected_total",
    "fides_integrity_detector_score_bucket",
    "fides_integrity_detector_score_sum",
    "fides_integrity_detector_score_count",
    "fides_integrity_verification_duration_seconds_bucket",
    "fides_integrity_verification_duration_seconds_sum",
    "fides_integrity_verification_duration_seconds_count",
    "fides_integrity_unverified_total",
    "fides_integrity_substitution_statistic",
    "fides_integrity_substitution_suspected",
    "fides_enclave_up",
    "fides_enclave_restarts_total",
    "fides_integrity_drill_active",
}

SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "summary": ("", "_sum", "_count"),
}
METRIC_RE = re.compile(r"\bfides_[a-z0-9_]+\b")


def exported_series_names() -> set[str]:
    """Every series name a gateway app's registry can export (labels aside)."""
    names: set[str] = set()
    for family in GatewayMetrics().registry.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
    return names


def names_in(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))

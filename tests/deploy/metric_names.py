"""The metric names the alert rules and the dashboard may use, from the gateway's own code."""

from __future__ import annotations

import re

from gateway.metrics import GatewayMetrics

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

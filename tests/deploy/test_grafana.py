"""The Grafana dashboard: valid JSON, PromQL that parses, metrics the gateway exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import DEPLOY, require_tool, run_tool
from tests.deploy.metric_names import exported_series_names, names_in

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fides-gateway.json"
# Grafana's variables, replaced by values Prometheus accepts
VARIABLES = {"$__rate_interval": "5m", "$model": "digits", "${datasource}": "prometheus"}
# what issue 8 asks the dashboard to show -> a metric that shows it
REQUIRED = {
    "request rate": "fides_inference_requests_total",
    "latency percentiles": "fides_inference_request_duration_seconds_bucket",
    "batch sizes": "fides_inference_batch_size_sum",
    "verdicts": "fides_integrity_verdicts_total",
    "attack rate": "fides_integrity_attacks_detected_total",
    "substitution statistic": "fides_integrity_substitution_statistic",
    "enclave state": "fides_enclave_up",
    "sequential alarm": "fides_integrity_alarm",
    "alarm statistic": "fides_integrity_alarm_statistic",
    "alarm keys dropped": "fides_integrity_alarm_keys_dropped_total",
    "alarm requests untracked": "fides_integrity_alarm_untracked_requests_total",
    "speculative acceptance": "fides_spec_decode_num_accepted_tokens_total",
    "tokens/s": "fides_spec_decode_num_emitted_tokens_total",
}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _queries() -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in _dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["uid"] == "fides-gateway"
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert variables == {"datasource", "model"}


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    used = set().union(*(names_in(expr) for _, expr in _queries()))
    missing = {what: metric for what, metric in REQUIRED.items() if metric not in used}
    assert not missing


def test_dashboard_uses_only_metrics_the_gateway_exports() -> None:
    known = exported_series_names()
    for title, expr in _queries():
        assert names_in(expr) <= known, f"{title!r}: unknown {names_in(expr) - known}"


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule: promtool parses it."""
    promtool = require_tool("promtool")
    rules = []
    for i, (_, expr) in enumerate(_queries()):
        for var, value in VARIABLES.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unhandled Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run_tool(promtool, "check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "fides.yml").read_text("utf-8")
    )
    (dashboards,) = provider["providers"]
    assert mounts["./grafana/dashboards"] == dashboards["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    datasource = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text("utf-8")
    )
    (prom,) = datasource["datasources"]
    assert prom["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]

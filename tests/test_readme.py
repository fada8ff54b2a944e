"""The README's tables must not rot: every metric and every setting is documented."""

from __future__ import annotations

from pathlib import Path

from gateway.metrics import GatewayMetrics
from gateway.model_config import ModelConfig
from gateway.settings import Settings

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_metric_is_documented() -> None:
    names = set()
    for family in GatewayMetrics().registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    missing = sorted(n for n in names if f"`{n}`" not in README)
    assert not missing, f"metrics missing from README: {missing}"
    assert all(n.startswith("fides_") for n in names)


def test_every_setting_is_documented() -> None:
    missing = [f for f in Settings.model_fields if f"FIDES_{f.upper()}" not in README]
    assert not missing, f"settings missing from README: {missing}"


def test_every_model_config_key_is_documented() -> None:
    missing = [k for k in ModelConfig.model_fields if f"`{k}" not in README]
    assert not missing, f"config.yaml keys missing from README: {missing}"


def test_readme_shows_the_two_commands() -> None:
    assert "make run" in README
    assert "make test" in README

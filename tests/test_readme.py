"""The documentation must not rot: the README stays a short manual, the reference pages name
every metric, setting, config key and command, every relative link resolves, and the result
pages are exactly what ``fides bench report`` renders from ``bench/results``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer

from fides.bench.report import render_reports
from fides.cli import app as fides_app
from fides_core.integrity_config import DrillConfig, EnclaveConfig, IntegrityConfig
from gateway.generation.config import GenerationConfig
from gateway.metrics import GatewayMetrics
from gateway.model_config import ModelConfig
from gateway.settings import Settings

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
REFERENCE = DOCS / "reference"
README_MAX_LINES = 300


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


# -- the reference pages -------------------------------------------------------------------------


def test_every_metric_is_documented() -> None:
    page = _read(REFERENCE / "metrics.md")
    names = set()
    for family in GatewayMetrics().registry.collect():
        suffix = "_total" if family.type == "counter" else ""
        names.add(family.name + suffix)
    missing = sorted(n for n in names if f"`{n}`" not in page)
    assert not missing, f"metrics missing from docs/reference/metrics.md: {missing}"
    assert all(n.startswith("fides_") for n in names)


def test_every_setting_is_documented() -> None:
    page = _read(REFERENCE / "settings.md")
    missing = [f for f in Settings.model_fields if f"FIDES_{f.upper()}" not in page]
    assert not missing, f"settings missing from docs/reference/settings.md: {missing}"


def test_every_model_config_key_is_documented() -> None:
    page = _read(REFERENCE / "configuration.md")
    missing = [k for k in ModelConfig.model_fields if f"`{k}" not in page]
    assert not missing, f"config.yaml keys missing from docs/reference/configuration.md: {missing}"


@pytest.mark.parametrize(
    ("block", "schema"),
    [
        ("integrity", IntegrityConfig),
        ("integrity.enclave", EnclaveConfig),
        ("integrity.drill", DrillConfig),
        ("generation", GenerationConfig),
    ],
)
def test_every_block_key_is_documented(block: str, schema: type[IntegrityConfig]) -> None:
    page = _read(REFERENCE / "configuration.md")
    # in a table cell: in full (`integrity.enclave.timeout_s`), as the prefix of its own keys
    # (`integrity.enclave.outputs`), or after a full key of the same row
    # (`integrity.enclave.outputs`, `max_batch_size`)
    missing = [
        k
        for k in schema.model_fields
        if f"`{block}.{k}`" not in page
        and f"`{block}.{k}." not in page
        and not re.search(rf"`{re.escape(block)}\.[^`]+`, [^|]*`{k}`", page)
    ]
    assert not missing, f"'{block}:' keys missing from docs/reference/configuration.md: {missing}"


def _commands(app: typer.Typer, prefix: str = "fides") -> list[str]:
    names = [
        f"{prefix} {c.name or c.callback.__name__}" for c in app.registered_commands if c.callback
    ]
    for group in app.registered_groups:
        assert group.typer_instance is not None
        names += _commands(group.typer_instance, f"{prefix} {group.name}")
    return names


def test_every_cli_command_is_documented() -> None:
    page = _read(REFERENCE / "cli.md")
    commands = _commands(fides_app)
    assert "fides bench report" in commands
    missing = [c for c in commands if f"\n## {c}\n" not in page]
    assert not missing, f"commands without a section in docs/reference/cli.md: {missing}"


# -- the README ----------------------------------------------------------------------------------


def test_readme_shows_the_two_commands() -> None:
    assert "make run" in README
    assert "make test" in README


def test_readme_is_a_short_manual() -> None:
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move reference into docs/"


# -- links ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text outside code blocks and inline code, where a link is a link."""
    return re.sub(r"`[^`\n]*`", "", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _FENCE.sub("", _read(path)).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in _pages():
        for target in _LINK.findall(_prose(_read(page))):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not path.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{where} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


# -- generated results ---------------------------------------------------------------------------


def test_docs_results_are_what_the_report_command_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the pages name the results folder as the command is run here
    render_reports(Path("bench/results"), tmp_path)
    want = {p.name: _read(p) for p in tmp_path.iterdir()}
    have = {p.name: _read(p) for p in (DOCS / "results").iterdir()}
    assert sorted(have) == sorted(want), "docs/results/ is stale: run `fides bench report`"
    stale = sorted(name for name in want if have[name] != want[name])
    assert not stale, f"docs/results/ differs from `fides bench report` in {stale}: re-run it"

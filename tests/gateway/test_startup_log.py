"""What the start-up log says: a gateway that starts not ready says so as a warning, and an
empty model repository (a wrong or empty volume) is named, not served silently as nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import USER_KEY


def _settings(repo: Path) -> Settings:
    return Settings(model_repository=repo, api_keys=[USER_KEY], log_json=False)


async def _start(repo: Path, caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    app = create_app(_settings(repo))
    with caplog.at_level(logging.INFO, logger="gateway.app"):
        async with app.router.lifespan_context(app):
            pass
    return [r for r in caplog.records if r.name == "gateway.app"]


async def test_an_empty_repository_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    records = await _start(repo, caplog)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any(
        f"model repository {repo} (FIDES_MODEL_REPOSITORY) holds no model" in w for w in warnings
    ), warnings


async def test_a_gateway_that_starts_not_ready_says_so_as_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.yaml").write_text("platform: onnx\n")
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    records = await _start(repo, caplog)
    started = [r for r in records if r.getMessage() == "gateway started"]
    assert len(started) == 1
    assert started[0].levelno == logging.WARNING
    assert started[0].__dict__["ready"] is False
    # models that failed are not "an empty repository"
    assert not any("holds no model" in r.getMessage() for r in records)

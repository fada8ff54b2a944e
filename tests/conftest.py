"""Shared fixtures: settings -> app -> in-process client (httpx over ASGI)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import Settings
from tests.model_factory import make_repository

if TYPE_CHECKING:
    from tests.integrity_factory import Digits

# Apps built in the test process serve HTTP only: each would otherwise bind the gRPC port 8001
# (a second gateway on a taken port refuses to start). The gRPC tests turn it on, on a free port;
# the real server processes of tests/e2e get it from running_gateway.
os.environ.setdefault("FIDES_GRPC_ENABLED", "false")

USER_KEY = "user-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"


@pytest.fixture
def repo_path(tmp_path: Path) -> Path:
    return make_repository(tmp_path / "repo")


@pytest.fixture
def settings(repo_path: Path) -> Settings:
    return Settings(
        model_repository=repo_path,
        api_keys=[USER_KEY],
        admin_api_keys=[ADMIN_KEY],
        log_json=False,
        shutdown_grace_s=5,
        max_tensor_elements=100_000,
    )


@asynccontextmanager
async def serving_app(
    settings: Settings, timeout: float | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A started app (lifespan run) and an in-process client holding the user key (``timeout``:
    the client's, httpx's default 5 s when None)."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://test",
            headers={"X-API-Key": USER_KEY},
            timeout=httpx.Timeout(5.0) if timeout is None else timeout,
        ) as c,
    ):
        yield app, c


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A started app (lifespan run) and an in-process client holding the user key."""
    async with serving_app(settings) as (_, c):
        yield c


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://test",
        headers={"Authorization": f"Bearer {USER_KEY}"},
    ) as c:
        yield c


@pytest.fixture(scope="session")
def trained_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One really trained integrity-enabled digits repository per session (seconds to build),
    shared by tests/gateway/integrity and the e2e alerting test; copy it before changing it."""
    from tests.integrity_factory import build_integrity_repository  # torch: only when needed

    return build_integrity_repository(tmp_path_factory.mktemp("integrity"))


@pytest.fixture(scope="session")
def digits(trained_repository: tuple[Path, dict[str, Any]]) -> Digits:
    """Clear cases for the trained repository's models (tests/integrity_factory.py): what
    tests about plumbing send, so that none depends on one training outcome."""
    from tests.integrity_factory import typical_digits

    return typical_digits(trained_repository[0])

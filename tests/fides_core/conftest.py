"""The incident tests' simulated platform (tests/fides_core/incident_kit.py), one per test
module, and their check of a bundle against it."""

from __future__ import annotations

from typing import Any

import pytest

from fides_core.incident import check_incident
from tests.fides_core.incident_kit import Platform


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Platform:
    return Platform(tmp_path_factory.mktemp("platform"))


def check(b: dict[str, Any], platform: Platform, **kw: Any) -> Any:
    """:func:`check_incident` of bundle ``b`` against ``platform``'s root and measurement."""
    return check_incident(b, root=platform.root_pem, policy=platform.policy(), **kw)

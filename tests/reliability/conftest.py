"""Reliability and security harness (issue 9): fuzzing, soak, overload, faults, security.

Fuzz tests count the cases they try in :data:`FUZZ_CASES`; the counts are printed at the end
of the run (pytest's terminal summary), so that a run says how much it tried, not only that
nothing failed. Hypothesis settings live here, one place: no example database (nothing is
written to the work tree), no per-example deadline (the machine is shared and noisy; a hang is
caught by pytest-timeout instead).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

FUZZ_CASES: Counter[str] = Counter()

FUZZ_SETTINGS = settings(
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# FIDES_FUZZ_SCALE multiplies every fuzz test's case count (1 in `make test`; docs/reliability.md
# gives the figures of a longer run).
FUZZ_SCALE = max(1, int(os.environ.get("FIDES_FUZZ_SCALE", "1")))


def fuzz_settings(max_examples: int) -> settings:
    return settings(FUZZ_SETTINGS, max_examples=max_examples * FUZZ_SCALE)


def record(what: str, n: int = 1) -> None:
    FUZZ_CASES[what] += n


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FUZZ_CASES:
        return
    terminalreporter.section("fuzz cases tried (tests/reliability)")
    for what, n in sorted(FUZZ_CASES.items()):
        terminalreporter.write_line(f"{what:<48} {n:>7}")
    terminalreporter.write_line(f"{'total':<48} {sum(FUZZ_CASES.values()):>7}")

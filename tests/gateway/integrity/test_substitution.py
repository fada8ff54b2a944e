"""The substitution window: when a test is due, and what a test of a reset window gives."""

from __future__ import annotations

import numpy as np

from gateway.integrity.substitution import SubstitutionMonitor


def test_a_test_is_due_once_the_window_is_full_and_every_n_scores_after() -> None:
    rng = np.random.default_rng(0)
    clean = rng.uniform(size=500)
    monitor = SubstitutionMonitor(clean, window=20, alpha=0.001, every=5)
    assert not monitor.record(rng.uniform(size=19))
    assert monitor.test() is None  # not full: nothing to test
    assert monitor.record([0.5])
    honest = monitor.test()
    assert honest is not None
    assert not honest.flagged
    assert not monitor.record(rng.uniform(size=4))  # four since the last test
    assert monitor.record(np.full(16, 0.999))  # 20 since; the window now leans high
    shifted = monitor.test()
    assert shifted is not None
    assert shifted.flagged
    assert shifted.direction == "more"
    assert monitor.last is shifted
    monitor.reset()  # a test scheduled before a reset finds an empty window
    assert monitor.test() is None
    assert monitor.last is None

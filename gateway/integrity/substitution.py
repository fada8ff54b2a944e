"""Windowed detection of model substitution over recent verified requests.

A lazy provider that serves a cheaper model cannot be caught on one answer, but its answers
disagree with the verifier a little more often: the detector's scores drift up. Every
``every`` new scores, the last ``window`` of them are compared with the detector's clean
calibration scores (:class:`fides_core.stats.WindowTest`, the reference prepared once).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np

from fides_core.stats import WindowResult, WindowTest

__all__ = ["SubstitutionMonitor"]


class SubstitutionMonitor:
    def __init__(
        self, reference: np.ndarray, window: int = 100, alpha: float = 0.001, every: int = 10
    ) -> None:
        if len(reference) < 10:
            raise ValueError("the substitution test needs at least 10 clean reference scores")
        self.reference = np.asarray(reference, dtype=np.float64)
        self._test = WindowTest(self.reference)
        self.alpha = alpha
        self.every = every
        self.scores: deque[float] = deque(maxlen=window)
        self._since = 0
        self.last: WindowResult | None = None

    def record(self, scores: Iterable[float]) -> bool:
        """Record scores; True when a test is due (the window is full and ``every`` scores
        came since the last test): then call :meth:`test`, off the request's path."""
        for s in scores:
            self.scores.append(float(s))
            self._since += 1
        return len(self.scores) >= (self.scores.maxlen or 0) and self._since >= self.every

    def test(self) -> WindowResult | None:
        """Test the window as it is now; None while it is not full (it was reset since)."""
        if len(self.scores) < (self.scores.maxlen or 0):
            return None
        self._since = 0
        self.last = self._test(np.fromiter(self.scores, float), self.alpha)
        return self.last

    def reset(self) -> None:
        self.scores.clear()
        self._since = 0
        self.last = None

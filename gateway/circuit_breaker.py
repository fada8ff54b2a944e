"""A small thread-safe circuit breaker for calls to a remote service.

The pattern (Nygard, *Release It!*): while the remote is healthy the breaker is **closed** and
every call goes through. Each failure is counted; ``failure_threshold`` *consecutive*
failures **open** the breaker, and from then on calls are refused at once with
:class:`~gateway.errors.CircuitOpen` (HTTP 503 + ``Retry-After``) instead of waiting on a
remote that is down -- this sheds load from both sides and keeps worker threads free.
After ``reset_timeout_s`` the breaker is **half-open**: exactly one trial call is let
through while concurrent callers keep being refused. If the trial succeeds the breaker
closes; if it fails the breaker re-opens for another ``reset_timeout_s``.

Usage, once per *logical* call (retries happen inside it)::

    admitted = breaker.before_call()          # raises CircuitOpen when refused
    try:
        result = call_remote()
    except RemoteIsBroken:
        breaker.record_failure(admitted)
        raise
    breaker.record_success(admitted)

The admission says when the call was let through: an outcome of a call admitted before the
breaker last changed state (opened, or closed again) is stale and changes nothing. Without it,
one slow call that was sent before the breaker opened and then succeeded closed the breaker
at once (and let the flood through again), and a late failure of such a call failed a
half-open trial that was still running.

Every admitted call must report exactly one outcome (or :meth:`CircuitBreaker.release` it
when it ended with no verdict on the remote). An outcome that says nothing about
the remote's health (our own bug, a rejected request) should be reported as a success: the
remote answered. As a safety net, a half-open trial that never reports is considered lost
after ``reset_timeout_s`` and another trial is admitted.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from gateway.errors import CircuitOpen

logger = logging.getLogger(__name__)

State = Literal["closed", "open", "half_open"]

CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"


@dataclass(frozen=True)
class Admission:
    """A call let through by :meth:`CircuitBreaker.before_call`."""

    generation: int  # the breaker's state changes before it was admitted


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive failures -> half-open trial.

    ``name`` (usually the upstream URL) appears in log lines and in the CircuitOpen message.
    ``clock`` is injectable for tests; it must be monotonic.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        reset_timeout_s: float = 10.0,
        *,
        name: str = "upstream",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be > 0")
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        self._state: State = CLOSED
        self._failures = 0  # consecutive failures while closed
        self._opened_at = 0.0
        self._trial_started_at: float | None = None  # set while a half-open trial runs
        self._times_opened = 0
        self._generation = 0  # state changes so far (opened, closed again)

    # -- introspection (metrics) --------------------------------------------------------

    @property
    def state(self) -> State:
        """``closed``, ``open`` or ``half_open``.

        An open breaker whose reset timeout has elapsed reports ``half_open``: the next call
        will be admitted as the trial.
        """
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
                return HALF_OPEN
            return self._state

    @property
    def consecutive_failures(self) -> int:
        with self._lock:
            return self._failures

    @property
    def times_opened(self) -> int:
        """How many times the breaker went from closed (or half-open) to open."""
        with self._lock:
            return self._times_opened

    # -- the protocol -------------------------------------------------------------------

    def before_call(self) -> Admission:
        """Admit a call or raise :class:`CircuitOpen` with the seconds left until a trial."""
        with self._lock:
            now = self._clock()
            admitted = Admission(self._generation)
            if self._state == CLOSED:
                return admitted
            if self._state == OPEN:
                remaining = self.reset_timeout_s - (now - self._opened_at)
                if remaining > 0:
                    raise self._refusal(remaining)
                self._state = HALF_OPEN
                self._trial_started_at = now
                logger.info(
                    "circuit breaker for %s is half-open: letting one trial call through", self.name
                )
                return admitted
            # HALF_OPEN: one trial at a time.
            started = self._trial_started_at
            if started is None or now - started >= self.reset_timeout_s:
                if started is not None:
                    logger.warning(
                        "circuit breaker for %s: trial call never reported; admitting another",
                        self.name,
                    )
                self._trial_started_at = now
                return admitted
            raise self._refusal(self.reset_timeout_s - (now - started))

    def record_success(self, admitted: Admission | None = None) -> None:
        """The remote answered: reset the failure count and close the breaker (unless the
        call was admitted before the breaker last changed state)."""
        with self._lock:
            if self._stale(admitted):
                return
            if self._state != CLOSED:
                logger.info("circuit breaker for %s closed: trial call succeeded", self.name)
                self._generation += 1
            self._state = CLOSED
            self._failures = 0
            self._trial_started_at = None

    def record_failure(self, admitted: Admission | None = None) -> None:
        """Count a failure; open at the threshold, or re-open when the trial failed (unless
        the call was admitted before the breaker last changed state)."""
        with self._lock:
            if self._stale(admitted):
                return
            now = self._clock()
            if self._state == HALF_OPEN:
                self._open(now, "trial call failed")
                return
            if self._state == OPEN:
                # A call admitted before the breaker opened finished late; keep the timer.
                return
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open(now, f"{self._failures} consecutive failures")

    def reset(self) -> None:
        """Force the breaker closed (e.g. after an operator reload)."""
        self.record_success()

    def release(self, admitted: Admission) -> None:
        """The call ended with no verdict on the remote (our caller's deadline cut it): a
        half-open trial's slot is freed for the next call at once, instead of after
        ``reset_timeout_s`` as for a trial that never reports; nothing else changes."""
        with self._lock:
            if self._stale(admitted) or self._state != HALF_OPEN:
                return
            self._trial_started_at = None

    # -- internals (lock held) ----------------------------------------------------------

    def _stale(self, admitted: Admission | None) -> bool:
        if admitted is None or admitted.generation == self._generation:
            return False
        logger.debug(
            "circuit breaker for %s: ignoring the outcome of a call admitted before it last "
            "changed state",
            self.name,
        )
        return True

    def _open(self, now: float, why: str) -> None:
        self._state = OPEN
        self._generation += 1
        self._opened_at = now
        self._trial_started_at = None
        self._times_opened += 1
        logger.warning(
            "circuit breaker for %s opened (%s); refusing calls for %.1fs",
            self.name,
            why,
            self.reset_timeout_s,
        )

    def _refusal(self, remaining_s: float) -> CircuitOpen:
        retry_after = max(1, math.ceil(remaining_s))
        return CircuitOpen(
            f"circuit breaker open for upstream {self.name}: too many recent failures; "
            f"retry in {remaining_s:.1f}s",
            headers={"Retry-After": str(retry_after)},
        )

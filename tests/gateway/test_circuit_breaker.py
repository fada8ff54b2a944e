"""CircuitBreaker: closed -> open -> half-open trial -> closed / re-open, with a fake clock."""

from __future__ import annotations

import threading

import pytest

from gateway.circuit_breaker import CircuitBreaker
from gateway.errors import CircuitOpen, UpstreamError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def breaker(clock: FakeClock) -> CircuitBreaker:
    return CircuitBreaker(3, 10.0, name="http://mlaas.test:8000", clock=clock)


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record_failure()


def test_starts_closed_and_admits_calls(breaker: CircuitBreaker) -> None:
    assert breaker.state == "closed"
    breaker.before_call()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0


def test_opens_after_threshold_consecutive_failures(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 2
    fail(breaker, 1)
    assert breaker.state == "open"
    assert breaker.times_opened == 1


def test_success_resets_the_consecutive_count(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.before_call()
    breaker.record_success()
    fail(breaker, 2)
    assert breaker.state == "closed"


def test_open_breaker_refuses_with_retry_after(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(2.5)
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    exc = info.value
    assert isinstance(exc, UpstreamError)
    assert exc.status == 503
    assert exc.headers["Retry-After"] == "8"  # ceil(7.5)
    assert "http://mlaas.test:8000" in exc.message
    assert "7.5s" in exc.message


def test_retry_after_is_at_least_one_second(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(9.99)
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.headers["Retry-After"] == "1"


def test_half_open_admits_one_trial_and_success_closes(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail(breaker, 3)
    clock.advance(10.0)
    assert breaker.state == "half_open"  # next call will be the trial
    breaker.before_call()  # the trial
    assert breaker.state == "half_open"
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # a concurrent caller during the trial
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.before_call()
    breaker.record_success()


def test_failed_trial_reopens_for_a_full_timeout(breaker: CircuitBreaker, clock: FakeClock) -> None:
    fail(breaker, 3)
    clock.advance(11.0)
    breaker.before_call()
    breaker.record_failure()  # a single failure re-opens, whatever the threshold
    assert breaker.state == "open"
    assert breaker.times_opened == 2
    clock.advance(9.0)
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.advance(1.0)
    breaker.before_call()
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0


def test_late_failure_while_open_does_not_extend_the_timeout(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    for _ in range(4):  # four calls admitted while closed
        breaker.before_call()
    for _ in range(3):
        breaker.record_failure()
    clock.advance(5.0)
    breaker.record_failure()  # the fourth finishes after the breaker opened
    clock.advance(5.0)
    breaker.before_call()  # timer counted from the opening, not the late failure
    assert breaker.state == "half_open"


def test_lost_trial_is_replaced_after_the_reset_timeout(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail(breaker, 3)
    clock.advance(10.0)
    breaker.before_call()  # trial that never reports
    clock.advance(5.0)
    with pytest.raises(CircuitOpen):
        breaker.before_call()
    clock.advance(5.0)
    breaker.before_call()  # a new trial
    breaker.record_success()
    assert breaker.state == "closed"


def test_reset_closes(breaker: CircuitBreaker) -> None:
    fail(breaker, 3)
    breaker.reset()
    assert breaker.state == "closed"
    breaker.before_call()


def test_only_one_of_many_concurrent_callers_gets_the_trial(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    fail(breaker, 3)
    clock.advance(10.0)
    n = 16
    barrier = threading.Barrier(n)
    admitted: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        barrier.wait()
        try:
            breaker.before_call()
        except CircuitOpen:
            with lock:
                refused.append(i)
        else:
            with lock:
                admitted.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert len(admitted) == 1
    assert len(refused) == n - 1


def test_concurrent_failures_are_all_counted(clock: FakeClock) -> None:
    n, per_thread = 8, 100
    breaker = CircuitBreaker(n * per_thread, 10.0, clock=clock)

    def worker() -> None:
        for _ in range(per_thread):
            breaker.before_call()
            breaker.record_failure()

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert breaker.consecutive_failures == n * per_thread
    assert breaker.state == "open"  # exactly the last failure opened it
    assert breaker.times_opened == 1


@pytest.mark.parametrize(("threshold", "reset"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_rejects_invalid_settings(threshold: int, reset: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        CircuitBreaker(threshold, reset)


def test_a_late_success_admitted_before_opening_does_not_close_it(
    breaker: CircuitBreaker,
) -> None:
    """A slow call sent while the breaker was closed, answering after it opened, says
    nothing about the remote now: it closed the breaker and let the flood through again."""
    slow = breaker.before_call()
    fail(breaker, 3)
    assert breaker.state == "open"
    breaker.record_success(slow)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        breaker.before_call()


def test_a_late_failure_does_not_fail_a_running_trial(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    slow = breaker.before_call()
    fail(breaker, 3)
    clock.advance(10.0)
    trial = breaker.before_call()
    breaker.record_failure(slow)  # sent before the breaker opened: not the trial's outcome
    assert breaker.state == "half_open"
    assert breaker.times_opened == 1
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # still one trial at a time
    breaker.record_success(trial)
    assert breaker.state == "closed"


def test_the_second_of_two_trials_reports_nothing(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """A trial that never reported is replaced; once one trial decided, the other's late
    outcome does not undo it."""
    fail(breaker, 3)
    clock.advance(10.0)
    first = breaker.before_call()
    clock.advance(10.0)  # the first trial is presumed lost: a second is admitted
    second = breaker.before_call()
    breaker.record_success(second)
    assert breaker.state == "closed"
    breaker.record_failure(first)
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 0


def test_a_trial_released_without_a_verdict_frees_its_slot_at_once(
    breaker: CircuitBreaker, clock: FakeClock
) -> None:
    """A half-open trial that ended with no verdict on the remote (our caller's deadline cut
    it) is released: the next call is the new trial at once, not after reset_timeout_s (it
    was refused CircuitOpen for 10 s); the breaker stays half-open, its count unchanged."""
    fail(breaker, 3)
    clock.advance(10.0)
    trial = breaker.before_call()
    with pytest.raises(CircuitOpen):
        breaker.before_call()  # one trial at a time
    breaker.release(trial)
    assert breaker.state == "half_open"
    second = breaker.before_call()
    breaker.record_success(second)
    assert breaker.state == "closed"


def test_releasing_a_call_of_a_closed_breaker_changes_nothing(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.release(breaker.before_call())
    assert breaker.state == "closed"
    assert breaker.consecutive_failures == 2

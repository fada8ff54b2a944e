"""The query client and money: nothing paid for is lost, nothing is sent after an interrupt,
nothing is paid twice, and no credential is shown (issue: review of ``fides protect``), over
HTTP with the misbehaving MLaaS of tests/fides/protect/conftest.py:

* a second Ctrl-C / SIGTERM while the first one's handler records what is in flight;
* an interrupt while a worker waits for its rate-limit slot, or in a retry's backoff;
* a read timeout (or a 502) after the request was sent: not retried, counted as paid for;
* user info in the URL and secrets in a Location: never shown, nor recorded;
* the redirect's advice, 202 / 304, and a refusal that is no circuit-breaker failure."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import numpy as np
import pytest

from fides.protect.query import BudgetExhausted, QueryFailed
from fides.protect.store import AnswerStore, input_key
from tests.fides.protect.conftest import MLaaS, closing, open_querier, open_upstream
from verifier.data import load_digits_arrays

X = load_digits_arrays(0)[0][:300]  # [300, 1, 8, 8] float32 in [0, 1]

pytestmark = pytest.mark.usefixtures("protect_clients")


@pytest.fixture
def raising_handlers() -> Iterator[threading.Event]:
    """SIGINT and SIGTERM raise KeyboardInterrupt (as ``fides protect`` has them) and set the
    yielded event once the main thread has run the first one."""
    seen = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.set()
        raise KeyboardInterrupt

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    yield seen
    for s, h in before.items():
        signal.signal(s, h)


# -- 1. a second interrupt while the first one's handler records what is in flight ----------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_interrupt_does_not_lose_the_answers_in_flight(
    mlaas: MLaaS, tmp_path: Path, raising_handlers: threading.Event, signum: int
) -> None:
    """Ctrl-C, then Ctrl-C again (or SIGTERM twice, as docker / systemd / k8s send) while
    three requests are in flight: each answer the provider bills is recorded and counted,
    and the rerun pays for none of them again."""
    main = threading.main_thread().ident
    assert main is not None
    calls = {"n": 0}

    def hook(x: np.ndarray) -> None:  # the provider thinks about the first request ...
        calls["n"] += 1
        if calls["n"] != 1:
            return
        signal.pthread_kill(main, signum)  # ... while the client is interrupted, once
        assert raising_handlers.wait(10)
        time.sleep(0.2)  # the first interrupt's handler is waiting for the answers
        signal.pthread_kill(main, signum)  # ... and twice
        time.sleep(0.2)

    mlaas.on_infer = hook
    store = tmp_path / "a.sqlite"
    q = open_querier(mlaas, store)
    with pytest.raises(KeyboardInterrupt):
        q.answers(X[:96])
    assert mlaas.rows_answered > 0
    assert q.store.spent == len(q.store) == mlaas.rows_answered  # billed = counted = recorded
    billed = mlaas.rows_answered
    mlaas.on_infer = None
    q2 = open_querier(mlaas, store)
    assert q2.answers(X[:96]).shape == (96, 10)
    assert mlaas.rows_answered == 96  # the rerun asked only for what was not billed
    assert q2.store.spent == 96
    assert billed <= 96


# -- 2. nothing is sent after an interrupt ---------------------------------------------------


def test_an_interrupt_while_workers_wait_for_their_rate_slot_sends_nothing_more(
    mlaas: MLaaS, tmp_path: Path, raising_handlers: threading.Event
) -> None:
    """0.5 requests a second, three workers: the second and third wait 2 s and 4 s for their
    slot; Ctrl-C during the first request: they are never sent."""
    main = threading.main_thread().ident
    assert main is not None
    mlaas.on_infer = lambda x: signal.pthread_kill(main, signal.SIGINT)
    q = open_querier(mlaas, tmp_path / "a.sqlite", rate_limit=0.5)
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        q.answers(X[:96])
    # the call returns once every worker is done: what they sent is billed by now
    assert mlaas.rows_answered == q.store.spent == len(q.store) == 32
    assert time.monotonic() - started < 3.9  # the last slot (4 s) was not waited for


def test_an_interrupt_the_kernel_hands_to_a_worker_thread_is_taken_at_once(
    mlaas: MLaaS, tmp_path: Path, raising_handlers: threading.Event
) -> None:
    """Ctrl-C reaches a process, not a thread: the kernel may hand it to any thread that does
    not block it, here the worker waiting for the answer. Python runs the handler in the main
    thread, which must notice while the request is still in flight (the provider holds it up
    to 30 s), not when the answer wakes it: the run stops, the answer in flight is recorded."""
    q = open_querier(mlaas, tmp_path / "a.sqlite", up={"timeout_s": 60}, concurrency=1)
    held: dict[str, float] = {}

    def hook(x: np.ndarray) -> None:
        workers = [t for t in threading.enumerate() if t.name.startswith("fides-query")]
        assert len(workers) == 1
        assert workers[0].ident is not None
        signal.pthread_kill(workers[0].ident, signal.SIGINT)
        started = time.monotonic()
        q.service.stop.wait(30)  # answered once the client has taken the interrupt
        held["s"] = time.monotonic() - started

    mlaas.on_infer = hook
    with pytest.raises(KeyboardInterrupt):
        q.answers(X[:32])
    assert raising_handlers.is_set()
    assert held["s"] < 10  # not the 30 s the provider would have held the answer
    assert mlaas.rows_answered == q.store.spent == len(q.store) == 32


def test_an_interrupt_during_a_retry_backoff_sends_no_retry(
    mlaas: MLaaS, tmp_path: Path, raising_handlers: threading.Event
) -> None:
    """A 503, then Ctrl-C while the runtime waits 3 s to retry: the wait ends at once and
    the retry is never sent (nor billed)."""
    main = threading.main_thread().ident
    assert main is not None
    mlaas.fail_with, mlaas.fail_times = 503, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite", up={"backoff_s": 3.0}, concurrency=1)
    stop = getattr(q, "_stop", None)  # (the code before the fix has none)

    def interrupt() -> None:  # before the backoff: Ctrl-C, and the client has taken it
        signal.pthread_kill(main, signal.SIGINT)
        assert raising_handlers.wait(10)
        if stop is not None:
            assert stop.wait(10)

    q.service.runtime.on_retry = interrupt  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        q.answers(X[:32])
    assert time.monotonic() - started < 2.9  # the backoff (3 s) was not waited out
    assert mlaas.fail_times == 0
    assert mlaas.rows_answered == q.store.spent == 0


# -- 3. a request that may have been processed is not retried, and is counted ---------------


def test_a_read_timeout_is_not_retried_and_counted_as_possibly_paid(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """The provider answers (and bills) the first request after the client's timeout: a
    retry would be billed again. It is not retried, and counted as paid for: --max-queries
    32 is never exceeded at the provider."""
    requests: list[int] = []

    def slow_first(x: np.ndarray) -> float:
        requests.append(len(x))
        return 1.5 if len(requests) == 1 else 0.0

    mlaas.delay_s = slow_first
    store = tmp_path / "a.sqlite"
    q = open_querier(mlaas, store, 32, up={"timeout_s": 0.5}, concurrency=1)
    with pytest.raises(QueryFailed, match=r"ReadTimeout.*not retried.*counted as paid for") as err:
        q.answers(X[:32])
    assert err.value.possibly_paid
    assert str(err.value).count(mlaas.url) == 1  # the endpoint named once, by its identity
    assert requests == [32]  # asked once
    assert q.store.spent == 32  # what the provider may bill is counted ...
    assert len(q.store) == 0  # ... nothing recorded: a rerun asks again, within the budget
    with pytest.raises(BudgetExhausted):
        open_querier(mlaas, store, 32).answers(X[:32])
    assert requests == [32]
    assert open_querier(mlaas, store, 64).answers(X[:32]).shape == (32, 10)
    assert requests == [32, 32]


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_5xx_other_than_503_is_not_retried_and_counted_as_possibly_paid(
    mlaas: MLaaS, tmp_path: Path, status: int
) -> None:
    mlaas.fail_with, mlaas.fail_times = status, 1  # a retry would be answered (and billed)
    q = open_querier(mlaas, tmp_path / "a.sqlite", concurrency=1)
    with pytest.raises(QueryFailed, match=rf"HTTP {status}.*not retried") as err:
        q.answers(X[:32])
    assert err.value.possibly_paid
    assert mlaas.rows_answered == 0
    assert q.store.spent == 32


def test_429_and_503_and_connection_errors_are_still_retried(mlaas: MLaaS, tmp_path: Path) -> None:
    """What the provider cannot have processed is retried, and not counted."""
    mlaas.fail_with, mlaas.fail_times = 503, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite", concurrency=1)
    assert q.answers(X[:32]).shape == (32, 10)
    mlaas.fail_with, mlaas.fail_times = 429, 1
    assert q.answers(X[32:64]).shape == (32, 10)
    assert q.store.spent == mlaas.rows_answered == 64
    runtime: Any = q.service.runtime
    refused = httpx.ConnectError("refused")
    send = runtime.client.send
    tries = {"n": 0}

    def flaky_send(request: httpx.Request, **kw: Any) -> httpx.Response:
        tries["n"] += 1
        if tries["n"] == 1:
            raise refused
        return send(request, **kw)

    runtime.client.send = flaky_send
    assert q.answers(X[64:96]).shape == (32, 10)
    assert tries["n"] == 2
    assert q.store.spent == mlaas.rows_answered == 96


# -- 4. no credential is shown or recorded ---------------------------------------------------


def test_user_info_in_the_url_is_sent_as_basic_auth_and_never_shown(
    mlaas: MLaaS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mlaas.basic_auth = "alice:hunter2"
    creds = mlaas.url.replace("http://", "http://alice:hunter2@")
    caplog.set_level(logging.DEBUG)
    q = open_querier(mlaas, tmp_path / "a.sqlite", url=creds, up={"headers_from_env": {}})
    assert q.answers(X[:32]).shape == (32, 10)  # the credentials still reach the service
    assert "hunter2" not in q.service.identity
    assert "hunter2" not in (q.store.meta("service") or "")
    mlaas.location = "https://elsewhere.example/x?sig=SIGNED"
    for status in (302, 204, 500):
        mlaas.fail_with, mlaas.fail_times = status, 1
        with pytest.raises(QueryFailed) as err:
            q.answers(X[32 * status // 100 : 32 * status // 100 + 32])
        assert "hunter2" not in str(err.value)
        assert "alice" not in str(err.value)
    assert "hunter2" not in caplog.text


def test_a_store_recorded_under_a_url_with_user_info_is_adopted(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """A store an earlier version keyed to the URL with its password is this service's:
    adopted (its answers kept) and re-recorded without it."""
    from fides.protect.run import _legacy_ids

    mlaas.basic_auth = "alice:hunter2"
    creds = mlaas.url.replace("http://", "http://alice:hunter2@")
    service = open_upstream(creds, headers_from_env={})
    path = tmp_path / "a.sqlite"
    old = AnswerStore(path, f"upstream {creds}/v2/models/digits, output probabilities")
    keys = [input_key(row) for row in X[:2]]
    old.put(keys, np.full((2, 10), 0.1, np.float32), paid=2)
    old.close()
    store = AnswerStore(
        path, f"{service.identity}, output {service.output}", legacy_ids=_legacy_ids(service)
    )
    closing(store)
    assert len(store) == 2
    assert store.spent == 2
    assert "hunter2" not in (store.meta("service") or "")


@pytest.mark.parametrize(
    "location",
    [
        "https://cdn.example:abc/o?X-Amz-Signature=SECRETSIG",  # not a valid URL
        "https://u:SECRETPW@cdn.example:abc/o",  # not valid, with user info
        "https://cdn.example/o;jsessionid=SECRETSID",
        "https://cdn.example/o#SECRETFRAG",
        "https://u:SECRETPW@cdn.example/o?sig=SECRETSIG",
    ],
)
def test_a_location_is_shown_without_its_secrets(
    mlaas: MLaaS, tmp_path: Path, location: str
) -> None:
    mlaas.location = location
    mlaas.fail_with, mlaas.fail_times = 307, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    with pytest.raises(QueryFailed, match=r"HTTP 307") as err:
        q.answers(X[:32])
    assert "SECRET" not in str(err.value)
    assert "cdn.example" in str(err.value)


# -- 5. the redirect's advice ----------------------------------------------------------------


def test_a_redirect_elsewhere_names_the_base_url_once_and_the_store(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    mlaas.location = "https://moved.example/api/v2/models/digits/infer?token=SECRET"
    mlaas.fail_with, mlaas.fail_times = 308, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    with pytest.raises(QueryFailed) as err:
        q.answers(X[:32])
    message = str(err.value)
    assert "to the same model's path under https://moved.example/api)" in message
    assert message.count("moved.example") == 1
    assert message.count(mlaas.url) == 1  # the endpoint is named once (the service's name)
    assert "new --answers file" in message
    assert "SECRET" not in message
    mlaas.location = "https://moved.example/somewhere/else"
    mlaas.fail_with, mlaas.fail_times = 308, 1
    with pytest.raises(QueryFailed) as err:
        q.answers(X[:32])
    assert "Location https://moved.example/somewhere/else" in str(err.value)
    assert "its base URL (what comes before /v2/)" in str(err.value)


def test_the_base_url_of_a_moved_endpoint() -> None:
    from fides.protect.service import _moved_base

    infer = httpx.URL("https://a.example/v2/models/m/versions/3/infer")
    assert _moved_base(infer, httpx.URL("https://b.example/x/v2/models/m/versions/3/infer"))
    assert (
        _moved_base(infer, httpx.URL("https://b.example/x/v2/models/m/versions/3/infer;s=1"))
        == "https://b.example/x"
    )
    assert _moved_base(infer, httpx.URL("https://b.example/v2/models/m/infer")) is None
    meta = httpx.URL("https://a.example/p/v2/models/m")
    assert _moved_base(meta, httpx.URL("https://u:p@b.example/v2/models/m")) == "https://b.example"


# -- 6. 202, 304 and the circuit breaker -----------------------------------------------------


def test_an_async_202_is_refused_by_name_and_counted_as_possibly_paid(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    mlaas.fail_with, mlaas.fail_times = 202, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite", concurrency=1)
    with pytest.raises(QueryFailed, match=r"HTTP 202 Accepted: an asynchronous endpoint") as err:
        q.answers(X[:32])
    assert "may bill" in str(err.value)
    assert mlaas.fail_times == 0  # not retried
    assert q.store.spent == 32  # counted as the provider may bill it ...
    assert q.store.unusable(input_key(row) for row in q.service.encode(X[:32])) == {}  # not
    assert q.answers(X[:32]).shape == (32, 10)  # ... unusable: asked again once it answers


def test_a_304_is_named_and_not_paid_for(mlaas: MLaaS, tmp_path: Path) -> None:
    mlaas.fail_with, mlaas.fail_times = 304, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite", concurrency=1)
    with pytest.raises(QueryFailed, match=r"HTTP 304 Not Modified") as err:
        q.answers(X[:32])
    assert "redirect" not in str(err.value)
    assert q.store.spent == 0


def test_a_refused_answer_is_no_circuit_breaker_failure(mlaas: MLaaS, tmp_path: Path) -> None:
    mlaas.location = "https://moved.example/v2/models/digits/infer"
    mlaas.fail_with, mlaas.fail_times = 307, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite", concurrency=1)
    with pytest.raises(QueryFailed):
        q.answers(X[:32])
    assert q.service.runtime.breaker.consecutive_failures == 0  # type: ignore[attr-defined]

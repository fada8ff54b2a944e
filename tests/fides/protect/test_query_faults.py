"""The query client against three faults of a real endpoint (issue 19), over HTTP with the
misbehaving MLaaS of tests/fides/protect/conftest.py:

* a service whose answers change shape between two runs on one answer store: named (the
  recorded shape, the new one, the store), what this run paid for counted, nothing recorded
  lost, the store still usable;
* a redirect (3xx) or a 204 No Content: not followed, not retried, named, neither counted as
  paid for nor recorded as unusable;
* Ctrl-C, SIGTERM or an exhausted budget during the determinism probe: it stops as the main
  query loop does (what is in flight is recorded and counted), and a rerun goes on with the
  repeats not yet asked."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from typer.testing import CliRunner

from fides.cli import app
from fides.protect.query import (
    PROBE_STATE,
    AnswerError,
    AnswerShapeChanged,
    BudgetExhausted,
    Querier,
    QueryFailed,
)
from fides.protect.service import ServiceError, open_service
from fides.protect.store import input_key
from gateway.model_config import UpstreamOptions
from tests.fides.protect.conftest import MLaaS, open_querier, protect_raw, upstream
from tests.gateway.test_upstream_gateway import serve_in_thread
from verifier.data import load_digits_arrays

X = load_digits_arrays(0)[0][:300]  # [300, 1, 8, 8] float32 in [0, 1]
REPO_ROOT = Path(__file__).parents[3]

pytestmark = pytest.mark.usefixtures("protect_clients")


def _unusable_rows(q: Querier, x: np.ndarray) -> list[int]:
    keys = [input_key(row) for row in q.service.encode(x)]
    unusable = q.store.unusable(keys)
    return [i for i, k in enumerate(keys) if k in unusable]


# -- 1. answers that change shape between runs --------------------------------------------


def test_answers_that_change_shape_between_runs_are_named_counted_and_kept(
    mlaas: MLaaS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The provider's metadata allows any number of classes; between two runs its model
    grows an eleventh. The second run is not an interrupt: it names both shapes and the
    store, counts what it paid for, and leaves the first run's answers usable."""
    store = tmp_path / "a.sqlite"
    mlaas.declared = -1  # [-1, -1]: the metadata does not pin the classes
    first = open_querier(mlaas, store).answers(X[:64])
    assert mlaas.rows_answered == 64
    mlaas.classes = 11
    q = open_querier(mlaas, store)
    with pytest.raises(AnswerShapeChanged) as err:
        q.answers(X[:128])  # 64 recorded, 64 asked: 2 batches of 32, both answered [11]
    message = str(err.value)
    assert "now answers float32 [11] per input" in message
    assert f"the answers recorded in {store} are float32 [10]" in message
    assert "64 inputs paid for by this run (128 in all)" in message
    assert "--answers" in message
    assert "--retry-unusable" in message
    assert "interrupted" not in caplog.text  # an error, not the interrupt path
    assert q.store.spent == mlaas.rows_answered == 128  # paid for, and counted
    assert len(q.store) == 64  # nothing recorded was lost
    assert _unusable_rows(q, X[64:128]) == list(range(64))  # not paid for again by a rerun
    assert "the service changed" in next(iter(q.store.unusable([input_key(X[64])]).values()))
    # the store is still valid: the first run's answers read back, nothing asked
    mlaas.classes = 10
    rerun = open_querier(mlaas, store)
    np.testing.assert_array_equal(rerun.answers(X[:64]), first)
    with pytest.raises(AnswerError, match="64 of the inputs were answered with unusable"):
        rerun.answers(X[:128])
    assert mlaas.rows_answered == 128
    assert rerun.store.forget_unusable() == 64  # --retry-unusable, the service back as it was
    assert rerun.answers(X[:128]).shape == (128, 10)
    assert rerun.store.spent == mlaas.rows_answered == 192


def test_a_service_declaring_another_shape_is_refused_before_any_query(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """A new model version that says so in its metadata is named before a batch is paid."""
    store = tmp_path / "a.sqlite"
    open_querier(mlaas, store).answers(X[:64])
    mlaas.classes = 11  # its metadata now declares [-1, 11]
    with pytest.raises(
        AnswerShapeChanged,
        match=rf"declares FP32 \[11\] per input .*but the 64 answers recorded in {store} are "
        r"float32 \[10\].*Nothing was asked",
    ):
        open_querier(mlaas, store)
    assert mlaas.rows_answered == 64


def test_probe_repeats_answered_in_another_shape_are_named_and_counted(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """The determinism probe compares repeats with the recorded answers: repeats of another
    shape are the same error, not a failed subtraction."""
    mlaas.declared = -1
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    q.answers(X[:64])
    mlaas.classes = 11
    with pytest.raises(AnswerShapeChanged, match=r"now answers float32 \[11\].*\[10\]"):
        q.repeat_probe(X[:64])
    assert q.store.spent == mlaas.rows_answered == 96  # one batch at a time: the first one
    assert q.store.meta("determinism") is None


def test_the_command_names_a_changed_shape_with_its_own_exit_code(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """Through ``fides protect``: exit 4 (the service answers something unusable) with the
    shapes and the store, not 130 (interrupted) nor 2 (an unusable store)."""
    mlaas.declared = -1
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(protect_raw(upstream(mlaas.url))))
    args = ["protect", str(config), "--repository", str(tmp_path / "repo")]
    args += ["--run-dir", str(tmp_path / "run")]
    runner = CliRunner()
    r = runner.invoke(app, [*args, "--max-queries", "100"])
    assert r.exit_code == 3, r.output
    mlaas.classes = 11
    r = runner.invoke(app, args)
    assert r.exit_code == 4, r.output
    output = " ".join(r.output.split())  # the console wraps lines
    assert "now answers float32 [11] per input" in output
    assert "are float32 [10]" in output
    assert "interrupted" not in output
    with contextlib.closing(sqlite3.connect(tmp_path / "run" / "answers.sqlite")) as db:
        spent = int(db.execute("SELECT value FROM meta WHERE key = 'spent'").fetchone()[0])
        answers = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    assert spent == mlaas.rows_answered > 100
    assert answers == 100


# -- 2. redirects and 204 No Content -------------------------------------------------------


@pytest.fixture
def elsewhere() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Another server, where a redirect points: it records every request it gets."""
    seen: list[dict[str, Any]] = []
    other = FastAPI()

    @other.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str, request: Request) -> Any:
        seen.append({"path": path, "headers": dict(request.headers)})
        return JSONResponse({"error": "you should not be here"}, status_code=418)

    with serve_in_thread(other) as (url, _):
        yield url, seen


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_named_not_followed_and_not_retried(
    mlaas: MLaaS,
    tmp_path: Path,
    elsewhere: tuple[str, list[dict[str, Any]]],
    status: int,
) -> None:
    url, seen = elsewhere
    host = url.removeprefix("http://")
    mlaas.location = f"http://user:pw@{host}/v2/models/digits/infer?signature=s3cret"
    mlaas.fail_with, mlaas.fail_times = status, 1  # once: a retry would be answered
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    with pytest.raises(QueryFailed) as err:
        q.answers(X[:32])
    message = str(err.value)
    assert f"HTTP {status}" in message
    assert "not followed" in message
    assert "service.upstream.url" in message
    assert "s3cret" not in message
    assert "pw@" not in message
    assert seen == []  # the credentials never went to the other server
    assert mlaas.fail_times == 0  # asked once: a redirect is configuration, not a passing fault
    # a 303 See Other says the request was processed (its result is elsewhere): the provider
    # may bill it, so it is counted as paid for; any other redirect was not processed
    paid = 32 if status == 303 else 0
    if status == 303:
        assert "may have processed and billed it" in message
    else:  # the same model's path elsewhere: the base URL to set is named, once
        assert f"to the same model's path under http://{host});" in message
        assert message.count(host) == 1
        assert "new --answers file" in message
    assert q.store.spent == paid  # no answer: nothing else counted ...
    assert _unusable_rows(q, X[:32]) == []  # ... nor recorded as unusable
    assert q.answers(X[:32]).shape == (32, 10)  # once the endpoint answers, they are asked
    assert mlaas.rows_answered == 32
    assert q.store.spent == paid + 32


def test_a_redirected_metadata_call_is_named_before_any_query(
    elsewhere: tuple[str, list[dict[str, Any]]],
) -> None:
    """An endpoint that moved redirects its metadata call too: the service is not opened,
    and the error names the status and where it points."""
    url, seen = elsewhere
    moved = FastAPI()

    @moved.api_route("/{path:path}", methods=["GET", "POST"])
    async def everything(path: str) -> Any:
        return Response(status_code=308, headers={"Location": f"{url}/{path}"})

    with serve_in_thread(moved) as (moved_url, _):
        options = UpstreamOptions.model_validate(upstream(moved_url)["upstream"])
        with pytest.raises(
            ServiceError,
            match=rf"GET /v2/models/digits was redirected \(HTTP 308 Permanent Redirect, "
            rf"to the same model's path under {url}\).*not followed",
        ):
            open_service(
                repository=None, model=None, upstream=options, output=None, max_batch_size=64
            )
    assert seen == []


def test_no_content_is_named_not_retried_and_counted_as_possibly_paid(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """A 204 says the request was processed: the provider may bill it, so it is counted as
    paid for (spent never under what may be billed), nothing recorded, not retried."""
    mlaas.fail_with, mlaas.fail_times = 204, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    with pytest.raises(QueryFailed, match=r"HTTP 204 No Content: a response without a body"):
        q.answers(X[:32])
    assert mlaas.fail_times == 0  # not retried
    assert q.store.spent == 32
    assert _unusable_rows(q, X[:32]) == []
    assert q.answers(X[:32]).shape == (32, 10)
    assert mlaas.rows_answered == 32
    assert q.store.spent == 64


def test_a_redirect_among_batches_in_flight_keeps_their_answers(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """One of three concurrent requests is redirected: the other two are recorded and
    counted; the redirected batch is asked by the rerun, once."""
    mlaas.location = "https://moved.example/v2/models/digits/infer"
    mlaas.fail_with, mlaas.fail_times = 307, 1
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    with pytest.raises(
        QueryFailed,
        match=r"HTTP 307 Temporary Redirect, to the same model's path under https://moved",
    ):
        q.answers(X[:96])
    assert q.store.spent == len(q.store) == mlaas.rows_answered == 64
    assert q.answers(X[:96]).shape == (96, 10)
    assert q.store.spent == mlaas.rows_answered == 96


# -- 3. interrupts and the budget during the determinism probe ----------------------------


def _interrupt_the_probe(
    mlaas: MLaaS,
    probe: np.ndarray,
    signum: int,
    at_request: int,
    stopped: threading.Event | None = None,
) -> None:
    """Deliver ``signum`` to the main thread while the ``at_request``-th request of the
    probe's repeats is in flight, then answer it (the provider bills it) once the client has
    taken the interrupt (``stopped``: its stop event), or after 5 s (a signal the kernel hands
    to another thread is taken when the main thread next wakes: row 89 of
    docs/reliability.md)."""
    keys = {row.tobytes() for row in probe}
    main = threading.main_thread().ident
    assert main is not None
    count = {"n": 0}

    def hook(x: np.ndarray) -> None:
        if not {row.tobytes() for row in x} <= keys:
            return
        count["n"] += 1
        if count["n"] == at_request:
            signal.pthread_kill(main, signum)
            if stopped is None or not stopped.wait(5):
                time.sleep(0.5)  # the client is waiting for this answer when the signal lands

    mlaas.on_infer = hook


@contextlib.contextmanager
def _raising_handlers() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, as ``fides protect`` has them, whatever an
    earlier test of the process left installed."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    before = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_during_the_probe_keeps_the_repeat_in_flight_and_a_rerun_goes_on(
    mlaas: MLaaS, tmp_path: Path, caplog: pytest.LogCaptureFixture, signum: int
) -> None:
    store = tmp_path / "a.sqlite"
    probe = X[:96]  # 3 repeats of 32, one at a time
    # the request in flight is answered once the client has taken the interrupt, however
    # late a loaded machine lets it: a read timeout must not pass first
    q = open_querier(mlaas, store, up={"timeout_s": 60})
    q.answers(probe)
    mlaas.mode = "noisy"  # so that the probe has something to measure
    _interrupt_the_probe(mlaas, probe, signum, at_request=2, stopped=q.service.stop)
    with _raising_handlers(), pytest.raises(KeyboardInterrupt):
        q.repeat_probe(probe)
    mlaas.on_infer = None
    assert q.store.spent == mlaas.rows_answered == 96 + 64  # the one in flight is counted
    assert q.store.meta("determinism") is None  # not measured yet
    assert "interrupted while asking for repeats of the determinism probe" in caplog.text
    assert len(json.loads(q.store.meta(PROBE_STATE) or "{}")["done"]) == 64
    rerun = open_querier(mlaas, store)
    result = rerun.repeat_probe(probe)  # goes on: only the last 32 are asked
    assert rerun.store.spent == mlaas.rows_answered == 96 + 96
    assert result["inputs"] == 96
    assert float(result["max_abs_diff"]) > 0.01
    assert 0 < float(result["mean_abs_diff"]) <= float(result["max_abs_diff"])
    assert rerun.store.meta(PROBE_STATE) is None
    assert rerun.repeat_probe(probe) == result  # measured once per store
    assert mlaas.rows_answered == 192


def test_an_interrupt_while_a_probe_batch_is_recorded_counts_it_once(
    mlaas: MLaaS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C inside the transaction that records a batch of repeats (it rolls back): the
    batch, paid for, is recorded before the interrupt goes on, and counted once."""
    store = tmp_path / "a.sqlite"
    q = open_querier(mlaas, store)
    q.answers(X[:64])
    real = q.store.set_meta

    def interrupted_once(key: str, value: str) -> None:
        if key == PROBE_STATE:  # after the spent count, in the same transaction
            monkeypatch.setattr(q.store, "set_meta", real)
            raise KeyboardInterrupt
        real(key, value)

    monkeypatch.setattr(q.store, "set_meta", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        q.repeat_probe(X[:64])
    assert q.store.spent == mlaas.rows_answered == 96
    assert len(json.loads(q.store.meta(PROBE_STATE) or "{}")["done"]) == 32
    rerun = open_querier(mlaas, store)
    assert rerun.repeat_probe(X[:64])["inputs"] == 64
    assert rerun.store.spent == mlaas.rows_answered == 128


def test_an_interrupt_while_a_later_batch_is_recorded_keeps_every_batch(
    mlaas: MLaaS, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch sent second is answered first, and Ctrl-C lands while it is recorded (its
    transaction rolls back); the first is still in flight. Both are recorded, once each."""
    first = {row.tobytes() for row in X[:32]}
    mlaas.delay_s = lambda x: 0.3 if {row.tobytes() for row in x} <= first else 0.0
    q = open_querier(mlaas, tmp_path / "a.sqlite")
    real = q.store.put

    def interrupted_once(*args: Any, **kwargs: Any) -> None:
        monkeypatch.setattr(q.store, "put", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(q.store, "put", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        q.answers(X[:64])
    assert len(q.store) == q.store.spent == mlaas.rows_answered == 64
    assert open_querier(mlaas, tmp_path / "a.sqlite").answers(X[:64]).shape == (64, 10)
    assert mlaas.rows_answered == 64


def test_a_budget_exhausted_during_the_probe_stops_cleanly_and_a_larger_one_goes_on(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    store = tmp_path / "a.sqlite"
    q = open_querier(mlaas, store, budget=96 + 40)
    q.answers(X[:96])
    with pytest.raises(
        BudgetExhausted,
        match=r"136 inputs paid for of --max-queries 136, 56 more needed for the repeats of "
        r"the determinism probe.*at least 192",
    ):
        q.repeat_probe(X[:96])
    assert q.store.spent == mlaas.rows_answered == 136  # what fits was asked and counted
    assert q.store.meta("determinism") is None
    rerun = open_querier(mlaas, store, budget=192)
    assert rerun.repeat_probe(X[:96])["inputs"] == 96
    assert rerun.store.spent == mlaas.rows_answered == 192  # none asked twice


def test_a_probe_of_other_inputs_starts_afresh(mlaas: MLaaS, tmp_path: Path) -> None:
    """An unfinished probe's counts are of its inputs only: a probe of others starts over
    (what the first one paid for stays counted)."""
    store = tmp_path / "a.sqlite"
    q = open_querier(mlaas, store, budget=96 + 32)
    q.answers(X[:96])
    with pytest.raises(BudgetExhausted):
        q.repeat_probe(X[:96])
    rerun = open_querier(mlaas, store)
    assert rerun.repeat_probe(X[:64])["inputs"] == 64  # another probe: all 64 asked
    assert rerun.store.spent == mlaas.rows_answered == 96 + 32 + 64


def _spent(store: Path) -> int:
    with contextlib.closing(sqlite3.connect(store, timeout=5)) as db:
        row = db.execute("SELECT value FROM meta WHERE key = 'spent'").fetchone()
    return int(row[0]) if row else 0


def test_the_command_killed_during_the_probe_exits_130_without_a_traceback(
    mlaas: MLaaS, tmp_path: Path
) -> None:
    """``fides protect`` as a process, SIGTERM while a repeat of the probe is in flight:
    exit 130 with the message, every input the provider answered counted, the probe's
    progress recorded for the rerun."""
    seen: set[bytes] = set()
    kit: dict[str, subprocess.Popen[bytes]] = {}
    signalled = threading.Event()

    def hook(x: np.ndarray) -> None:
        rows = {row.tobytes() for row in x}
        if rows <= seen and not signalled.is_set():  # inputs answered before: the probe
            signalled.set()
            kit["p"].send_signal(signal.SIGTERM)
            time.sleep(0.5)
        seen.update(rows)

    mlaas.on_infer = hook
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(protect_raw(upstream(mlaas.url))))
    run_dir = tmp_path / "run"
    log = tmp_path / "kit.log"
    with log.open("wb") as out:
        kit["p"] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fides.cli",
                "protect",
                str(config),
                "--repository",
                str(tmp_path / "repo"),
                "--run-dir",
                str(run_dir),
            ],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        code = kit["p"].wait(timeout=240)
    finally:
        if kit["p"].poll() is None:
            kit["p"].kill()
            kit["p"].wait()
    text = log.read_text()
    assert signalled.is_set(), text
    assert code == 130, text
    assert "Traceback" not in text
    assert "interrupted while asking for repeats of the determinism probe" in " ".join(text.split())
    assert "every answer paid for is recorded" in " ".join(text.split())
    store = run_dir / "answers.sqlite"
    assert _spent(store) == mlaas.rows_answered, text  # the repeat in flight is counted
    with contextlib.closing(sqlite3.connect(store)) as db:
        state = db.execute("SELECT value FROM meta WHERE key = ?", (PROBE_STATE,)).fetchone()
    assert state is not None
    assert len(json.loads(state[0])["done"]) == 32

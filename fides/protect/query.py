"""Querying a service that may be a paid, rate-limited, flaky remote endpoint.

:class:`Querier` asks the service only for inputs whose answer is not in the
:class:`~fides.protect.store.AnswerStore` yet, in batches, with at most ``concurrency``
requests in flight and at most ``rate_limit`` requests per second (retries with backoff, 429
``Retry-After`` and the circuit breaker are the gateway's upstream runtime's; a request that
may have been processed is not retried, and counted as paid for). Each answered
batch is committed before the next is counted, so an interrupt (Ctrl-C, SIGTERM), a crash or
an exhausted budget loses nothing already paid for, and a rerun asks only for the rest.

Answers are checked as they arrive (one row per input, finite values); what they are
(probabilities, logits, top-k or labels) is decided over the whole set by
:func:`answer_kind`, and :func:`as_probabilities` turns them into the probability vectors the
verifier is distilled from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
from rich.progress import Progress, TaskID

from fides.protect.config import AnswerKind, QueryConfig
from fides.protect.service import NotAnswered, NotSent, PossiblyPaid, Service
from fides.protect.store import AnswerStore, input_key
from gateway.errors import GatewayError

__all__ = [
    "AnswerError",
    "AnswerShapeChanged",
    "BudgetExhausted",
    "Querier",
    "QueryFailed",
    "answer_kind",
    "as_probabilities",
]

log = logging.getLogger(__name__)

#: What a changed answer shape leaves the user to do (both ways of going on are named).
SHAPE_ADVICE = (
    "If the service changed for good, its recorded answers are another model's: give a new "
    "--answers file (the kit starts over); if the change has passed, rerun with "
    "--retry-unusable to ask again for the inputs answered in the new shape"
)
#: The determinism probe's repeats, as named in progress, log and budget messages.
PROBE_WHAT = "repeats of the determinism probe"

#: Label-only answers are distilled from this much probability on the answered class.
LABEL_CONFIDENCE = 0.9
#: Probability rows must sum to 1 within this (float32 soft-max outputs do).
SUM_TOLERANCE = 1e-3


class QueryFailed(RuntimeError):
    """The service did not answer (after the runtime's retries); what it had answered
    before is recorded. ``possibly_paid``: the request was sent and may have been processed
    and billed (a read timeout, a 202, ...): its inputs are counted as paid for."""

    def __init__(self, message: str, *, possibly_paid: bool = False) -> None:
        super().__init__(message)
        self.possibly_paid = possibly_paid


class AnswerError(ValueError):
    """The service's answers cannot be used as they are; the message names the problem."""


class AnswerShapeChanged(AnswerError):
    """The service answers rows of another shape (or dtype) than the answers recorded in the
    store: it changed since they were recorded (a new model version, another output).
    ``reason``: what is recorded for each input answered so."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


#: The answer store's key for a determinism probe begun and not finished (interrupted, out
#: of budget, stopped by an unusable batch): the repeats counted so far, so a rerun goes on.
PROBE_STATE = "determinism_partial"

#: (the batch's (key, row index) pairs, its answer or why it is unusable as a whole, the
#: inputs answered unusably one by one): commits one answered batch, with what it cost.
Settle = Callable[[list[tuple[bytes, int]], "np.ndarray | AnswerError", list[str]], None]


UNUSABLE_REASON = "non-finite values (NaN / Inf)"
#: The reason recorded for each input of a batch answered unusably as a whole is cut to this.
REASON_CHARS = 200


def _batch_reason(message: str, identity: str) -> str:
    """Why a batch's answer was unusable as a whole, as recorded for each of its inputs: the
    :class:`AnswerError`'s message without the service's name (a store is one service's),
    shortened in the middle (its start says what failed, its end what was wrong)."""
    text = "its batch was answered unusably: " + message.removeprefix(identity).lstrip(": ")
    if len(text) <= REASON_CHARS:
        return text
    half = (REASON_CHARS - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


class BudgetExhausted(RuntimeError):
    """The query budget does not cover the inputs still unanswered."""

    def __init__(self, spent: int, budget: int, missing: int, what: str = "inputs") -> None:
        super().__init__(
            f"query budget exhausted: {spent:,} inputs paid for of --max-queries {budget:,}, "
            f"{missing:,} more needed for the {what} (the run's later stages, of validation, "
            "test, views, the determinism probe and the evaluation, ask for more); every "
            f"answer so far is recorded: rerun with --max-queries of at least "
            f"{spent + missing:,} and nothing is asked twice"
        )
        self.spent, self.budget, self.missing = spent, budget, missing


def _probe_result(state: dict[str, Any], inputs: int) -> dict[str, float | int]:
    """The report's determinism block, from the probe's counts."""
    compared = int(state["values_compared"])
    return {
        "inputs": inputs,
        "max_abs_diff": float(state["max_abs_diff"]),
        "mean_abs_diff": float(state["sum_abs_diff"]) / compared if compared else 0.0,
        "top1_changed": int(state["top1_changed"]),
        "non_finite": int(state["non_finite"]),
    }


# Ctrl-C and SIGTERM reach the process, and the kernel may hand them to any thread that does
# not block them, such as a worker waiting for its answer. Python then runs the handler in the
# main thread only when that thread next runs Python code: a main thread blocked without a
# timeout in ``wait`` would take the interrupt only when the request in flight ends (its read
# timeout, a minute or more on a slow endpoint). It waits in steps of this many seconds.
_SIGNAL_POLL_S = 0.2


@contextlib.contextmanager
def _deferred_interrupts() -> Iterator[list[int]]:
    """While in the block, Ctrl-C and SIGTERM (where a Python handler would raise, e.g. the
    command's) are noted rather than raised; the list of those received is yielded. In the
    main thread only (the only one Python's signal handlers run in); elsewhere a no-op."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        log.warning(
            "%s: still recording the answers in flight (they are paid for); exiting after",
            signal.Signals(signum).name,
        )

    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):  # a handler that raises; the default action is left alone
            previous[signum] = signal.signal(signum, note)
    try:
        yield received
    finally:
        for number, before in previous.items():
            signal.signal(number, before)


class _RateLimiter:
    """At most ``rate`` calls per second, evenly spaced (None: no limit), across the threads
    that share it: each caller claims the next free slot under a lock, then sleeps until it."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 0.0 if rate is None else 1.0 / rate
        self.next_at = 0.0
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Wait for the next slot; False (at once) when ``stop`` is set meanwhile."""
        stop = stop or threading.Event()
        if self.interval == 0.0:
            return not stop.is_set()
        with self._lock:
            now = time.monotonic()
            at = max(now, self.next_at)
            self.next_at = at + self.interval
        if at > now:
            return not stop.wait(at - now)
        return not stop.is_set()


@dataclass
class _Progress:
    """Queries spent and an ETA, logged (and shown on the progress bar) as batches land."""

    total: int
    done: int = 0
    started: float = 0.0
    last_log: float = 0.0
    task: TaskID | None = None

    def eta_s(self) -> float:
        rate = self.done / max(1e-9, time.monotonic() - self.started)
        return (self.total - self.done) / rate if rate > 0 else float("inf")


class Querier:
    """Answers for images, from the store or, once, from the service."""

    def __init__(
        self,
        service: Service,
        store: AnswerStore,
        cfg: QueryConfig,
        *,
        max_queries: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.service = service
        self.store = store
        self.cfg = cfg
        self.budget = max_queries if max_queries is not None else cfg.max_queries
        self.progress = progress  # a rich bar (answered, ETA, paid for), None: log lines only
        self.asked = 0  # inputs sent by this process (the store counts every run)
        self.distinct: set[bytes] = set()  # every input answered for, whichever run paid
        self._limiter = _RateLimiter(cfg.rate_limit)
        # set first on Ctrl-C / SIGTERM (or a failure): no request nor retry is sent after it
        self._stop = service.stop
        self._batch = min(cfg.batch_size, service.max_batch or cfg.batch_size)
        self._check_declared_layout()

    # -- public -------------------------------------------------------------------------

    def answers(self, x: np.ndarray, what: str = "inputs") -> np.ndarray:
        """The service's answer rows for images ``x`` (float32 [n, C, H, W] in [0, 1])."""
        sent = self.service.encode(x)
        keys = [input_key(row) for row in sent]
        self.distinct.update(keys)
        have = self.store.get(keys)
        missing: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in have and k not in missing:
                missing[k] = i
        earlier = self.store.unusable(missing) if missing else {}
        if earlier:  # answered unusably before (NaN / Inf, or the batch): not paid for again
            raise self._unusable_before(earlier, missing, what)
        if missing:
            self._fetch(sent, list(missing.items()), what)
            have.update(self.store.get(missing))  # only what was just asked for
        lost = [i for i, k in enumerate(keys) if k not in have]
        if lost:  # only non-finite answers are not stored: _fetch raised for them
            raise AnswerError(f"{len(lost)} {what} have no usable answer")
        return np.stack([have[k] for k in keys])

    def repeat_probe(self, x: np.ndarray) -> dict[str, float | int]:
        """Ask again for ``x`` (recorded already) and compare: how deterministic is the
        service? Measured once per store (the result is kept in it).

        The repeats go through the main loop's machinery one batch at a time: each batch is
        committed with what it cost and what it showed, so an interrupt, an exhausted budget
        or an unusable batch stops the probe cleanly, and a rerun goes on with the inputs
        not yet asked again (none is paid for twice)."""
        known = self.store.meta_json("determinism")
        if known is not None or len(x) == 0:
            return dict(known or {})
        recorded = self.answers(x, "probe inputs")
        sent = self.service.encode(x)
        keys = [input_key(row) for row in sent]
        state = self._probe_state(keys)
        done = set(state["done"])
        todo = [(k, i) for i, k in enumerate(keys) if i not in done]
        # the inputs are answered (above): an unusable record of one is of an earlier probe's
        earlier = self.store.unusable(k for k, _ in todo)
        if earlier:  # its repeat was answered unusably as a whole: not paid for again
            first = {k: i for k, i in reversed(todo)}
            raise self._unusable_before(earlier, first, "probe inputs")
        if done and todo:
            log.info(
                "the determinism probe goes on: %d of its %d inputs were asked again by an "
                "earlier run",
                len(done),
                len(x),
            )

        def settle(
            chunk: list[tuple[bytes, int]], outcome: np.ndarray | AnswerError, bad: list[str]
        ) -> None:
            self._settle_probe(state, recorded, chunk, outcome)

        if todo:
            self._fetch(sent, todo, PROBE_WHAT, settle=settle, concurrency=1)
        result = _probe_result(state, len(x))
        self.store.update_meta({"determinism": json.dumps(result), PROBE_STATE: None})
        if result["top1_changed"]:
            log.warning(
                "the service changed its top-1 answer for %d of %d repeated inputs: it is not "
                "deterministic, so the verifier and the detector learn a noisy target (see the "
                "report's determinism block)",
                result["top1_changed"],
                len(x),
            )
        elif result["max_abs_diff"] > 1e-4:
            log.warning(
                "the service's answers to repeated inputs differ by up to %.3g (top-1 unchanged)",
                result["max_abs_diff"],
            )
        return result

    # -- internals ----------------------------------------------------------------------

    def _unusable_before(
        self, earlier: dict[bytes, str], first: dict[bytes, int], what: str
    ) -> AnswerError:
        """The error naming inputs (``first``: key -> its first row) an earlier run recorded as
        answered unusably (``earlier``: key -> why)."""
        key = min(earlier, key=first.__getitem__)
        return AnswerError(
            f"{len(earlier)} of the {what} were answered with unusable values by an earlier run "
            f"({earlier[key]}; first: input #{first[key]}), recorded in {self.store.path} and "
            "not asked for again: remove them from the inputs, or rerun with --retry-unusable "
            "to pay for them once more"
        )

    def _probe_state(self, keys: list[bytes]) -> dict[str, Any]:
        """The probe's repeats counted so far, by an earlier run, for these inputs (another
        probe's, of other inputs, is started afresh: its queries stay counted as paid)."""
        digest = hashlib.blake2b(b"".join(keys), digest_size=16).hexdigest()
        state = self.store.meta_json(PROBE_STATE)
        if isinstance(state, dict) and state.get("inputs_digest") == digest:
            return state
        if state is not None:
            log.info("an unfinished determinism probe of other inputs is started afresh")
        return {
            "inputs_digest": digest,
            "done": [],
            "max_abs_diff": 0.0,
            "sum_abs_diff": 0.0,
            "values_compared": 0,
            "top1_changed": 0,
            "non_finite": 0,
        }

    def _settle_probe(
        self,
        state: dict[str, Any],
        recorded: np.ndarray,
        chunk: list[tuple[bytes, int]],
        outcome: np.ndarray | AnswerError,
    ) -> None:
        """Commit one batch of repeats: what it cost and how it compares with the recorded
        answers, in one transaction (``state`` is updated only once it is committed, so a
        batch whose commit an interrupt rolled back is settled again, not counted twice)."""
        if isinstance(outcome, AnswerError):  # answered (paid for), unusable as a whole
            self._record_unusable([k for k, _ in chunk], outcome)
            return
        committed = self.store.meta_json(PROBE_STATE)  # the truth, after any interrupt
        if isinstance(committed, dict) and committed.get("inputs_digest") == state["inputs_digest"]:
            state.update(committed)
        rows = [i for _, i in chunk]
        again = outcome.reshape(len(rows), -1).astype(np.float64)
        before = recorded[rows].reshape(len(rows), -1).astype(np.float64)
        finite = np.isfinite(again).all(1)  # the recorded answers are finite (stored)
        diff = np.abs(again[finite] - before[finite])
        top1 = (
            (again.argmax(1) != before.argmax(1)) if again.shape[1] > 1 else (again != before)[:, 0]
        ) | ~finite
        after = {
            **state,
            "done": [*state["done"], *rows],
            "max_abs_diff": max(float(state["max_abs_diff"]), float(diff.max(initial=0.0))),
            "sum_abs_diff": float(state["sum_abs_diff"]) + float(diff.sum()),
            "values_compared": int(state["values_compared"]) + int(diff.size),
            "top1_changed": int(state["top1_changed"]) + int(top1.sum()),
            "non_finite": int(state["non_finite"]) + int((~finite).sum()),
        }
        self.store.add_spent(len(rows), meta={PROBE_STATE: json.dumps(after)})
        state.update(after)
        self.asked += len(rows)

    def _check_declared_layout(self) -> None:
        """Before any query: a service whose declared answer shape is not the recorded
        answers' changed since they were recorded (refused without paying for a batch)."""
        layout = self.store.layout()
        spec = next(
            (s for s in self.service.runtime.outputs if s.name == self.service.output), None
        )
        if layout is None or spec is None:
            return
        declared = tuple(spec.shape[1:]) if self.service.max_batch > 0 else tuple(spec.shape)
        shape = layout[1]
        if len(declared) == len(shape) and all(
            d in (-1, n) for d, n in zip(declared, shape, strict=True)
        ):
            return
        raise AnswerShapeChanged(
            f"{self.service.identity} declares {spec.datatype} {list(declared)} per input "
            f"(output {self.service.output!r}), but the {len(self.store):,} answers recorded "
            f"in {self.store.path} are {layout[0]} {list(shape)}: the service changed what it "
            "answers since they were recorded (a new model version?). Nothing was asked: give "
            "a new --answers file (the kit starts over), or point service.upstream at the "
            "version that gave the recorded answers (model_version)"
        )

    def _layout_change(self, answer: np.ndarray) -> AnswerShapeChanged | None:
        """Why ``answer`` (a batch's rows) cannot join the recorded answers: rows of another
        shape or dtype than theirs (None: it can; the first answers set the layout)."""
        layout = self.store.layout()
        if layout is None or (answer.dtype == layout[0] and answer.shape[1:] == layout[1]):
            return None
        now, then = f"{answer.dtype} {list(answer.shape[1:])}", f"{layout[0]} {list(layout[1])}"
        return AnswerShapeChanged(
            f"{self.service.identity} now answers {now} per input, but the answers recorded "
            f"in {self.store.path} are {then}: the service changed what it answers since they "
            "were recorded",
            reason=f"answered {now} per input where the recorded answers are {then} (the "
            "service changed)",
        )

    def _outcome(self, fut: Future[np.ndarray]) -> np.ndarray | AnswerError:
        """A request's answer, or why it is unusable as a whole (answered, so paid for);
        raises QueryFailed (no answer: nothing paid for) or, for a request an interrupt
        cancelled before it was sent, CancelledError."""
        try:
            answer = fut.result()
        except AnswerError as exc:
            return exc
        return self._layout_change(answer) or answer

    def _recorded(self, exc: AnswerError, n: int) -> AnswerError:
        """``exc`` (a batch of ``n`` answered unusably as a whole), saying it is recorded."""
        return AnswerError(
            f"{exc}; the batch's {n} inputs are recorded as unusable in {self.store.path}: a "
            "rerun names them instead of paying for them again (--retry-unusable asks again)"
        )

    def _ask_into(self, fut: Future[np.ndarray], batch: np.ndarray) -> None:
        """:meth:`_ask` in a worker thread, its outcome into ``fut``; nothing is sent when
        the run was stopped (an interrupt) before the request went out: the worker waits for
        its rate-limit slot before it takes ``fut`` up, so the interrupt can still cancel it,
        and sends nothing once ``_stop`` is set."""
        if not self._limiter.wait(self._stop):  # stopped while waiting: fut is cancelled
            if fut.set_running_or_notify_cancel():  # (not yet: it will not be sent)
                fut.set_exception(QueryFailed(f"{self.service.identity}: not sent (stopped)"))
            return
        if not fut.set_running_or_notify_cancel():
            return
        try:
            if self._stop.is_set():
                raise QueryFailed(f"{self.service.identity}: not sent (stopped)")
            fut.set_result(self._ask(batch))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            fut.set_exception(exc)

    def _ask(self, batch: np.ndarray) -> np.ndarray:
        """One request; the answer rows checked against the batch."""
        try:
            out = self.service.ask(batch)
        except NotAnswered as exc:  # a redirect, a 202 or no content: no answer
            raise QueryFailed(
                f"{self.service.identity}: {exc.message}", possibly_paid=exc.possibly_paid
            ) from None
        except PossiblyPaid as exc:  # sent, then no answer: the provider may bill it
            raise QueryFailed(
                f"{self.service.identity}: {exc.message}", possibly_paid=True
            ) from None
        except NotSent as exc:  # stopped before it was sent (or retried)
            raise QueryFailed(f"{self.service.identity}: {exc.message}") from None
        except GatewayError as exc:
            if "returned an invalid response" in exc.message:  # answered (paid), unusable
                raise AnswerError(f"{self.service.identity}: {exc.message}") from None
            hint = ""
            if " 401" in exc.message or " 403" in exc.message:
                hint = (
                    " (check the credentials: service.upstream.headers_from_env / "
                    "headers_from_file)"
                )
            raise QueryFailed(f"{self.service.identity}: {exc.message}{hint}") from None
        if out.ndim == 0 or out.shape[0] != len(batch):
            raise AnswerError(
                f"{self.service.identity} answered {list(out.shape)} for a batch of "
                f"{len(batch)}: one answer row per input is needed"
            )
        return out

    def _fetch(
        self,
        sent: np.ndarray,
        todo: list[tuple[bytes, int]],
        what: str,
        *,
        settle: Settle | None = None,
        concurrency: int | None = None,
    ) -> None:
        """Ask for ``todo`` (key, row index) in batches, committing each answered batch
        (``settle``; by default its answers go into the store). With a budget too small for
        all of them, what fits is asked and then :class:`BudgetExhausted` raised."""
        settle = settle or self._settle
        concurrency = concurrency or self.cfg.concurrency
        short = 0
        if self.budget is not None:
            room = max(0, self.budget - self.store.spent)
            if room < len(todo):
                short, todo = len(todo) - room, todo[:room]
        chunks = [todo[i : i + self._batch] for i in range(0, len(todo), self._batch)]
        prog = _Progress(total=len(todo), started=time.monotonic(), last_log=time.monotonic())
        if self.progress is not None and todo:
            prog.task = self.progress.add_task(f"asking for {what}", total=len(todo))
        if todo:
            log.log(
                logging.INFO if len(todo) >= 1000 else logging.DEBUG,
                "asking the service for %d %s (%d already recorded)",
                len(todo),
                what,
                len(self.store),
            )
        bad: list[str] = []
        possibly_paid = 0  # inputs sent without an answer that the provider may bill
        self._stop.clear()
        pool = ThreadPoolExecutor(concurrency, thread_name_prefix="fides-query")
        # each batch's own future, registered before its request can start: an interrupt
        # that lands anywhere (inside submit, between a batch's answer and its commit) finds
        # every batch that may have been sent here, in flight or answered
        pending: dict[Future[np.ndarray], list[tuple[bytes, int]]] = {}
        queue = iter(chunks)
        error: BaseException | None = None
        changed = 0  # inputs answered in another shape than the recorded answers'
        # the answered batch being committed, with the inputs paid for before: if they are
        # still as many after an interrupt, its commit was rolled back (or never began)
        in_hand: tuple[Future[np.ndarray], int] | None = None
        try:
            while True:
                while error is None and len(pending) < concurrency:
                    chunk = next(queue, None)
                    if chunk is None:
                        break
                    fut: Future[np.ndarray] = Future()
                    pending[fut] = chunk
                    pool.submit(self._ask_into, fut, sent[[i for _, i in chunk]])
                if not pending:
                    break
                done: set[Future[np.ndarray]] = set()
                while not done:  # timed: see _SIGNAL_POLL_S
                    done, _ = wait(
                        list(pending), timeout=_SIGNAL_POLL_S, return_when=FIRST_COMPLETED
                    )
                for fut in done:
                    chunk = pending[fut]
                    in_hand = (fut, self.store.spent)
                    try:
                        outcome: np.ndarray | AnswerError | None = self._outcome(fut)
                    except QueryFailed as exc:  # no answer: nothing recorded
                        error = error or exc
                        outcome = None
                        if exc.possibly_paid:  # ... but counted as paid for
                            self._settle_sent(chunk)
                            possibly_paid += len(chunk)
                    if isinstance(outcome, AnswerShapeChanged):  # named with the totals
                        changed += len(chunk)
                        error = error or outcome
                    elif isinstance(outcome, AnswerError):  # answered (paid for), unusable
                        error = error or self._recorded(outcome, len(chunk))
                    if outcome is not None:
                        settle(chunk, outcome, bad)
                    del pending[fut]
                    in_hand = None
                    if outcome is None or isinstance(outcome, AnswerError):
                        continue
                    prog.done += len(chunk)
                    self._report(prog, what)
        except BaseException as exc:  # Ctrl-C / SIGTERM (or a failure): keep what is in flight
            # a second Ctrl-C / SIGTERM does not abandon what is paid for: it is deferred
            # until every answer in flight is recorded (the exit takes no longer)
            with _deferred_interrupts() as deferred:
                self._stop.set()  # no request, nor retry, is sent from now on
                for fut in pending:
                    fut.cancel()  # not taken up yet: never sent (one being sent is not cancelled)
                pool.shutdown(wait=False, cancel_futures=True)
                with contextlib.suppress(Exception):
                    self.store.abandon()  # an interrupt inside a rollback: read the committed
                unsettled = dict(pending)
                with contextlib.suppress(Exception):  # (checked before any other is settled)
                    if in_hand is not None and self.store.spent != in_hand[1]:
                        unsettled.pop(in_hand[0], None)  # committed before the interrupt
                for fut, chunk in unsettled.items():
                    try:
                        outcome = self._outcome(fut)  # waits for the answer of one in flight
                    except QueryFailed as failed:  # no answer: paid for only if possibly so
                        if failed.possibly_paid:
                            with contextlib.suppress(Exception):
                                self._settle_sent(chunk)
                        continue
                    except Exception:  # noqa: BLE001 - not answered (or never sent): not paid
                        continue
                    with contextlib.suppress(Exception):
                        settle(chunk, outcome, bad)
                log.warning(
                    "%s while asking for %s: %d inputs paid for (%d by this run) are recorded "
                    "in %s; the same command goes on from there",
                    "interrupted"
                    if isinstance(exc, KeyboardInterrupt) or deferred
                    else f"stopped by {type(exc).__name__}",
                    what,
                    self.store.spent,
                    self.asked,
                    self.store.path,
                )
            if deferred and not isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt from exc  # the user's interrupt, not the failure
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(error, AnswerShapeChanged):
            raise AnswerShapeChanged(
                f"{error}. The {changed:,} inputs answered so are recorded as unusable (paid "
                f"for); {self.asked:,} inputs paid for by this run ({self.store.spent:,} in "
                f"all) are recorded in {self.store.path}, every earlier answer kept. "
                + SHAPE_ADVICE
            )
        if isinstance(error, QueryFailed) and possibly_paid:
            raise QueryFailed(
                f"{error}. {possibly_paid:,} inputs were sent without an answer that the "
                f"provider may have billed: they are counted as paid for ({self.store.spent:,} "
                f"in all, against --max-queries) and not recorded, so a rerun asks for them "
                "again",
                possibly_paid=True,
            )
        if error is not None:
            raise error
        if bad:
            raise AnswerError(
                f"{self.service.identity} answered non-finite values (NaN / Inf) for "
                f"{len(bad)} of {len(todo)} {what}; the finite answers are recorded "
                f"(first: {bad[0]})"
            )
        if short:
            raise BudgetExhausted(self.store.spent, self.budget or 0, short, what)

    def _settle_sent(self, chunk: list[tuple[bytes, int]]) -> None:
        """Commit a batch sent and not answered that the provider may have billed (a read
        timeout, a 202, ...): counted as paid for, nothing recorded."""
        self.store.add_spent(len(chunk))
        self.asked += len(chunk)
        log.warning(
            "%d inputs sent without an answer are counted as paid for in %s (the provider may "
            "have billed them)",
            len(chunk),
            self.store.path,
        )

    def _settle(
        self, chunk: list[tuple[bytes, int]], outcome: np.ndarray | AnswerError, bad: list[str]
    ) -> None:
        """Commit one answered batch: its answers, or its inputs as unusable when the answer
        was unusable as a whole."""
        if isinstance(outcome, AnswerError):
            self._record_unusable([k for k, _ in chunk], outcome)
        else:
            self._record(chunk, outcome, bad)

    def _record_unusable(self, keys: list[bytes], exc: AnswerError) -> None:
        """Commit a batch (of ``keys``, as sent) answered unusably as a whole: paid for, and
        each of its inputs unusable, with why, so a rerun does not pay for them again."""
        reason = (
            exc.reason
            if isinstance(exc, AnswerShapeChanged) and exc.reason
            else _batch_reason(str(exc), self.service.identity)
        )
        self.store.put_unusable(dict.fromkeys(keys, reason), paid=len(keys))
        self.asked += len(keys)
        log.warning(
            "%d inputs recorded as unusable in %s (%s)", len(set(keys)), self.store.path, reason
        )

    def _record(self, chunk: list[tuple[bytes, int]], answer: np.ndarray, bad: list[str]) -> None:
        """Commit one batch's finite answers (and the whole batch as paid for)."""
        finite = (
            np.isfinite(answer.reshape(len(answer), -1)).all(1)
            if answer.dtype.kind == "f"
            else np.ones(len(answer), bool)
        )
        for (_, i), ok in zip(chunk, finite, strict=True):
            if not ok:
                bad.append(f"input #{i}")
        keys = [k for (k, _), ok in zip(chunk, finite, strict=True) if ok]
        unusable = {k: UNUSABLE_REASON for (k, _), ok in zip(chunk, finite, strict=True) if not ok}
        self.store.put(keys, answer[finite], paid=len(chunk), unusable=unusable)
        self.asked += len(chunk)

    def _report(self, prog: _Progress, what: str) -> None:
        if self.progress is not None and prog.task is not None:
            self.progress.update(
                prog.task,
                completed=prog.done,
                description=f"asking for {what} ({self.store.spent:,} paid for)",
            )
        now = time.monotonic()
        if now - prog.last_log >= 10.0 or (prog.done == prog.total and prog.total >= 1000):
            prog.last_log = now
            log.info(
                "%s: %d/%d answered, %d paid for in all, ETA %.0f s",
                what,
                prog.done,
                prog.total,
                self.store.spent,
                prog.eta_s(),
            )


# ---------------------------------------------------------------- what the answers are


def _decimal_grid(a: np.ndarray) -> int | None:
    """The fewest decimals (1 to 3) every value of ``a`` is rounded to, or None: answers
    rounded for a JSON API sum to 1 only within ``classes x 0.5 x 10^-d``."""
    for d in (1, 2, 3):
        scaled = a * 10.0**d
        if np.abs(scaled - np.round(scaled)).max() < 1e-2:
            return d
    return None


def answer_kind(answers: np.ndarray, declared: str, identity: str) -> tuple[AnswerKind, int]:
    """What the service answers (and k for top-k: the most non-zero scores in a row).

    ``declared`` (service.answers) other than ``auto`` is checked, not trusted: probabilities
    declared for rows that are not probability vectors is an error. Rows that sum to 1 are
    probabilities even where some entries are 0 (float16 underflow, rounding): top-k only
    when declared, or when rows carry less than the whole mass.
    """
    if (
        answers.dtype.kind in "iu"
        or answers.ndim == 1
        or (answers.ndim == 2 and answers.shape[1] == 1)
    ):
        flat = answers.reshape(len(answers), -1).astype(np.float64)
        if answers.dtype.kind == "f" and (np.round(flat) != flat).any():
            raise AnswerError(
                f"{identity} answers one fractional score per input (e.g. "
                f"{float(flat[np.round(flat) != flat][0]):.4g}), not a class index: one "
                "class's probability (a sigmoid)? A classifier must answer a score for every "
                "class (a binary one: both classes' probabilities) or the class index"
            )
        if declared not in ("auto", "label"):
            raise AnswerError(f"{identity} answers class indices, not {declared}")
        return "label", 1
    if answers.ndim != 2 or answers.shape[1] < 2:
        raise AnswerError(
            f"{identity} answers {list(answers.shape[1:])} per input; a classifier answers "
            "a vector of class scores (or a class index)"
        )
    a = answers.astype(np.float64)
    sums = a.sum(1)
    probability_like = bool((a >= 0).all() and (a <= 1 + SUM_TOLERANCE).all())
    tolerance = SUM_TOLERANCE
    decimals = _decimal_grid(a) if probability_like else None
    if decimals is not None:  # at most 0.1: coarser rounding says nothing of the row's sum
        tolerance = min(max(tolerance, a.shape[1] * 0.5 * 10.0**-decimals), 0.1)
    if not probability_like or (np.abs(sums - 1) > tolerance).any():
        is_topk_mass = probability_like and (sums <= 1 + tolerance).all()
        nonzero = int((a > 0).sum(1).max())
        if is_topk_mass and nonzero < a.shape[1] and declared in ("auto", "top_k"):
            return "top_k", nonzero  # top-k scores whose rest of the mass is not given
        if declared == "logits":
            return "logits", a.shape[1]
        worst = int(np.abs(sums - 1).argmax())
        if probability_like:  # values in [0, 1]: not logits, but not probability vectors
            raise AnswerError(
                f"{identity} answers rows of values in [0, 1] that do not sum to 1 (e.g. row "
                f"{worst} sums to {sums[worst]:.4g}): not probability vectors, nor logits "
                "(independent per-class scores, such as sigmoids?); the verifier is distilled "
                "from a probability vector per input"
            )
        raise AnswerError(
            f"{identity} answers rows that are not probability vectors (e.g. row {worst} sums "
            f"to {sums[worst]:.4g}, min value {a.min():.4g}): these look like logits. Set "
            "service.answers: logits to have them soft-maxed (the fronting gateway's detector "
            "then sees what the service answers, not soft-maxed values: serve probabilities "
            "where you can)"
        )
    nonzero_per_row = (a > 0).sum(1)
    if (nonzero_per_row == 1).all():
        if declared not in ("auto", "label"):
            raise AnswerError(f"{identity} answers one-hot labels, not {declared}")
        return "label", 1
    k = int(nonzero_per_row.max())
    if declared == "top_k" and k < a.shape[1]:
        return "top_k", k
    if declared == "logits":
        raise AnswerError(f"{identity} answers probability vectors, not logits")
    return "probabilities", a.shape[1]


def as_probabilities(answers: np.ndarray, kind: AnswerKind, num_classes: int) -> np.ndarray:
    """Probability rows ([n, C] float32) to distil from: probabilities as they are; logits
    soft-maxed; top-k with the missing mass spread evenly over the other classes; labels
    as ``LABEL_CONFIDENCE`` on the class and the rest spread evenly."""
    if kind == "label":
        idx = answers.reshape(len(answers), -1)
        idx = idx.argmax(1) if idx.shape[1] > 1 else idx[:, 0].astype(np.int64)
        if (idx < 0).any() or (idx >= num_classes).any():
            raise AnswerError(f"class indices outside 0..{num_classes - 1}")
        p = np.full((len(idx), num_classes), (1 - LABEL_CONFIDENCE) / (num_classes - 1))
        p[np.arange(len(idx)), idx] = LABEL_CONFIDENCE
        return p.astype(np.float32)
    a: np.ndarray = answers.astype(np.float64)
    if kind == "logits":
        a = np.exp(a - a.max(1, keepdims=True))
    elif kind == "top_k":
        rest = np.clip(1.0 - a.sum(1, keepdims=True), 1e-3, None)  # [n, 1]
        zeros = (a <= 0).sum(1, keepdims=True).clip(1, None)
        a = np.where(a > 0, a, rest / zeros)
    out: np.ndarray = (a / a.sum(1, keepdims=True)).astype(np.float32)
    return out

"""Querying a service that may be a paid, rate-limited, flaky remote endpoint.

:class:`Querier` asks the service only for inputs whose answer is not in the
:class:`~fides.protect.store.AnswerStore` yet, in batches, with at most ``concurrency``
requests in flight and at most ``rate_limit`` requests per second (retries with backoff, 429
``Retry-After`` and the circuit breaker are the gateway's upstream runtime's). Each answered
batch is committed before the next is counted, so an interrupt (Ctrl-C, SIGTERM), a crash or
an exhausted budget loses nothing already paid for, and a rerun asks only for the rest.

Answers are checked as they arrive (one row per input, finite values); what they are
(probabilities, logits, top-k or labels) is decided over the whole set by
:func:`answer_kind`, and :func:`as_probabilities` turns them into the probability vectors the
verifier is distilled from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from rich.progress import Progress, TaskID

from fides.protect.config import AnswerKind, QueryConfig
from fides.protect.service import Service
from fides.protect.store import AnswerStore, input_key
from gateway.errors import GatewayError

__all__ = [
    "AnswerError",
    "BudgetExhausted",
    "Querier",
    "QueryFailed",
    "answer_kind",
    "as_probabilities",
]

log = logging.getLogger(__name__)

#: Label-only answers are distilled from this much probability on the answered class.
LABEL_CONFIDENCE = 0.9
#: Probability rows must sum to 1 within this (float32 soft-max outputs do).
SUM_TOLERANCE = 1e-3


class QueryFailed(RuntimeError):
    """The service did not answer (after the runtime's retries); what it had answered
    before is recorded."""


class AnswerError(ValueError):
    """The service's answers cannot be used as they are; the message names the problem."""


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


class _RateLimiter:
    """At most ``rate`` calls per second, evenly spaced (None: no limit), across the threads
    that share it: each caller claims the next free slot under a lock, then sleeps until it."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 0.0 if rate is None else 1.0 / rate
        self.next_at = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if self.interval == 0.0:
            return
        with self._lock:
            now = time.monotonic()
            at = max(now, self.next_at)
            self.next_at = at + self.interval
        if at > now:
            time.sleep(at - now)


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
        self._batch = min(cfg.batch_size, service.max_batch or cfg.batch_size)

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
        service? Measured once per store (the result is kept in it)."""
        known = self.store.meta_json("determinism")
        if known is not None or len(x) == 0:
            return dict(known or {})
        recorded = self.answers(x, "probe inputs")
        sent = self.service.encode(x)
        keys = [input_key(row) for row in sent]
        # the inputs are answered (above): an unusable record of one is of an earlier probe's
        earlier = self.store.unusable(keys)
        if earlier:  # its repeat was answered unusably as a whole: not paid for again
            first = {k: i for i, k in reversed(list(enumerate(keys)))}
            raise self._unusable_before(earlier, first, "probe inputs")
        self._check_budget(len(x))
        parts = []
        for i in range(0, len(x), self._batch):
            batch = sent[i : i + self._batch]
            try:
                parts.append(self._ask(batch))
            except AnswerError as exc:  # answered (paid for), unusable as a whole
                self._record_unusable(keys[i : i + self._batch], exc)
                raise self._recorded(exc, len(batch)) from None
            self.store.add_spent(len(batch))  # each batch counted once it is paid for
            self.asked += len(batch)
        again = np.concatenate(parts)
        flat_a = again.reshape(len(x), -1).astype(np.float64)
        flat_r = recorded.reshape(len(x), -1).astype(np.float64)
        finite = np.isfinite(flat_a).all(1)  # the recorded answers are finite (stored)
        diff = np.abs(flat_a[finite] - flat_r[finite])
        top1 = (
            (flat_a.argmax(1) != flat_r.argmax(1))
            if flat_a.shape[1] > 1
            else (flat_a != flat_r)[:, 0]
        ) | ~finite
        result = {
            "inputs": len(x),
            "max_abs_diff": float(diff.max()) if diff.size else 0.0,
            "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
            "top1_changed": int(top1.sum()),
            "non_finite": int((~finite).sum()),
        }
        self.store.set_meta("determinism", json.dumps(result))
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

    def _recorded(self, exc: AnswerError, n: int) -> AnswerError:
        """``exc`` (a batch of ``n`` answered unusably as a whole), saying it is recorded."""
        return AnswerError(
            f"{exc}; the batch's {n} inputs are recorded as unusable in {self.store.path}: a "
            "rerun names them instead of paying for them again (--retry-unusable asks again)"
        )

    def _check_budget(self, need: int) -> None:
        if self.budget is not None and self.store.spent + need > self.budget:
            raise BudgetExhausted(self.store.spent, self.budget, need, "determinism probe")

    def _ask(self, batch: np.ndarray) -> np.ndarray:
        """One request; the answer rows checked against the batch."""
        self._limiter.wait()
        try:
            out = self.service.ask(batch)
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

    def _fetch(self, sent: np.ndarray, todo: list[tuple[bytes, int]], what: str) -> None:
        """Ask for ``todo`` (key, row index) in batches, committing each answered batch.
        With a budget too small for all of them, what fits is asked and then
        :class:`BudgetExhausted` raised."""
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
        pool = ThreadPoolExecutor(self.cfg.concurrency, thread_name_prefix="fides-query")
        pending: dict[Future[np.ndarray], list[tuple[bytes, int]]] = {}
        queue = iter(chunks)
        error: BaseException | None = None
        # the answered batch being recorded (its answer, or why it is unusable as a whole)
        in_hand: tuple[list[tuple[bytes, int]], np.ndarray | AnswerError] | None = None
        try:
            while True:
                while error is None and len(pending) < self.cfg.concurrency:
                    chunk = next(queue, None)
                    if chunk is None:
                        break
                    rows = sent[[i for _, i in chunk]]
                    pending[pool.submit(self._ask, rows)] = chunk
                if not pending:
                    break
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    chunk = pending.pop(fut)
                    try:
                        outcome: np.ndarray | AnswerError = fut.result()
                    except QueryFailed as exc:  # no answer: nothing paid for or recorded
                        error = error or exc
                        continue
                    except AnswerError as exc:  # answered (paid for), unusable as a whole
                        outcome = exc
                        error = error or self._recorded(exc, len(chunk))
                    in_hand = (chunk, outcome)
                    self._settle(chunk, outcome, bad)
                    in_hand = None
                    if isinstance(outcome, AnswerError):
                        continue
                    prog.done += len(chunk)
                    self._report(prog, what)
        except BaseException:  # Ctrl-C / SIGTERM: keep what is in flight, then stop
            pool.shutdown(wait=False, cancel_futures=True)
            keys = [k for k, _ in in_hand[0]] if in_hand is not None else []
            if in_hand is not None and not (self.store.get(keys) or self.store.unusable(keys)):
                # interrupted while recording it (its transaction rolled back): paid for
                with contextlib.suppress(Exception):
                    self._settle(*in_hand, bad)
            for fut, chunk in pending.items():
                try:
                    outcome = fut.result()
                except AnswerError as exc:  # answered (paid for), unusable as a whole
                    outcome = exc
                except Exception:  # noqa: BLE001 - the interrupt is what is reported
                    continue
                with contextlib.suppress(Exception):
                    self._settle(chunk, outcome, bad)
            log.warning(
                "interrupted: %d inputs paid for are recorded in %s",
                self.store.spent,
                self.store.path,
            )
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
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
        reason = _batch_reason(str(exc), self.service.identity)
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

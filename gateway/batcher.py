"""Dynamic batching per model version (Triton's ``dynamic_batching``).

Requests wait in a bounded queue; a scheduler task forms a batch from the head of the queue
(requests whose non-batch dimensions match), dispatching when a preferred size or
``max_batch_size`` is reached, or when the oldest request has waited
``max_queue_delay_microseconds``, or at once while no batch of the model is running
(``dispatch_when_idle``: waiting cannot fill a batch when the model is idle; it would only
add the delay to every request at low load). Batches run on a thread pool with one worker per model
instance, so inference never runs on the event loop. While every instance is busy, the queue
keeps filling, and the next batch is larger: batching adapts to load by itself. A model
with ``execution: inline`` runs its batches on the event loop itself instead (microsecond
models, for which the thread hop costs more than the model); when it also dispatches when
idle, it needs no scheduler task either: what is submitted in one turn of the loop runs as one
batch from a callback in the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gateway.errors import GatewayError, QueueFull, RequestTimeout, Unavailable
from gateway.runtimes.base import Runtime, Tensors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int  # 0: the model has no batch dimension; requests run one by one
    max_queue_delay_s: float = 0.0005
    dispatch_when_idle: bool = False  # the model config's default is True (DynamicBatching)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 256
    instances: int = 1
    inline: bool = False  # run batches on the event loop itself (execution: inline)


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def queued(self, depth: int) -> None: ...

    def batch_started(self, size: int, waits_s: list[float]) -> None: ...

    def batch_finished(self, size: int, compute_s: float) -> None: ...

    def batch_stages(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """Of one execution: assembling the batch's inputs, running the model, splitting its
        outputs per request (the statistics extension's compute_input / infer / output)."""


@dataclass(eq=False)
class _Pending:
    inputs: Tensors
    batch: int  # samples in this request (dimension 0), 1 for unbatched models
    signature: tuple[tuple[str, tuple[int, ...], str], ...]
    deadline: float
    enqueued: float
    future: asyncio.Future[Tensors] = field(repr=False)


def _signature(inputs: Tensors, batched: bool) -> tuple[tuple[str, tuple[int, ...], str], ...]:
    # Requests can share a batch only if every input agrees beyond dimension 0.
    return tuple(
        (name, tuple(arr.shape[1:] if batched else arr.shape), arr.dtype.str)
        for name, arr in sorted(inputs.items())
    )


class DynamicBatcher:
    """Queue + scheduler + executor for one runtime."""

    def __init__(
        self,
        runtime: Runtime,
        policy: BatchPolicy,
        observer: BatchObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.policy = policy
        self.observer = observer or BatchObserver()
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(policy.instances)
        self._executor = ThreadPoolExecutor(
            max_workers=policy.instances, thread_name_prefix=f"infer-{runtime.name}"
        )
        self._running: set[asyncio.Task[None]] = set()
        self._in_flight: dict[asyncio.Task[None], list[_Pending]] = {}  # the running batches
        self._busy = 0  # batches dispatched and not yet finished
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False
        # inline and dispatching when idle: batches run from a call_soon, not the scheduler
        self._flushes = policy.inline and (policy.dispatch_when_idle or not self.batched)
        self._flush_soon = False

    @property
    def batched(self) -> bool:
        return self.policy.max_batch_size > 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._closing

    def start(self) -> None:
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    def check_queue(self) -> None:
        """QueueFull if a request submitted now would be refused for a full queue (requests
        whose caller left or whose deadline passed do not count: the scheduler drops them
        only from the head, and not at all while every instance is busy)."""
        if len(self._queue) >= self.policy.max_queue_size:
            self._drop_all_dead()
        if len(self._queue) >= self.policy.max_queue_size:
            raise QueueFull(
                f"model '{self.runtime.name}' queue is full "
                f"({self.policy.max_queue_size} requests waiting); retry later"
            )

    async def submit(self, inputs: Tensors, deadline: float) -> Tensors:
        """Queue one request and wait for its outputs (raises QueueFull / RequestTimeout)."""
        if self._closing:
            raise Unavailable(
                f"model '{self.runtime.name}' version {self.runtime.version} is being unloaded"
            )
        self.check_queue()
        batch = next(iter(inputs.values())).shape[0] if self.batched else 1
        now = self._clock()
        loop = asyncio.get_running_loop()
        item = _Pending(
            inputs, batch, _signature(inputs, self.batched), deadline, now, loop.create_future()
        )
        self._queue.append(item)
        self.observer.queued(len(self._queue))
        if self._flushes:
            # an inline model that dispatches when idle: whatever is queued by the end of this
            # event-loop turn runs as one batch at the start of the next (one turn, where the
            # scheduler task takes three); no timer: deadlines are checked when the batch is
            # taken, and a batch runs within a turn or two of its requests
            if not self._flush_soon:
                self._flush_soon = True
                loop.call_soon(self._flush)
            return await item.future
        self._wakeup.set()
        # A timer instead of asyncio.wait_for: wait_for wraps the wait in a task and a shield,
        # which cost more than the rest of submit on a busy event loop.
        timer = loop.call_later(max(0.0, deadline - now), self._expire, item)
        try:
            return await item.future  # cancelling the caller cancels the future: not computed
        finally:
            timer.cancel()

    def _expire(self, item: _Pending) -> None:
        if not item.future.done():  # still queued, or its batch is running: it is dropped
            item.future.set_exception(
                RequestTimeout(
                    f"model '{self.runtime.name}' did not answer within "
                    f"{item.deadline - item.enqueued:.3f}s"
                )
            )

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting, let queued and running batches finish, then stop the executor."""
        self._closing = True
        self._wakeup.set()
        deadline = self._clock() + drain_timeout_s
        while (self._queue or self._running) and self._clock() < deadline:
            await asyncio.sleep(0.005)
        if self._scheduler is not None:
            self._scheduler.cancel()
            # its end, not its CancelledError: a cancellation of close's own caller still
            # reaches the caller (suppressing CancelledError here swallowed it)
            await asyncio.wait([self._scheduler])
        for item in self._queue:
            if not item.future.done():
                item.future.set_exception(Unavailable("model unloaded before the request ran"))
        self._queue.clear()
        for batch in self._in_flight.values():  # still running after the drain timeout
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(
                        Unavailable("model unloaded while the request's batch was running")
                    )
        # waits for a running batch (the runtime is unloaded after this, never under it), in a
        # thread: the event loop keeps serving every other model meanwhile
        await asyncio.to_thread(self._executor.shutdown, True)

    # -- scheduling ---------------------------------------------------------------------------

    def _departed(self, item: _Pending, now: float) -> bool:
        """Whether a queued request is gone: its caller left, or its deadline passed (then it
        is answered with a timeout here)."""
        if item.future.done():
            return True
        if item.deadline <= now:
            item.future.set_exception(
                RequestTimeout(f"model '{self.runtime.name}': request timed out in queue")
            )
            return True
        return False

    def _drop_dead(self) -> None:
        """Drop cancelled and expired requests from the head of the queue (and report the new
        depth: a caller that went away must not stay counted as waiting)."""
        now = self._clock()
        before = len(self._queue)
        while self._queue and self._departed(self._queue[0], now):
            self._queue.popleft()
        if len(self._queue) != before:
            self.observer.queued(len(self._queue))

    def _drop_all_dead(self) -> None:
        """:meth:`_drop_dead` over the whole queue (when it looks full)."""
        now = self._clock()
        live = deque(item for item in self._queue if not self._departed(item, now))
        if len(live) != len(self._queue):
            self._queue = live
            self.observer.queued(len(self._queue))

    def _take_batch(self) -> list[_Pending]:
        """Pop the head and every compatible request after it that still fits (requests
        whose caller left or whose deadline passed are dropped on the way)."""
        head = self._queue.popleft()
        batch = [head]
        if not self.batched:
            return batch
        total = head.batch
        keep: deque[_Pending] = deque()
        now = self._clock()
        while self._queue and total < self.policy.max_batch_size:
            item = self._queue.popleft()
            if self._departed(item, now):  # the flush path sets no timer per request
                continue
            if (
                item.signature == head.signature
                and total + item.batch <= self.policy.max_batch_size
            ):
                batch.append(item)
                total += item.batch
            else:
                keep.append(item)
        keep.extend(self._queue)
        self._queue = keep
        return batch

    def _batch_is_ready(self) -> bool:
        """Whether the live requests that could share a batch with the head (in queue order,
        as :meth:`_take_batch` takes them) fill the batch limit, or reach a preferred size on
        the way. Triton's rule: a preferred size that the queue's head can form is sent at
        once; a request of several samples behind it that takes the total past that size does
        not hide it. Requests whose caller left or whose deadline passed do not count."""
        head, now = self._queue[0], self._clock()
        limit, preferred = self.policy.max_batch_size, self.policy.preferred_batch_sizes
        size = 0
        for item in self._queue:
            if item.signature != head.signature or self._departed(item, now):
                continue
            if size + item.batch > limit:  # the next request no longer fits: as full as it gets
                return size > 0
            size += item.batch
            if size == limit or size in preferred:
                return True
        return False

    def _should_dispatch(self) -> bool:
        if not self.batched or self._closing:
            return True
        if self.policy.dispatch_when_idle and self._busy == 0:
            return True
        if self._batch_is_ready():
            return True
        return self._clock() - self._queue[0].enqueued >= self.policy.max_queue_delay_s

    async def _schedule(self) -> None:
        while True:
            self._drop_dead()
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if not self._should_dispatch():
                wait = self.policy.max_queue_delay_s - (self._clock() - self._queue[0].enqueued)
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), max(wait, 0.0))
                continue
            await self._slots.acquire()
            # The queue may have grown while all instances were busy: take what is there now.
            self._drop_dead()
            if not self._queue:
                self._slots.release()
                continue
            batch = self._take_batch()
            self._busy += 1
            self.observer.queued(len(self._queue))
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            self._in_flight[task] = batch
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._in_flight.pop(task, None)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            now = self._clock()
            size = sum(i.batch for i in batch)
            self.observer.batch_started(size, [now - i.enqueued for i in batch])
            inputs, sizes = [i.inputs for i in batch], [i.batch for i in batch]
            deadlines = [i.deadline for i in batch]
            start = self._clock()
            try:
                if self.policy.inline:  # on the loop: no hop, no GIL hand-back
                    results, stages = self._execute(inputs, sizes, deadlines)
                else:
                    results, stages = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._execute, inputs, sizes, deadlines
                    )
            except Exception as exc:  # noqa: BLE001 - every request in the batch gets the error
                self._fail(batch, exc)
                return
            self._answer(batch, results, stages, size, start)
        finally:
            self._busy -= 1
            self._slots.release()
            self._wakeup.set()

    def _flush(self) -> None:
        """One batch of what is queued, run on the loop (inline models that dispatch when
        idle; see :meth:`submit`); a next batch runs in a callback of its own, so the loop
        serves other work in between."""
        self._flush_soon = False
        self._drop_dead()
        if not self._queue or self._busy:  # a batch of the scheduler's wakes it when done
            return
        batch = self._take_batch()
        try:
            self.observer.queued(len(self._queue))
            start = self._clock()
            size = sum(i.batch for i in batch)
            self.observer.batch_started(size, [start - i.enqueued for i in batch])
            results, stages = self._execute(
                [i.inputs for i in batch], [i.batch for i in batch], [i.deadline for i in batch]
            )
            self._answer(batch, results, stages, size, start)
        except Exception as exc:  # noqa: BLE001 - every request in the batch gets the error
            self._fail(batch, exc)
        finally:
            if self._queue and not self._flush_soon:
                self._flush_soon = True
                asyncio.get_running_loop().call_soon(self._flush)

    def _fail(self, batch: list[_Pending], exc: Exception) -> None:
        err = exc if isinstance(exc, GatewayError) else _internal(self.runtime, exc)
        for item in batch:
            if not item.future.done():
                item.future.set_exception(err)

    def _answer(
        self,
        batch: list[_Pending],
        results: list[Tensors | Exception],
        stages: tuple[float, float, float],
        size: int,
        start: float,
    ) -> None:
        for item, out in zip(batch, results, strict=True):
            if item.future.done():
                continue
            if isinstance(out, Exception):
                err = out if isinstance(out, GatewayError) else _internal(self.runtime, out)
                item.future.set_exception(err)
            else:
                item.future.set_result(out)
        self.observer.batch_finished(size, self._clock() - start)
        self.observer.batch_stages(size, *stages)

    def _predict(self, inputs: Tensors, deadline: float) -> Tensors:
        return self.runtime.predict(inputs, deadline=deadline)

    def _execute(
        self, inputs: list[Tensors], sizes: list[int], deadlines: list[float]
    ) -> tuple[list[Tensors | Exception], tuple[float, float, float]]:
        """Worker thread (or the loop, inline): concatenate the requests' inputs (``sizes``
        samples each), run, split; with the seconds of each of the three. The runtime is
        given the batch's latest deadline (until then a caller still waits for it; a remote
        call's retries stop there, instead of holding the worker long after every caller
        was answered 504), a request run on its own its own deadline. When the batch of
        several requests fails, each request runs on its own, so that only the one the model
        fails on gets the error (one request never fails another); its entry is then the
        exception. Unless the runtime says the failure is every request's (a remote that is
        down: ``Runtime.fails_every_request``): each entry is then that error. A request alone
        that fails raises."""
        clock = time.perf_counter
        t0 = clock()
        if len(inputs) == 1:
            outputs = self._predict(inputs[0], deadlines[0])
            return [outputs], (0.0, clock() - t0, 0.0)
        names = list(inputs[0])
        merged = {n: np.concatenate([i[n] for i in inputs], axis=0) for n in names}
        t1 = clock()
        try:
            outputs = self._predict(merged, max(deadlines))
            t2 = clock()
            splits = np.cumsum(sizes)[:-1]
            total = int(sum(sizes))
            for n, arr in outputs.items():
                if arr.ndim == 0 or arr.shape[0] != total:
                    raise GatewayError(
                        f"model '{self.runtime.name}' answered output '{n}' with shape "
                        f"{list(arr.shape)} for a batch of {total} rows: it must have one row "
                        "per input row"
                    )
            per_output = {n: np.split(arr, splits, axis=0) for n, arr in outputs.items()}
        except Exception as exc:  # noqa: BLE001 - retried request by request
            if self.runtime.fails_every_request(exc):  # e.g. the remote is down: not rerun
                return [exc] * len(inputs), (t1 - t0, clock() - t1, 0.0)
            log.warning(
                "a batch of %d requests failed in model %s (%s: %s): each runs on its own",
                len(inputs),
                self.runtime.name,
                type(exc).__name__,
                exc,
            )
            alone = [self._alone(i, d) for i, d in zip(inputs, deadlines, strict=True)]
            return alone, (t1 - t0, clock() - t1, 0.0)
        results: list[Tensors | Exception] = [
            {n: parts[k] for n, parts in per_output.items()} for k in range(len(inputs))
        ]
        return results, (t1 - t0, t2 - t1, clock() - t2)

    def _alone(self, inputs: Tensors, deadline: float) -> Tensors | Exception:
        try:
            return self._predict(inputs, deadline)
        except Exception as exc:  # noqa: BLE001 - this request's own error
            return exc


def _internal(runtime: Runtime, exc: Exception) -> GatewayError:
    log.exception(
        "inference failed in model %s version %s", runtime.name, runtime.version, exc_info=exc
    )
    err = GatewayError(f"inference failed in model '{runtime.name}': {type(exc).__name__}: {exc}")
    return err

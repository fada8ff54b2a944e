from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.batcher import BatchObserver, BatchPolicy, DynamicBatcher
from gateway.errors import GatewayError, QueueFull, RequestTimeout
from gateway.model_config import ModelConfig
from gateway.runtimes.base import Runtime, Tensors


class DoublingRuntime(Runtime):
    """A real runtime for the batcher: y = 2x, with a chosen compute time per batch."""

    platform = "test"

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        super().__init__("double", 1, Path("."), ModelConfig(platform="onnx", max_batch_size=8))
        self.delay_s = delay_s
        self.fail = fail
        self.batches: list[int] = []
        self.threads: set[int] = set()

    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,
    ) -> Tensors:
        self.threads.add(threading.get_ident())
        self.batches.append(inputs["x"].shape[0])
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise ValueError("boom")
        return {"y": inputs["x"] * 2}


def _policy(**kw: object) -> BatchPolicy:
    base: dict[str, object] = {
        "max_batch_size": 8,
        "max_queue_delay_s": 0.02,
        "max_queue_size": 64,
        "instances": 1,
    }
    base.update(kw)
    return BatchPolicy(**base)  # type: ignore[arg-type]


def _x(value: float, n: int = 1, width: int = 3) -> Tensors:
    return {"x": np.full((n, width), value, dtype=np.float32)}


async def _run_all(b: DynamicBatcher, items: list[Tensors], timeout: float = 5.0) -> list[Tensors]:
    deadline = time.monotonic() + timeout
    return await asyncio.gather(*(b.submit(i, deadline) for i in items))


async def test_results_go_back_to_their_requests_in_order() -> None:
    rt = DoublingRuntime()
    b = DynamicBatcher(rt, _policy())
    b.start()
    items = [_x(float(i), n=1 + i % 3) for i in range(20)]
    outs = await _run_all(b, items)
    for i, out in zip(items, outs, strict=True):
        np.testing.assert_array_equal(out["y"], i["x"] * 2)
    assert max(rt.batches) <= 8
    assert sum(rt.batches) == sum(i["x"].shape[0] for i in items)
    assert len(rt.batches) < 20  # some batching happened
    assert threading.get_ident() not in rt.threads  # never on the event loop thread
    await b.close()


async def test_waits_max_delay_for_a_batch_to_form() -> None:
    rt = DoublingRuntime()
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=0.05))
    b.start()
    t0 = time.monotonic()
    await _run_all(b, [_x(1.0)])
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.045  # a lone request waited for company
    # requests arriving within the delay share one batch
    await _run_all(b, [_x(1.0), _x(2.0), _x(3.0)])
    assert rt.batches[-1] == 3
    await b.close()


async def test_an_idle_model_takes_a_lone_request_at_once() -> None:
    rt = DoublingRuntime(delay_s=0.2)
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=5.0, dispatch_when_idle=True))
    b.start()
    t0 = time.monotonic()
    await _run_all(b, [_x(1.0)])
    assert time.monotonic() - t0 < 2.0  # not the 5 s delay: nothing else could have joined
    # while that first batch runs, the queue fills; the rest go as one batch when it ends
    deadline = time.monotonic() + 10.0
    first = asyncio.ensure_future(b.submit(_x(0.0), deadline))
    await asyncio.sleep(0.05)  # the first is running now
    rest = [asyncio.ensure_future(b.submit(_x(float(i)), deadline)) for i in range(1, 6)]
    outs = await asyncio.gather(first, *rest)
    assert time.monotonic() - t0 < 4.0  # no 5 s delay anywhere
    assert rt.batches == [1, 1, 5]
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], _x(float(i))["x"] * 2)
    await b.close()


async def test_an_inline_model_runs_on_the_event_loop_and_still_batches() -> None:
    rt = DoublingRuntime()
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=0.02, inline=True))
    b.start()
    items = [_x(float(i)) for i in range(6)]
    outs = await _run_all(b, items)
    for i, out in zip(items, outs, strict=True):
        np.testing.assert_array_equal(out["y"], i["x"] * 2)
    assert rt.threads == {threading.get_ident()}  # the loop's own thread, no worker
    assert len(rt.batches) < 6  # queued requests still shared batches
    rt.fail = True  # an error still goes to every request of its batch, the loop lives on
    with pytest.raises(GatewayError, match="ValueError: boom"):
        await _run_all(b, [_x(1.0)])
    rt.fail = False
    assert (await _run_all(b, [_x(3.0)]))[0]["y"][0, 0] == 6.0
    await b.close()


async def test_an_idle_inline_model_runs_each_turns_requests_as_one_batch() -> None:
    """Inline and dispatching when idle: what was submitted in one event-loop turn runs as
    one batch in the next (up to max_batch_size, compatible shapes only), with no wait."""
    rt = DoublingRuntime()
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=5.0, inline=True, dispatch_when_idle=True))
    b.start()
    t0 = time.monotonic()
    items = [_x(float(i)) for i in range(10)] + [_x(7.0, width=5)]
    outs = await _run_all(b, items)
    assert time.monotonic() - t0 < 2.0  # the 5 s queue delay never applies
    for i, out in zip(items, outs, strict=True):
        np.testing.assert_array_equal(out["y"], i["x"] * 2)
    assert rt.batches == [8, 2, 1]  # one turn: full batch, the rest, the other shape
    assert rt.threads == {threading.get_ident()}
    assert (await _run_all(b, [_x(3.0)]))[0]["y"][0, 0] == 6.0  # alone: a batch of one
    assert rt.batches[-1] == 1
    # a request cancelled before its turn is not computed; the others are
    deadline = time.monotonic() + 5
    gone = asyncio.ensure_future(b.submit(_x(1.0), deadline))
    kept = asyncio.ensure_future(b.submit(_x(2.0), deadline))
    await asyncio.sleep(0)  # both submitted
    gone.cancel()
    assert (await kept)["y"][0, 0] == 4.0
    assert rt.batches[-1] == 1
    # a failing batch fails its own requests only; the next turn's are served
    rt.fail = True
    failed = await asyncio.gather(
        *(b.submit(_x(1.0), deadline) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, GatewayError) and "ValueError: boom" in str(r) for r in failed)
    rt.fail = False
    assert (await _run_all(b, [_x(5.0)]))[0]["y"][0, 0] == 10.0
    await b.close()


async def test_the_flush_path_answers_in_one_turn_and_keeps_deadlines() -> None:
    """An idle inline model answers a lone request within three loop turns (submit, the
    flush, the caller's wake-up; the scheduler task takes five); a request whose deadline
    passes behind a slow batch times out instead of being computed late."""
    rt = DoublingRuntime()
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=5.0, inline=True, dispatch_when_idle=True))
    b.start()
    await asyncio.sleep(0)  # the scheduler task is parked
    task = asyncio.ensure_future(b.submit(_x(2.0), time.monotonic() + 5))
    for _ in range(3):
        await asyncio.sleep(0)
    assert task.done()
    assert task.result()["y"][0, 0] == 4.0
    rt.delay_s = 0.1
    slow = asyncio.ensure_future(b.submit(_x(1.0), time.monotonic() + 5))
    late = asyncio.ensure_future(b.submit(_x(1.0, width=5), time.monotonic() + 0.05))
    assert (await slow)["y"][0, 0] == 2.0
    with pytest.raises(RequestTimeout):
        await late
    assert rt.batches[-1] == 1  # the late request was never computed
    assert len(rt.batches) == 2
    await b.close()


class FailingObserver(BatchObserver):
    def __init__(self) -> None:
        self.fail = True

    def batch_started(self, size: int, waits_s: list[float]) -> None:
        if self.fail:
            raise RuntimeError("observer down")


async def test_a_failing_observer_fails_its_batch_and_nothing_hangs() -> None:
    """The flush path sets no timer per request: an error anywhere in a batch (here, the
    metrics observer) must answer the batch's requests, and the next requests are served."""
    rt = DoublingRuntime()
    observer = FailingObserver()
    b = DynamicBatcher(rt, _policy(inline=True, dispatch_when_idle=True), observer=observer)
    b.start()
    results = await asyncio.wait_for(
        asyncio.gather(
            *(b.submit(_x(1.0), time.monotonic() + 60) for _ in range(3)), return_exceptions=True
        ),
        timeout=5,
    )
    assert all(isinstance(r, GatewayError) and "observer down" in str(r) for r in results)
    observer.fail = False
    assert (await asyncio.wait_for(_run_all(b, [_x(4.0)]), timeout=5))[0]["y"][0, 0] == 8.0
    await b.close()


def test_inline_execution_needs_one_instance_and_a_local_model() -> None:
    with pytest.raises(ValueError, match="instance_group.count must be 1, not 2"):
        ModelConfig(
            platform="onnx", max_batch_size=8, execution="inline", instance_group={"count": 2}
        )
    with pytest.raises(ValueError, match="not 'upstream'"):
        ModelConfig(platform="upstream", execution="inline", upstream={"url": "http://127.0.0.1:1"})
    assert ModelConfig(platform="onnx", execution="inline").execution == "inline"


async def test_preferred_size_dispatches_without_waiting() -> None:
    rt = DoublingRuntime()
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=5.0, preferred_batch_sizes=(4,)))
    b.start()
    t0 = time.monotonic()
    await _run_all(b, [_x(float(i)) for i in range(4)])
    assert time.monotonic() - t0 < 2.0
    assert rt.batches == [4]
    await b.close()


async def test_a_preferred_size_formed_at_the_head_dispatches_past_a_larger_request() -> None:
    """Four single samples make the preferred 4; a request of two behind them takes the total
    to 6, which must not hide the preferred size until the queue delay runs out."""
    rt = DoublingRuntime()
    policy = _policy(max_queue_delay_s=5.0, preferred_batch_sizes=(4,), dispatch_when_idle=False)
    b = DynamicBatcher(rt, policy)
    b.start()
    t0 = time.monotonic()
    await _run_all(b, [*(_x(float(i)) for i in range(4)), _x(9.0, n=2)])
    assert time.monotonic() - t0 < 2.0
    assert rt.batches == [6]  # what is queued when the batch goes: up to the limit
    await b.close()


async def test_departed_requests_do_not_count_towards_a_preferred_size() -> None:
    rt = DoublingRuntime()
    policy = _policy(max_queue_delay_s=5.0, preferred_batch_sizes=(3,), dispatch_when_idle=False)
    b = DynamicBatcher(rt, policy)
    b.start()
    deadline = time.monotonic() + 10
    first = asyncio.ensure_future(b.submit(_x(1.0), deadline))
    gone = asyncio.ensure_future(b.submit(_x(2.0), deadline))
    await asyncio.sleep(0.02)
    gone.cancel()  # its caller left; it stays in the queue until a batch is taken
    third = asyncio.ensure_future(b.submit(_x(3.0), deadline))
    await asyncio.sleep(0.3)
    assert rt.batches == []  # two live samples: not the preferred 3
    fourth = asyncio.ensure_future(b.submit(_x(4.0), deadline))
    outs = await asyncio.wait_for(asyncio.gather(first, third, fourth), 2.0)
    assert [float(o["y"][0, 0]) for o in outs] == [2.0, 6.0, 8.0]
    assert rt.batches == [3]
    await b.close()


async def test_full_batch_dispatches_without_waiting() -> None:
    rt = DoublingRuntime()
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=5.0))
    b.start()
    t0 = time.monotonic()
    await _run_all(b, [_x(1.0, n=4), _x(2.0, n=4)])
    assert time.monotonic() - t0 < 2.0
    assert rt.batches == [8]
    await b.close()


async def test_incompatible_shapes_are_not_mixed() -> None:
    rt = DoublingRuntime()
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=0.01))
    b.start()
    outs = await _run_all(b, [_x(1.0, width=3), _x(2.0, width=5), _x(3.0, width=3)])
    assert [o["y"].shape for o in outs] == [(1, 3), (1, 5), (1, 3)]
    assert sorted(rt.batches) == [1, 2]
    await b.close()


async def test_sheds_when_queue_is_full() -> None:
    rt = DoublingRuntime(delay_s=0.2)
    b = DynamicBatcher(rt, _policy(max_batch_size=1, max_queue_size=2, max_queue_delay_s=0))
    b.start()
    deadline = time.monotonic() + 5
    first = asyncio.ensure_future(b.submit(_x(0.0), deadline))
    await asyncio.sleep(0.05)  # first is running; the queue is empty again
    queued = [asyncio.ensure_future(b.submit(_x(1.0), deadline)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as err:
        await b.submit(_x(9.0), deadline)
    assert err.value.status == 503
    assert err.value.headers["Retry-After"] == "1"
    await asyncio.gather(first, *queued)  # nothing admitted was lost
    await b.close()


async def test_request_times_out_in_queue() -> None:
    rt = DoublingRuntime(delay_s=0.3)
    b = DynamicBatcher(rt, _policy(max_batch_size=1, max_queue_delay_s=0))
    b.start()
    slow = asyncio.ensure_future(b.submit(_x(0.0), time.monotonic() + 5))
    await asyncio.sleep(0.02)
    with pytest.raises(RequestTimeout):
        await b.submit(_x(1.0), time.monotonic() + 0.05)
    await slow
    await asyncio.sleep(0.05)
    assert rt.batches == [1]  # the timed-out request was never computed
    await b.close()


async def test_a_cancelled_request_leaves_the_queue_and_its_depth() -> None:
    """A caller that goes away (a cancelled gRPC call) is dropped without being computed, and
    the queue depth the metrics see goes back to 0 when its batch would have run."""

    class Depths(BatchObserver):
        def __init__(self) -> None:
            self.depths: list[int] = []

        def queued(self, depth: int) -> None:
            self.depths.append(depth)

    rt, seen = DoublingRuntime(), Depths()
    b = DynamicBatcher(
        rt,
        _policy(max_queue_delay_s=0.1, dispatch_when_idle=False, preferred_batch_sizes=(8,)),
        seen,
    )
    b.start()
    waiting = asyncio.ensure_future(b.submit(_x(1.0), time.monotonic() + 5))
    await asyncio.sleep(0.02)
    assert seen.depths == [1]
    waiting.cancel()
    await asyncio.sleep(0.2)
    assert seen.depths[-1] == 0
    assert rt.batches == []  # never computed
    await b.close()


async def test_runtime_error_reaches_every_request_in_the_batch() -> None:
    rt = DoublingRuntime(fail=True)
    b = DynamicBatcher(rt, _policy())
    b.start()
    deadline = time.monotonic() + 5
    results = await asyncio.gather(
        *(b.submit(_x(1.0), deadline) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, GatewayError) and "boom" in str(r) for r in results)
    # and the batcher keeps serving
    rt.fail = False
    out = await b.submit(_x(2.0), time.monotonic() + 5)
    np.testing.assert_array_equal(out["y"], _x(4.0)["x"])
    await b.close()


async def test_close_drains_queued_requests() -> None:
    rt = DoublingRuntime(delay_s=0.05)
    b = DynamicBatcher(rt, _policy(max_batch_size=1, max_queue_delay_s=0))
    b.start()
    deadline = time.monotonic() + 5
    futures = [asyncio.ensure_future(b.submit(_x(float(i)), deadline)) for i in range(4)]
    await asyncio.sleep(0.01)
    await b.close()
    outs = await asyncio.gather(*futures)
    assert len(outs) == 4
    assert sorted(rt.batches) == [1, 1, 1, 1]


class MeetingRuntime(DoublingRuntime):
    """y = 2x, but each batch waits in ``predict`` until ``parties`` batches are there at
    once (at most 20 s, then it fails): run one at a time, none would ever finish."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.meeting = threading.Barrier(parties, timeout=20)

    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,
    ) -> Tensors:
        self.meeting.wait()
        return super().predict(inputs, output_names)


async def test_instances_run_concurrently() -> None:
    rt = MeetingRuntime(parties=4)  # no timing: the 4 batches must be computed side by side
    b = DynamicBatcher(rt, _policy(max_batch_size=1, max_queue_delay_s=0, instances=4))
    b.start()
    outs = await _run_all(b, [_x(float(i)) for i in range(4)], timeout=60)
    assert [o["y"][0, 0] for o in outs] == [0.0, 2.0, 4.0, 6.0]
    assert len(rt.threads) == 4
    await b.close()


class PickyRuntime(DoublingRuntime):
    """y = 2x, but a batch holding a negative row fails (a bad input the model chokes on)."""

    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,
    ) -> Tensors:
        if (inputs["x"] < 0).any():
            self.batches.append(inputs["x"].shape[0])
            raise ValueError("negative row")
        return super().predict(inputs, output_names)


@pytest.mark.parametrize("inline", [False, True], ids=["thread", "inline"])
async def test_one_bad_request_fails_alone_not_its_batch(inline: bool) -> None:
    """Three requests batched together, one of which the model fails on: the batch is run
    again request by request, and only the bad one gets the error."""
    rt = PickyRuntime()
    policy = _policy(max_queue_delay_s=0.05, dispatch_when_idle=False, inline=inline)
    b = DynamicBatcher(rt, policy)
    b.start()
    deadline = time.monotonic() + 5
    good, bad, other = await asyncio.gather(
        b.submit(_x(1.0), deadline),
        b.submit(_x(-1.0), deadline),
        b.submit(_x(3.0), deadline),
        return_exceptions=True,
    )
    assert rt.batches[0] == 3  # they were one batch
    np.testing.assert_array_equal(good["y"], _x(2.0)["x"])  # type: ignore[index]
    np.testing.assert_array_equal(other["y"], _x(6.0)["x"])  # type: ignore[index]
    assert isinstance(bad, GatewayError)
    assert "negative row" in str(bad)
    await b.close()


class SummingRuntime(DoublingRuntime):
    """An output with one row per batch, not per input row (a reduction over the batch)."""

    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,
    ) -> Tensors:
        self.batches.append(inputs["x"].shape[0])
        return {"y": inputs["x"].sum(axis=0, keepdims=True)}


async def test_an_output_without_a_row_per_input_row_is_not_split_into_empty_answers() -> None:
    """np.split would hand the first request the whole output and the others empty arrays
    with a 200; each request is run on its own instead and gets its own answer."""
    rt = SummingRuntime()
    b = DynamicBatcher(rt, _policy(max_queue_delay_s=0.05, dispatch_when_idle=False))
    b.start()
    outs = await _run_all(b, [_x(1.0), _x(2.0), _x(3.0)])
    assert rt.batches[0] == 3
    for value, out in zip((1.0, 2.0, 3.0), outs, strict=True):
        np.testing.assert_array_equal(out["y"], _x(value)["x"])
    await b.close()


async def test_closing_during_a_long_batch_keeps_the_loop_serving() -> None:
    """A batch still running when the drain time is up: its request is answered with a named
    error, and the event loop serves other work while the batch finishes (the executor's
    shutdown waited on the loop itself, freezing every model)."""
    rt = DoublingRuntime(delay_s=1.0)
    b = DynamicBatcher(rt, _policy(max_batch_size=1, max_queue_delay_s=0))
    b.start()
    running = asyncio.ensure_future(b.submit(_x(1.0), time.monotonic() + 30))
    await asyncio.sleep(0.1)  # its batch is running
    events: list[str] = []

    async def beat() -> None:
        await asyncio.sleep(0.2)
        events.append("beat")

    async def close() -> None:
        await b.close(drain_timeout_s=0.05)
        events.append("closed")

    await asyncio.gather(beat(), close())
    assert events == ["beat", "closed"]  # the loop ran other work while the batch finished
    with pytest.raises(GatewayError, match="unloaded while the request's batch was running"):
        await running


async def test_requests_that_left_do_not_fill_the_queue() -> None:
    """Timed-out and cancelled requests behind a long batch no longer count against the queue
    limit (the scheduler, waiting for an instance, does not drop them)."""
    rt = DoublingRuntime(delay_s=0.5)
    b = DynamicBatcher(rt, _policy(max_batch_size=1, max_queue_size=4, max_queue_delay_s=0))
    b.start()
    first = asyncio.ensure_future(b.submit(_x(0.0), time.monotonic() + 5))
    await asyncio.sleep(0.05)  # running; the queue is empty
    soon = time.monotonic() + 0.05
    expiring = [asyncio.ensure_future(b.submit(_x(1.0), soon)) for _ in range(2)]
    leaving = [asyncio.ensure_future(b.submit(_x(2.0), time.monotonic() + 5)) for _ in range(2)]
    await asyncio.sleep(0.1)
    for f in leaving:
        f.cancel()
    await asyncio.sleep(0)
    out = await b.submit(_x(3.0), time.monotonic() + 5)  # QueueFull before
    np.testing.assert_array_equal(out["y"], _x(6.0)["x"])
    for f in expiring:
        with pytest.raises(RequestTimeout):
            await f
    await first
    await b.close()


async def test_close_does_not_swallow_its_callers_cancellation() -> None:
    """A caller that cancels ``close`` while it waits for the scheduler to stop gets its
    CancelledError (asyncio's contract; a close that ate it ran on as if not cancelled)."""
    b = DynamicBatcher(DoublingRuntime(), _policy())
    b.start()
    await asyncio.sleep(0)  # the scheduler is waiting for requests
    closing = asyncio.get_running_loop().create_task(b.close())
    await asyncio.sleep(0)  # close has cancelled the scheduler and waits for it to end
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await b.close()  # a close that is let run still closes

"""The data plane without HTTP (as KServe's test/test_dataplane.py and MLServer's
tests/handlers/test_dataplane.py): lookup, input and output checks, deadlines, metrics, and
servables that wrap a model (integrity) seen only through their interface."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.dataplane import DataPlane
from gateway.errors import BadRequest, NotFound, Unavailable
from gateway.metrics import GatewayMetrics
from gateway.model_config import ModelConfig
from gateway.repository import ModelRepository
from gateway.runtimes import Tensors
from gateway.servables import InferContext, Inferred, Servable, TensorServable, VerifiedServable
from gateway.settings import Settings
from gateway.types import InferRequest, InputTensor, RequestedOutput
from tests.model_factory import TINY_B, TINY_W, make_repository, tiny_expected

X = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]], dtype=np.float32)


class Marking:
    """An integrity runner that adds a parameter (ready unless told otherwise)."""

    def __init__(self) -> None:
        self.why: str | None = None
        self.seen: list[InferContext] = []
        self.released = 0

    async def run(self, service: TensorServable, inputs: Tensors, ctx: InferContext) -> Inferred:
        self.seen.append(ctx)
        done = await service.infer(inputs, ctx)
        return Inferred(done.outputs, {"integrity_verdict": "verified"})

    def readiness_error(self) -> str | None:
        return self.why

    async def release(self) -> None:
        self.released += 1


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[tuple[DataPlane, Marking]]:
    runner = Marking()

    async def wrap(name: str, cfg: ModelConfig, versions: list[TensorServable]) -> list[Servable]:
        if name != "tiny":
            return list(versions)
        return [VerifiedServable(v, runner) for v in versions]

    settings = Settings(model_repository=make_repository(tmp_path / "repo"), dev_mode=True)
    repository = ModelRepository(settings.model_repository)
    repository.wrap = wrap
    await repository.load_all()
    yield DataPlane(repository, settings, GatewayMetrics()), runner
    await repository.close()


def request(x: np.ndarray = X, **kw: object) -> InferRequest:
    tensor = InputTensor("input", "FP32", x.shape, x)
    return InferRequest([tensor], **kw)  # type: ignore[arg-type]


async def test_infer_goes_through_the_servable_the_repository_built(
    plane: tuple[DataPlane, Marking],
) -> None:
    dp, runner = plane
    resp = await dp.infer("tiny", None, request(id="r-1", parameters={"x": 1}))
    assert (resp.model_name, resp.model_version, resp.id) == ("tiny", "2", "r-1")
    assert resp.parameters == {"integrity_verdict": "verified"}  # no branch in the data plane
    assert [o.name for o in resp.outputs] == ["logits", "probabilities"]
    want = X @ (TINY_W * 2) + TINY_B  # version 2 is the tiny classifier with W scaled by 2
    np.testing.assert_allclose(resp.outputs[0].data, want, rtol=1e-5)
    (ctx,) = runner.seen
    assert ctx.request_id == "r-1"
    assert ctx.parameters == {"x": 1}


async def test_outputs_are_filtered_and_checked(plane: tuple[DataPlane, Marking]) -> None:
    dp, _ = plane
    resp = await dp.infer("tiny", "1", request(outputs=[RequestedOutput("probabilities")]))
    assert [o.name for o in resp.outputs] == ["probabilities"]
    _, probs = tiny_expected(X)
    np.testing.assert_allclose(resp.outputs[0].data, probs, rtol=1e-5)
    with pytest.raises(BadRequest, match=r"has no output\(s\) \['nope'\]"):
        await dp.infer("tiny", None, request(outputs=[RequestedOutput("nope")]))


@pytest.mark.parametrize(
    ("req", "match"),
    [
        (InferRequest([InputTensor("x", "FP32", (1, 4), X[:1])]), r"has no input\(s\) \['x'\]"),
        (InferRequest([]), r"missing input\(s\) \['input'\]"),
        (
            InferRequest([InputTensor("input", "INT32", (1, 4), X[:1].astype(np.int32))]),
            "datatype INT32 does not match",
        ),
        (
            InferRequest([InputTensor("input", "FP32", (1, 3), X[:1, :3])]),
            r"shape \[1, 3\] does not match",
        ),
        (
            InferRequest([InputTensor("input", "FP32", (17, 4), np.zeros((17, 4), np.float32))]),
            "exceeds max_batch_size 16",
        ),
        (
            InferRequest(
                [InputTensor("input", "FP32", (1, 4), np.full((1, 4), np.nan, np.float32))]
            ),
            "contains NaN or Inf",
        ),
        (request(parameters={"timeout": -1}), "'timeout' must be a positive number"),
        # NaN passes `raw <= 0`; gRPC's double_param carries NaN and infinity
        (request(parameters={"timeout": float("nan")}), "'timeout' must be a positive number"),
        (request(parameters={"timeout": float("inf")}), "'timeout' must be a positive number"),
        # more names than the model has: refused by count, not with 20,000 names listed
        (
            request(outputs=[RequestedOutput(f"o{i}") for i in range(20_000)]),
            r"asks for 20000 outputs; model 'tiny' has 2: \['logits', 'probabilities'\]$",
        ),
        (
            InferRequest([InputTensor(f"i{i}", "FP32", (1, 4), X[:1]) for i in range(20_000)]),
            r"has 20000 inputs; model 'tiny' takes 1: \['input'\]$",
        ),
        # output parameters the gateway does not implement are named, not ignored
        (
            request(outputs=[RequestedOutput("logits", None, {"classification": 3})]),
            r"output 'logits': parameter\(s\) \['classification'\] not supported",
        ),
        (
            request(outputs=[RequestedOutput("logits", None, {"shared_memory_region": "r"})]),
            r"\['shared_memory_region'\] not supported",
        ),
    ],
)
async def test_bad_input_is_a_400_naming_the_problem(
    plane: tuple[DataPlane, Marking], req: InferRequest, match: str
) -> None:
    dp, runner = plane
    with pytest.raises(BadRequest, match=match):
        await dp.infer("tiny", None, req)
    assert runner.seen == []  # refused before the model (and its integrity) saw it


async def test_lookup_errors(plane: tuple[DataPlane, Marking]) -> None:
    dp, _ = plane
    with pytest.raises(NotFound):
        await dp.infer("nope", None, request())
    with pytest.raises(NotFound, match="no loaded version 9"):
        await dp.infer("tiny", "9", request())


async def test_readiness_asks_every_servable(plane: tuple[DataPlane, Marking]) -> None:
    dp, runner = plane
    assert dp.ready() == (True, [])
    runner.why = "its enclave is down: refused"
    ok, missing = dp.ready()
    assert not ok
    assert missing == ["tiny (its enclave is down: refused)"]
    assert dp.not_ready("tiny") == "its enclave is down: refused"
    assert dp.not_ready("identity_fp32") is None


async def test_failures_and_successes_are_counted(plane: tuple[DataPlane, Marking]) -> None:
    dp, _ = plane
    await dp.infer("tiny", None, request())
    with pytest.raises(BadRequest):
        await dp.infer("tiny", None, request(parameters={"timeout": "soon"}))
    sample = dp.metrics.registry.get_sample_value
    failures = {"model": "tiny", "version": "2", "reason": "bad_request"}
    assert sample("fides_inference_failures_total", failures) == 1


async def test_an_unloaded_model_is_not_ready_and_its_wrapper_released(
    plane: tuple[DataPlane, Marking],
) -> None:
    dp, runner = plane
    await dp.repository.unload("identity_fp32")
    with pytest.raises(Unavailable):
        dp.not_ready("identity_fp32")
    await dp.repository.unload("tiny")
    assert runner.released == 2  # both versions retired


async def test_binary_data_is_the_output_parameter_taken(plane: tuple[DataPlane, Marking]) -> None:
    dp, _ = plane
    outputs = [RequestedOutput("logits", True, {"binary_data": True})]
    resp = await dp.infer("tiny", None, request(outputs=outputs))
    assert [o.name for o in resp.outputs] == ["logits"]


async def test_the_callers_deadline_bounds_the_inferences(
    plane: tuple[DataPlane, Marking],
) -> None:
    dp, runner = plane
    soon = time.monotonic() + 5.0  # sooner than the default 30 s
    await dp.infer("tiny", None, request(), deadline=soon)
    later = time.monotonic() + 3600.0
    await dp.infer("tiny", None, request(), deadline=later)
    first, second = runner.seen
    assert first.deadline == soon
    assert second.deadline < later  # the gateway's own timeout, sooner


async def test_a_cancelled_inference_is_counted_as_failed(
    plane: tuple[DataPlane, Marking],
) -> None:
    """A request admitted and then cancelled (its caller gone, or its gRPC deadline passed)
    is a failure in the metrics and the statistics extension, not a request that vanished."""
    dp, runner = plane
    entered, release = asyncio.Event(), asyncio.Event()
    run = runner.run

    async def held(service: TensorServable, inputs: Tensors, ctx: InferContext) -> Inferred:
        entered.set()
        await release.wait()
        return await run(service, inputs, ctx)

    runner.run = held  # type: ignore[method-assign]
    sample = dp.metrics.registry.get_sample_value
    # a cancellation 40 ms before the caller's deadline is the caller's timer firing first
    # (a gRPC client's deadline runs ahead of the server's copy): a timeout, not a cancel
    counted = {"cancelled": 0, "timeout": 0}
    for offset_s, reason in ((None, "cancelled"), (-1.0, "timeout"), (0.04, "timeout")):
        entered.clear()
        deadline = None if offset_s is None else time.monotonic() + offset_s
        task = asyncio.ensure_future(dp.infer("tiny", None, request(), deadline=deadline))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        counted[reason] += 1
        labels = {"model": "tiny", "version": "2", "reason": reason}
        assert sample("fides_inference_failures_total", labels) == counted[reason]
    stats = dp.model_statistics("tiny", "2")["model_stats"][0]["inference_stats"]
    assert stats["fail"]["count"] == 3
    assert sample("fides_inference_inflight_requests", {"model": "tiny"}) == 0

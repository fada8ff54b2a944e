"""What the model repository serves: one interface for every loaded model version.

- :class:`TensorServable`: a runtime (onnx, torch, upstream) behind its dynamic batcher.
- :class:`VerifiedServable`: a model with an ``integrity:`` block: the same interface around the
  service's :class:`TensorServable`, whose :meth:`~Servable.infer` runs the integrity pipeline
  (the way MLServer's adaptive batching wraps a model's ``predict``), so that the data plane
  never branches on integrity.
- :class:`ModelSlot`: a stable handle on whatever versions of a model serve now; what the
  integrity pipeline holds for its detector, re-classifier and novelty check, so a request
  reaches them without looking them up and a hot reload of one of them is picked up.

- :class:`TextServable`: a causal LM (``platform: causal_lm``), served at ``/v1`` by
  :mod:`gateway.generation`.
"""

from __future__ import annotations

import asyncio
import functools
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.batcher import DynamicBatcher
from gateway.errors import Unavailable
from gateway.generation.service import TextModel
from gateway.model_config import ModelConfig
from gateway.runtimes import Runtime, Tensors, TensorSpec
from gateway.types import InputContract

if TYPE_CHECKING:
    from gateway.repository import ServedModel

__all__ = [
    "InferContext",
    "Inferred",
    "InferenceServable",
    "IntegrityRunner",
    "ModelSlot",
    "Servable",
    "TensorServable",
    "TextServable",
    "VerifiedServable",
]


@dataclass(frozen=True)
class InferContext:
    """What a request brings besides its tensors, whatever the protocol it came in by."""

    deadline: float  # time.monotonic() by which it must be answered
    request_id: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    client: str | None = None  # who asked (gateway.integrity.alarm.client_id), for the alarm


@dataclass
class Inferred:
    outputs: Tensors  # every output the model produced, by name
    parameters: dict[str, Any] = field(default_factory=dict)  # e.g. integrity_* parameters


class Servable(ABC):
    """One loaded version of a model, whatever its kind."""

    @property
    @abstractmethod
    def name(self) -> str: ...

    @property
    @abstractmethod
    def version(self) -> int: ...

    @property
    @abstractmethod
    def config(self) -> ModelConfig: ...

    @property
    def platform(self) -> str:
        return self.config.platform

    @abstractmethod
    def not_ready(self) -> str | None:
        """Why this version cannot answer (for readiness), or None when it can."""

    @abstractmethod
    async def close(self, drain_timeout_s: float) -> None:
        """Finish or cancel what is in flight, then free what it holds."""


class InferenceServable(Servable):
    """A tensor model, served over the Open Inference Protocol (``/v2``)."""

    @property
    @abstractmethod
    def tensors(self) -> TensorServable:
        """The runtime and batcher that compute this version's answers."""

    @property
    def name(self) -> str:
        return self.tensors.runtime.name

    @property
    def version(self) -> int:
        return self.tensors.runtime.version

    @property
    def config(self) -> ModelConfig:
        return self.tensors.runtime.config

    @property
    def platform(self) -> str:
        return self.tensors.runtime.platform

    @property
    def inputs(self) -> list[TensorSpec]:
        return self.tensors.runtime.inputs

    @property
    def outputs(self) -> list[TensorSpec]:
        return self.tensors.runtime.outputs

    @functools.cached_property
    def input_contract(self) -> InputContract:
        """What a parser checks each input against before decoding its data (built once)."""
        return InputContract(
            self.name,
            {s.name: (s.datatype, s.shape) for s in self.inputs},
            self.config.max_batch_size,
        )

    @property
    def closed(self) -> bool:
        return self.tensors.batcher.closed

    def check_queue(self) -> None:
        """QueueFull now if a request submitted now would be refused for a full queue."""
        self.tensors.batcher.check_queue()

    def not_ready(self) -> str | None:
        return "it is being unloaded" if self.closed else None

    async def close(self, drain_timeout_s: float) -> None:
        await self.tensors.batcher.close(drain_timeout_s)
        await asyncio.to_thread(self.tensors.runtime.unload)

    @abstractmethod
    async def infer(self, inputs: Tensors, ctx: InferContext) -> Inferred:
        """Answer one request whose inputs were already checked against :attr:`inputs`."""


@dataclass(eq=False)
class TensorServable(InferenceServable):
    """A runtime behind its dynamic batcher."""

    runtime: Runtime
    batcher: DynamicBatcher

    @property
    def tensors(self) -> TensorServable:
        return self

    async def predict(self, inputs: Tensors, deadline: float) -> Tensors:
        """The batched call itself (what wrappers and the integrity pipeline use)."""
        return await self.batcher.submit(inputs, deadline)

    async def infer(self, inputs: Tensors, ctx: InferContext) -> Inferred:
        return Inferred(await self.batcher.submit(inputs, ctx.deadline))


class IntegrityRunner(Protocol):
    """What :class:`VerifiedServable` needs from its model's integrity (gateway.integrity)."""

    async def run(self, service: TensorServable, inputs: Tensors, ctx: InferContext) -> Inferred:
        """Serve ``inputs`` with ``service`` and verify the answer (or meet the policy)."""
        ...

    def readiness_error(self) -> str | None: ...

    async def release(self) -> None:
        """A version that used it is retired (the last one stops it)."""
        ...


class VerifiedServable(InferenceServable):
    """A model version whose answers are verified: the service's own servable inside, the
    model's integrity runner around it (shared by its versions: one enclave per model)."""

    def __init__(self, service: TensorServable, integrity: IntegrityRunner) -> None:
        self.service = service
        self.integrity = integrity

    @property
    def tensors(self) -> TensorServable:
        return self.service

    def not_ready(self) -> str | None:
        return super().not_ready() or self.integrity.readiness_error()

    async def infer(self, inputs: Tensors, ctx: InferContext) -> Inferred:
        return await self.integrity.run(self.service, inputs, ctx)

    async def close(self, drain_timeout_s: float) -> None:
        await super().close(drain_timeout_s)  # in-flight verifications finish first
        await self.integrity.release()


class TextServable(Servable):
    """A causal LM, served at ``/v1`` (:mod:`gateway.generation`)."""

    def __init__(self, model: TextModel, config: ModelConfig) -> None:
        self.model = model
        self._config = config

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> int:
        return self.model.version

    @property
    def config(self) -> ModelConfig:
        return self._config

    def not_ready(self) -> str | None:
        return "it is being unloaded" if self.model.retiring.is_set() else None

    async def close(self, drain_timeout_s: float) -> None:
        """Drain as the batcher does, then stop the model's scheduler thread: admit nothing
        more (queued requests leave at once: to the version a reload put in its place, else
        503), let the running generations finish for up to ``drain_timeout_s``, then end the
        rest with a 503 naming the unload (a stream: an error event, then ``[DONE]``)."""
        model = self.model
        model.retiring.set()
        await _until_idle(model, drain_timeout_s)
        if model.active:
            for handle in list(model.active):
                handle.cancel(
                    Unavailable(
                        f"model '{self.name}' was unloaded while generating (version "
                        f"{self.version}, after the {drain_timeout_s:g} s drain); retry"
                    )
                )
            # they leave at the scheduler's next step boundary, each answered with its error;
            # any still there when the thread stops are answered the same (_Job.fail)
            await _until_idle(model, _STOP_WAIT_S)
        await asyncio.to_thread(model.scheduler.close)


_STOP_WAIT_S = 10.0  # for a step in progress to end after the drain: one step, normally


async def _until_idle(model: TextModel, timeout_s: float) -> None:
    """Until no sequence of ``model`` runs, or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while model.active and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


class ModelSlot:
    """A stable handle on a model name: the versions serving now (swapped by the repository on
    every load and unload), without a lookup per request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.served: ServedModel | None = None
        self.reason = "not loaded"  # why nothing serves, while nothing does

    def latest(self) -> TensorServable:
        """The latest version's runtime and batcher; 503 while the model does not serve."""
        served = self.served
        latest = None if served is None else served.latest
        if not isinstance(latest, InferenceServable):
            raise Unavailable(f"model '{self.name}' is not ready: {self.reason}")
        return latest.tensors

"""The runtime interface: one small class per framework (load / predict / unload)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from gateway.model_config import ModelConfig, TensorConfig


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as clients see it: full shape, batch dimension included (-1 = variable)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


Tensors = dict[str, np.ndarray]


class Runtime(ABC):
    """Wraps one framework for one model version.

    ``load`` runs once (it may be slow and may raise :class:`gateway.errors.ModelLoadError`);
    ``predict`` is called from worker threads, never on the event loop, with inputs that were
    already checked against :attr:`inputs` and batched along dimension 0 when
    ``config.max_batch_size > 0``; ``unload`` frees resources.
    """

    platform: ClassVar[str]

    def __init__(self, name: str, version: int, path: Path, config: ModelConfig) -> None:
        self.name = name
        self.version = version
        self.path = path  # the version directory
        self.config = config
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []

    @property
    def artefact(self) -> Path:
        return self.path / self.config.model_filename

    def load(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Load the artefact and fill :attr:`inputs` / :attr:`outputs`."""

    @abstractmethod
    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,
    ) -> Tensors:
        """Run inference; return every output (or those named). ``deadline``
        (``time.monotonic()``, given by the batcher: the latest of its requests'): after it
        no caller waits for the answer, so a runtime that can stop (a remote call's retries)
        stops by then; one that cannot ignores it."""
        raise NotImplementedError

    def unload(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Free what :meth:`load` took."""

    def fails_every_request(self, exc: Exception) -> bool:
        """Whether ``exc``, raised for a batch of several requests, is no one request's doing
        (a remote that is down, timed out or behind an open circuit): the batcher then fails
        each request of the batch with it, instead of running each on its own to find the
        one the model fails on (which would repeat the remote's whole retry sequence once
        per request while the callers wait). A model in this process: never."""
        return False

    def apply_config_specs(self) -> None:
        """Let config.yaml's inputs/outputs (if any) override the artefact's own metadata."""
        batched = self.config.max_batch_size > 0
        if self.config.inputs is not None:
            self.inputs = [_spec(t, batched) for t in self.config.inputs]
        if self.config.outputs is not None:
            self.outputs = [_spec(t, batched) for t in self.config.outputs]


def _spec(t: TensorConfig, batched: bool) -> TensorSpec:
    shape = ((-1,) if batched else ()) + tuple(t.shape)
    return TensorSpec(t.name, t.datatype, shape)

"""TorchRuntime never writes into the request's own input arrays.

``torch.from_numpy`` shares memory with the array it wraps, and a JSON request's arrays are
writable: a model that works in place (``relu_``, ``x.mul_(...)``, ``inplace=True``) changed
the request's inputs, which the integrity pipeline's verifier reads while the model runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gateway.model_config import ModelConfig
from gateway.runtimes.torch_runtime import TorchRuntime


class ReluInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [batch, 3]
        return torch.relu_(x) * 2


class ScaleInPlace(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(10)
        return x + 1


class Functional(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * 2


SPECS: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [3]}],
}


def _runtime(path: Path, **config: Any) -> TorchRuntime:
    cfg = {"platform": "torch", "max_batch_size": 4, "default_model_filename": path.name}
    rt = TorchRuntime("m", 1, path.parent, ModelConfig.model_validate({**cfg, **config}))
    rt.load()
    return rt


def _script(module: nn.Module, tmp_path: Path) -> TorchRuntime:
    path = tmp_path / "1" / "model.pt"
    path.parent.mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(path))
    return _runtime(path, **SPECS)


def _export(module: nn.Module, tmp_path: Path) -> TorchRuntime:
    path = tmp_path / "1" / "model.pt2"
    path.parent.mkdir(parents=True)
    batch = torch.export.Dim("batch", min=1, max=4)
    program = torch.export.export(module, (torch.ones(2, 3),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, path)
    return _runtime(path)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (ReluInPlace(), [[0.0, 4.0, 0.0]]),
        (ScaleInPlace(), [[-9.0, 21.0, -29.0]]),
        (Functional(), [[0.0, 4.0, 0.0]]),
    ],
)
@pytest.mark.parametrize("build", [_script, _export])
def test_the_request_inputs_are_left_as_they_were(
    tmp_path: Path, module: nn.Module, expected: list[list[float]], build: Any
) -> None:
    rt = build(module, tmp_path)
    x = np.array([[-1.0, 2.0, -3.0]], dtype=np.float32)
    sent = x.copy()
    (y,) = rt.predict({"x": x}).values()
    np.testing.assert_array_equal(y, np.asarray(expected, dtype=np.float32))
    np.testing.assert_array_equal(x, sent)  # the caller's array is unchanged


def test_a_functional_model_still_shares_memory(tmp_path: Path) -> None:
    """No copy where none is needed: the fast path keeps its zero-copy input."""
    rt = _export(Functional(), tmp_path)
    x = np.array([[-1.0, 2.0, -3.0]], dtype=np.float32)
    assert rt._to_tensor("x", x).data_ptr() == x.ctypes.data

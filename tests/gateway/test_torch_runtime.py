"""TorchRuntime: torch.export programs and TorchScript files, built here into tmp dirs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.export import Dim

from fides.defaults.nets import CNNConfig, DigitsCNN
from gateway.errors import BadRequest, ModelLoadError, Unavailable
from gateway.model_config import ModelConfig
from gateway.runtimes import runtime_class
from gateway.runtimes import torch_runtime as tr
from gateway.runtimes.base import TensorSpec
from gateway.runtimes.torch_runtime import TorchRuntime
from verifier.nets import NamedProbabilities

TINY = CNNConfig(channels=4, hidden=8)


class TwoInputs(nn.Module):
    """Two inputs, a tuple of three outputs of different dtypes."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # a, b: [batch, 3]
        total = a + 2 * b  # [batch, 3]
        return total, total.sum(dim=1), total.argmax(dim=1)  # [batch, 3], [batch], [batch]


class Scaled(nn.Module):
    """For TorchScript: a per-feature scale, so the output depends on a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale).relu()  # [batch, 3]


def export(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, **dims: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    program = torch.export.export(module.eval(), args, dynamic_shapes=dims or None)
    torch.export.save(program, path)
    return path


def make_runtime(version_dir: Path, **config: Any) -> TorchRuntime:
    cfg = ModelConfig.model_validate({"platform": "torch", **config})
    return TorchRuntime("m", 1, version_dir, cfg)


@pytest.fixture(scope="module")
def digits_net() -> nn.Module:
    torch.manual_seed(0)
    return NamedProbabilities(DigitsCNN(TINY)).eval()


@pytest.fixture(scope="module")
def digits_pt2(tmp_path_factory: pytest.TempPathFactory, digits_net: nn.Module) -> Path:
    version_dir = tmp_path_factory.mktemp("digits") / "1"
    batch = Dim("batch", min=1, max=1024)
    export(
        digits_net,
        (torch.rand(2, 1, 8, 8),),
        version_dir / "model.pt2",
        input={0: batch},
    )
    return version_dir


@pytest.fixture(scope="module")
def two_inputs_pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    version_dir = tmp_path_factory.mktemp("two") / "1"
    batch = Dim("batch", min=1, max=256)
    export(
        TwoInputs(),
        (torch.rand(4, 3), torch.rand(4, 3)),
        version_dir / "model.pt2",
        a={0: batch},
        b={0: batch},
    )
    return version_dir


@pytest.fixture
def loaded(digits_pt2: Path) -> TorchRuntime:
    rt = make_runtime(digits_pt2, max_batch_size=64)
    rt.load()
    return rt


def test_registered_for_platform_torch() -> None:
    assert runtime_class("torch") is TorchRuntime
    assert TorchRuntime.platform == "torch"


def test_exported_program_metadata(loaded: TorchRuntime) -> None:
    assert loaded.inputs == [TensorSpec("input", "FP32", (-1, 1, 8, 8))]
    # dict keys returned by forward() name the outputs
    assert loaded.outputs == [TensorSpec("probabilities", "FP32", (-1, 10))]


@pytest.mark.parametrize("batch", [1, 7])
def test_predict_matches_eager(loaded: TorchRuntime, digits_net: nn.Module, batch: int) -> None:
    x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
    out = loaded.predict({"input": x})
    with torch.inference_mode():
        want = digits_net(torch.from_numpy(x.copy()))["probabilities"].numpy()
    assert list(out) == ["probabilities"]
    got = out["probabilities"]
    assert got.shape == (batch, 10)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_read_only_input_is_accepted(loaded: TorchRuntime) -> None:
    # request decoders hand over np.frombuffer views, which are read-only
    x = np.frombuffer(np.ones(2 * 64, dtype=np.float32).tobytes(), dtype=np.float32)
    x = x.reshape(2, 1, 8, 8)
    assert not x.flags.writeable
    out = loaded.predict({"input": x})["probabilities"]
    np.testing.assert_allclose(out[0], out[1])


def test_output_selection_and_request_errors(loaded: TorchRuntime) -> None:
    x = np.zeros((1, 1, 8, 8), dtype=np.float32)
    assert list(loaded.predict({"input": x}, ["probabilities"])) == ["probabilities"]
    with pytest.raises(BadRequest, match="unknown output"):
        loaded.predict({"input": x}, ["logits"])
    with pytest.raises(BadRequest, match="missing input 'input'"):
        loaded.predict({"image": x})


def test_unload_then_predict_is_unavailable(loaded: TorchRuntime) -> None:
    loaded.unload()
    with pytest.raises(Unavailable, match="not loaded"):
        loaded.predict({"input": np.zeros((1, 1, 8, 8), dtype=np.float32)})


def test_tuple_outputs_and_two_inputs(two_inputs_pt2: Path) -> None:
    rt = make_runtime(two_inputs_pt2, max_batch_size=8)
    rt.load()
    assert rt.inputs == [TensorSpec("a", "FP32", (-1, 3)), TensorSpec("b", "FP32", (-1, 3))]
    assert rt.outputs == [
        TensorSpec("output0", "FP32", (-1, 3)),
        TensorSpec("output1", "FP32", (-1,)),
        TensorSpec("output2", "INT64", (-1,)),
    ]
    a = np.arange(15, dtype=np.float32).reshape(5, 3)
    b = np.ones((5, 3), dtype=np.float32)
    out = rt.predict({"b": b, "a": a})  # dict order does not matter; names do
    np.testing.assert_allclose(out["output0"], a + 2 * b)
    np.testing.assert_allclose(out["output1"], (a + 2 * b).sum(axis=1))
    np.testing.assert_array_equal(out["output2"], np.full(5, 2))
    assert out["output2"].dtype == np.int64


def test_config_specs_override_artefact_names(two_inputs_pt2: Path) -> None:
    rt = make_runtime(
        two_inputs_pt2,
        max_batch_size=8,
        inputs=[
            {"name": "first", "datatype": "FP32", "shape": [3]},
            {"name": "second", "datatype": "FP32", "shape": [3]},
        ],
        outputs=[
            {"name": "total", "datatype": "FP32", "shape": [3]},
            {"name": "sum", "datatype": "FP32", "shape": []},
            {"name": "best", "datatype": "INT64", "shape": []},
        ],
    )
    rt.load()
    assert [s.name for s in rt.inputs] == ["first", "second"]
    assert rt.outputs[0] == TensorSpec("total", "FP32", (-1, 3))
    a = np.zeros((2, 3), dtype=np.float32)
    b = np.ones((2, 3), dtype=np.float32)
    out = rt.predict({"first": a, "second": b})  # positional: first -> a, second -> b
    assert list(out) == ["total", "sum", "best"]
    np.testing.assert_allclose(out["total"], np.full((2, 3), 2.0))


def test_config_with_wrong_input_count_is_rejected(two_inputs_pt2: Path) -> None:
    rt = make_runtime(
        two_inputs_pt2, max_batch_size=8, inputs=[{"name": "x", "datatype": "FP32", "shape": [3]}]
    )
    with pytest.raises(ModelLoadError, match="declares 1 inputs but .*model.pt2 takes 2"):
        rt.load()


def test_unbatched_model_keeps_its_shapes(tmp_path: Path) -> None:
    export(TwoInputs(), (torch.rand(2, 3), torch.rand(2, 3)), tmp_path / "1" / "model.pt2")
    rt = make_runtime(tmp_path / "1", max_batch_size=0)
    rt.load()
    assert rt.inputs[0] == TensorSpec("a", "FP32", (2, 3))
    assert rt.outputs[1] == TensorSpec("output1", "FP32", (2,))


def test_fixed_batch_dim_with_batching_is_rejected(tmp_path: Path) -> None:
    export(TwoInputs(), (torch.rand(2, 3), torch.rand(2, 3)), tmp_path / "1" / "model.pt2")
    rt = make_runtime(tmp_path / "1", max_batch_size=8)
    with pytest.raises(ModelLoadError, match="fixed first dimension 2"):
        rt.load()


def test_batch_range_smaller_than_max_batch_size_is_rejected(digits_pt2: Path) -> None:
    rt = make_runtime(digits_pt2, max_batch_size=2048)  # exported for 1..1024
    with pytest.raises(ModelLoadError, match=r"batch sizes 1\.\.1024 .* max_batch_size 2048"):
        rt.load()


def test_bf16_model_takes_and_returns_float32_arrays(tmp_path: Path) -> None:
    net = Scaled().to(torch.bfloat16)
    batch = Dim("batch", min=1, max=64)
    x = torch.rand(2, 3, dtype=torch.bfloat16)
    export(net, (x,), tmp_path / "1" / "model.pt2", x={0: batch})
    rt = make_runtime(tmp_path / "1", max_batch_size=4)
    rt.load()
    assert rt.inputs == [TensorSpec("x", "BF16", (-1, 3))]
    assert rt.outputs == [TensorSpec("output0", "BF16", (-1, 3))]
    # OIP BF16 travels as float32 in numpy (fides_core.oip)
    out = rt.predict({"x": np.array([[1.0, 1.0, 1.0]], dtype=np.float32)})["output0"]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.5]])


def test_num_threads_is_applied(digits_pt2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(tr, "_threads_set_by", None)
    try:
        make_runtime(digits_pt2, max_batch_size=4, torch={"num_threads": 1}).load()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------ TorchScript

SCRIPT_SPECS: dict[str, Any] = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [3]}],
    "outputs": [{"name": "y", "datatype": "FP32", "shape": [3]}],
}


@pytest.mark.parametrize("filename", ["model.pt", "model.ts"])
def test_torchscript_file(tmp_path: Path, filename: str) -> None:
    net = Scaled().eval()
    (tmp_path / "1").mkdir()
    torch.jit.save(torch.jit.script(net), str(tmp_path / "1" / filename))
    rt = make_runtime(
        tmp_path / "1", max_batch_size=16, default_model_filename=filename, **SCRIPT_SPECS
    )
    rt.load()
    assert rt.inputs == [TensorSpec("x", "FP32", (-1, 3))]
    assert rt.outputs == [TensorSpec("y", "FP32", (-1, 3))]
    for batch in (1, 7):
        x = np.random.default_rng(batch).standard_normal((batch, 3), dtype=np.float32)
        out = rt.predict({"x": x})
        with torch.inference_mode():
            want = net(torch.from_numpy(x)).numpy()
        assert list(out) == ["y"]
        np.testing.assert_allclose(out["y"], want, rtol=0, atol=1e-6)


def test_torchscript_needs_declared_specs(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    torch.jit.save(torch.jit.script(Scaled()), str(tmp_path / "1" / "model.pt"))
    rt = make_runtime(tmp_path / "1", max_batch_size=16, default_model_filename="model.pt")
    with pytest.raises(ModelLoadError, match="declare 'inputs' and 'outputs' in config.yaml"):
        rt.load()


# ------------------------------------------------------------------ load failures


def test_missing_artefact_names_the_file(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path / "1", max_batch_size=4)
    with pytest.raises(ModelLoadError, match="missing artefact") as info:
        rt.load()
    assert str(tmp_path / "1" / "model.pt2") in info.value.message


@pytest.mark.parametrize(
    ("filename", "content", "match"),
    [
        ("model.pt2", b"not a zip file at all", "as a torch.export program"),
        ("model.pt2", b"PK\x03\x04truncated zip", "as a torch.export program"),
        ("model.pt", b"\x00\x01garbage", "as TorchScript"),
    ],
)
def test_corrupt_artefact_names_the_file(
    tmp_path: Path, filename: str, content: bytes, match: str
) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / filename).write_bytes(content)
    rt = make_runtime(
        tmp_path / "1", max_batch_size=4, default_model_filename=filename, **SCRIPT_SPECS
    )
    with pytest.raises(ModelLoadError, match=match) as info:
        rt.load()
    assert str(tmp_path / "1" / filename) in info.value.message


def test_torchscript_file_named_pt2_is_a_load_error(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    torch.jit.save(torch.jit.script(Scaled()), str(tmp_path / "1" / "model.pt2"))
    rt = make_runtime(tmp_path / "1", max_batch_size=4)
    with pytest.raises(ModelLoadError, match="model.pt2 as a torch.export program"):
        rt.load()


def test_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "model.onnx").write_bytes(b"onnx")
    rt = make_runtime(tmp_path / "1", default_model_filename="model.onnx")
    with pytest.raises(ModelLoadError, match="unsupported file type '.onnx'"):
        rt.load()


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda(digits_pt2: Path, monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rt = make_runtime(digits_pt2, max_batch_size=4, torch={"device": device})
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        rt.load()


@pytest.mark.parametrize("device", ["tpu", "mps", "cuda:x"])
def test_unsupported_device(digits_pt2: Path, device: str) -> None:
    rt = make_runtime(digits_pt2, max_batch_size=4, torch={"device": device})
    with pytest.raises(ModelLoadError, match="torch.device"):
        rt.load()

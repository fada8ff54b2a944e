"""Small ONNX models built with onnx.helper for tests (no training, known weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

# A 4 -> 3 linear layer + softmax with fixed weights, so expected outputs are computable.
TINY_W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0
TINY_B = np.array([0.1, -0.2, 0.3], dtype=np.float32)

ONNX_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def tiny_expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = x.astype(np.float32) @ TINY_W + TINY_B
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return logits, e / e.sum(axis=1, keepdims=True)


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def tiny_classifier(path: Path, scale: float = 1.0) -> None:
    """input FP32 [N, 4] -> logits FP32 [N, 3], probabilities FP32 [N, 3]."""
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "B"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(TINY_W * scale, "W"), numpy_helper.from_array(TINY_B, "B")],
    )
    _save(helper.make_model(graph), path)


def identity(path: Path, datatype: str) -> None:
    """input [-1] of ``datatype`` -> output [-1], the same values."""
    t = ONNX_TYPES[datatype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", t, ["N"])],
        [helper.make_tensor_value_info("output", t, ["N"])],
    )
    _save(helper.make_model(graph), path)


def write_config(model_dir: Path, config: dict[str, Any]) -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")


TINY_CONFIG: dict[str, Any] = {
    "platform": "onnx",
    "max_batch_size": 16,
    "dynamic_batching": {"max_queue_delay_microseconds": 2000, "max_queue_size": 64},
    "onnx": {"intra_op_threads": 1},
}


def make_repository(root: Path, datatypes: tuple[str, ...] = ("FP32", "INT32", "BYTES")) -> Path:
    """A repository with the tiny classifier (versions 1 and 2) and identity models."""
    tiny = root / "tiny"
    write_config(tiny, {**TINY_CONFIG, "version_policy": {"all": {}}})
    tiny_classifier(tiny / "1" / "model.onnx")
    tiny_classifier(tiny / "2" / "model.onnx", scale=2.0)
    for dt in datatypes:
        d = root / f"identity_{dt.lower()}"
        write_config(d, {"platform": "onnx", "max_batch_size": 0, "onnx": {"intra_op_threads": 1}})
        identity(d / "1" / "model.onnx", dt)
    return root


def nan_on_blank(path: Path, width: int = 8, classes: int = 10) -> None:
    """input FP32 [N, 1, width, width] -> probabilities FP32 [N, classes]: a softmax over a
    fixed linear layer, times sum(x) / sum(x), so a blank (all-zero) image is answered with
    NaN (0 / 0) and every other image with a probability vector."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(width * width, classes)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["soft"], axis=1),
        helper.make_node("ReduceSum", ["flat", "axes"], ["total"], keepdims=1),
        helper.make_node("Div", ["total", "total"], ["one_or_nan"]),
        helper.make_node("Mul", ["soft", "one_or_nan"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan_on_blank",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, width, width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
    )
    _save(helper.make_model(graph), path)

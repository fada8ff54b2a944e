"""ONNX Runtime: CPU execution provider, CUDA when onnxruntime-gpu is installed and asked for."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnxruntime as ort

from gateway.errors import BadRequest, ModelLoadError
from gateway.runtimes.base import Runtime, Tensors, TensorSpec

log = logging.getLogger(__name__)

# onnxruntime's type strings -> OIP datatypes
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _spec(arg: Any, batched: bool, path: str) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelLoadError(f"{path}: tensor '{arg.name}' has unsupported type {arg.type}")
    # symbolic dims ('batch', 'N') and None are variable
    shape = tuple(d if isinstance(d, int) and d > 0 else -1 for d in arg.shape)
    if batched and shape and shape[0] != -1:
        raise ModelLoadError(
            f"{path}: max_batch_size > 0 but tensor '{arg.name}' has a fixed first "
            f"dimension {shape[0]}; export it with a dynamic batch axis"
        )
    return TensorSpec(arg.name, datatype, shape)


class OnnxRuntime(Runtime):
    platform = "onnx"

    def load(self) -> None:
        path = self.artefact
        opts = ort.SessionOptions()
        o = self.config.onnx
        opts.intra_op_num_threads = o.intra_op_threads
        opts.inter_op_num_threads = o.inter_op_threads
        opts.graph_optimization_level = _OPT_LEVELS[o.graph_optimization]
        available = ort.get_available_providers()
        providers = [_PROVIDERS[p] for p in o.providers]
        missing = [p for p in providers if p not in available]
        if missing and len(missing) == len(providers):
            raise ModelLoadError(
                f"model '{self.name}': none of the execution providers {providers} is available "
                f"(have {available}); CUDA needs the onnxruntime-gpu package"
            )
        if missing:
            log.warning(
                "model %s: providers %s unavailable, using %s",
                self.name,
                missing,
                [p for p in providers if p in available],
            )
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=[p for p in providers if p in available]
            )
        except FileNotFoundError as exc:
            raise ModelLoadError(f"model '{self.name}': missing artefact {path}") from exc
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            if not path.is_file():
                raise ModelLoadError(f"model '{self.name}': missing artefact {path}") from exc
            raise ModelLoadError(
                f"model '{self.name}': cannot load {path}: {type(exc).__name__}: {exc}"
            ) from exc
        batched = self.config.max_batch_size > 0
        self.inputs = [_spec(a, batched, str(path)) for a in self._session.get_inputs()]
        self.outputs = [_spec(a, batched, str(path)) for a in self._session.get_outputs()]
        self.apply_config_specs()
        self.providers = self._session.get_providers()
        log.info("loaded %s v%s with %s", self.name, self.version, self.providers)

    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,  # an in-process model runs to the end
    ) -> Tensors:
        feed = {
            name: _strings(name, arr) if arr.dtype == object else arr
            for name, arr in inputs.items()
        }
        names = output_names or [o.name for o in self.outputs]
        results = self._session.run(names, feed)
        return dict(zip(names, (np.asarray(r) for r in results), strict=True))

    def unload(self) -> None:
        self.__dict__.pop("_session", None)


def _strings(name: str, arr: np.ndarray) -> np.ndarray:
    """BYTES elements -> str, as onnxruntime's string tensors need."""
    try:
        strings: np.ndarray = np.vectorize(
            lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object]
        )(arr)
        return strings
    except UnicodeDecodeError:
        raise BadRequest(f"input '{name}': BYTES elements must be UTF-8 for this model") from None

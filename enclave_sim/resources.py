"""Enclave resources: a memory budget for the verifier, paging and transition costs.

Budget: 96 MB by default, about what SGX leaves usable of a 128 MB EPC on older parts. The
verifier's footprint is estimated (not measured) as::

    parameters  = sum of initializer sizes
    activations = sum of every graph input, intermediate and output tensor at max_batch_size
                  (ONNX shape inference with the batch axis fixed); a tensor whose shape
                  inference cannot resolve counts as the largest resolved tensor (an upper
                  bound for the element-wise graphs verifiers are made of)

That is an upper bound for activations (onnxruntime reuses buffers) and a lower bound for the
process (the runtime's own code and arenas are not counted).

A model over the budget is refused unless paging simulation is on; then each call pays
``paging_penalty_us_per_mib`` for every MiB over the budget (SGX EPC paging costs about 40,000
cycles per 4 KiB page, ~3 ms per MiB touched at 3 GHz; the default of 1,000 us/MiB assumes a
third of the overflow is touched per call). ``transition_us`` adds a simulated ECALL/OCALL cost
per call (real: ~2-6 us; default 0). Both are busy waits: a real enclave transition or page
fault burns the core, it does not sleep.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import onnx
from onnx import helper, shape_inference

from fides_core.enclave_errors import ModelTooLarge

MIB = 1024 * 1024
DEFAULT_BUDGET_BYTES = 96 * 1000 * 1000
DEFAULT_PAGING_PENALTY_US_PER_MIB = 1000.0


@dataclass(frozen=True)
class Footprint:
    parameter_bytes: int
    activation_bytes: int
    unresolved_tensors: int  # counted at the upper bound

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.activation_bytes


@dataclass(frozen=True)
class ResourceSettings:
    memory_budget_bytes: int = DEFAULT_BUDGET_BYTES
    paging: bool = False
    paging_penalty_us_per_mib: float = DEFAULT_PAGING_PENALTY_US_PER_MIB
    transition_us: float = 0.0

    def __post_init__(self) -> None:
        if self.memory_budget_bytes <= 0:
            raise ValueError("memory budget must be positive")
        if self.paging_penalty_us_per_mib < 0 or self.transition_us < 0:
            raise ValueError("simulated costs must be >= 0")


def _itemsize(elem_type: int) -> int:
    try:
        return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except Exception:  # strings and exotic types: count 8 bytes a value
        return 8


def _tensor_bytes(value_info: Any) -> int | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        dims.append(d.dim_value)
    return int(math.prod(dims)) * _itemsize(t.elem_type)


def estimate_footprint(model_bytes: bytes, batch_size: int) -> Footprint:
    model = onnx.load_model_from_string(model_bytes)
    parameter_bytes = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelTooLarge("verifier models with external data are not supported")
        parameter_bytes += math.prod(init.dims) * _itemsize(init.data_type)
    initializer_names = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in initializer_names:
            continue
        for d in inp.type.tensor_type.shape.dim:  # fix the batch axis and any symbolic dim
            if not d.HasField("dim_value") or d.dim_value <= 0:
                d.Clear()
                d.dim_value = batch_size
    inferred = shape_inference.infer_shapes(model)
    sizes: list[int | None] = []
    seen: set[str] = set()
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.name in seen or vi.name in initializer_names:
            continue
        seen.add(vi.name)
        sizes.append(_tensor_bytes(vi))
    resolved = [s for s in sizes if s is not None]
    upper = max(resolved, default=0)
    unresolved = len(sizes) - len(resolved)
    return Footprint(parameter_bytes, sum(resolved) + unresolved * upper, unresolved)


def paging_penalty_us(footprint: Footprint, settings: ResourceSettings) -> float:
    """The per-call penalty, 0 within budget; ModelTooLarge over budget without paging."""
    over = footprint.total_bytes - settings.memory_budget_bytes
    if over <= 0:
        return 0.0
    if not settings.paging:
        raise ModelTooLarge(
            f"the verifier needs about {footprint.total_bytes / 1e6:.1f} MB "
            f"({footprint.parameter_bytes / 1e6:.1f} MB parameters + "
            f"{footprint.activation_bytes / 1e6:.1f} MB activations), over the enclave budget "
            f"of {settings.memory_budget_bytes / 1e6:.1f} MB; shrink it, lower max_batch_size, "
            "or turn on paging simulation (--paging)"
        )
    return math.ceil(over / MIB) * settings.paging_penalty_us_per_mib


def busy_wait_us(us: float) -> None:
    """Burn ``us`` microseconds of CPU (a simulated transition or page fault)."""
    if us <= 0:
        return
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass

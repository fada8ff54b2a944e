"""The torch runtime: torch.export programs (``.pt2``) and TorchScript files (``.pt``/``.ts``).

The file suffix picks the loader:

* ``.pt2`` - an ``ExportedProgram`` saved with ``torch.export.save``. Its graph carries names,
  dtypes and (symbolic) shapes, so inputs and outputs are read from it: input names are the
  graph's placeholder names (the ``forward`` argument names), outputs are named after the keys
  when ``forward`` returns a dict and ``output0``, ``output1``, ... otherwise.
* ``.pt`` / ``.ts`` / ``.torchscript`` - a TorchScript module (``torch.jit.save``). TorchScript
  keeps no shapes or dtypes, so ``config.yaml`` must declare ``inputs`` and ``outputs``.

A model that changes a tensor in place (``relu_``, ``x.mul_(...)``, ``inplace=True``) is
given copies of its inputs: ``torch.from_numpy`` shares memory, and the arrays are the
request's own, which the integrity pipeline's verifier reads while the model runs.

Inputs are passed to ``forward`` positionally, in the artefact's argument order when the
declared names are the argument names, else in the order ``config.yaml`` lists them. Outputs
(a tensor, a tuple/list of tensors, or a dict of tensors) are matched to the declared outputs
by name when the names agree (dict keys), else by position.

``torch.num_threads`` calls :func:`torch.set_num_threads`, which is process-wide: the last
torch model loaded with ``num_threads > 0`` decides the intra-op thread count of every torch
model in the gateway process (a warning is logged when two models disagree).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from gateway.errors import BadRequest, ModelLoadError, Unavailable
from gateway.model_config import ModelConfig
from gateway.runtimes.base import Runtime, Tensors, TensorSpec

log = logging.getLogger(__name__)

EXPORT_SUFFIXES = frozenset({".pt2"})
SCRIPT_SUFFIXES = frozenset({".pt", ".ts", ".torchscript"})

_TORCH_TO_OIP: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "UINT8",
    torch.uint16: "UINT16",
    torch.uint32: "UINT32",
    torch.uint64: "UINT64",
    torch.int8: "INT8",
    torch.int16: "INT16",
    torch.int32: "INT32",
    torch.int64: "INT64",
    torch.float16: "FP16",
    torch.bfloat16: "BF16",
    torch.float32: "FP32",
    torch.float64: "FP64",
}
_OIP_TO_TORCH: dict[str, torch.dtype] = {v: k for k, v in _TORCH_TO_OIP.items()}

# torch.set_num_threads is process-global; remember who set it to warn about conflicts.
_threads_lock = threading.Lock()
_threads_set_by: tuple[str, int] | None = None


def _set_num_threads(model: str, n: int) -> None:
    global _threads_set_by
    with _threads_lock:
        if _threads_set_by is not None and _threads_set_by[1] != n:
            log.warning(
                "model %s sets torch.num_threads=%d, replacing %d set by model %s: "
                "torch.set_num_threads is process-wide and applies to every torch model",
                model,
                n,
                _threads_set_by[1],
                _threads_set_by[0],
            )
        torch.set_num_threads(n)
        _threads_set_by = (model, n)


class TorchRuntime(Runtime):
    platform = "torch"

    def __init__(self, name: str, version: int, path: Path, config: ModelConfig) -> None:
        super().__init__(name, version, path, config)
        self._module: Callable[..., Any] | None = None
        self._device = torch.device("cpu")
        self._arg_order: list[str] = []  # declared input names in forward()'s positional order
        self._input_dtypes: dict[str, torch.dtype] = {}
        self._copy_inputs = False  # the model writes in place: it must not get shared memory

    # ------------------------------------------------------------------ load

    def load(self) -> None:
        path = self.artefact
        where = f"model '{self.name}' version {self.version}"
        suffix = path.suffix.lower()
        if suffix not in EXPORT_SUFFIXES | SCRIPT_SUFFIXES:
            raise ModelLoadError(
                f"{where}: {path}: unsupported file type {suffix or '(no suffix)'!r}; expected "
                ".pt2 (torch.export.save) or .pt/.ts (TorchScript, torch.jit.save)"
            )
        if not path.is_file():
            raise ModelLoadError(f"{where}: missing artefact {path}")
        device = self._resolve_device(where)
        if self.config.torch.num_threads > 0:
            _set_num_threads(self.name, self.config.torch.num_threads)

        if suffix in EXPORT_SUFFIXES:
            module, arg_names = self._load_exported(path, device, where)
        else:
            module, arg_names = self._load_script(path, device, where)
        self.apply_config_specs()
        exact = suffix in EXPORT_SUFFIXES
        self._arg_order = self._positional_order(arg_names, exact, path, where)
        for spec in self.inputs:
            dtype = _OIP_TO_TORCH.get(spec.datatype)
            if dtype is None:
                raise ModelLoadError(
                    f"{where}: input '{spec.name}' has datatype {spec.datatype}, "
                    "which the torch runtime cannot feed"
                )
            self._input_dtypes[spec.name] = dtype
        self._copy_inputs = _writes_in_place(module)
        self._module = module
        self._device = device
        log.info("loaded %s v%s (%s) on %s", self.name, self.version, path.name, device)

    def _resolve_device(self, where: str) -> torch.device:
        requested = self.config.torch.device.strip()
        try:
            device = torch.device(requested)
        except (RuntimeError, ValueError) as exc:
            raise ModelLoadError(
                f"{where}: invalid torch.device {requested!r} ({exc}); "
                "use 'cpu', 'cuda' or 'cuda:N'"
            ) from exc
        if device.type == "cpu":
            return torch.device("cpu")
        if device.type != "cuda":
            raise ModelLoadError(
                f"{where}: unsupported torch.device {requested!r}; use 'cpu', 'cuda' or 'cuda:N'"
            )
        if not torch.cuda.is_available():
            built = "without" if torch.version.cuda is None else "with"
            raise ModelLoadError(
                f"{where}: config.yaml asks for torch.device {requested!r} but CUDA is not "
                f"available (torch {torch.__version__} was built {built} CUDA support); "
                "set torch.device to 'cpu' or run on a machine with a CUDA GPU"
            )
        index = device.index if device.index is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise ModelLoadError(
                f"{where}: torch.device {requested!r} but only {count} CUDA device(s) visible"
            )
        return torch.device("cuda", index)

    def _load_exported(
        self, path: Path, device: torch.device, where: str
    ) -> tuple[Callable[..., Any], list[str]]:
        try:
            program = torch.export.load(path)
        except Exception as exc:  # zipfile/pickle/serde errors of every kind
            raise ModelLoadError(
                f"{where}: cannot load {path} as a torch.export program "
                f"(torch.export.save format): {type(exc).__name__}: {exc}"
            ) from exc
        if device.type != "cpu":
            program = _move_to_device(program, device, where)
        arg_names, self.inputs, self.outputs = _exported_specs(
            program, self.config.max_batch_size, f"{where}: {path}"
        )
        try:
            module: Callable[..., Any] = program.module()
        except Exception as exc:
            raise ModelLoadError(
                f"{where}: cannot build a module from {path}: {type(exc).__name__}: {exc}"
            ) from exc
        return module, arg_names

    def _load_script(
        self, path: Path, device: torch.device, where: str
    ) -> tuple[Callable[..., Any], list[str]]:
        if self.config.inputs is None or self.config.outputs is None:
            raise ModelLoadError(
                f"{where}: {path} is TorchScript, which records no tensor shapes or datatypes; "
                "declare 'inputs' and 'outputs' in config.yaml (or serve a torch.export .pt2)"
            )
        try:
            module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
        except Exception as exc:  # RuntimeError for most damage, but not only
            raise ModelLoadError(
                f"{where}: cannot load {path} as TorchScript (torch.jit.save format): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        module.eval()
        try:
            # arguments[0] is `self`
            arg_names = [a.name for a in module.forward.schema.arguments[1:]]
        except (AttributeError, RuntimeError):
            arg_names = []
        return module, arg_names

    def _positional_order(
        self, arg_names: list[str], exact: bool, path: Path, where: str
    ) -> list[str]:
        """The declared input names in the order forward() takes them.

        ``exact``: forward() takes exactly ``arg_names`` (an exported program); TorchScript
        arguments may have defaults, so fewer inputs than arguments are allowed there.
        """
        declared = [s.name for s in self.inputs]
        if len(set(declared)) != len(declared):
            raise ModelLoadError(f"{where}: duplicate input names {declared}")
        if arg_names and set(declared) <= set(arg_names):
            # the declared names are forward()'s argument names: use the artefact's order
            ordered = [a for a in arg_names if a in set(declared)]
            if ordered == arg_names[: len(ordered)] and (not exact or ordered == arg_names):
                return ordered
            raise ModelLoadError(
                f"{where}: config.yaml inputs {declared} leave out positional arguments of "
                f"{path} ({arg_names})"
            )
        too_many = len(declared) > len(arg_names)
        if arg_names and (too_many or (exact and len(declared) != len(arg_names))):
            raise ModelLoadError(
                f"{where}: config.yaml declares {len(declared)} inputs but {path} takes "
                f"{len(arg_names)} ({arg_names})"
            )
        return declared  # other names: passed by position, in config.yaml's order

    # --------------------------------------------------------------- predict

    def predict(
        self,
        inputs: Tensors,
        output_names: list[str] | None = None,
        *,
        deadline: float | None = None,  # an in-process model runs to the end
    ) -> Tensors:
        module = self._module
        if module is None:
            raise Unavailable(f"model '{self.name}' version {self.version} is not loaded")
        args = []
        for name in self._arg_order:
            try:
                arr = inputs[name]
            except KeyError:
                raise BadRequest(f"missing input '{name}'") from None
            args.append(self._to_tensor(name, arr))
        with torch.inference_mode():
            result = module(*args)
            named = self._name_outputs(_flatten_outputs(result))
            if output_names:
                unknown = [n for n in output_names if n not in named]
                if unknown:
                    raise BadRequest(
                        f"unknown output(s) {unknown}; model '{self.name}' has {list(named)}"
                    )
                named = {n: named[n] for n in output_names}
            return {n: _to_numpy(t) for n, t in named.items()}

    def _to_tensor(self, name: str, arr: np.ndarray) -> torch.Tensor:
        if arr.dtype.kind in "OSU":
            raise BadRequest(f"input '{name}': BYTES tensors are not supported by torch models")
        if (
            self._copy_inputs
            or not arr.flags.writeable
            or not arr.dtype.isnative
            or any(s < 0 for s in arr.strides)
        ):
            # torch.from_numpy shares memory and needs a writable, native-endian array with
            # non-negative strides; buffers decoded from a request body are often read-only.
            # A model that writes in place would write into the request's own array.
            arr = np.array(arr, dtype=arr.dtype.newbyteorder("="), order="C", copy=True)
        tensor = torch.from_numpy(arr)
        want = self._input_dtypes.get(name)
        if want is not None and tensor.dtype != want:
            tensor = tensor.to(want)  # e.g. BF16, carried as float32 in numpy
        if self._device.type != "cpu":
            tensor = tensor.to(self._device)
        return tensor

    def _name_outputs(self, flat: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not self.outputs:
            return dict(flat)
        declared = [s.name for s in self.outputs]
        if len(declared) != len(flat):
            raise RuntimeError(
                f"model '{self.name}' returned {len(flat)} output(s) but declares "
                f"{len(declared)}: {declared}"
            )
        produced = dict(flat)
        if set(declared) == set(produced):
            return {n: produced[n] for n in declared}
        return {n: t for n, (_, t) in zip(declared, flat, strict=True)}

    # ---------------------------------------------------------------- unload

    def unload(self) -> None:
        self._module = None
        gc.collect()
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------- helpers


def _writes_in_place(module: Callable[..., Any]) -> bool:
    """Whether ``module``'s graph has an op that writes into a tensor (``aten::relu_``,
    ``aten.copy_``, ...): then it may write into its inputs. When the graph cannot be read,
    assume it does (a copy costs little; a changed request costs a wrong verification)."""
    try:
        if isinstance(module, torch.fx.GraphModule):
            return any(
                getattr(getattr(node.target, "_schema", None), "is_mutable", False)
                for node in module.graph.nodes
                if node.op == "call_function"
            )
        graph = module.inlined_graph  # type: ignore[attr-defined]  # TorchScript
        return any(_in_place_kind(node.kind()) for node in graph.nodes())
    except Exception:  # noqa: BLE001 - an unreadable graph: the safe answer
        return True


def _in_place_kind(kind: str) -> bool:
    """``aten::relu_`` writes in place (the trailing underscore); ``aten::__and__`` does not."""
    return kind.startswith("aten::") and kind.endswith("_") and not kind.endswith("__")


def _flatten_outputs(result: Any) -> list[tuple[str, torch.Tensor]]:
    """A forward() result as (name, tensor) pairs: dict keys, else output0, output1, ..."""
    if isinstance(result, Mapping) and all(isinstance(v, torch.Tensor) for v in result.values()):
        return [(str(k), v) for k, v in result.items()]
    leaves: list[torch.Tensor] = []
    _leaves(result, leaves)
    return [(f"output{i}", v) for i, v in enumerate(leaves)]


def _leaves(value: Any, into: list[torch.Tensor]) -> None:
    """Tensors of a nested tuple/list/dict in order (as torch's pytree flattens them)."""
    if isinstance(value, torch.Tensor):
        into.append(value)
    elif isinstance(value, Mapping):
        for v in value.values():
            _leaves(v, into)
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        for v in value:
            _leaves(v, into)
    else:
        raise RuntimeError(
            f"model returned a {type(value).__name__}; forward() must return a tensor, "
            "a tuple of tensors or a dict of tensors"
        )


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        t = t.float()  # numpy has no bfloat16; OIP BF16 travels as float32 (see datatypes)
    return t.detach().cpu().numpy()


def _move_to_device(program: ExportedProgram, device: torch.device, where: str) -> ExportedProgram:
    """Move parameters, buffers and device constants baked into the graph (torch >= 2.6)."""
    try:
        from torch.export.passes import move_to_device_pass
    except ImportError as exc:
        raise ModelLoadError(
            f"{where}: torch {torch.__version__} cannot move an exported program to "
            f"{device} (needs torch.export.passes.move_to_device_pass, torch >= 2.6)"
        ) from exc
    try:
        return move_to_device_pass(program, device)
    except Exception as exc:
        raise ModelLoadError(
            f"{where}: cannot move the exported program to {device}: {type(exc).__name__}: {exc}"
        ) from exc


def _exported_specs(
    program: ExportedProgram, max_batch_size: int, where: str
) -> tuple[list[str], list[TensorSpec], list[TensorSpec]]:
    """Input argument names, input specs and output specs of an exported program."""
    try:
        in_spec = program.call_spec.in_spec
        # TreeSpec.children() replaced the children_specs attribute in newer torch
        children = in_spec.children() if hasattr(in_spec, "children") else in_spec.children_specs
        args_spec, kwargs_spec = children
        flat_args = args_spec.num_children == args_spec.num_leaves and kwargs_spec.num_leaves == 0
    except (AttributeError, TypeError, ValueError):
        flat_args = True  # older/newer spec layouts: assume plain positional tensors
    if not flat_args:
        raise ModelLoadError(
            f"{where}: forward() takes nested or keyword-only inputs; export a module whose "
            "forward takes tensors as positional arguments"
        )

    nodes = {n.name: n for n in program.graph.nodes}
    signature = program.graph_signature

    def spec(name: str, kind: str) -> TensorSpec:
        val = nodes[name].meta.get("val") if name in nodes else None
        if not isinstance(val, torch.Tensor):
            raise ModelLoadError(f"{where}: {kind} '{name}' is not a tensor ({val!r})")
        datatype = _TORCH_TO_OIP.get(val.dtype)
        if datatype is None:
            raise ModelLoadError(f"{where}: {kind} '{name}' has unsupported dtype {val.dtype}")
        # symbolic (torch.export.Dim) dimensions are variable
        shape = [d if isinstance(d, int) else -1 for d in val.shape]
        if max_batch_size > 0:
            if not shape:
                raise ModelLoadError(
                    f"{where}: max_batch_size > 0 but {kind} '{name}' is a scalar (no batch axis)"
                )
            if kind == "input":
                _check_batch_dim(program, val.shape[0], name, max_batch_size, where)
            shape[0] = -1
        return TensorSpec(name, datatype, tuple(shape))

    arg_names: list[str] = []
    inputs: list[TensorSpec] = []
    for in_spec in signature.input_specs:
        if in_spec.kind != InputKind.USER_INPUT:
            continue  # parameters, buffers, constants
        name = getattr(in_spec.arg, "name", None)
        if name is None:
            raise ModelLoadError(f"{where}: forward() takes a non-tensor input {in_spec.arg!r}")
        arg_names.append(name)
        inputs.append(spec(name, "input"))

    user_outputs = [o for o in signature.output_specs if o.kind == OutputKind.USER_OUTPUT]
    out_names = [f"output{i}" for i in range(len(user_outputs))]
    out_spec = program.call_spec.out_spec
    if (
        out_spec is not None
        and isinstance(out_spec.type, type)
        and issubclass(out_spec.type, dict)
        and out_spec.num_children == out_spec.num_leaves == len(user_outputs)
    ):
        out_names = [str(k) for k in out_spec.context]
    outputs: list[TensorSpec] = []
    for out_name, o in zip(out_names, user_outputs, strict=True):
        node_name = getattr(o.arg, "name", None)
        if node_name is None:
            raise ModelLoadError(f"{where}: forward() returns a non-tensor value {o.arg!r}")
        s = spec(node_name, "output")
        outputs.append(TensorSpec(out_name, s.datatype, s.shape))
    return arg_names, inputs, outputs


def _check_batch_dim(
    program: ExportedProgram, dim: Any, name: str, max_batch_size: int, where: str
) -> None:
    """The first axis must take every batch size from 1 to max_batch_size."""
    if isinstance(dim, int):
        if dim == 1 and max_batch_size == 1:
            return
        raise ModelLoadError(
            f"{where}: max_batch_size is {max_batch_size} but input '{name}' was exported with "
            f"a fixed first dimension {dim}; export it with a dynamic batch axis, e.g. "
            f"dynamic_shapes={{'{name}': {{0: torch.export.Dim('batch', min=1)}}}}"
        )
    try:
        bounds = program.range_constraints.get(dim.node.expr)
        lower, upper = bounds.lower, bounds.upper
    except AttributeError:
        return  # no recorded range: trust the export
    if lower > 1 or (upper.is_finite and upper < max_batch_size):
        raise ModelLoadError(
            f"{where}: input '{name}' accepts batch sizes {lower}..{upper} but config.yaml "
            f"sets max_batch_size {max_batch_size}; re-export with "
            f"torch.export.Dim('batch', min=1, max>={max_batch_size}) or lower max_batch_size"
        )

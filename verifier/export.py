"""ONNX export with a parity check, and model-repository entries the gateway loads.

Each entry is ``<repo>/<name>/config.yaml`` + ``<repo>/<name>/1/model.onnx`` +
``<repo>/<name>/1/model_card.json``. The ONNX graph takes ``input`` (FP32 pixels in [0, 1],
``[-1, C, H, W]``) and answers ``probabilities`` (``[-1, classes]``, softmax inside).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import yaml
from torch import nn

from verifier.nets import Probabilities
from verifier.train import CheckpointError, write_durably

if TYPE_CHECKING:
    from enclave_sim.pki import PlatformIdentity

__all__ = [
    "ExportError",
    "export_onnx",
    "measure_latency",
    "onnx_bytes",
    "ort_session",
    "serving_config",
    "write_entry",
]

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
ONNX_OPSET = 17
PARITY_ATOL = 1e-4

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exported model does not reproduce the torch model."""


def onnx_bytes(net: nn.Module, sample: torch.Tensor) -> bytes:
    """``net`` + softmax as a checked ONNX model with a dynamic batch axis, in memory.

    The TorchScript-based exporter (``dynamo=False``): the torch.export-based default needs
    ``onnxscript``, which is not a dependency.
    """
    model = Probabilities(net).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # "You are using the legacy TorchScript-based ONNX export" and its helper's
        # "The feature will be removed": deliberate, see the docstring.
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy")
        warnings.filterwarnings(
            "ignore", category=DeprecationWarning, message="The feature will be removed"
        )
        torch.onnx.export(
            model,
            (sample,),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter takes a file object
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    return data


def export_onnx(net: nn.Module, path: Path, sample: torch.Tensor) -> None:
    """:func:`onnx_bytes` written to ``path`` whole (a full disk leaves the file before)."""
    write_durably(path, onnx_bytes(net, sample), "ONNX model")


def ort_session(path: Path | bytes) -> ort.InferenceSession:
    """A session on a model file (or its bytes): one intra-op thread, as the served configs
    use and as latency is quoted."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(net: nn.Module, session: ort.InferenceSession, x: torch.Tensor) -> float:
    """Max |ONNX - torch| of the probabilities on ``x``; raises above ``PARITY_ATOL``."""
    net.eval()
    with torch.inference_mode():
        want = net(x).softmax(-1).numpy()  # [n, C]
    got = session.run(None, {INPUT_NAME: x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if not diff <= PARITY_ATOL:
        raise ExportError(f"ONNX differs from torch by {diff:.3g} (limit {PARITY_ATOL})")
    return diff


def measure_latency(
    session: ort.InferenceSession,
    x: np.ndarray | dict[str, np.ndarray],
    repeats: int = 200,
    warmup: int = 10,
) -> float:
    """Median latency of one run on the batch ``x`` as given (``x[:1]`` for a single image; a
    dict feeds a model with several inputs), on one CPU thread, in milliseconds."""
    feed = x if isinstance(x, dict) else {INPUT_NAME: x}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 4)


def single_image_latency_ms(net: nn.Module, image_shape: tuple[int, int, int]) -> float:
    """``net`` (untrained weights are as fast as trained ones) exported to ONNX and run on one
    image on one onnxruntime thread, as the enclave runs a verifier: median milliseconds."""
    x = torch.rand(2, *image_shape)
    return measure_latency(ort_session(onnx_bytes(net.eval(), x)), x[:1].numpy(), repeats=50)


@functools.cache
def _probe_platform() -> PlatformIdentity:
    from enclave_sim.pki import create_identity

    return create_identity()[1]  # an in-memory platform CA: the probe signs as an enclave does


def enclave_latency_ms(
    net: nn.Module,
    image_shape: tuple[int, int, int],
    *,
    memory_budget_mb: float = 96.0,
    repeats: int = 50,
) -> float:
    """``net`` (untrained weights are as fast as trained ones) exported to ONNX, booted in a
    simulated enclave core with ``memory_budget_mb`` (one onnxruntime thread, per-boot keys)
    and asked to verify one image at a time: the median milliseconds of the enclave's whole
    call (the model, hashing the input, the Merkle entry and the ES256 signature), the
    socket to it excluded. ``memory_budget_mb`` in MB of 10^6 bytes, as the enclave takes
    it (``fides enclave run --memory-budget-mb``). Raises
    :class:`fides_core.enclave_errors.ModelTooLarge` when the model does not fit the budget."""
    from enclave_sim.core import EnclaveCore  # the enclave's own code, imported when used
    from enclave_sim.resources import ResourceSettings
    from fides_core.enclave_config import EnclaveModelConfig
    from fides_core.measurement import measure
    from fides_core.verify import VerifiedItem, VerifyRequest

    x = torch.rand(2, *image_shape)
    model = onnx_bytes(net.eval(), x)
    config = EnclaveModelConfig(max_batch_size=1, intra_op_threads=1)
    core = EnclaveCore(
        model,
        config,
        measure(model, config),
        _probe_platform(),
        resources=ResourceSettings(memory_budget_bytes=int(memory_budget_mb * 1e6)),
    )
    request = [VerifyRequest("latency-probe", b"\x00" * 16, {INPUT_NAME: x[:1].numpy()})]
    for _ in range(5):
        (item,) = core.verify(request).items
        if not isinstance(item, VerifiedItem):  # never time a refusal
            raise RuntimeError(f"the enclave refused the latency probe: {item.message}")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        core.verify(request)
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 4)


# A model whose full batch runs faster than this is served inline (on the event loop): the
# thread hop and handing the GIL back cost more than the model (issue 25, docs/enclave.md).
INLINE_BELOW_MS = 0.2


def execution_for(path: Path, feeds: dict[str, np.ndarray], repeats: int = 50) -> str:
    """``inline`` when one run of the ONNX model at ``path`` on ``feeds`` (a full batch) takes
    under :data:`INLINE_BELOW_MS` on one thread (median), else ``thread``."""
    ms = measure_latency(ort_session(path), feeds, repeats=repeats, warmup=5)
    return "inline" if ms < INLINE_BELOW_MS else "thread"


def serving_config(
    labels: list[str], max_batch_size: int = 64, execution: str = "thread"
) -> dict[str, Any]:
    """The gateway ``config.yaml`` (gateway.model_config) for a classifier on one core."""
    preferred = [b for b in (16, 32, 64) if b < max_batch_size] + [max_batch_size]
    return {
        "platform": "onnx",
        "max_batch_size": max_batch_size,
        "version_policy": {"latest": {"num_versions": 1}},
        "dynamic_batching": {
            "max_queue_delay_microseconds": 500,
            "preferred_batch_size": sorted(set(preferred)),
            "max_queue_size": 512,
        },
        "instance_group": {"count": 1, "kind": "cpu"},
        "execution": execution,
        "onnx": {"intra_op_threads": 1},
        "labels": labels,
    }


def write_entry(
    root: Path,
    name: str,
    net: nn.Module,
    x_check: torch.Tensor,
    labels: list[str],
    card: dict[str, Any],
    *,
    comment: str,
    max_batch_size: int = 64,
    latency_repeats: int = 200,
) -> dict[str, Any]:
    """Export ``net`` as model ``name`` (version 1) with its config and model card.

    ``x_check`` ([n, C, H, W]) is the parity batch. Returns the card as written, with
    ``onnx_max_abs_diff`` and ``cpu_latency_ms_batch1`` filled in.
    """
    version_dir = root / name / "1"
    body = yaml.safe_dump(
        serving_config(labels, max_batch_size), sort_keys=False, default_flow_style=None
    )
    model = onnx_bytes(net, x_check[:2])
    session = ort_session(model)
    diff = check_parity(net, session, x_check)
    card = {
        **card,
        "name": name,
        "onnx_max_abs_diff": diff,
        "cpu_latency_ms_batch1": measure_latency(session, x_check[:1].numpy(), latency_repeats),
    }
    version_dir.mkdir(parents=True, exist_ok=True)
    _replace_together(
        {
            version_dir / "model.onnx": model,
            version_dir / "model_card.json": (
                json.dumps(card, indent=2, default=str) + "\n"
            ).encode(),
            root / name / "config.yaml": f"# {comment}\n{body}".encode(),
        },
        f"model repository entry {root / name}",
    )
    return card


def _replace_together(files: dict[Path, bytes], what: str) -> None:
    """Write every file beside its target first (flushed to disk), then rename them all into
    place: a full disk or a crash while writing leaves every target as it was (the gateway
    may be serving it), never a truncated model or a new model beside its old card.
    A failure is a :class:`verifier.train.CheckpointError` that says so."""
    staged: list[Path] = []
    try:
        for path, data in files.items():
            tmp = path.with_name(path.name + ".tmp")
            staged.append(tmp)
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:
        for tmp in staged:
            tmp.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write the {what} ({tmp}: {exc.strerror or exc}); its files are as they "
            "were before: free the space and run again"
        ) from exc
    for tmp, path in zip(staged, files, strict=True):
        tmp.replace(path)  # renames need no space: once all are written, all go in
    for directory in {path.parent for path in files}:
        try:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)  # the renames survive a power cut
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("%s written, but %s could not be synced: %s", what, directory, exc)

"""Build the embedded default model repository on a fresh machine, with no data download.

The models are trained on scikit-learn's bundled ``digits`` data set (1797 8x8 grayscale
images, 10 classes), which ships inside the scikit-learn wheel:

* ``digits`` - the service model: a small CNN distilled (Hinton KD) from a 3.9x more
  expensive teacher by the verifier pipeline (:mod:`verifier.pipeline`, experiment
  ``experiments/digits.yaml``), exported to ONNX (``input`` [-1, 1, 8, 8] pixels in [0, 1]
  -> ``probabilities`` [-1, 10], softmax inside the graph), with ``1/model_card.json``;
* ``digits_verifier`` - its Fides verification model, built by GDTL (rotation-pretrained
  backbone, greedy unfreezing with KD from ``digits``), ONNX with a model card; the gateway
  seals it into ``digits``' enclave at start and never serves it on ``/v2``;
* ``digits_detector`` / ``digits_reclassifier`` - the GAN-trained attack detector and the
  re-classifier over (service, verifier) probability pairs (:mod:`verifier.evaluate`);
  ``digits``' config has the ``integrity:`` block that uses them;
* ``digits_novelty`` - the out-of-distribution check: a blank, inverted or faint image is
  answered ``unverified`` (reason ``out_of_distribution``), not judged an attack;
* ``digits_lite`` - a much cheaper model, what a lazy provider might serve instead (the
  substitution drill serves it);
* ``digits_torch`` - the same service student as a ``torch.export`` program (``model.pt2``);
* ``digits_heavy`` - a wider network (~1-2 ms per single-sample inference on one core) for the
  serving benchmark, exported to ONNX.

Everything is built in a staging directory next to ``output`` and moved in when done; the
``.built`` marker (JSON: accuracies, timings) is written last, so a half-built repository is
never taken for a built one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
import yaml
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.export import Dim

from fides.defaults.nets import (
    NUM_CLASSES,
    DigitsHeavy,
    HeavyConfig,
)
from verifier.defaults import digits_default
from verifier.evaluate import evaluate_experiment
from verifier.experiment import Experiment
from verifier.export import export_onnx, ort_session
from verifier.export import measure_latency as single_latency_ms
from verifier.logs import forward_logs, log_epoch
from verifier.nets import NamedProbabilities, count_parameters
from verifier.pipeline import ExperimentRun, run_experiment

Progress = Callable[[str], None]  # build_default's console: one call per log line

log = logging.getLogger(__name__)

LABELS = [str(i) for i in range(NUM_CLASSES)]
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
MAX_BATCH_SIZE = 64
MAX_EXPORT_BATCH = 1024  # upper bound of the dynamic batch axis in model.pt2
MAX_ABS_DIFF = 1e-4  # exported vs eager probabilities
MARKER = ".built"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 1e-4


HEAVY_TRAIN = TrainConfig(epochs=4, lr=2e-3, batch_size=64)


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor  # [n_train, 1, 8, 8] float32 in [0, 1]
    y_train: torch.Tensor  # [n_train] int64
    x_test: torch.Tensor  # [n_test, 1, 8, 8]
    y_test: torch.Tensor  # [n_test]


def load_split(seed: int = 0, test_size: float = 0.2) -> Split:
    """scikit-learn's digits, pixels scaled from 0..16 to [0, 1], stratified seeded split."""
    images, labels = load_digits(return_X_y=True)
    x = (np.asarray(images, dtype=np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = np.asarray(labels, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return Split(
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(np.ascontiguousarray(y_tr)),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(np.ascontiguousarray(y_te)),
    )


def train(net: nn.Module, split: Split, cfg: TrainConfig, seed: int, label: str = "train") -> float:
    """AdamW with a one-cycle schedule (fast convergence in few epochs); returns seconds.
    Logs one line per epoch (stage ``label``)."""
    t0 = time.perf_counter()
    shuffle = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(split.x_train)
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch
    )
    net.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=shuffle)
        total = 0.0
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(net(split.x_train[idx]), split.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        detail = f"loss {total / n:.4f}"
        log_epoch(log, label, epoch + 1, cfg.epochs, detail, time.perf_counter() - t0, None)
    net.eval()
    return time.perf_counter() - t0


def accuracy(probabilities: np.ndarray, labels: torch.Tensor) -> float:
    # probabilities: [n, 10]
    return float((probabilities.argmax(axis=1) == labels.numpy()).mean())


def export_torch(net: nn.Module, path: Path, sample: torch.Tensor) -> None:
    """``net`` + softmax as a torch.export program returning ``{"probabilities": ...}``."""
    model = NamedProbabilities(net).eval()
    batch = Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    program = torch.export.export(model, (sample,), dynamic_shapes={INPUT_NAME: {0: batch}})
    torch.export.save(program, path)


def eager_probabilities(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        probs: np.ndarray = net(x).softmax(dim=-1).numpy()  # [n, 10]
    return probs


def check_close(name: str, got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.abs(got - want).max())
    if not diff <= MAX_ABS_DIFF:
        raise RuntimeError(f"{name}: exported model differs from torch by {diff:.3g}")
    return diff


def measure_latency(session: ort.InferenceSession, x: np.ndarray) -> dict[str, float]:
    """Median single-sample latency and per-sample latency at batch MAX_BATCH_SIZE, in ms."""
    batch = x[:MAX_BATCH_SIZE]  # [64, 1, 8, 8]
    return {
        "batch1_ms": single_latency_ms(session, x[:1], repeats=200, warmup=20),
        f"batch{len(batch)}_ms_per_sample": round(
            single_latency_ms(session, batch, repeats=20, warmup=0) / len(batch), 4
        ),
    }


def model_config(platform: str) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "platform": platform,
        "max_batch_size": MAX_BATCH_SIZE,
        "version_policy": {"latest": {"num_versions": 1}},
        "dynamic_batching": {
            "max_queue_delay_microseconds": 500,
            "preferred_batch_size": [16, 32, MAX_BATCH_SIZE],
            "max_queue_size": 512,
        },
        "instance_group": {"count": 1, "kind": "cpu"},
        "labels": LABELS,
    }
    if platform == "onnx":
        cfg["onnx"] = {"intra_op_threads": 1}
    else:
        cfg["torch"] = {"device": "cpu"}
    return cfg


def write_model(root: Path, name: str, platform: str, comment: str) -> Path:
    """``<root>/<name>/config.yaml``; returns the version directory ``<root>/<name>/1``."""
    model_dir = root / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True)
    body = yaml.safe_dump(model_config(platform), sort_keys=False, default_flow_style=None)
    (model_dir / "config.yaml").write_text(f"# {comment}\n{body}", encoding="utf-8")
    return version_dir


def build_default(
    output: Path, *, seed: int = 0, progress: Progress | None = None, text: bool = False
) -> Path:
    """Train, export and verify the default models into ``output``; returns ``output``.

    Model directories already in ``output`` with the same names are replaced; others are left
    alone. Takes roughly 30-70 s on two CPU cores (the verifier pipeline, then digits_heavy);
    ``text=True`` adds the ``code`` LM pair (:mod:`fides.defaults.text`, minutes).
    ``progress`` gets every log line of the build (the training code's prefixed ``digits: ``),
    one per epoch of each training stage included. Raises ``RuntimeError`` when an exported
    model disagrees with the trained one.
    """
    forwarding = (
        forward_logs(progress, {"verifier": "digits: ", __name__: ""})
        if progress is not None
        else nullcontext()
    )
    with forwarding:
        return _build_into(Path(output), seed, text)


def _build_into(output: Path, seed: int, text: bool) -> Path:
    """Build in a staging directory beside ``output``, then move the models in; the marker
    last."""
    t_start = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    (output / MARKER).unlink(missing_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.building-", dir=output.parent))
    try:
        report = _build(staging, seed)
        if text:
            from fides.defaults.text import build_text_default

            report["models"]["code"] = build_text_default(staging, seed=seed, say=log.info)
        for name in report["models"]:
            target = output / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
        report["build_seconds"] = round(time.perf_counter() - t_start, 2)
        tmp = output / f"{MARKER}.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, output / MARKER)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "done in %.1fs: %s in %s", report["build_seconds"], ", ".join(report["models"]), output
    )
    return output


def _run_pipeline(root: Path, exp: Experiment) -> tuple[ExperimentRun, dict[str, Any]]:
    """digits + digits_verifier (teacher -> distilled service student -> GDTL verifier), then
    the attack detector, re-classifier, novelty check and a cheap substitute; each exported
    with its model card, and digits' integrity block written: the default service is verified.
    Returns the pipeline's run and the evaluation report."""
    log.info(
        "digits: verifier pipeline (teacher, KD student, GDTL verifier; config %s)",
        exp.config_hash()[:8],
    )
    threads = torch.get_num_threads()
    try:
        run = run_experiment(exp, root / ".run", repository=root)
        log.info("digits: attack detector (GAN), re-classifier, calibration (verifier.evaluate)")
        integrity = evaluate_experiment(exp, root / ".run", repository=root, run=run)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    shutil.rmtree(root / ".run")
    return run, integrity


@dataclass(frozen=True)
class _Service:
    """The service student and its probabilities on the test images."""

    net: nn.Module
    eager: np.ndarray  # [n_test, 10] from torch
    onnx: np.ndarray  # [n_test, 10] from the exported model


def _onnx_probabilities(root: Path, name: str, split: Split) -> np.ndarray:
    session = ort_session(root / name / "1" / "model.onnx")
    probs: np.ndarray = session.run(None, {INPUT_NAME: split.x_test.numpy()})[0]  # [n, 10]
    return probs


def _service_entries(
    root: Path, run: ExperimentRun, split: Split
) -> tuple[_Service, dict[str, dict[str, Any]]]:
    """The marker's rows for digits and digits_verifier, each checked against torch."""
    results = run.report
    service = _Service(
        run.student,
        eager_probabilities(run.student, split.x_test),
        _onnx_probabilities(root, "digits", split),
    )
    diff = check_close("digits", service.onnx, service.eager)
    stu, ver = results["student"], results["verifier"]
    got_v = _onnx_probabilities(root, "digits_verifier", split)
    models: dict[str, dict[str, Any]] = {}
    models["digits"] = {
        "platform": "onnx",
        "role": "service (distilled student)",
        "test_accuracy": accuracy(service.onnx, split.y_test),
        "teacher_test_accuracy": [t["test_accuracy"] for t in results["teachers"]],
        "train_seconds": results["train_seconds"],
        "parameters": stu["params"],
        "flops_per_image": stu["flops"],
        "teacher_to_student_flops_ratio": stu["teacher_to_student_flops_ratio"],
        "max_abs_diff_vs_torch": diff,
        "cpu_latency_ms_batch1": stu["cpu_latency_ms_batch1"],
    }
    models["digits_verifier"] = {
        "platform": "onnx",
        "role": "verifier (GDTL)",
        "test_accuracy": accuracy(got_v, split.y_test),
        "fidelity_top1": ver["test_fidelity_top1"],
        "fidelity_mean_kl": ver["test_mean_kl"],
        "parameters": ver["params"],
        "flops_per_image": ver["flops"],
        "flops_ratio_to_service": ver["flops_ratio_to_service"],
        "inference_memory_mb": ver["inference_memory_mb"],
        "unfrozen_blocks": ver["unfrozen_blocks"],
        "gdtl_stop_reason": ver["stop_reason"],
        "max_abs_diff_vs_torch": check_close(
            "digits_verifier", got_v, eager_probabilities(run.verifier, split.x_test)
        ),
        "cpu_latency_ms_batch1": ver["cpu_latency_ms_batch1"],
    }
    log.info(
        "digits: service student test accuracy %.2f%% (teacher %.2f%%, %.1fx fewer FLOPs; ONNX "
        "matches torch within %.1e)",
        100 * models["digits"]["test_accuracy"],
        100 * models["digits"]["teacher_test_accuracy"][0],
        stu["teacher_to_student_flops_ratio"],
        diff,
    )
    log.info(
        "digits_verifier: fidelity to digits %.2f%%, test accuracy %.2f%%, %.1f%% of its FLOPs "
        "(%.1fs for the pipeline)",
        100 * ver["test_fidelity_top1"],
        100 * models["digits_verifier"]["test_accuracy"],
        100 * ver["flops_ratio_to_service"],
        results["wall_seconds"],
    )
    return service, models


def _integrity_entries(
    root: Path, exp: Experiment, integrity: dict[str, Any], split: Split, service: _Service
) -> dict[str, dict[str, Any]]:
    """The marker's rows for the detector, novelty check, re-classifier and substitute."""
    novelty = integrity["novelty"]
    got_lite = _onnx_probabilities(root, "digits_lite", split)
    models: dict[str, dict[str, Any]] = {
        "digits_detector": {
            "platform": "onnx",
            "role": "attack detector (GAN-trained, inputs service_probs + verifier_probs)",
            "threshold": integrity["threshold"],
            "target_fpr": exp.detector.target_fpr,
            "threshold_rule": integrity["threshold_rule"],
            "calibration_scores": integrity["calibration_scores"],
            "clean_fpr": integrity["clean_fpr"],
            "evaluation_images": integrity["data"]["evaluation"],
            "mean_detection_accuracy": integrity["mean_detection_accuracy"],
        },
        "digits_novelty": {
            "platform": "onnx",
            "role": "out-of-distribution check (input -> novelty_score)",
            "threshold": novelty["threshold"],
            "threshold_rule": novelty["threshold_rule"],
            "calibration_scores": novelty["calibration_scores"],
            "clean_rate": novelty["clean_rate"],
            "called_novel": {k: v["called_novel"] for k, v in novelty["inputs"].items()},
        },
        "digits_reclassifier": {
            "platform": "onnx",
            "role": "re-classifier",
            "reclassification_accuracy": integrity["reclassification_accuracy"],
        },
        "digits_lite": {
            "platform": "onnx",
            "role": "cheap substitute for substitution drills",
            "test_accuracy": accuracy(got_lite, split.y_test),
            "agreement_with_service": round(
                float((got_lite.argmax(1) == service.onnx.argmax(1)).mean()), 5
            ),
        },
    }
    log.info(
        "digits_detector: threshold %.4f, mean detection accuracy %.2f%% on %d held-out images; "
        "re-classification %.2f%%",
        integrity["threshold"],
        100 * integrity["mean_detection_accuracy"],
        integrity["data"]["evaluation"],
        100 * integrity["reclassification_accuracy"],
    )
    return models


def _torch_entry(root: Path, service: _Service, split: Split) -> dict[str, Any]:
    """digits_torch: the service student as a torch.export program."""
    t = time.perf_counter()
    version_dir = write_model(
        root, "digits_torch", "torch", "the digits service student as a torch.export program"
    )
    export_torch(service.net, version_dir / "model.pt2", split.x_train[:2])
    program = torch.export.load(version_dir / "model.pt2")
    with torch.inference_mode():
        got = program.module()(split.x_test)[OUTPUT_NAME].numpy()
    entry: dict[str, Any] = {
        "platform": "torch",
        "test_accuracy": accuracy(got, split.y_test),
        "parameters": count_parameters(service.net),
        "max_abs_diff_vs_torch": check_close("digits_torch", got, service.eager),
    }
    log.info(
        "digits_torch: exported with torch.export in %.1fs, test accuracy %.2f%%",
        time.perf_counter() - t,
        100 * entry["test_accuracy"],
    )
    return entry


def _heavy_entry(root: Path, seed: int, split: Split) -> dict[str, Any]:
    """digits_heavy: the benchmark model, trained, exported to ONNX and timed."""
    x_test = split.x_test.numpy()  # [n_test, 1, 8, 8]
    torch.manual_seed(seed)
    heavy = DigitsHeavy(HeavyConfig())
    log.info(
        "digits_heavy: training (%s parameters, %d epochs)",
        f"{count_parameters(heavy):,}",
        HEAVY_TRAIN.epochs,
    )
    train_s = train(heavy, split, HEAVY_TRAIN, seed, label="digits_heavy")
    want = eager_probabilities(heavy, split.x_test)
    version_dir = write_model(
        root, "digits_heavy", "onnx", "wide CNN+MLP on 8x8 digits, for benchmarks"
    )
    export_onnx(heavy, version_dir / "model.onnx", split.x_train[:2])
    session = ort_session(version_dir / "model.onnx")
    got = session.run(None, {INPUT_NAME: x_test})[0]
    diff = check_close("digits_heavy", got, want)
    latency = measure_latency(session, x_test)
    entry: dict[str, Any] = {
        "platform": "onnx",
        "test_accuracy": accuracy(got, split.y_test),
        "train_seconds": round(train_s, 2),
        "epochs": HEAVY_TRAIN.epochs,
        "parameters": count_parameters(heavy),
        "max_abs_diff_vs_torch": diff,
        "latency_onnxruntime_1_thread": latency,
    }
    log.info(
        "digits_heavy: test accuracy %.2f%% (trained in %.1fs); onnxruntime, 1 thread: %.2f ms "
        "per single-sample request, %.3f ms per sample at batch %d",
        100 * entry["test_accuracy"],
        train_s,
        latency["batch1_ms"],
        latency[f"batch{MAX_BATCH_SIZE}_ms_per_sample"],
        MAX_BATCH_SIZE,
    )
    return entry


def _build(root: Path, seed: int) -> dict[str, Any]:
    """Every default model into ``root``; returns the marker's report."""
    t0 = time.perf_counter()
    exp = digits_default(seed)
    split = load_split(seed, test_size=exp.data.test_fraction or 0.2)  # the experiment's split
    log.info(
        "data: scikit-learn digits, %d train / %d test images (%.1fs)",
        len(split.x_train),
        len(split.x_test),
        time.perf_counter() - t0,
    )
    run, integrity = _run_pipeline(root, exp)
    service, models = _service_entries(root, run, split)
    models |= _integrity_entries(root, exp, integrity, split, service)
    models["digits_torch"] = _torch_entry(root, service, split)
    models["digits_heavy"] = _heavy_entry(root, seed, split)
    for name, info in models.items():
        if name == "digits_lite" or "test_accuracy" not in info:  # cheap on purpose / no label
            continue
        if info["test_accuracy"] < 0.95:  # the verifier is judged by fidelity, but still
            log.warning("%s test accuracy %.2f%% is below 95%%", name, 100 * info["test_accuracy"])
    return {
        "format": 1,
        "seed": seed,
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "data": {
            "source": "sklearn.datasets.load_digits",
            "train": len(split.x_train),
            "test": len(split.x_test),
        },
        "models": models,
    }

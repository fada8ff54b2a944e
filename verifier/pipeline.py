"""One experiment end to end: data -> teachers -> distilled service student -> GDTL verifier
-> ONNX model-repository entries with model cards -> a results JSON.

Each stage is a function with explicit inputs and a small frozen result; :func:`run_experiment`
runs them in order and returns the report with the trained networks (:class:`ExperimentRun`).
Progress goes to ``logging`` (:mod:`verifier.logs`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress

from verifier.cards import model_card
from verifier.data import Splits, data_fingerprint, load_splits
from verifier.experiment import Experiment, NetSpec, RunSpec
from verifier.export import write_entry
from verifier.flops import count_flops, memory_estimate
from verifier.gdtl import Fidelity, GreedyResult, fidelity, path_rows, path_table, select_verifier
from verifier.logs import progress_bar
from verifier.losses import cross_entropy, ensemble_kd_loss, kd_loss
from verifier.nets import ConvNet, NetConfig, count_parameters, new_net
from verifier.train import (
    StageError,
    fit,
    predict_logits,
    set_determinism,
    stage_throughput,
    write_durably,
)

__all__ = [
    "ExperimentRun",
    "Exported",
    "StageError",
    "StageKeys",
    "experiment_splits",
    "net_config",
    "run_experiment",
    "checked_stage_dir",
    "stage_inputs",
    "stage_key",
    "stage_keys",
    "trained_nets",
    "training_data",
]

log = logging.getLogger(__name__)


def net_config(spec: NetSpec, splits: Splits) -> NetConfig:
    return NetConfig(
        image_size=splits.image_shape[1:],
        in_channels=splits.image_shape[0],
        num_classes=splits.num_classes,
        mean=tuple(splits.mean),
        std=tuple(splits.std),
    ).with_layout(spec)


def experiment_splits(exp: Experiment) -> Splits:
    """The experiment's data, split (seeded) into train / validation / test."""
    d = exp.data
    return load_splits(
        d.source,
        d.file,
        seed=exp.seed,
        val_fraction=d.val_fraction,
        train_limit=d.train_limit,
        test_limit=d.test_limit,
        test_fraction=d.test_fraction,
        classes_key=d.classes_key,
        group_key=d.group_key,
    )


def stage_key(*parts: object) -> str:
    """A short hash of everything a stage's result depends on: a stage directory is reused
    only by a config that would train it identically (changing the verifier settings keeps
    the trained teachers and student)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class StageKeys:
    """The keys of the stage directories (``<run_dir>/<stage>-<key>``)."""

    teachers: tuple[str, ...]
    student: str
    verifier: str


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, list) and any(isinstance(v, dict | list) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: tree}


def _changes(before: dict[str, object], now: dict[str, object], most: int = 6) -> str:
    keys = sorted(set(before) | set(now))
    diff = [
        f"{k}: {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
        for k in keys
        if before.get(k, "(unset)") != now.get(k, "(unset)")
    ]
    more = f" and {len(diff) - most} more" if len(diff) > most else ""
    return "; ".join(diff[:most]) + more


_RECORDED_LATER = ("pretrain_file", "pretrain_checkpoint")  # the verifier stage's


def checked_stage_dir(run_dir: Path, stage: str, key: str, inputs: dict[str, object]) -> Path:
    """``run_dir/<stage>-<key>``, checked against what it was made from.

    Each stage directory records its inputs (``stage.json``: the config it depends on and the
    data file's fingerprint). A directory whose data changed since is refused, and so is a
    config change while the stage is interrupted (another ``<stage>-*`` directory holds an
    unfinished epoch): resuming would mix two runs, and starting over silently would drop the
    work done. Either way the message names what changed."""
    here = run_dir / f"{stage}-{key}"
    now = _flatten(inputs)
    manifest = here / "stage.json"
    if manifest.is_file():
        before = _recorded_inputs(manifest)
        # inputs recorded only since a later version: a record without them is not a change
        for later in _RECORDED_LATER:
            if later not in before:
                now.pop(later, None)
        if before != json.loads(json.dumps(now)):
            raise StageError(
                f"{here} was trained from other inputs ({_changes(before, now)}); delete it "
                "to train the stage again from this data"
            )
        return here
    for other in sorted(run_dir.glob(f"{stage}-*")):
        earlier = other / "stage.json"
        unfinished = [
            last for last in other.rglob("last.pt") if not (last.parent / "done.pt").is_file()
        ]  # a last.pt beside its done.pt is a finished stage's leftover
        if other == here or not earlier.is_file() or not unfinished:
            continue
        before = _recorded_inputs(earlier)
        raise StageError(
            f"{stage} was interrupted in {other}, trained from other inputs "
            f"({_changes(before, now)}): restore them to resume it, or delete {other} to "
            "start the stage over with these"
        )
    here.mkdir(parents=True, exist_ok=True)
    write_durably(  # written whole, then renamed: never half a manifest
        manifest,
        (
            json.dumps({"stage": stage, "key": key, "inputs": now}, indent=2, default=str) + "\n"
        ).encode(),
        "stage manifest",
    )
    return here


def _recorded_inputs(manifest: Path) -> dict[str, object]:
    try:
        inputs = json.loads(manifest.read_text(encoding="utf-8"))["inputs"]
        if not isinstance(inputs, dict):
            raise TypeError("inputs is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StageError(
            f"{manifest}: not a readable stage record ({exc}); delete its directory to train "
            "the stage again"
        ) from exc
    return inputs


def training_data(exp: RunSpec) -> dict[str, object]:
    """The data config as the stages see it: without ``test_limit``, which picks test images
    only (drawn after the train / validation split), so changing it retrains nothing; left at
    its default, the keys of runs that never set it are what they were."""
    return {**exp.data.model_dump(mode="json"), "test_limit": None}


def stage_inputs(exp: Experiment, data_file: str) -> dict[str, dict[str, object]]:
    """What each stage's key is computed from, with the data file's fingerprint (not in the
    keys: the directories of runs made before it keep their names)."""
    base = {
        "data": training_data(exp),
        "data_file": data_file,
        "seed": exp.seed,
        "threads": exp.threads,
    }
    teachers = [t.model_dump(mode="json") for t in exp.teachers]
    out: dict[str, dict[str, object]] = {
        f"teacher_{i}": {**base, "teacher": t} for i, t in enumerate(teachers)
    }
    out["student"] = {
        **base,
        "teachers": teachers,
        "student": exp.student.model_dump(mode="json"),
    }
    out["verifier"] = {
        **out["student"],
        "verifier": exp.verifier.model_dump(mode="json", exclude={"candidates"}),
    }
    pretrain = exp.verifier.pretrain
    for name, path in (
        ("pretrain_file", pretrain.path),
        ("pretrain_checkpoint", pretrain.checkpoint),
    ):
        if path is not None:  # its bytes, not only its name (absent when unset: older records)
            out["verifier"][name] = data_fingerprint("npz", path)
    return out


def stage_keys(exp: Experiment) -> StageKeys:
    """Teacher ``i``: data, seed, threads and its own config; the student: those and every
    teacher's and its own config; the verifier: the student's key and the verifier config less
    its candidates (each candidate has its own directory inside)."""
    base = (training_data(exp), exp.seed, exp.threads)
    teachers_dump = [t.model_dump(mode="json") for t in exp.teachers]
    student = stage_key(*base, teachers_dump, exp.student.model_dump(mode="json"))
    return StageKeys(
        teachers=tuple(stage_key(*base, t) for t in teachers_dump),
        student=student,
        verifier=stage_key(student, exp.verifier.model_dump(mode="json", exclude={"candidates"})),
    )


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((logits.argmax(-1) == y).float().mean()), 5)


# ---------------------------------------------------------------- stages


@dataclass(frozen=True)
class Architectures:
    """The teachers' and the student's architectures and costs (FLOPs per image)."""

    teachers: tuple[NetConfig, ...]
    student: NetConfig
    teacher_flops: tuple[int, ...]
    student_flops: int

    @property
    def ratio(self) -> float:
        """How many times cheaper the student is than the cheapest teacher."""
        return min(self.teacher_flops) / self.student_flops


def architectures(exp: Experiment, splits: Splits) -> Architectures:
    """Raises ``ValueError`` when the student is not ``student.min_flops_ratio`` times cheaper
    than the cheapest teacher."""
    shape = splits.image_shape
    teachers = tuple(net_config(t.net, splits) for t in exp.teachers)
    student = net_config(exp.student.net, splits)
    teacher_flops = tuple(count_flops(ConvNet(c), shape) for c in teachers)
    arch = Architectures(teachers, student, teacher_flops, count_flops(ConvNet(student), shape))
    if arch.ratio < exp.student.min_flops_ratio:
        raise ValueError(
            f"student costs {arch.student_flops:,} FLOPs, the cheapest teacher "
            f"{min(teacher_flops):,}: ratio {arch.ratio:.2f} is below student.min_flops_ratio "
            f"{exp.student.min_flops_ratio}"
        )
    return arch


def _smoothed_cross_entropy(
    logits: torch.Tensor, _x: torch.Tensor, y: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    return cross_entropy(logits, y, label_smoothing)


@dataclass(frozen=True)
class Teachers:
    nets: tuple[ConvNet, ...]
    rows: list[dict[str, Any]]  # one report row per teacher
    ensemble_accuracy: float  # of the averaged softmax, on the test split
    seconds: dict[str, float]  # "teacher_<i>" -> training seconds


def train_teachers(
    exp: Experiment,
    splits: Splits,
    arch: Architectures,
    keys: StageKeys,
    run_dir: Path,
    bar: Progress | None,
    inputs: dict[str, dict[str, object]],
) -> Teachers:
    """Each teacher trained with cross-entropy (or loaded from its finished stage)."""
    nets: list[ConvNet] = []
    rows, seconds = [], {}
    for i, (tc, cfg) in enumerate(zip(exp.teachers, arch.teachers, strict=True)):
        net = new_net(cfg, splits.train.x, seed=exp.seed + i)
        secs = fit(
            net,
            splits.train,
            partial(_smoothed_cross_entropy, label_smoothing=tc.train.label_smoothing),
            tc.train,
            seed=exp.seed + i,
            augment_cfg=exp.data.augment,
            stage_dir=checked_stage_dir(
                run_dir, f"teacher_{i}", keys.teachers[i], inputs[f"teacher_{i}"]
            ),
            progress=bar,
            label=f"teacher {i}",
        )
        acc = _accuracy(predict_logits(net, splits.test.x), splits.test.y)
        rows.append(
            {
                "widths": list(cfg.widths),
                "convs_per_block": cfg.convs_per_block,
                "params": count_parameters(net),
                "flops": arch.teacher_flops[i],
                "test_accuracy": acc,
                "train_seconds": round(secs, 1),
            }
        )
        seconds[f"teacher_{i}"] = round(secs, 1)
        log.info("teacher %d: test accuracy %.2f%% (%.0fs)", i, 100 * acc, secs)
        nets.append(net)
    ens_logits = torch.stack([predict_logits(t, splits.test.x) for t in nets])  # [K, n, C]
    ensemble = _accuracy(ens_logits.softmax(-1).mean(0), splits.test.y)
    return Teachers(tuple(nets), rows, ensemble, seconds)


@dataclass(frozen=True)
class Student:
    net: ConvNet
    test_logits: torch.Tensor  # [n_test, C]
    accuracy: float  # on the test split
    seconds: float


def train_student(
    exp: Experiment,
    splits: Splits,
    arch: Architectures,
    teachers: Teachers,
    stage_dir: Path,
    bar: Progress | None,
) -> Student:
    """The service student, distilled from the teacher (or the teachers' averaged softmax)."""
    kd = exp.student.kd

    def student_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = [t(x).float() for t in teachers.nets]  # K x [b, C]
        if len(t_logits) == 1:
            return kd_loss(logits, t_logits[0], y, kd.temperature, kd.alpha, kd.beta)
        return ensemble_kd_loss(logits, t_logits, y, kd.temperature, kd.alpha, kd.beta)

    net = new_net(arch.student, splits.train.x, seed=exp.seed + 50)
    secs = fit(
        net,
        splits.train,
        student_loss,
        exp.student.train,
        seed=exp.seed + 50,
        augment_cfg=exp.data.augment,
        stage_dir=stage_dir,
        progress=bar,
        label="student (KD)",
    )
    test_logits = predict_logits(net, splits.test.x)
    acc = _accuracy(test_logits, splits.test.y)
    log.info(
        "service student: test accuracy %.2f%% (%.0fs; %.1fx fewer FLOPs than the cheapest "
        "teacher)",
        100 * acc,
        secs,
        arch.ratio,
    )
    return Student(net, test_logits, acc, secs)


@dataclass(frozen=True)
class Verifier:
    result: GreedyResult  # the chosen candidate; ``result.net`` is the verifier
    candidates: list[dict[str, object]]  # one summary row per candidate
    seconds: float
    test_fidelity: Fidelity
    flops: int
    memory_mb: float  # inference footprint at ``verifier.memory_batch_size``

    @property
    def net(self) -> ConvNet:
        return self.result.net

    @property
    def search_path(self) -> list[Any]:
        path = self.result.extra["search_path"]
        assert isinstance(path, list)
        return path


def train_verifier(
    exp: Experiment,
    splits: Splits,
    arch: Architectures,
    student: Student,
    stage_dir: Path,
    bar: Progress | None,
) -> Verifier:
    """GDTL over the candidate sizes, then the chosen verifier measured on the test split."""
    t0 = time.perf_counter()
    result, candidates = select_verifier(
        exp.verifier.candidates,
        arch.student,
        student.net,
        splits,
        exp.verifier,
        seed=exp.seed,
        service_flops=arch.student_flops,
        augment_cfg=exp.data.augment,
        run_dir=stage_dir,
        progress=bar,
    )
    seconds = round(time.perf_counter() - t0, 1)
    net, shape = result.net, splits.image_shape
    test_fid = fidelity(predict_logits(net, splits.test.x), student.test_logits, splits.test.y)
    flops = count_flops(net, shape)
    mem = memory_estimate(net, shape, exp.verifier.memory_batch_size, training=False)
    log.info(
        "verifier: test fidelity %.2f%% (KL %.4f), accuracy %.2f%%, %.1f%% of the service "
        "FLOPs; stopped: %s",
        100 * test_fid.agreement,
        test_fid.mean_kl,
        100 * test_fid.accuracy,
        100 * flops / arch.student_flops,
        result.stop_reason,
    )
    return Verifier(result, candidates, seconds, test_fid, flops, mem.total_mb)


# ---------------------------------------------------------------- report and export


def dataset_summary(splits: Splits) -> dict[str, Any]:
    return {
        "source": splits.source,
        "train": len(splits.train),
        "val": len(splits.val),
        "test": len(splits.test),
        "image_shape": list(splits.image_shape),
        "classes": splits.classes,
        "normalisation": {"mean": splits.mean, "std": splits.std, "computed_on": "train"},
        **splits.checks,
    }


def assemble_report(
    exp: Experiment,
    splits: Splits,
    arch: Architectures,
    teachers: Teachers,
    student: Student,
    verifier: Verifier,
) -> dict[str, Any]:
    """The results (``run_dir/results.json``), before export and wall time."""
    v, fid = verifier, verifier.test_fidelity
    result = v.result
    return {
        "experiment": exp.name,
        "config_sha256": exp.config_hash(),
        "dataset": dataset_summary(splits),
        "teachers": teachers.rows,
        "teacher_ensemble_test_accuracy": teachers.ensemble_accuracy,
        "student": {
            "widths": list(arch.student.widths),
            "params": count_parameters(student.net),
            "flops": arch.student_flops,
            "teacher_to_student_flops_ratio": round(arch.ratio, 2),
            "test_accuracy": student.accuracy,
        },
        "verifier": {
            "widths": list(v.net.cfg.widths),
            "params": count_parameters(v.net),
            "flops": v.flops,
            "flops_ratio_to_service": round(v.flops / arch.student_flops, 4),
            "inference_memory_mb": round(v.memory_mb, 3),
            "memory_budget_mb": exp.verifier.memory_budget_mb,
            "fits_budget": v.memory_mb <= exp.verifier.memory_budget_mb,
            "unfrozen_blocks": result.extra["unfrozen_blocks"],
            "pretrain": result.extra.get("pretrain"),
            "stop_reason": result.stop_reason,
            "val_fidelity": result.fidelity.agreement if result.fidelity else None,
            "test_fidelity_top1": round(fid.agreement, 5),
            "test_mean_kl": round(fid.mean_kl, 5),
            "test_accuracy": round(fid.accuracy, 5),
            "candidates": v.candidates,
            "path": path_rows(v.search_path),  # every candidate tried, the chosen one last
        },
        "train_seconds": {
            **teachers.seconds,
            "student": round(student.seconds, 1),
            "verifier_gdtl": v.seconds,
        },
        "per_class": per_class_report(
            splits.test.y.numpy(),
            student.test_logits.argmax(-1).numpy(),
            predict_logits(v.net, splits.test.x).argmax(-1).numpy(),
            splits.classes,
        ),
    }


def confusions(
    y: np.ndarray, pred: np.ndarray, classes: list[str], most: int
) -> list[dict[str, Any]]:
    """The ``most`` commonest (true, predicted) mistakes, with their share of all mistakes."""
    wrong = y != pred
    pairs, counts = np.unique(np.stack([y[wrong], pred[wrong]], 1), axis=0, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:most]
    total = max(1, int(wrong.sum()))
    return [
        {
            "true": classes[int(pairs[i, 0])],
            "predicted": classes[int(pairs[i, 1])],
            "count": int(counts[i]),
            "share_of_errors": round(int(counts[i]) / total, 4),
        }
        for i in order
    ]


def per_class_report(
    y: np.ndarray, service: np.ndarray, verifier: np.ndarray, classes: list[str], most: int = 5
) -> dict[str, Any]:
    """Per-class test accuracy of the service and the verifier, the verifier's agreement with
    the service per service class, and the largest confusions: a label-changing augmentation
    (a flip that turns one class into another) or a class the verifier cannot follow shows
    here, where the overall figures hide it."""

    def by_class(hit: np.ndarray, of: np.ndarray) -> dict[str, float | None]:
        return {
            name: (round(float(hit[of == c].mean()), 4) if (of == c).any() else None)
            for c, name in enumerate(classes)
        }

    return {
        "service_accuracy": by_class(service == y, y),
        "verifier_accuracy": by_class(verifier == y, y),
        "verifier_fidelity": by_class(verifier == service, service),
        "service_confusions": confusions(y, service, classes, most),
        "verifier_confusions": confusions(service, verifier, classes, most),  # vs the service
    }


@dataclass(frozen=True)
class Exported:
    """What the export adds to the report."""

    service_latency_ms: float  # batch 1, one CPU thread
    verifier_latency_ms: float
    onnx_max_abs_diff: float  # the larger of the two entries'


def export_models(
    exp: Experiment,
    splits: Splits,
    student: Student,
    verifier: Verifier,
    report: dict[str, Any],
    repository: Path,
) -> Exported:
    """The service student and the verifier as repository entries with model cards."""
    ex = exp.export
    dataset = report["dataset"]
    stu, ver = report["student"], report["verifier"]
    service_card = model_card(
        exp,
        role="service",
        architecture={"type": "ConvNet", **student.net.cfg.as_dict()},
        metrics={
            "test_accuracy": student.accuracy,
            "teacher_test_accuracy": [t["test_accuracy"] for t in report["teachers"]],
        },
        params=stu["params"],
        flops=stu["flops"],
        dataset=dataset,
    )
    verifier_card = model_card(
        exp,
        role="verifier",
        architecture={"type": "ConvNet", **verifier.net.cfg.as_dict()},
        metrics={
            "test_accuracy": ver["test_accuracy"],
            "fidelity_top1": ver["test_fidelity_top1"],
            "fidelity_mean_kl": ver["test_mean_kl"],
            "service_model": ex.service_name,
        },
        params=ver["params"],
        flops=ver["flops"],
        extra={"gdtl_path": ver["path"], "inference_memory_mb": ver["inference_memory_mb"]},
        dataset=dataset,
    )
    cards = {}
    for name, net, card, comment in (
        (ex.service_name, student.net, service_card, f"{exp.name}: distilled service student"),
        (ex.verifier_name, verifier.net, verifier_card, f"{exp.name}: GDTL verifier"),
    ):
        cards[name] = write_entry(
            repository,
            name,
            net,
            splits.test.x[:256],
            splits.classes,
            card,
            comment=f"{comment} (verifier.pipeline)",
            max_batch_size=ex.max_batch_size,
            latency_repeats=ex.latency_repeats,
        )
    log.info("exported %s and %s to %s", ex.service_name, ex.verifier_name, repository)
    return Exported(
        cards[ex.service_name]["cpu_latency_ms_batch1"],
        cards[ex.verifier_name]["cpu_latency_ms_batch1"],
        max(c["onnx_max_abs_diff"] for c in cards.values()),
    )


def _write_results(report: dict[str, Any], exp: Experiment, run_dir: Path, seconds: float) -> None:
    """Wall time (this invocation, and with the earlier ones that finished in ``run_dir``),
    then ``run_dir/results.json``."""
    report["wall_seconds"] = round(seconds, 1)
    earlier = run_dir / "results.json"
    try:
        prior = json.loads(earlier.read_text(encoding="utf-8")) if earlier.is_file() else {}
    except (OSError, ValueError) as exc:  # cut short by a crash: its earlier wall time is lost
        log.warning("%s is unreadable (%s): earlier runs' wall time is not added", earlier, exc)
        prior = {}
    if not isinstance(prior, dict) or prior.get("config_sha256") != exp.config_hash():
        prior = {}
    report["wall_seconds_total"] = round(
        prior.get("wall_seconds_total", prior.get("wall_seconds", 0.0)) + report["wall_seconds"], 1
    )
    report["threads"] = exp.threads
    write_durably(earlier, (json.dumps(report, indent=2) + "\n").encode(), "results file")


# ---------------------------------------------------------------- the whole run


@dataclass(frozen=True)
class ExperimentRun:
    """A finished run: its results (as in ``run_dir/results.json``) and the trained nets."""

    report: dict[str, Any]
    splits: Splits
    teachers: tuple[ConvNet, ...]
    student: ConvNet
    verifier: ConvNet


def _prepare(exp: Experiment, run_dir: Path) -> Splits:
    """Seed and threads, ``run_dir/experiment.json``, and the data."""
    set_determinism(exp.seed, exp.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_durably(
        run_dir / "experiment.json",
        (json.dumps(exp.model_dump(mode="json"), indent=2) + "\n").encode(),
        "experiment record",
    )
    splits = experiment_splits(exp)
    log.info(
        "data: %s, %d train / %d val / %d test, images %s, %d classes",
        splits.source,
        len(splits.train),
        len(splits.val),
        len(splits.test),
        splits.image_shape,
        splits.num_classes,
    )
    return splits


def run_experiment(
    exp: Experiment, run_dir: Path, *, repository: Path | None = None, show_progress: bool = False
) -> ExperimentRun:
    """Run (or resume) ``exp`` in ``run_dir``; export into ``repository`` when given.

    Returns the results (also written to ``run_dir/results.json``) and the trained networks.
    ``show_progress``: rich progress bars, when stderr is a terminal.
    """
    t_start = time.perf_counter()
    splits = _prepare(exp, run_dir)
    arch = architectures(exp, splits)
    keys = stage_keys(exp)
    inputs = stage_inputs(exp, data_fingerprint(exp.data.source, exp.data.file))
    with progress_bar(show_progress) as bar:
        teachers = train_teachers(exp, splits, arch, keys, run_dir, bar, inputs)
        student_dir = checked_stage_dir(run_dir, "student", keys.student, inputs["student"])
        student = train_student(exp, splits, arch, teachers, student_dir, bar)
        verifier_dir = checked_stage_dir(run_dir, "verifier", keys.verifier, inputs["verifier"])
        verifier = train_verifier(exp, splits, arch, student, verifier_dir, bar)
    write_durably(
        run_dir / "gdtl_path.md", (path_table(verifier.search_path) + "\n").encode(), "results file"
    )
    report = assemble_report(exp, splits, arch, teachers, student, verifier)
    # where the training time went: per stage, wall and CPU seconds and images per second
    # (the verifier's row sums its search: pretraining, every greedy step, the final step)
    report["stage_throughput"] = {
        **{
            f"teacher_{i}": stage_throughput(run_dir / f"teacher_{i}-{k}")
            for i, k in enumerate(keys.teachers)
        },
        "student": stage_throughput(student_dir),
        "verifier_gdtl": stage_throughput(verifier_dir),
    }
    if repository is not None:
        exported = export_models(exp, splits, student, verifier, report, repository)
        report["student"]["cpu_latency_ms_batch1"] = exported.service_latency_ms
        report["verifier"]["cpu_latency_ms_batch1"] = exported.verifier_latency_ms
        report["onnx_max_abs_diff"] = exported.onnx_max_abs_diff
        report["repository"] = str(repository)
    _write_results(report, exp, run_dir, time.perf_counter() - t_start)
    return ExperimentRun(report, splits, teachers.nets, student.net, verifier.net)


def trained_nets(run_dir: Path) -> dict[str, Path]:
    """Checkpoints of a finished run (for callers that want the torch modules)."""
    return {p.parent.name: p for p in sorted(run_dir.glob("*/done.pt"))}

"""One experiment end to end: data -> teachers -> distilled service student -> GDTL verifier
-> ONNX model-repository entries with model cards -> a results JSON."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from verifier.cards import model_card
from verifier.data import Splits, load_splits
from verifier.experiment import Experiment, NetSpec
from verifier.export import write_entry
from verifier.flops import count_flops, memory_estimate
from verifier.gdtl import fidelity, path_rows, path_table, select_verifier
from verifier.losses import cross_entropy, ensemble_kd_loss, kd_loss
from verifier.nets import ConvNet, NetConfig, count_parameters
from verifier.train import fit, predict_logits, set_determinism

__all__ = ["net_config", "run_experiment", "stage_key", "trained_nets"]

Say = Callable[[str], None]


def net_config(spec: NetSpec, splits: Splits) -> NetConfig:
    c = splits.image_shape[0]
    return NetConfig(
        widths=tuple(spec.widths),
        convs_per_block=spec.convs_per_block,
        dropout=spec.dropout,
        pool=spec.pool,
        image_size=splits.image_shape[1:],
        in_channels=c,
        num_classes=splits.num_classes,
        mean=tuple(splits.mean),
        std=tuple(splits.std),
    )


def experiment_splits(exp: Experiment) -> Splits:
    """The experiment's data, split (seeded) into train / validation / test."""
    d = exp.data
    return load_splits(
        d.source,
        d.path,
        seed=exp.seed,
        val_fraction=d.val_fraction,
        train_limit=d.train_limit,
        test_limit=d.test_limit,
        test_fraction=d.test_fraction,
    )


def stage_key(*parts: object) -> str:
    """A short hash of everything a stage's result depends on: a stage directory is reused
    only by a config that would train it identically (changing the verifier settings keeps
    the trained teachers and student)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((logits.argmax(-1) == y).float().mean()), 5)


def run_experiment(
    exp: Experiment,
    run_dir: Path,
    *,
    repository: Path | None = None,
    show_progress: bool = False,
    say: Say | None = None,
    trained: dict[str, nn.Module] | None = None,
) -> dict[str, Any]:
    """Run (or resume) ``exp`` in ``run_dir``; export into ``repository`` when given.

    Returns the results (also written to ``run_dir/results.json``). When ``trained`` is a
    dict, the trained networks are put in it (``teacher_<i>``, ``student``, ``verifier``).
    """
    log: Say = say or (lambda _m: None)
    t_start = time.perf_counter()
    set_determinism(exp.seed, exp.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "experiment.json").write_text(
        json.dumps(exp.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
    )
    splits = experiment_splits(exp)
    shape = splits.image_shape
    log(
        f"data: {splits.source}, {len(splits.train)} train / {len(splits.val)} val / "
        f"{len(splits.test)} test, images {shape}, {splits.num_classes} classes"
    )
    teacher_cfgs = [net_config(t.net, splits) for t in exp.teachers]
    student_cfg = net_config(exp.student.net, splits)
    teacher_flops = [count_flops(ConvNet(c), shape) for c in teacher_cfgs]
    student_flops = count_flops(ConvNet(student_cfg), shape)
    ratio = min(teacher_flops) / student_flops
    if ratio < exp.student.min_flops_ratio:
        raise ValueError(
            f"student costs {student_flops:,} FLOPs, the cheapest teacher {min(teacher_flops):,}: "
            f"ratio {ratio:.2f} is below student.min_flops_ratio {exp.student.min_flops_ratio}"
        )
    base = (exp.data.model_dump(mode="json"), exp.seed, exp.threads)
    teachers_dump = [t.model_dump(mode="json") for t in exp.teachers]
    student_key = stage_key(*base, teachers_dump, exp.student.model_dump(mode="json"))
    verifier_key = stage_key(
        student_key, exp.verifier.model_dump(mode="json", exclude={"candidates"})
    )
    bar = Progress(transient=True) if show_progress else None
    timings: dict[str, float] = {}
    with bar if bar is not None else nullcontext():
        # teachers (cross-entropy)
        teachers: list[ConvNet] = []
        teacher_results = []
        for i, (tc, cfg) in enumerate(zip(exp.teachers, teacher_cfgs, strict=True)):
            torch.manual_seed(exp.seed + i)
            net = ConvNet(cfg)
            secs = fit(
                net,
                splits.train,
                lambda logits, _x, y: cross_entropy(logits, y),
                tc.train,
                seed=exp.seed + i,
                augment_cfg=exp.data.augment,
                stage_dir=run_dir / f"teacher_{i}-{stage_key(*base, teachers_dump[i])}",
                progress=bar,
                label=f"teacher {i}",
            )
            acc = _accuracy(predict_logits(net, splits.test.x), splits.test.y)
            teacher_results.append(
                {
                    "widths": list(cfg.widths),
                    "convs_per_block": cfg.convs_per_block,
                    "params": count_parameters(net),
                    "flops": teacher_flops[i],
                    "test_accuracy": acc,
                    "train_seconds": round(secs, 1),
                }
            )
            timings[f"teacher_{i}"] = round(secs, 1)
            log(f"teacher {i}: test accuracy {acc:.2%} ({secs:.0f}s)")
            teachers.append(net)
        ens_logits = torch.stack([predict_logits(t, splits.test.x) for t in teachers])
        ensemble_acc = _accuracy(ens_logits.softmax(-1).mean(0), splits.test.y)

        # service student (KD from the teacher, or the teachers' averaged softmax)
        kd = exp.student.kd

        def student_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                t_logits = [t(x) for t in teachers]  # K x [b, C]
            if len(t_logits) == 1:
                return kd_loss(logits, t_logits[0], y, kd.temperature, kd.alpha, kd.beta)
            return ensemble_kd_loss(logits, t_logits, y, kd.temperature, kd.alpha, kd.beta)

        torch.manual_seed(exp.seed + 50)
        student = ConvNet(student_cfg)
        secs = fit(
            student,
            splits.train,
            student_loss,
            exp.student.train,
            seed=exp.seed + 50,
            augment_cfg=exp.data.augment,
            stage_dir=run_dir / f"student-{student_key}",
            progress=bar,
            label="student (KD)",
        )
        timings["student"] = round(secs, 1)
        student_test = predict_logits(student, splits.test.x)
        student_acc = _accuracy(student_test, splits.test.y)
        log(
            f"service student: test accuracy {student_acc:.2%} ({secs:.0f}s; "
            f"{ratio:.1f}x fewer FLOPs than the cheapest teacher)"
        )

        # verifier (GDTL)
        t0 = time.perf_counter()
        result, candidates = select_verifier(
            exp.verifier.candidates,
            student_cfg,
            student,
            splits,
            exp.verifier,
            seed=exp.seed,
            augment_cfg=exp.data.augment,
            run_dir=run_dir / f"verifier-{verifier_key}",
            progress=bar,
            say=log,
        )
        timings["verifier_gdtl"] = round(time.perf_counter() - t0, 1)
    verifier = result.net
    if trained is not None:
        trained.update({f"teacher_{i}": t for i, t in enumerate(teachers)})
        trained.update(student=student, verifier=verifier)
    verifier_test = predict_logits(verifier, splits.test.x)
    test_fid = fidelity(verifier_test, student_test, splits.test.y)
    verifier_flops = count_flops(verifier, shape)
    verifier_mem = memory_estimate(verifier, shape, exp.verifier.memory_batch_size, training=False)
    log(
        f"verifier: test fidelity {test_fid.agreement:.2%} (KL {test_fid.mean_kl:.4f}), "
        f"accuracy {test_fid.accuracy:.2%}, {verifier_flops / student_flops:.1%} of the service "
        f"FLOPs; stopped: {result.stop_reason}"
    )
    search_path = result.extra["search_path"]
    assert isinstance(search_path, list)
    (run_dir / "gdtl_path.md").write_text(path_table(search_path) + "\n", encoding="utf-8")

    dataset = {
        "source": splits.source,
        "train": len(splits.train),
        "val": len(splits.val),
        "test": len(splits.test),
        "image_shape": list(shape),
        "classes": splits.classes,
        "normalisation": {"mean": splits.mean, "std": splits.std, "computed_on": "train"},
    }
    results: dict[str, Any] = {
        "experiment": exp.name,
        "config_sha256": exp.config_hash(),
        "dataset": dataset,
        "teachers": teacher_results,
        "teacher_ensemble_test_accuracy": ensemble_acc,
        "student": {
            "widths": list(student_cfg.widths),
            "params": count_parameters(student),
            "flops": student_flops,
            "teacher_to_student_flops_ratio": round(ratio, 2),
            "test_accuracy": student_acc,
        },
        "verifier": {
            "widths": list(verifier.cfg.widths),
            "params": count_parameters(verifier),
            "flops": verifier_flops,
            "flops_ratio_to_service": round(verifier_flops / student_flops, 4),
            "inference_memory_mb": round(verifier_mem.total_mb, 3),
            "memory_budget_mb": exp.verifier.memory_budget_mb,
            "fits_budget": verifier_mem.total_mb <= exp.verifier.memory_budget_mb,
            "unfrozen_blocks": result.extra["unfrozen_blocks"],
            "pretrain": result.extra.get("pretrain"),
            "stop_reason": result.stop_reason,
            "val_fidelity": result.fidelity.agreement if result.fidelity else None,
            "test_fidelity_top1": round(test_fid.agreement, 5),
            "test_mean_kl": round(test_fid.mean_kl, 5),
            "test_accuracy": round(test_fid.accuracy, 5),
            "candidates": candidates,
            "path": path_rows(search_path),  # every candidate tried, the chosen one last
        },
        "train_seconds": timings,
    }
    if repository is not None:
        x_check = splits.test.x[:256]
        common = {"dataset": dataset}
        ex = exp.export
        service_card = model_card(
            exp,
            role="service",
            architecture={"type": "ConvNet", **student_cfg.as_dict()},
            metrics={
                "test_accuracy": student_acc,
                "teacher_test_accuracy": [t["test_accuracy"] for t in teacher_results],
            },
            params=count_parameters(student),
            flops=student_flops,
            **common,
        )
        verifier_card = model_card(
            exp,
            role="verifier",
            architecture={"type": "ConvNet", **verifier.cfg.as_dict()},
            metrics={
                "test_accuracy": round(test_fid.accuracy, 5),
                "fidelity_top1": round(test_fid.agreement, 5),
                "fidelity_mean_kl": round(test_fid.mean_kl, 5),
                "service_model": ex.service_name,
            },
            params=count_parameters(verifier),
            flops=verifier_flops,
            extra={
                "gdtl_path": path_rows(search_path),
                "inference_memory_mb": round(verifier_mem.total_mb, 3),
            },
            **common,
        )
        cards = {}
        for name, net, card, comment in (
            (ex.service_name, student, service_card, f"{exp.name}: distilled service student"),
            (ex.verifier_name, verifier, verifier_card, f"{exp.name}: GDTL verifier"),
        ):
            cards[name] = write_entry(
                repository,
                name,
                net,
                x_check,
                splits.classes,
                card,
                comment=f"{comment} (verifier.pipeline)",
                max_batch_size=ex.max_batch_size,
                latency_repeats=ex.latency_repeats,
            )
        results["student"]["cpu_latency_ms_batch1"] = cards[ex.service_name][
            "cpu_latency_ms_batch1"
        ]
        results["verifier"]["cpu_latency_ms_batch1"] = cards[ex.verifier_name][
            "cpu_latency_ms_batch1"
        ]
        results["onnx_max_abs_diff"] = max(c["onnx_max_abs_diff"] for c in cards.values())
        results["repository"] = str(repository)
    results["wall_seconds"] = round(time.perf_counter() - t_start, 1)  # this invocation
    # a resumed run also counts the earlier invocations that finished in this run directory
    earlier = run_dir / "results.json"
    prior = json.loads(earlier.read_text(encoding="utf-8")) if earlier.is_file() else {}
    if prior.get("config_sha256") != exp.config_hash():
        prior = {}
    results["wall_seconds_total"] = round(
        prior.get("wall_seconds_total", prior.get("wall_seconds", 0.0)) + results["wall_seconds"], 1
    )
    results["threads"] = exp.threads
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def trained_nets(run_dir: Path) -> dict[str, Path]:
    """Checkpoints of a finished run (for callers that want the torch modules)."""
    return {p.parent.name: p for p in sorted(run_dir.glob("*/done.pt"))}

"""What each FLOP of verification buys: one verifier per share of the service's FLOPs (for
example 10%, 25%, 50% and 100%), each distilled by GDTL from the same trained service and
evaluated with the experiment's detector recipe, in one table.

Every share runs in its own directory (``<run_dir>/cost_quality/share_<s>``) that links the
experiment's finished teacher, student and substitute stages, so the service is trained once,
each point resumes like any stage, and the experiment's own ``results.json`` and
``evaluation.json`` stay those of its configured verifier. A verifier at a share is the
experiment's (first) verifier candidate with every width scaled by one factor, the largest
whose FLOPs fit the share (capped at the service's widths when the verifier is pruned from the
service); where the configured candidate itself costs 90-100% of a share, it is that share's
verifier, and its trained stages are reused.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from verifier.evaluate import evaluate_experiment
from verifier.experiment import Experiment, ExperimentError, NetSpec
from verifier.flops import count_flops
from verifier.nets import ConvNet
from verifier.pipeline import net_config, run_experiment

__all__ = ["candidate_at_share", "cost_quality", "result_markdown", "table_markdown"]

log = logging.getLogger(__name__)


def candidate_at_share(
    spec: NetSpec, flops_of: Any, service_flops: int, share: float, cap: list[int] | None = None
) -> NetSpec:
    """``spec`` with its widths scaled by the largest factor (to 0.1%) whose FLOPs per image
    (``flops_of(spec)``) are at most ``share * service_flops``; each width at least 1 and, with
    ``cap``, at most the service's."""

    def scaled(f: float) -> NetSpec:
        widths = [max(1, round(w * f)) for w in spec.widths]
        if cap is not None:
            widths = [min(w, c) for w, c in zip(widths, cap, strict=True)]
        return spec.model_copy(update={"widths": widths})

    budget = share * service_flops
    lo, hi = 0.0, 1.0
    while flops_of(scaled(hi)) <= budget and hi < 64:
        lo, hi = hi, hi * 2
        if cap is not None and scaled(hi).widths == cap:
            break
    for _ in range(30):  # bisection on the factor
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops_of(scaled(mid)) <= budget else (lo, mid)
    best = scaled(lo) if lo > 0 else scaled(hi)
    if flops_of(best) > budget:
        raise ExperimentError(
            f"no width factor brings the verifier {spec.widths} under {share:.0%} of the "
            f"service's {service_flops:,} FLOPs"
        )
    return best


def _link_shared_stages(run_dir: Path, share_dir: Path) -> None:
    """The experiment's stage directories, linked (not copied): its teachers, student and
    substitutes are every share's, and a share whose verifier is the configured one finds
    that verifier and its detector already trained."""
    share_dir.mkdir(parents=True, exist_ok=True)
    for stage in run_dir.iterdir():
        if stage.is_dir() and "-" in stage.name and not stage.is_symlink():
            link = share_dir / stage.name
            if not link.exists():
                os.symlink(os.path.relpath(stage, share_dir), link, target_is_directory=True)


def _row(share: float, train: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    v = train["verifier"]
    fgsm = {
        name.removeprefix("fgsm_eps"): {
            "tpr_at_1pct_fpr": row["tpr_at_1pct_fpr"],
            "detection_accuracy": row["detection_accuracy"],
            "flip_rate": row["flip_rate"],
        }
        for name, row in ev["attacks"].items()
        if name.startswith("fgsm_eps")
    }
    return {
        "share": share,
        "widths": v["widths"],
        "flops": v["flops"],
        "flops_ratio_to_service": v["flops_ratio_to_service"],
        "inference_memory_mb": v["inference_memory_mb"],
        "fits_budget": v["fits_budget"],
        "test_fidelity_top1": v["test_fidelity_top1"],
        "test_mean_kl": v["test_mean_kl"],
        "mean_detection_accuracy": ev["mean_detection_accuracy"],
        "mean_detection_attacks": ev["mean_detection_attacks"],
        "per_attack_detection": {
            a: ev["attacks"][a]["detection_accuracy"] for a in ev["mean_detection_attacks"]
        },
        "clean_fpr": ev["clean_fpr"],
        "threshold_rule": ev["threshold_rule"],
        "fgsm": fgsm,
        "reclassification_accuracy": ev["reclassification_accuracy"],
        "verifier_train_seconds": train["train_seconds"]["verifier_gdtl"],
        "evaluation_seconds": ev.get("wall_seconds"),
    }


def cost_quality(
    exp: Experiment,
    run_dir: Path,
    shares: list[float],
    *,
    show_progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume) the service, then a verifier and a detector per share; returns the
    table as a dict (``rows`` in the order of ``shares``). ``on_row`` is called with the table
    so far after each share (a long sweep's finished rows are on disk before it ends)."""
    if not shares or any(not 0 < s <= 1 for s in shares):
        raise ExperimentError(f"FLOPs shares must be in (0, 1], got {shares}")
    t0 = time.perf_counter()
    base = run_experiment(exp, run_dir, show_progress=show_progress)  # the service, once
    splits = base.splits
    shape = splits.image_shape

    def flops_of(spec: NetSpec) -> int:
        return count_flops(ConvNet(net_config(spec, splits)), shape)

    service_flops = flops_of(exp.student.net)
    prune = exp.verifier.pretrain.task == "service"
    cap = list(exp.student.net.widths) if prune else None
    rows = []
    configured = exp.verifier.candidates[0]
    for share in shares:
        spec = candidate_at_share(configured, flops_of, service_flops, share, cap)
        if 0.9 * share * service_flops <= flops_of(configured) <= share * service_flops:
            spec = configured  # the experiment's own verifier stands for its share
        # the verifier stage keeps the experiment's settings (and so its directory) unless
        # the share needs a higher FLOPs ceiling; the candidate is under the share either way
        ceiling = max(exp.verifier.max_flops_ratio, share)
        point = exp.model_copy(
            update={
                "verifier": exp.verifier.model_copy(
                    update={"candidates": [spec], "max_flops_ratio": ceiling}
                )
            }
        )
        share_dir = run_dir / "cost_quality" / f"share_{share:g}"
        _link_shared_stages(run_dir, share_dir)
        log.info("cost-quality: %.0f%% of the service FLOPs, verifier %s", 100 * share, spec.widths)
        run = run_experiment(point, share_dir, show_progress=show_progress)
        ev = evaluate_experiment(point, share_dir, run=run, show_progress=show_progress)
        rows.append(_row(share, run.report, ev))
        if on_row is not None:
            on_row(_table(exp, splits.source, service_flops, base.report, rows, t0))
    return _table(exp, splits.source, service_flops, base.report, rows, t0)


def _table(
    exp: Experiment,
    source: str,
    service_flops: int,
    base: dict[str, Any],
    rows: list[dict[str, Any]],
    t0: float,
) -> dict[str, Any]:
    return {
        "experiment": exp.name,
        "config_sha256": exp.config_hash(),
        "dataset": source,
        "service": {
            "widths": list(exp.student.net.widths),
            "flops": service_flops,
            "test_accuracy": base["student"]["test_accuracy"],
        },
        "verifier_recipe": exp.verifier.model_dump(mode="json", exclude={"candidates"}),
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def result_markdown(result: dict[str, Any]) -> str:
    """The page of one sweep: what was measured, then the table (cheapest verifier first)."""
    svc = result["service"]
    done = "" if result.get("complete", True) else " (incomplete: the sweep is still running)"
    return "\n".join(
        [
            f"# Cost and quality of verification: {result['experiment']}{done}",
            "",
            f"Command: `{result.get('command', '')}`  ",
            f"Service {svc['widths']}: {svc['flops']:,} FLOPs per image, test accuracy "
            f"{svc['test_accuracy']:.2%}. Each row: a verifier at that share of the service's "
            "FLOPs, distilled by GDTL from the same service, and a detector trained for it; "
            "mean detection over switch / avg / random switch / GAN at the clean-FPR rule.",
            "",
            *table_markdown(result),
            "",
        ]
    )


def table_markdown(result: dict[str, Any]) -> list[str]:
    """The table's markdown rows (with its header), cheapest verifier first."""
    rows = sorted(result["rows"], key=lambda r: r["flops"])
    eps = sorted({e for r in rows for e in r["fgsm"]}, key=float)
    head = (
        "| FLOPs share | verifier widths | FLOPs | fidelity | mean detection | clean FPR | "
        + "".join(f"FGSM {float(e):.4g} TPR@1% | " for e in eps)
        + "re-classification | verifier training |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['flops_ratio_to_service']:.1%} | {r['widths']} | {r['flops']:,} | "
            f"{r['test_fidelity_top1']:.2%} | {r['mean_detection_accuracy']:.2%} | "
            f"{r['clean_fpr']:.2%} | "
            + "".join(
                f"{r['fgsm'][e]['tpr_at_1pct_fpr']:.2%} | " if e in r["fgsm"] else "- | "
                for e in eps
            )
            + f"{r['reclassification_accuracy']:.2%} | {r['verifier_train_seconds'] / 60:.0f} min |"
        )
    return lines

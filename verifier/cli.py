"""``fides train`` / ``fides evaluate``: what the command line calls (kept here so the CLI
imports no training code until the command runs). Progress: the training code's log records on
the console while a command runs (:func:`verifier.logs.log_to_console`), with progress bars when
stderr is a terminal."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from verifier.experiment import Experiment, load_experiment
from verifier.gdtl import StepRecord, path_table
from verifier.logs import log_to_console
from verifier.pipeline import run_experiment

__all__ = ["default_run_dir", "evaluate_command", "results_markdown", "train_command"]


def default_run_dir(exp: Experiment) -> Path:
    """``runs/<name>``. Stage directories inside are named by a hash of what they depend on,
    so re-running resumes, and a changed config retrains only the stages it changes."""
    return Path("runs") / exp.name


def results_markdown(results: dict[str, Any], command: str) -> str:
    v, s = results["verifier"], results["student"]
    wall = results.get("wall_seconds_total", results["wall_seconds"])
    lines = [
        f"# Verifier pipeline: {results['experiment']}",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall:.0f} s on {results['threads']} CPU thread(s) "
        f"({results.get('machine', '')}); config sha256 `{results['config_sha256'][:16]}`",
        "",
        "| model | params | FLOPs/image | test accuracy | fidelity to service | CPU ms (batch 1) |",
        "|---|---|---|---|---|---|",
    ]
    for i, t in enumerate(results["teachers"]):
        lines.append(
            f"| teacher {i} {t['widths']} | {t['params']:,} | {t['flops']:,} | "
            f"{t['test_accuracy']:.2%} | | |"
        )
    lines.append(
        f"| service student {s['widths']} | {s['params']:,} | {s['flops']:,} | "
        f"{s['test_accuracy']:.2%} | | {s.get('cpu_latency_ms_batch1', '')} |"
    )
    lines.append(
        f"| verifier {v['widths']} | {v['params']:,} | {v['flops']:,} "
        f"({v['flops_ratio_to_service']:.1%} of service) | {v['test_accuracy']:.2%} | "
        f"{v['test_fidelity_top1']:.2%} (KL {v['test_mean_kl']:.4f}) | "
        f"{v.get('cpu_latency_ms_batch1', '')} |"
    )
    lines += [
        "",
        f"Verifier inference memory at batch 64: {v['inference_memory_mb']:.2f} MB "
        f"(budget {v['memory_budget_mb']} MB). GDTL stopped: {v['stop_reason']}.",
        "",
        "## Verifier candidates (smallest FLOPs first)",
        "",
        "| candidate | widths | params | FLOPs | of service | outcome | val fidelity |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {c['candidate']} | {c['widths']} | {c['params']:,} | {c['flops']:,} | "
            f"{c['flops_ratio_to_service']:.1%} | {c['outcome']} | "
            f"{c.get('fidelity', float('nan')):.4f} |"
            for c in v["candidates"]
        ],
        "",
        "## GDTL path (memory: fine-tuning footprint at the configured batch size)",
        "",
        path_table([StepRecord(**r) for r in v["path"]]),
        "",
        *throughput_markdown(results.get("stage_throughput")),
        *per_class_markdown(results.get("per_class")),
    ]
    return "\n".join(lines)


def throughput_markdown(stages: dict[str, dict[str, float]] | None) -> list[str]:
    """Where the training time went (results written before it was recorded: nothing)."""
    if not stages:
        return []
    rows = [
        f"| {name} | {s['wall_s']:,.0f} | {s['cpu_s']:,.0f} | {s['images']:,} | "
        f"{s['images_per_s']:,.0f} |"
        for name, s in stages.items()
    ]
    return [
        "## Training time per stage",
        "",
        "Training loops only (the verifier's row sums its pretraining and every GDTL step); "
        "CPU seconds are the process's, over every thread.",
        "",
        "| stage | wall s | CPU s | images | images/s |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def _pct_or_dash(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def per_class_markdown(pc: dict[str, Any] | None) -> list[str]:
    """The per-class table and the largest confusions (results written before they existed
    have none)."""
    if not pc:
        return []
    lines = [
        "## Per class (test split)",
        "",
        "| class | service accuracy | verifier accuracy | verifier fidelity |",
        "|---|---|---|---|",
        *[
            f"| {name} | {_pct_or_dash(acc)} | {_pct_or_dash(pc['verifier_accuracy'][name])} "
            f"| {_pct_or_dash(pc['verifier_fidelity'][name])} |"
            for name, acc in pc["service_accuracy"].items()
        ],
        "",
    ]
    for key, title in (
        ("service_confusions", "Service's largest confusions (true -> predicted)"),
        ("verifier_confusions", "Verifier's largest disagreements (service -> verifier)"),
    ):
        listed = [
            f"{c['true']} -> {c['predicted']}: {c['count']} ({c['share_of_errors']:.0%})"
            for c in pc[key]
        ]
        lines += [f"{title}, share of all: " + ("; ".join(listed) or "none") + ".", ""]
    return lines


def train_command(
    experiment: Path,
    *,
    run_dir: Path | None,
    repository: Path | None,
    results_path: Path | None,
    console: Console,
) -> dict[str, Any]:
    exp = load_experiment(experiment)
    run_dir = run_dir or default_run_dir(exp)
    repository = repository or run_dir / "repository"
    console.print(f"experiment [bold]{exp.name}[/bold] -> {run_dir} (resumes if interrupted)")
    t0 = time.perf_counter()
    with log_to_console(console):
        results = run_experiment(exp, run_dir, repository=repository, show_progress=True).report
    results["machine"] = f"{platform.machine()}, torch {torch.__version__}"
    results["command"] = f"fides train {experiment}"
    results["command_seconds"] = round(time.perf_counter() - t0, 1)
    if results_path is not None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        md = results_path.with_suffix(".md")
        md.write_text(results_markdown(results, results["command"]), encoding="utf-8")
        console.print(f"results: {results_path} and {md}")
    console.print(f"models: {repository}")
    return results


def evaluate_command(
    experiment: Path,
    *,
    out: Path | None,
    run_dir: Path | None,
    repository: Path | None,
    console: Console,
) -> dict[str, Any]:
    from verifier.evaluate import evaluate_experiment, report_markdown

    exp = load_experiment(experiment)
    run_dir = run_dir or default_run_dir(exp)
    repository = repository or run_dir / "repository"
    out = out or Path(f"bench/results/integrity_{exp.name}.json")
    console.print(f"experiment [bold]{exp.name}[/bold] -> {run_dir} (resumes if interrupted)")
    with log_to_console(console):
        report = evaluate_experiment(exp, run_dir, repository=repository, show_progress=True)
    report["command"] = f"fides evaluate {experiment}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(report_markdown(report, report["command"]), encoding="utf-8")
    console.print(f"report: {out} and {md}; detector and re-classifier in {repository}")
    return report

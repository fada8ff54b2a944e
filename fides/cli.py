"""The ``fides`` command line: the application layer over every package.

``serve`` is the gateway's (:mod:`gateway.cli`); ``train`` / ``evaluate`` the training code's
(:mod:`verifier.cli`); ``enclave`` the simulated enclave's (:mod:`enclave_sim.cli`); ``models``
builds the embedded defaults (:mod:`fides.defaults`) and ``bench`` runs :mod:`fides.bench`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from enclave_sim.cli import enclave_app
from gateway.cli import serve

app = typer.Typer(no_args_is_help=True, help="Fides Gateway: verifiable model serving.")
app.command()(serve)
models_app = typer.Typer(no_args_is_help=True, help="Model repository tools.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (results in bench/results/).")
app.add_typer(models_app, name="models")
app.add_typer(bench_app, name="bench")
# `fides enclave`: the enclave's commands, its `run` replaced by the isolated launch below
enclave_cli = typer.Typer(no_args_is_help=True, help=enclave_app.info.help)
enclave_cli.registered_commands = [c for c in enclave_app.registered_commands if c.name != "run"]
app.add_typer(enclave_cli, name="enclave")
incident_app = typer.Typer(
    no_args_is_help=True, help="Incident bundles: the signed evidence behind an integrity alarm."
)
app.add_typer(incident_app, name="incident")
console = Console(stderr=True)


# the options of `enclave_sim.cli run` that EnclaveLaunch sets itself
_LAUNCH_OPTIONS = ("--socket", "--sealed-model", "--platform-dir")


def _without(args: list[str], options: tuple[str, ...]) -> list[str]:
    """``args`` less ``options`` and their values (``--opt VALUE`` and ``--opt=VALUE``)."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg.split("=", 1)[0] not in options:
            kept.append(arg)
    return kept


def isolated_enclave_command(args: list[str]) -> list[str]:
    """The command that runs ``enclave_sim.cli run ARGS`` as the gateway's supervisor starts
    it: :meth:`gateway.enclave_client.EnclaveLaunch.command` (``python -I``, the measured
    ``CODE_ROOT`` first on ``sys.path``). ``ARGS`` are parsed by the enclave's own ``run``
    (its ``--help``, defaults and errors); ``--exit-with-parent`` stays off unless asked for."""
    from gateway.enclave_client import EnclaveLaunch

    group = typer.main.get_command(enclave_app)
    assert isinstance(group, typer.core.TyperGroup)
    with group.commands["run"].make_context("fides enclave run", list(args)) as parsed:
        params = parsed.params  # --help printed, or a usage error raised, here
    extra = _without(list(args), _LAUNCH_OPTIONS)
    if not {"--exit-with-parent", "--no-exit-with-parent"} & set(extra):
        extra.append("--no-exit-with-parent")  # `run`'s default; the supervisor turns it on
    launch = EnclaveLaunch(
        socket_path=params["socket"],
        sealed_model=params["sealed_model"],
        platform_dir=params["platform_dir"],
        extra_args=extra,
    )
    return launch.command()


@enclave_cli.command(
    "run",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,  # --help goes to the enclave's own `run`
)
def enclave_run_cmd(ctx: typer.Context) -> None:
    """Boot the SIMULATED enclave: measure, unseal, attest on request, verify and sign.

    Started isolated, as the gateway starts it (``python -I``, its measured code root first:
    docs/enclave.md): this process is replaced by that one, with the same pid and options."""
    command = isolated_enclave_command(ctx.args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


@models_app.command("build-default")
def build_default_cmd(
    output: Annotated[Path, typer.Option(help="Repository directory to create.")] = Path(
        "model_repository"
    ),
    force: Annotated[bool, typer.Option(help="Rebuild even if already built.")] = False,
    text: Annotated[
        bool, typer.Option(help="Also train the code-completion LM pair (a few minutes).")
    ] = True,
) -> None:
    """Train and export the embedded default models (digits, the code LM pair; no download)."""
    from fides.defaults.digits import build_default

    if (output / ".built").is_file() and not force:
        console.print(f"{output} already built (use --force to rebuild)")
        return
    build_default(output, progress=lambda msg: console.print(f"  [cyan]>[/cyan] {msg}"), text=text)


@app.command()
def train(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML (see experiments/).")],
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints; default runs/<name>.")] = None,
    repository: Annotated[
        Path | None,
        typer.Option(help="Model repository to export into; default <run-dir>/repository."),
    ] = None,
    results: Annotated[
        Path | None, typer.Option(help="Results JSON; default bench/results/verifier_<name>.json.")
    ] = None,
    no_results: Annotated[bool, typer.Option(help="Do not write a results file.")] = False,
) -> None:
    """Train teachers, distil the service student and the GDTL verifier, export them."""
    from verifier.cli import train_command
    from verifier.data import DataError
    from verifier.experiment import ExperimentError, load_experiment
    from verifier.pipeline import StageError
    from verifier.train import CheckpointError

    try:
        name = load_experiment(experiment).name
        results_path = (
            None if no_results else results or Path(f"bench/results/verifier_{name}.json")
        )
        train_command(
            experiment,
            run_dir=run_dir,
            repository=repository,
            results_path=results_path,
            console=console,
        )
    except (ExperimentError, DataError, StageError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command("protect")
def protect_cmd(
    config: Annotated[Path, typer.Argument(help="Protect YAML (see experiments/protect_*.yaml).")],
    repository: Annotated[
        Path,
        typer.Option(
            help="Repository of the gateway that serves (or fronts) the service: the kit and "
            "the integrity block are written here."
        ),
    ],
    run_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints and answers; default runs/<name>.")
    ] = None,
    answers: Annotated[
        Path | None,
        typer.Option(help="Answer store (SQLite); default <run-dir>/answers.sqlite."),
    ] = None,
    max_queries: Annotated[
        int | None,
        typer.Option(help="Inputs paid for at most, over every run with this answer store.", min=1),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Report JSON (+ .md beside it); default <run-dir>/report.json."),
    ] = None,
    retry_unusable: Annotated[
        bool,
        typer.Option(
            help="Ask again for inputs an earlier run got NaN / Inf answers for (recorded "
            "in the answer store and otherwise not paid for twice)."
        ),
    ] = False,
) -> None:
    """Build the integrity kit for a classifier you already have (a repository model or a
    remote endpoint queried as a black box): verifier, detector, re-classifier, report."""
    from fides.protect.cli import CommandFailed, protect_command

    try:
        protect_command(
            config,
            repository=repository,
            run_dir=run_dir,
            answers=answers,
            max_queries=max_queries,
            out=out,
            console=console,
            retry_unusable=retry_unusable,
        )
    except CommandFailed as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(exc.code) from None


@app.command()
def evaluate(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML (see experiments/).")],
    out: Annotated[
        Path | None,
        typer.Option(
            help="Report JSON (+ .md beside it); default bench/results/integrity_<name>.json."
        ),
    ] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Checkpoints; default runs/<name>.")] = None,
    repository: Annotated[
        Path | None,
        typer.Option(help="Where the detector and re-classifier go; default <run-dir>/repository."),
    ] = None,
) -> None:
    """Attacks, GAN-trained detector, re-classifier and calibration; writes the report."""
    from verifier.cli import evaluate_command
    from verifier.data import DataError
    from verifier.experiment import ExperimentError
    from verifier.export import ExportError
    from verifier.pipeline import StageError
    from verifier.train import CheckpointError

    try:
        evaluate_command(
            experiment, out=out, run_dir=run_dir, repository=repository, console=console
        )
    except (ExperimentError, DataError, StageError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except ExportError as exc:
        console.print(
            f"[red]error:[/red] exporting the detector: {exc}. Every figure is in the run "
            "directory's evaluation.json, and a rerun resumes from its trained stages."
        )
        raise typer.Exit(1) from None


@bench_app.command("serving")
def bench_serving(
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "bench/results/serving.json"
    ),
    model_repository: Annotated[Path, typer.Option()] = Path("model_repository"),
    model: Annotated[str, typer.Option(help="Model to benchmark.")] = "digits_heavy",
    duration: Annotated[float, typer.Option(help="Seconds per measurement.")] = 10.0,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            help="A gateway setting for the measured server, KEY=VALUE (infer_fast_path=false "
            "is FIDES_INFER_FAST_PATH=false); repeatable."
        ),
    ] = None,
) -> None:
    """Throughput and latency: raw onnxruntime vs the gateway (JSON, binary and gRPC)."""
    from fides.bench.serving import run_serving_bench
    from gateway.settings import Settings

    settings: dict[str, str] = {}
    for item in setting or []:
        key, sep, value = item.partition("=")
        if not sep or key.lower() not in Settings.model_fields:
            console.print(f"[red]error:[/red] --setting {item!r}: not KEY=VALUE of a setting")
            raise typer.Exit(2)
        settings[key.lower()] = value
    run_serving_bench(
        model_repository, model, output, duration, log=console.print, settings=settings
    )


@bench_app.command("payload")
def bench_payload(
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "bench/results/payload.json"
    ),
) -> None:
    """JSON vs Triton binary tensors for tensors of 1 Ki to 4 Mi elements."""
    from fides.bench.payload import run_payload_bench

    run_payload_bench(output, log=console.print)


@bench_app.command("integrity")
def bench_integrity(
    output: Annotated[
        Path, typer.Option(help="Where to write the enclave boundary's JSON results.")
    ] = Path("bench/results/enclave.json"),
    duration: Annotated[float, typer.Option(help="Seconds per boundary measurement.")] = 2.0,
    part: Annotated[
        str,
        typer.Option(
            help="boundary (the enclave call alone), cost (verified against unverified "
            "answers through the gateway) or all."
        ),
    ] = "all",
    cost_output: Annotated[
        Path, typer.Option(help="Where to write the verified-vs-unverified JSON (+ .md).")
    ] = Path("bench/results/verification_cost_current.json"),
    model_repository: Annotated[Path, typer.Option()] = Path("model_repository"),
    model: Annotated[
        list[str], typer.Option(help="Verified models to measure (each needs its inputs).")
    ] = ["digits"],  # noqa: B006 - typer reads the default
    inputs: Annotated[
        list[str],
        typer.Option(
            help="MODEL=FILE.npz: real inputs for a model ('x_test'; uint8 is scaled to [0, 1]). "
            "The default digits model uses its own test split."
        ),
    ] = [],  # noqa: B006 - typer reads the default
    concurrency: Annotated[list[int], typer.Option(help="Closed-loop clients.")] = [1, 4, 16],  # noqa: B006
    cell_duration: Annotated[float, typer.Option(help="Seconds per cost cell.")] = 8.0,
    repeats: Annotated[int, typer.Option(help="Runs of each cost cell (best kept).")] = 2,
    note: Annotated[str | None, typer.Option(help="A note stored in the results.")] = None,
) -> None:
    """What verification costs: verified against unverified answers through the gateway (cost)
    and the enclave boundary's socket round trip and signing vs the verifier in process."""
    if part not in ("all", "boundary", "cost"):
        raise typer.BadParameter(f"--part must be all, boundary or cost, not {part!r}")
    if part in ("all", "cost"):
        from fides.bench.verified import (
            BenchSetupError,
            digits_inputs,
            npz_inputs,
            run_verified_bench,
        )

        files: dict[str, Path] = {}
        for item in inputs:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise typer.BadParameter(f"--inputs takes MODEL=FILE.npz, not {item!r}")
            files[name] = Path(path)
        try:
            samples = {}
            for name in model:
                if name in files:
                    samples[name] = npz_inputs(files[name])
                elif name == "digits":
                    samples[name] = digits_inputs()
                else:
                    raise BenchSetupError(f"model '{name}' needs --inputs {name}=FILE.npz")
            run_verified_bench(
                model_repository,
                samples,
                cost_output,
                console.print,
                concurrency=tuple(concurrency),
                duration_s=cell_duration,
                repeats=repeats,
                note=note,
            )
        except (BenchSetupError, OSError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    if part in ("all", "boundary"):
        from fides.bench.enclave import run_enclave_bench

        run_enclave_bench(output, log=console.print, duration_s=duration)


@bench_app.command("speculative")
def bench_speculative(
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "bench/results/speculative.json"
    ),
    model_repository: Annotated[Path, typer.Option()] = Path("model_repository"),
    data: Annotated[
        Path, typer.Option(help="Directory with war_and_peace.txt / anna_karenina.txt.")
    ] = Path("../shared/data"),
    gamma: Annotated[int, typer.Option(help="Draft tokens per round.")] = 4,
    prompts: Annotated[int, typer.Option(help="Prompts per measurement.")] = 12,
    new_tokens: Annotated[
        int | None,
        typer.Option(help="Tokens generated per prompt (default 128; 64 with --concurrency)."),
    ] = None,
    distill_steps: Annotated[
        int, typer.Option(help="DistillSpec steps per divergence (0 skips that part).")
    ] = 30,
    pair: Annotated[
        list[str], typer.Option(help="code and/or war_and_peace; others in --output are kept.")
    ] = ["code", "war_and_peace"],  # noqa: B006 - typer reads the default
    concurrency: Annotated[
        list[int] | None,
        typer.Option(
            help="Concurrent clients (repeat it, e.g. 1, 4, 8): run the concurrency axis "
            "instead, the default pair served by a gateway under continuous batching."
        ),
    ] = None,
    variant: Annotated[
        list[str] | None,
        typer.Option(help="With --concurrency: auto, fixed, no_draft, serial (default: all)."),
    ] = None,
    duration: Annotated[float, typer.Option(help="With --concurrency: seconds per cell.")] = 10.0,
    concurrency_output: Annotated[
        Path, typer.Option(help="With --concurrency: where to write the JSON results.")
    ] = Path("bench/results/speculative_concurrency.json"),
) -> None:
    """Speculative decoding: tokens/s vs target-only, HF assisted generation and prediction;
    with --concurrency, aggregate tokens/s and time per token under concurrent clients."""
    if concurrency:
        import json

        from fides.bench.generation_load import VARIANTS, markdown, run_generation_load

        names = variant or list(VARIANTS)
        unknown = sorted(set(names) - set(VARIANTS))
        if unknown or any(c < 1 for c in concurrency):
            console.print(
                f"[red]error:[/red] --variant {unknown} unknown (choose from {list(VARIANTS)})"
                if unknown
                else "[red]error:[/red] --concurrency must be at least 1"
            )
            raise typer.Exit(2)
        result = run_generation_load(
            model_repository,
            console.print,
            concurrency=sorted(set(concurrency)),
            variants=names,
            new_tokens=new_tokens or 64,
            duration_s=duration,
        )
        result["command"] = "fides bench speculative " + " ".join(
            [f"--concurrency {c}" for c in sorted(set(concurrency))]
            + ([f"--variant {v}" for v in names] if variant else [])
            + [f"--duration {duration:g}"]
        )
        concurrency_output.parent.mkdir(parents=True, exist_ok=True)
        concurrency_output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        md = "\n".join(markdown(result)) + "\n"
        concurrency_output.with_suffix(".md").write_text(md, encoding="utf-8")
        console.print(md)
        return
    from fides.bench.speculative import run_speculative_bench

    run_speculative_bench(
        model_repository,
        output,
        console.print,
        data=data,
        gamma=gamma,
        prompts=prompts,
        new_tokens=new_tokens or 128,
        distill_steps=distill_steps,
        pairs=tuple(pair),
    )


@bench_app.command("soak")
def bench_soak(
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "bench/results/soak.json"
    ),
    duration: Annotated[float, typer.Option(help="Seconds of soak after the warm-up.")] = 600.0,
    load: Annotated[float, typer.Option(help="Offered load as a share of capacity.")] = 0.8,
) -> None:
    """Soak: a share of the measured capacity for a long time (ids, statuses, memory growth)."""
    from fides.bench.load import run_soak_bench

    run_soak_bench(output, duration, load, log=console.print)


@bench_app.command("overload")
def bench_overload(
    output: Annotated[Path, typer.Option(help="Where to write the JSON results.")] = Path(
        "bench/results/overload.json"
    ),
    factor: Annotated[float, typer.Option(help="Offered load as a multiple of capacity.")] = 4.0,
    duration: Annotated[float, typer.Option(help="Seconds of overload.")] = 30.0,
) -> None:
    """Overload: 80% of capacity, then FACTOR x capacity, then 80% (shedding and recovery)."""
    from fides.bench.load import run_overload_bench

    run_overload_bench(output, factor, duration, log=console.print)


@bench_app.command("cost-quality")
def bench_cost_quality(
    experiment: Annotated[Path, typer.Argument(help="Experiment YAML (see experiments/).")],
    shares: Annotated[
        str, typer.Option(help="Verifier FLOPs as shares of the service's, comma-separated.")
    ] = "0.1,0.25,0.5,1",
    run_dir: Annotated[
        Path | None, typer.Option(help="The experiment's run directory; default runs/<name>.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Default bench/results/cost_quality_<name>.json.")
    ] = None,
) -> None:
    """What each FLOP of verification buys: a verifier and a detector per FLOPs share."""
    import json

    from verifier.cli import default_run_dir
    from verifier.cost_quality import cost_quality, result_markdown, table_markdown
    from verifier.data import DataError
    from verifier.experiment import ExperimentError, load_experiment
    from verifier.logs import log_to_console
    from verifier.pipeline import StageError
    from verifier.train import CheckpointError

    try:
        share_list = [float(x) for x in shares.split(",") if x.strip()]
    except ValueError:
        console.print(f"[red]error:[/red] --shares {shares!r}: comma-separated numbers, e.g. 0.1,1")
        raise typer.Exit(2) from None
    command = f"fides bench cost-quality {experiment} --shares {shares}"

    def write(result: dict[str, Any]) -> None:  # after every share: a long sweep keeps its rows
        result["command"] = command
        result["complete"] = len(result["rows"]) == len(share_list)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        out.with_suffix(".md").write_text(result_markdown(result), encoding="utf-8")

    try:
        exp = load_experiment(experiment)
        out = output or Path(f"bench/results/cost_quality_{exp.name}.json")
        with log_to_console(console):
            result = cost_quality(
                exp, run_dir or default_run_dir(exp), share_list, show_progress=True, on_row=write
            )
    except (ExperimentError, DataError, StageError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print("\n".join(table_markdown(result)))
    console.print(f"results: {out} and {out.with_suffix('.md')}")


@bench_app.command("report")
def bench_report(
    results: Annotated[Path, typer.Option(help="The benchmarks' JSON files.")] = Path(
        "bench/results"
    ),
    output: Annotated[Path, typer.Option(help="Where the pages go.")] = Path("docs/results"),
) -> None:
    """Render every results JSON to a Markdown page (docs/results/: generated, never edited)."""
    from fides.bench.report import ReportError, render_reports

    try:
        pages = render_reports(results, output)
    except ReportError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"{len(pages)} pages in {output}")


@app.command()
def distillspec(
    model_dir: Annotated[
        Path, typer.Argument(help="Target model directory, e.g. model_repository/code/1.")
    ],
    draft: Annotated[
        Path | None, typer.Option(help="Draft to distil; default <model-dir>/draft-corpus.")
    ] = None,
    corpus: Annotated[
        str, typer.Option(help="'stdlib' or a text file (prompts and fixed data).")
    ] = "stdlib",
    held_out: Annotated[
        Path | None, typer.Option(help="Held-out text file for evaluation (not with stdlib).")
    ] = None,
    divergence: Annotated[
        list[str], typer.Option(help="fkl, rkl, jsd, tvd; repeat for several.")
    ] = ["fkl", "rkl", "jsd", "tvd"],  # noqa: B006 - typer reads the default
    steps: Annotated[int, typer.Option(help="Training steps per divergence.")] = 40,
    draft_share: Annotated[float, typer.Option(help="Share of on-policy draft samples.")] = 0.5,
    target_share: Annotated[float, typer.Option(help="Share of target samples.")] = 0.25,
    save: Annotated[
        Path | None, typer.Option(help="Save the draft distilled with the first divergence.")
    ] = None,
    output: Annotated[Path, typer.Option(help="Results JSON.")] = Path(
        "bench/results/distillspec.json"
    ),
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 1,
) -> None:
    """DistillSpec: distil a draft from a target on on-policy data; acceptance before/after."""
    import json

    import torch

    torch.set_num_threads(threads)

    from verifier.distillspec import DIVERGENCES

    bad = [d for d in divergence if d not in DIVERGENCES]
    if bad:
        console.print(f"[red]error:[/red] unknown divergence {bad}; one of {list(DIVERGENCES)}")
        raise typer.Exit(2)
    from fides.defaults.text import TextRecipe, encode_corpus, stdlib_sources
    from gateway.generation.runtime import load_causal_lm, load_tokenizer
    from verifier.distillspec import DistillSpecConfig, distill

    tok = load_tokenizer(model_dir)
    if corpus == "stdlib":
        train_texts, held_texts = stdlib_sources(TextRecipe())
    else:
        if held_out is None:
            console.print("[red]error:[/red] --held-out is needed with a corpus file")
            raise typer.Exit(2)
        train_texts = [Path(corpus).read_text(encoding="utf-8", errors="replace")]
        held_texts = [held_out.read_text(encoding="utf-8", errors="replace")]
    train_ids, held_ids = encode_corpus(tok, train_texts), encode_corpus(tok, held_texts)
    target = load_causal_lm(model_dir).model
    results = {}
    for i, name in enumerate(divergence):
        student = load_causal_lm(draft or model_dir / "draft-corpus").model
        cfg = DistillSpecConfig(
            divergence=name,  # type: ignore[arg-type]
            steps=steps,
            draft_share=draft_share,
            target_share=target_share,
        )
        r = distill(target, student, train_ids, held_ids, cfg, desc=name)
        results[name] = {"before": r.before, "after": r.after, "seconds": r.seconds}
        console.print(
            f"{name}: acceptance greedy {r.before['greedy']:.3f} -> {r.after['greedy']:.3f}, "
            f"T=1 {r.before['t1']:.3f} -> {r.after['t1']:.3f} ({r.seconds:.0f}s)"
        )
        if i == 0 and save is not None:
            student.save_pretrained(save)
            tok.save_pretrained(save)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def main() -> None:
    app(prog_name="fides")


@incident_app.command("export")
def incident_export_cmd(
    model: Annotated[str, typer.Argument(help="The verified model whose alarm fired.")],
    incident_id: Annotated[
        str | None, typer.Option("--id", help="The incident (default: the newest).")
    ] = None,
    url: Annotated[str, typer.Option(help="The gateway.")] = "http://127.0.0.1:8000",
    out: Annotated[
        Path | None, typer.Option(help="Where the bundle goes; default <id>.incident.json.")
    ] = None,
    list_only: Annotated[
        bool, typer.Option("--list", help="List the model's incidents, export nothing.")
    ] = False,
) -> None:
    """Fetch an incident bundle from the gateway (admin key in FIDES_ADMIN_KEY)."""
    from fides.incident import IncidentCommandError, export_incident

    try:
        export_incident(model, incident_id, url=url, out=out, list_only=list_only, console=console)
    except IncidentCommandError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@incident_app.command("verify")
def incident_verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="The bundle (fides incident export).")],
    root: Annotated[Path, typer.Option(help="The pinned enclave root certificate (PEM).")],
    measurement: Annotated[
        list[str] | None,
        typer.Option(help="An expected enclave measurement (hex); repeat for several."),
    ] = None,
    repository: Annotated[
        Path | None,
        typer.Option(
            help="The provider's published repository: its detector recomputes the scores, its "
            "card's calibration is required, its verifier gives the measurement."
        ),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="The model in --repository (default: the bundle's).")
    ] = None,
    allow_simulated: Annotated[
        bool, typer.Option(help="Accept the SIMULATED enclave (development only).")
    ] = False,
    max_alpha: Annotated[
        float,
        typer.Option(
            help="The loosest false-alarm level accepted; a bundle computed at a looser one "
            "is refused (the gateway's default integrity.alarm_alpha).",
            min=1e-300,
            max=0.5,
        ),
    ] = 1e-5,
    at: Annotated[
        str | None,
        typer.Option(
            help="The verification time (ISO 8601, e.g. 2026-12-07T10:00:00Z, or seconds since "
            "1970): every attestation's certificates must be valid then. Default now; name a "
            "time you trust the chain at to re-check a bundle older than its certificates."
        ),
    ] = None,
) -> None:
    """Check a bundle offline: attestations, signatures, KL and scores recomputed, and the
    statistic recomputed to the alarm threshold. Exit 1 naming the broken part."""
    from fides.incident import IncidentCommandError, verify_command

    try:
        ok = verify_command(
            bundle,
            root=root,
            measurements=measurement or [],
            repository=repository,
            model=model,
            allow_simulated=allow_simulated,
            console=console,
            max_alpha=max_alpha,
            at=at,
        )
    except IncidentCommandError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    main()

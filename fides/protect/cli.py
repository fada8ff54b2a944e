"""``fides protect CONFIG``: the command's wiring (logging, signals, exit codes, report files).

Exit codes: 0 done; 2 the config, the data or the answer store is unusable; 3 the query
budget ran out (rerun with a larger --max-queries: nothing recorded is asked again); 4 the
service cannot be opened, does not answer or answers something unusable; 130 interrupted
(Ctrl-C or SIGTERM; every answer paid for is recorded).
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console

from fides.protect.config import ProtectConfigError, load_protect_config
from fides.protect.query import AnswerError, BudgetExhausted, QueryFailed
from fides.protect.run import PublishError, protect, report_markdown
from fides.protect.service import ServiceError
from fides.protect.store import StoreError
from verifier.data import DataError
from verifier.export import ExportError
from verifier.gdtl import NoVerifierFits
from verifier.logs import log_to_console
from verifier.train import CheckpointError

__all__ = ["EXIT_BUDGET", "EXIT_SERVICE", "EXIT_USAGE", "protect_command"]

EXIT_USAGE, EXIT_BUDGET, EXIT_SERVICE, EXIT_INTERRUPTED = 2, 3, 4, 130


class CommandFailed(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler stopping the job) stops the run as Ctrl-C does: in-flight
    answers are recorded first."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def protect_command(
    config: Path,
    *,
    repository: Path,
    run_dir: Path | None,
    answers: Path | None,
    max_queries: int | None,
    out: Path | None,
    console: Console,
    retry_unusable: bool = False,
) -> dict[str, Any]:
    """Run the kit; raises :class:`CommandFailed` with an exit code and a message."""
    try:
        cfg = load_protect_config(config)
    except ProtectConfigError as exc:
        raise CommandFailed(EXIT_USAGE, str(exc)) from None
    run_dir = run_dir or Path("runs") / cfg.name
    out = out or run_dir / "report.json"
    console.print(
        f"protect [bold]{cfg.name}[/bold] -> {repository} "
        f"(answers recorded in {answers or run_dir / 'answers.sqlite'})"
    )
    try:
        with _sigterm_interrupts(), log_to_console(console, ("verifier", "fides")):
            result = protect(
                cfg,
                repository=repository,
                run_dir=run_dir,
                answers=answers,
                max_queries=max_queries,
                show_progress=True,
                retry_unusable=retry_unusable,
            )
    except KeyboardInterrupt:
        raise CommandFailed(
            EXIT_INTERRUPTED,
            "interrupted: every answer paid for is recorded; rerun the same command to go on",
        ) from None
    except BudgetExhausted as exc:
        raise CommandFailed(EXIT_BUDGET, str(exc)) from None
    except (ServiceError, QueryFailed, AnswerError) as exc:
        raise CommandFailed(EXIT_SERVICE, str(exc)) from None
    except (
        DataError,
        StoreError,
        NoVerifierFits,
        CheckpointError,
        ExportError,
        PublishError,
        ProtectConfigError,
    ) as exc:
        raise CommandFailed(EXIT_USAGE, str(exc)) from None
    report = result.report
    report["command"] = f"fides protect {config} --repository {repository}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = out.with_suffix(".md")
    md.write_text(report_markdown(report, report["command"]), encoding="utf-8")
    q = report["protect"]["queries"]
    console.print(
        f"verifier fidelity {report['protect']['verifier']['test_fidelity_top1']:.2%}, mean "
        f"detection {report['mean_detection_accuracy']:.2%} at clean FPR "
        f"{report['clean_fpr']:.2%}; "
        f"{q['paid_for_in_all']:,} queries paid for. Report: {out} and {md}; kit in {repository}"
    )
    return report

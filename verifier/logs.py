"""How the training code reports progress: ``logging`` records, and rich progress bars only when
stderr is a terminal.

Every module logs to ``logging.getLogger(__name__)``: one line per finished stage, and one line
per epoch of every training stage (:func:`log_epoch`: the stage, epoch i/n, the loss and the
seconds so far), so a run whose output goes to a file or a CI log still shows where it is.
Nothing here configures the root logger; a command attaches a handler for its own duration
(:func:`log_to_console`), a caller with a progress callback forwards the records to it
(:func:`forward_logs`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import Progress

__all__ = ["forward_logs", "log_epoch", "log_to_console", "progress_bar"]

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextmanager
def progress_bar(enabled: bool) -> Iterator[Progress | None]:
    """A transient rich progress bar on stderr while inside, when ``enabled`` and stderr is a
    terminal; ``None`` otherwise (output going to a file or CI, where the per-epoch log lines
    are the progress)."""
    console = Console(stderr=True)
    if not enabled or not console.is_terminal:
        yield None
        return
    with Progress(console=console, transient=True) as bar:
        yield bar


def log_epoch(
    logger: logging.Logger,
    stage: str,
    epoch: int,
    epochs: int,
    detail: str,
    seconds: float,
    bar: Progress | None,
) -> None:
    """``<stage> epoch <i>/<n>: <detail> (<seconds>s)``; at DEBUG while a bar shows the same
    progress, at INFO otherwise."""
    level = logging.DEBUG if bar is not None else logging.INFO
    logger.log(level, "%s epoch %d/%d: %s (%.1fs)", stage, epoch, epochs, detail, seconds)


class _CallbackHandler(logging.Handler):
    """Hands each record's message, after a prefix (and ``warning: `` or ``error: `` from
    those levels up), to a callback."""

    def __init__(self, emit: Callable[[str], None], prefix: str, level: int) -> None:
        super().__init__(level)
        self._emit = emit
        self._prefix = prefix

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
            self._emit(self._prefix + level + record.getMessage())
        except Exception:
            self.handleError(record)


@contextmanager
def _attached(name: str, handler: logging.Handler, level: int) -> Iterator[None]:
    """``handler`` on the logger ``name``, whose level is lowered to ``level`` while inside."""
    logger = logging.getLogger(name)
    before = logger.level
    if before == logging.NOTSET or before > level:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(before)


@contextmanager
def forward_logs(
    emit: Callable[[str], None], prefixes: Mapping[str, str], level: int = logging.INFO
) -> Iterator[None]:
    """While inside, the records (``level`` and above) of each logger named in ``prefixes``
    and of its children go to ``emit``, each message after its logger's prefix."""
    with _attach_all(
        {name: _CallbackHandler(emit, prefix, level) for name, prefix in prefixes.items()}, level
    ):
        yield


@contextmanager
def log_to_console(
    console: Console, names: tuple[str, ...] = ("verifier",), level: int = logging.INFO
) -> Iterator[None]:
    """While inside, the records of the loggers ``names`` are printed on ``console``: through
    rich (above any progress bar) on a terminal, as plain timestamped lines otherwise."""
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(console.file)
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    handler.setLevel(level)
    with _attach_all(dict.fromkeys(names, handler), level):
        yield


@contextmanager
def _attach_all(handlers: Mapping[str, logging.Handler], level: int) -> Iterator[None]:
    with ExitStack() as stack:
        for name, handler in handlers.items():
            stack.enter_context(_attached(name, handler, level))
        yield

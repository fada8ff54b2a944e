"""``python -m gateway.cli serve``: the gateway's own entry point (``fides serve`` is the same
command, mounted by :mod:`fides.cli`)."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

if TYPE_CHECKING:
    from fastapi import FastAPI

    from gateway.settings import Settings

console = Console(stderr=True, soft_wrap=True)  # an error stays one line


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (FIDES_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (FIDES_PORT).")] = None,
    # text, not a Path: typer makes "" the working directory (Path("") is Path("."));
    # the settings refuse an empty one by the flag's name
    model_repository: Annotated[
        str | None,
        typer.Option(metavar="PATH", help="Model repository (FIDES_MODEL_REPOSITORY)."),
    ] = None,
) -> None:
    """Start the gateway (settings from FIDES_* environment variables)."""
    import logging
    import os

    from gateway.logs import configure_logging
    from gateway.settings import SettingsError, load_settings, unknown_variables

    # the settings are checked before the serving stack is imported (seconds): a bad value
    # is a one-line error naming the variable, exit status 2, at once
    overrides: dict[str, object] = {}
    flags: dict[str, str] = {}
    for field, flag, value in (
        ("host", "--host", host),
        ("port", "--port", port),
        ("model_repository", "--model-repository", model_repository),
    ):
        if value is not None:
            overrides[field] = value
            flags[field] = flag
    unknown = unknown_variables(os.environ)
    try:
        settings = load_settings(overrides, flags=flags)
    except SettingsError as exc:
        for problem in str(exc).splitlines():
            console.print(f"[red]error:[/red] {problem}", highlight=False)
        if unknown:
            console.print(
                f"[yellow]warning:[/yellow] unknown FIDES_* variables: {', '.join(unknown)}",
                highlight=False,
            )
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_json)
    if unknown:
        logging.getLogger("gateway.settings").warning(
            "ignoring unknown FIDES_* variables: %s", ", ".join(unknown)
        )
    try:
        settings.check_secure()
        settings.check_key_lengths()
    except ValueError as exc:
        for problem in str(exc).splitlines():
            console.print(f"[red]error:[/red] {problem}", highlight=False)
        raise typer.Exit(2) from None
    repo = settings.model_repository
    if not repo.is_dir():
        why = "is not a directory" if repo.exists() else "does not exist"
        console.print(
            f"[red]error:[/red] model repository {repo} (FIDES_MODEL_REPOSITORY) {why}; "
            "build one with `fides models build-default`",
            highlight=False,
        )
        raise typer.Exit(2)
    _check_alarm_state_dir(settings)

    # the ports before the models: one that is taken is said at once, by name, not after
    # every model loaded and every enclave started (uvicorn binds again after the start-up)
    ports = [("FIDES_PORT", settings.port)]
    if settings.grpc_enabled:
        ports.append(("FIDES_GRPC_PORT", settings.grpc_port))
    for variable, number in ports:
        if number == 0:  # any free one
            continue
        try:
            _bind(settings.host, number).close()
        except OSError as exc:
            console.print(
                f"[red]error:[/red] cannot bind {settings.host}:{number} "
                f"(FIDES_HOST, {variable}): {exc.strerror or exc}",
                highlight=False,
            )
            raise typer.Exit(2) from None

    from gateway.app import create_app
    from gateway.http_protocol import limited_http_protocol

    url_host = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{url_host}:{settings.port}"
    grpc = f", gRPC on {settings.host}:{settings.grpc_port}" if settings.grpc_enabled else ""
    console.print(f"Fides Gateway on [bold]{url}[/bold]{grpc}  (Ctrl-C to stop)")
    auth = "" if not settings.api_keys else ' -H "Authorization: Bearer $KEY"'
    console.print(
        "  try: curl -s" + auth + f" {url}/v2/models/digits\n"
        "       curl -s" + auth + f" -X POST {url}/v2/models/digits/infer "
        "-H 'Content-Type: application/json' -d @examples/digit.json"
    )
    # Inference threads release the GIL inside onnxruntime/torch but need it back to hand
    # results over; with the default 5 ms switch interval a busy event loop makes them wait
    # (a batch of 16 on digits_heavy: 2.9 ms alone, 12.4 ms beside a busy Python thread at
    # 5 ms, 4.1 ms at 1 ms).
    sys.setswitchinterval(0.001)
    _run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        # whole seconds for uvicorn: rounded up, so 0.5 s is not cut to none
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        timeout_keep_alive=15,
        # httptools with a 64 KiB cap on the request head and a deadline for it, and
        # a deadline for the client to read its response (slow readers)
        http=limited_http_protocol(
            settings.header_timeout_s, send_timeout_s=settings.send_timeout_s
        ),
        limit_concurrency=2048,
    )


def _check_alarm_state_dir(settings: Settings) -> None:
    """Where the repository holds a verified model, its sequential alarm state must be
    writable: kept only in memory it is lost at the next restart (latched alarms too), while
    the gateway answered ready. Checked before anything loads, as the ports are."""
    from gateway.integrity.alarm_state import check_writable

    verified = _verified_models(settings.model_repository)
    if not verified:
        return  # nothing to keep: a gateway without verified models needs no such directory
    directory = settings.alarm_state_dir
    try:
        check_writable(directory)
    except OSError as exc:
        where = (
            "FIDES_INTEGRITY_STATE_DIR"
            if settings.integrity_state_dir is not None
            else "FIDES_INTEGRITY_STATE_DIR, by default <FIDES_ENCLAVE_RUNTIME_DIR>/alarm"
        )
        console.print(
            f"[red]error:[/red] integrity alarm state directory {directory} ({where}) is not "
            f"writable: {exc.strerror or exc}; the sequential alarms of {', '.join(verified)} "
            "are kept there across restarts",
            highlight=False,
        )
        raise typer.Exit(2) from None


def _verified_models(repository: Path) -> list[str]:
    """The models whose config has an integrity block (a config that cannot be read is left
    to the load, which says why)."""
    from gateway.model_config import ConfigError, load_model_config

    names = []
    try:
        configs = sorted(p / "config.yaml" for p in repository.iterdir())
    except OSError:
        return []
    for config in configs:
        try:
            if load_model_config(config, expected_name=config.parent.name).integrity:
                names.append(config.parent.name)
        except (ConfigError, OSError):
            continue
    return names


def _run(app: FastAPI, **options: Any) -> None:
    """``uvicorn.run(app, **options)``, but a SIGTERM or SIGINT during the start-up stops it
    at once. uvicorn only notes a signal until the app's lifespan start-up has finished (every
    model loaded, every enclave up and attested), then binds and shuts down; here the server
    runs the app's lifespan itself (uvicorn's ``lifespan="off"``) and a signal cancels its
    start-up: the model being loaded finishes and is unloaded, the others are never loaded,
    an enclave being started is stopped. The exit is then as after a start: SIGTERM re-raised
    (killed by it, or status 0 as PID 1), status 0 on SIGINT."""
    import asyncio
    import contextlib
    import logging

    import uvicorn

    log = logging.getLogger("uvicorn.error")  # where uvicorn says the start-up's steps

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.lifespan_stack = contextlib.AsyncExitStack()
            self.starting: asyncio.Task[object] | None = None
            self.loop: asyncio.AbstractEventLoop | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            starting, loop = self.starting, self.loop
            if starting is not None and loop is not None and not starting.done():
                loop.call_soon_threadsafe(starting.cancel)  # a signal handler: not cancel()

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()
            if self.should_exit:  # signalled before the start-up began
                return
            log.info("Waiting for application startup.")
            self.starting = asyncio.ensure_future(
                self.lifespan_stack.enter_async_context(app.router.lifespan_context(app))
            )
            try:
                await self.starting
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self.should_exit or (task is not None and task.cancelling()):
                    raise  # not a signal's doing
                log.warning(
                    "start-up stopped by a signal: the models loaded so far were unloaded "
                    "and their enclaves stopped; not serving"
                )
                return
            except Exception:
                log.exception("Application startup failed. Exiting.")
                sys.exit(3)  # as uvicorn: a failed start-up
            finally:
                self.starting = None
            log.info("Application startup complete.")
            if self.should_exit:  # signalled as it ended: stop as after a start
                await self.lifespan_stack.aclose()
                return
            try:
                await super().startup(sockets)
            except BaseException:  # e.g. the port cannot be bound: stop what started
                await self.lifespan_stack.aclose()
                raise

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)  # drains the connections
            if not self.force_exit:  # a second Ctrl-C skips the app's shutdown, as uvicorn
                await self.lifespan_stack.aclose()

    server = Server(uvicorn.Config(app, lifespan="off", **options))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: stopped, as uvicorn.run
        server.run()
    if not server.started and not server.should_exit:
        sys.exit(3)  # as uvicorn.run: the start-up failed


def _bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to the host's first address, set up as asyncio sets up its own
    (address reuse; IPv6 only on an IPv6 address): whether the server will be able to bind."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


app = typer.Typer(no_args_is_help=True, help="The Fides Gateway server.")
app.command()(serve)


@app.callback()
def _group() -> None:
    """The Fides Gateway server (``fides serve`` is the same command)."""


if __name__ == "__main__":
    app()

"""``python -m gateway.cli serve``: the gateway's own entry point (``fides serve`` is the same
command, mounted by :mod:`fides.cli`)."""

from __future__ import annotations

import math
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True, soft_wrap=True)  # an error stays one line


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (FIDES_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (FIDES_PORT).")] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository (FIDES_MODEL_REPOSITORY).")
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
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
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

    import uvicorn

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
    uvicorn.run(
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

"""``python -m gateway.cli serve``: the gateway's own entry point (``fides serve`` is the same
command, mounted by :mod:`fides.cli`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (FIDES_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (FIDES_PORT).")] = None,
    model_repository: Annotated[
        Path | None, typer.Option(help="Model repository (FIDES_MODEL_REPOSITORY).")
    ] = None,
) -> None:
    """Start the gateway (settings from FIDES_* environment variables)."""
    import uvicorn

    from gateway.app import create_app
    from gateway.http_protocol import limited_http_protocol
    from gateway.logs import configure_logging
    from gateway.settings import Settings

    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if model_repository is not None:
        overrides["model_repository"] = model_repository
    settings = Settings(**overrides)  # type: ignore[arg-type]
    configure_logging(settings.log_level, settings.log_json)
    try:
        settings.check_secure()
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if not settings.model_repository.is_dir():
        console.print(
            f"[red]error:[/red] model repository {settings.model_repository} "
            "does not exist; build one with `fides models build-default`"
        )
        raise typer.Exit(2)
    url = f"http://{settings.host}:{settings.port}"
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
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        timeout_keep_alive=15,
        # httptools with a 64 KiB cap on the request head and a deadline for it, and
        # a deadline for the client to read its response (slow readers)
        http=limited_http_protocol(
            settings.header_timeout_s, send_timeout_s=settings.send_timeout_s
        ),
        limit_concurrency=2048,
    )


app = typer.Typer(no_args_is_help=True, help="The Fides Gateway server.")
app.command()(serve)


@app.callback()
def _group() -> None:
    """The Fides Gateway server (``fides serve`` is the same command)."""


if __name__ == "__main__":
    app()

"""``fides enclave {run, seal, measure, init-ca}``: the simulated enclave's command line.

Mounted by ``fides.cli`` as ``fides enclave``; also runnable alone as
``python -m enclave_sim.cli``. ``run`` is started as this module's ``__main__`` by an isolated
interpreter (``gateway.enclave_client.EnclaveLaunch``: ``python -I``, the measured code root
first), from the gateway's supervisor, ``fides enclave run`` and ``fides bench integrity`` alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import BootError, EnclaveFailure
from fides_core.layout import MODEL_NAME_RULE, is_model_name

enclave_app = typer.Typer(
    no_args_is_help=True,
    help="The SIMULATED trusted execution module (no hardware protection).",
)
DEFAULT_PLATFORM_DIR = Path(".fides/enclave-platform")

PlatformDir = Annotated[
    Path,
    typer.Option(
        "--platform-dir",
        envvar="FIDES_ENCLAVE_PLATFORM_DIR",
        help="Simulated platform: root CA, platform CA, platform secret, rollback counter.",
    ),
]


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


@enclave_app.command("init-ca")
def init_ca_cmd(
    platform_dir: PlatformDir = DEFAULT_PLATFORM_DIR,
    force: Annotated[bool, typer.Option(help="Replace an existing platform.")] = False,
) -> None:
    """Create the simulated root CA (clients pin root.pem), platform CA and platform secret."""
    from enclave_sim.pki import ROOT_CERT, init_ca

    try:
        paths = init_ca(platform_dir, force=force)
    except EnclaveFailure as exc:
        raise _fail(exc) from None
    for p in paths:
        typer.echo(f"wrote {p}")
    typer.echo(f"clients pin {platform_dir / ROOT_CERT} (SIMULATED root, not a hardware vendor's)")


@enclave_app.command("measure")
def measure_cmd(
    model: Annotated[
        Path | None,
        typer.Option(
            help="The verifier ONNX model (default: the one --config's model names).", exists=True
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="A verifier config YAML, or a served model's config.yaml in a model repository "
            "(its integrity.enclave block: what the gateway measures and clients pin)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print all PCRs as JSON.")] = False,
) -> None:
    """Print the expected measurement (PCR0, SHA-384) of an enclave serving the verifier, offline.

    For a model repository, pass the served model's config (``--config
    model_repository/digits/config.yaml``), or the verifier's file inside the repository: the
    measurement then covers the verifier with the settings of the integrity block that names it,
    exactly as the gateway computes it, and is what a client pins."""
    from fides_core.measurement import measure

    try:
        model, vcfg, pinned = _what_to_measure(model, config)
        m = measure(model.read_bytes(), vcfg)
    except EnclaveFailure as exc:
        raise _fail(exc) from None
    if pinned is not None and pinned != m.pcr0.hex():
        typer.echo(
            f"warning: the config pins measurement {pinned[:16]}..., not the measured "
            f"{m.pcr0.hex()[:16]}...: the gateway pins (and clients must pin) the config's",
            err=True,
        )
    if as_json:
        typer.echo(json.dumps({f"pcr{i}": v.hex() for i, v in m.pcrs().items()}, indent=2))
    else:
        typer.echo(pinned or m.hex)


def _what_to_measure(
    model: Path | None, config: Path | None
) -> tuple[Path, EnclaveModelConfig, str | None]:
    """(verifier file, verifier config, measurement pinned in the model config or None)."""
    from fides_core.enclave_config import from_enclave_block, served_verifiers
    from fides_core.layout import latest_version_file

    raw = _read_yaml(config) if config is not None else None
    if isinstance(raw, dict) and ("integrity" in raw or "platform" in raw):  # a served model's
        integrity = raw.get("integrity")
        block = integrity.get("enclave") if isinstance(integrity, dict) else None
        if not isinstance(block, dict) or not isinstance(block.get("verifier_model"), str):
            raise BootError(f"{config}: a model config without an integrity.enclave block")
        assert config is not None
        if model is None:
            try:
                model = latest_version_file(config.parent.parent / block["verifier_model"])
            except FileNotFoundError as exc:
                raise BootError(str(exc)) from None
        return model, from_enclave_block(block), block.get("measurement")
    if model is None:
        raise BootError("give --model (the verifier ONNX) or --config (a served model's config)")
    if config is not None:
        return model, EnclaveModelConfig.from_dict(raw), None
    # a verifier inside a model repository (<repo>/<name>/<version>/model.onnx): measured with
    # the integrity block that names it, as the gateway does
    entry = model.resolve().parent.parent
    named = served_verifiers(entry.parent).get(entry.name)
    if named is None:
        return model, EnclaveModelConfig(), None
    typer.echo(
        f"note: measured with the integrity.enclave block of '{named.model}' "
        f"({entry.parent / named.model / 'config.yaml'}), as the gateway does",
        err=True,
    )
    return model, from_enclave_block(named.block), named.block.get("measurement")


def _read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BootError(f"cannot read {path}: {exc}") from None


def _model_name(name: str | None) -> str | None:
    """A served model's name, by the gateway's rule (a counter named otherwise is one no
    gateway model ever boots against)."""
    if name is not None and not is_model_name(name):
        shown = repr(name) if len(name) <= 40 else f"{name[:20]!r}... ({len(name)} characters)"
        raise typer.BadParameter(
            f"{shown} is not a model name the gateway serves: {MODEL_NAME_RULE}"
        )
    return name


@enclave_app.command("seal")
def seal_cmd(
    model: Annotated[Path, typer.Option(help="The verifier ONNX model.", exists=True)],
    output: Annotated[Path, typer.Option(help="Sealed file to write.")],
    config: Annotated[Path | None, typer.Option(help="Verifier config YAML.")] = None,
    platform_dir: PlatformDir = DEFAULT_PLATFORM_DIR,
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name",
            callback=_model_name,
            help="The served model the file is for: it is checked against that model's "
            "rollback counter (platform_dir/model_counters/NAME), as the gateway seals. "
            "Without it: the platform-wide counter (platform_dir/model_counter), which every "
            "file sealed without a name shares.",
        ),
    ] = None,
    version: Annotated[
        int | None,
        typer.Option(help="Model version (default: the counter the file is checked against + 1)."),
    ] = None,
) -> None:
    """Encrypt the verifier for this enclave build's measurement (AES-256-GCM, HKDF key)."""
    from enclave_sim.pki import write_secret_file
    from enclave_sim.sealing import seal

    try:
        data, m, v = seal(
            model.read_bytes(),
            EnclaveModelConfig.load(config),
            platform_dir,
            version=version,
            model_id=model_name,
        )
    except EnclaveFailure as exc:
        raise _fail(exc) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    write_secret_file(output, data)
    counter = f"model {model_name!r}'s counter" if model_name else "the platform-wide counter"
    typer.echo(f"sealed {model} as version {v} ({counter}) for measurement {m.hex} -> {output}")


@enclave_app.command("run")
def run_cmd(
    socket: Annotated[Path, typer.Option(help="Unix socket to serve on (created 0600).")],
    sealed_model: Annotated[Path, typer.Option(help="Sealed verifier from `seal`.")],
    platform_dir: PlatformDir = DEFAULT_PLATFORM_DIR,
    memory_budget_mb: Annotated[
        float, typer.Option(help="Enclave memory budget (usable SGX EPC on older parts: ~96).")
    ] = 96.0,
    paging: Annotated[
        bool, typer.Option(help="Accept a model over the budget and charge a paging penalty.")
    ] = False,
    paging_penalty_us_per_mib: Annotated[
        float, typer.Option(help="Per-call penalty for each MiB over the budget (with --paging).")
    ] = 1000.0,
    transition_us: Annotated[
        float, typer.Option(help="Simulated enclave transition cost per call (busy wait).")
    ] = 0.0,
    max_frame_bytes: Annotated[int, typer.Option(help="Largest accepted frame.")] = 16 * 2**20,
    log_level: Annotated[str, typer.Option(help="Python logging level.")] = "INFO",
    exit_with_parent: Annotated[
        bool, typer.Option(help="Stop when the parent process (the gateway) goes away.")
    ] = False,
) -> None:
    """Boot the SIMULATED enclave: measure, unseal, attest on request, verify and sign."""
    from enclave_sim.core import EnclaveCore
    from enclave_sim.resources import ResourceSettings
    from enclave_sim.server import serve
    from fides_core.measurement import check_loaded_code

    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s enclave_sim[%(process)d] %(message)s",
    )
    try:
        # before measuring: the code that runs must be the code measured (CodeNotMeasured)
        check_loaded_code()
        resources = ResourceSettings(
            memory_budget_bytes=int(memory_budget_mb * 1e6),
            paging=paging,
            paging_penalty_us_per_mib=paging_penalty_us_per_mib,
            transition_us=transition_us,
        )
        core = EnclaveCore.boot(sealed_model, platform_dir, resources=resources)
        asyncio.run(
            serve(core, socket, max_frame_bytes=max_frame_bytes, exit_with_parent=exit_with_parent)
        )
    except (EnclaveFailure, ValueError) as exc:
        logging.getLogger("enclave_sim").error("enclave refused to start: %s", exc)
        raise _fail(exc) from None


if __name__ == "__main__":
    enclave_app()

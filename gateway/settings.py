"""Gateway settings, read from the environment with the ``FIDES_`` prefix."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split_keys(value: object) -> object:
    if isinstance(value, str):
        return [k.strip() for k in value.split(",") if k.strip()]
    return value


class Settings(BaseSettings):
    """Everything the gateway process needs to start; one field per knob."""

    model_config = SettingsConfigDict(env_prefix="FIDES_", extra="ignore")

    model_repository: Path = Field(
        Path("model_repository"), description="Directory holding <model>/config.yaml + versions."
    )
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    infer_fast_path: bool = Field(
        True,
        description="Answer POST /v2/models/{name}[/versions/{v}]/infer without FastAPI's "
        "routing and dependency solving (same handler, keys, errors and metrics; "
        "gateway/api/v2/fast_path.py).",
    )
    grpc_enabled: bool = Field(
        True, description="Serve the Open Inference Protocol over gRPC too, on grpc_port."
    )
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="gRPC port, on the same host (0 picks a free one)."
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys accepted on /v2 and /v1 (Bearer or X-API-Key).",
    )
    api_key_file: Path | None = Field(
        None, description="File with one API key per line (e.g. a mounted Kubernetes Secret)."
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated keys for admin endpoints (model load/unload).",
    )
    admin_api_key_file: Path | None = Field(None, description="File with one admin key per line.")
    dev_mode: bool = Field(
        False, description="Allow running without API keys (loopback only, logs a warning)."
    )
    metrics_require_auth: bool = Field(
        False, description="Require an API key on /metrics (Prometheus then needs one)."
    )
    max_body_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest accepted request body (413 above it)."
    )
    response_compression_min_bytes: int = Field(
        1024,
        ge=0,
        description="Responses of at least this many bytes are gzip-compressed for clients "
        "whose Accept-Encoding allows it (0: never compress).",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="A connection's request headers must be complete this long after its "
        "first byte (or after it opened): 408 and closed otherwise (slow-header clients).",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request's body must be complete this long after its headers: 408 "
        "otherwise (slow-body clients).",
    )
    send_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A response the client does not read for this long (its receive buffer "
        "full) is abandoned and the connection closed (slow readers cannot hold the server's "
        "memory).",
    )
    max_tensor_elements: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest element count of one input tensor."
    )
    default_timeout_s: float = Field(
        30.0, gt=0, description="Request timeout when neither request nor model config sets one."
    )
    shutdown_grace_s: float = Field(
        20.0, ge=0, description="How long shutdown waits for in-flight requests to finish."
    )
    enclave_platform_dir: Path = Field(
        Path(".fides/enclave-platform"),
        description="The (simulated) enclave platform: root CA, platform CA and secret.",
    )
    enclave_runtime_dir: Path = Field(
        Path(".fides/enclave"),
        description="Enclave sockets, sealed verifiers and logs (keep the path short: socket "
        "paths are limited to 107 bytes).",
    )
    integrity_state_dir: Path | None = Field(
        None,
        description="Where each verified model's sequential alarm state is kept across "
        "restarts (<model>@<host name>.alarm.npz); default <enclave_runtime_dir>/alarm.",
    )
    integrity_incidents_max_mb: float = Field(
        64.0,
        gt=0,
        description="The most this gateway's incident bundles of one verified model take in "
        "<integrity_state_dir>/incidents, in MiB (a full bundle is a few MB): the oldest of "
        "its own are deleted to make room for a new one; one over the bound alone is still "
        "kept. The alarm state's volume must hold this per model, plus the alarm state.",
    )
    enclave_external: bool = Field(
        False,
        description="Attach to enclaves started elsewhere (sidecars) at "
        "<enclave_runtime_dir>/<model>.sock instead of spawning and sealing them.",
    )
    enclave_init_platform: bool | None = Field(
        None, description="Create a missing enclave platform at start (default: in dev mode)."
    )
    enclave_allow_simulated: bool | None = Field(
        None,
        description="Accept evidence from the simulated enclave (default: in dev mode only; "
        "anywhere else it must be said explicitly).",
    )
    serve_verifiers: bool = Field(
        False,
        description="Also serve enclave verifiers on /v2 (development only: a provider that "
        "can query its verifier can serve its answers as a cheap substitute).",
    )
    log_level: str = Field("INFO", description="Root log level.")
    log_json: bool = Field(True, description="Structured JSON logs (one object per line).")

    _split_api = field_validator("api_keys", "admin_api_keys", mode="before")(_split_keys)

    @model_validator(mode="after")
    def _keys_from_files(self) -> Settings:
        self.api_keys = self.api_keys + _read_key_file(self.api_key_file)
        self.admin_api_keys = self.admin_api_keys + _read_key_file(self.admin_api_key_file)
        return self

    @property
    def enclave_simulated_allowed(self) -> bool:
        return (
            self.dev_mode if self.enclave_allow_simulated is None else self.enclave_allow_simulated
        )

    @property
    def enclave_may_init_platform(self) -> bool:
        return self.dev_mode if self.enclave_init_platform is None else self.enclave_init_platform

    @property
    def alarm_state_dir(self) -> Path:
        """``integrity_state_dir``, or the enclave runtime directory's ``alarm`` folder: each
        gateway keeps its alarms beside its own enclaves."""
        return self.integrity_state_dir or self.enclave_runtime_dir / "alarm"

    def check_secure(self) -> None:
        """Refuse insecure set-ups outside development mode (raises ``ValueError``)."""
        if not self.api_keys and not self.dev_mode:
            raise ValueError(
                "no API keys configured: set FIDES_API_KEYS or FIDES_API_KEY_FILE, "
                "or FIDES_DEV_MODE=1 for a loopback-only development server"
            )
        if not self.api_keys and self.dev_mode and not is_loopback(self.host):
            raise ValueError(
                f"FIDES_DEV_MODE without API keys only binds to loopback, not {self.host!r}"
            )


def _read_key_file(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read key file {path}: {exc.strerror}") from exc
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

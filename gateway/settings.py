"""Gateway settings, read from the environment with the ``FIDES_`` prefix."""

from __future__ import annotations

import difflib
import ipaddress
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "FIDES_"

# FIDES_ variables that other programs read (docs/reference/settings.md, "Other FIDES_
# variables"): not typos of a gateway setting
OTHER_PROGRAMS_VARIABLES = frozenset(
    {
        "FIDES_TORCH_SPEC",
        "FIDES_TORCH_WHEELHOUSE",
        "FIDES_ENCLAVE_PLATFORM_SOURCE",
        "FIDES_ENCLAVE_TRUST_DIR",
        "FIDES_ENCLAVE_SEAL_MODEL",
        "FIDES_ENCLAVE_SEAL_CONFIG",
        "FIDES_ENCLAVE_SEALED_MODEL",
        "FIDES_ENCLAVE_SEAL_MODEL_NAME",
        "FIDES_IMAGE_TAG",
        "FIDES_VARIANT",
        "FIDES_FUZZ_SCALE",
        "FIDES_DOCKER",
        "FIDES_DEBIAN_MIRROR",
        "FIDES_PIP_SOURCES_PORT",
    }
)

# settings whose value is a secret: never repeated in an error message
_SECRET_FIELDS = frozenset({"api_keys", "admin_api_keys"})

_LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")

# a shorter key is a password, not a secret (16 random hex digits are 64 bits); the keys the
# project makes are longer (`openssl rand -hex 24`: 48 characters, the Helm chart's: 46)
MIN_KEY_LENGTH = 16


def _split_keys(value: object) -> object:
    """Comma-separated keys, or a JSON list of them (how pydantic-settings writes lists): the
    JSON form is read as JSON, never as comma text with brackets and quotes in the keys."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise ValueError(
                "starts with '[' but is not a JSON list of strings: write the keys "
                'comma-separated (a,b) or as a JSON list (["a","b"])'
            ) from None
        if not isinstance(items, list) or not all(isinstance(k, str) for k in items):
            raise ValueError('a JSON list of keys holds strings only (["a","b"])')
        return [k.strip() for k in items if k.strip()]
    return [k.strip() for k in text.split(",") if k.strip()]


def _unsendable(key: str) -> int | None:
    """The 1-based position of the first character an HTTP header cannot carry as sent (not
    printable ASCII: clients send UTF-8 or refuse, the server reads Latin-1, so such a key
    never matches), or None."""
    for i, ch in enumerate(key, 1):
        if not " " <= ch <= "~":
            return i
    return None


def _check_keys(keys: list[str], where: str) -> list[str]:
    for n, key in enumerate(keys, 1):
        if (pos := _unsendable(key)) is not None:
            raise ValueError(
                f"{where} {n} has a character that is not printable ASCII at position {pos}: "
                "a client cannot present it (HTTP headers and gRPC metadata are ASCII)"
            )
    return keys


def _not_empty(value: object) -> object:
    # An empty path is the current directory and an empty host every interface: both
    # are far from what an empty variable (a template's unset value) meant.
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty (leave it unset for the default)")
    return value


class Settings(BaseSettings):
    """Everything the gateway process needs to start; one field per knob."""

    # no inf or nan: a timeout or size of "inf" broke the start-up (int(inf)) far from here
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", allow_inf_nan=False)

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
    log_level: str = Field(
        "INFO", description="Root log level: CRITICAL, ERROR, WARNING, INFO or DEBUG."
    )
    log_json: bool = Field(True, description="Structured JSON logs (one object per line).")

    # where each key came from (the variable, or the key file), for check_key_lengths
    _key_sources: list[tuple[str, list[str]]] = PrivateAttr(default_factory=list)

    _split_api = field_validator("api_keys", "admin_api_keys", mode="before")(_split_keys)

    @field_validator("api_keys", "admin_api_keys", mode="after")
    @classmethod
    def _sendable(cls, keys: list[str]) -> list[str]:
        return _check_keys(keys, "key")

    _non_empty = field_validator(
        "model_repository",
        "host",
        "api_key_file",
        "admin_api_key_file",
        "enclave_platform_dir",
        "enclave_runtime_dir",
        "integrity_state_dir",
        mode="before",
    )(_not_empty)

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, value: object) -> object:
        if isinstance(value, str):
            level = value.strip().upper()
            if level == "WARN":
                level = "WARNING"
            if level not in _LOG_LEVELS:
                raise ValueError(f"{value!r} is not a log level: one of {', '.join(_LOG_LEVELS)}")
            return level
        return value

    @model_validator(mode="after")
    def _keys_from_files(self) -> Settings:
        user_file = _read_key_file(self.api_key_file, "FIDES_API_KEY_FILE")
        admin_file = _read_key_file(self.admin_api_key_file, "FIDES_ADMIN_API_KEY_FILE")
        self._key_sources = [
            ("FIDES_API_KEYS", self.api_keys),
            (f"FIDES_API_KEY_FILE: key file {self.api_key_file}", user_file),
            ("FIDES_ADMIN_API_KEYS", self.admin_api_keys),
            (f"FIDES_ADMIN_API_KEY_FILE: key file {self.admin_api_key_file}", admin_file),
        ]
        self.api_keys = self.api_keys + user_file
        self.admin_api_keys = self.admin_api_keys + admin_file
        return self

    @model_validator(mode="after")
    def _distinct_ports(self) -> Settings:
        if self.grpc_enabled and self.port and self.grpc_port == self.port:
            raise ValueError(
                f"FIDES_GRPC_PORT and FIDES_PORT are both {self.port}: gRPC needs a port of "
                "its own (or FIDES_GRPC_ENABLED=false)"
            )
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

    def check_key_lengths(self) -> None:
        """Refuse a key shorter than ``MIN_KEY_LENGTH``: one that short is guessed, not kept
        secret. Raises ``ValueError`` naming the variable or key file and the key's position,
        one problem per line; never the key. (``fides serve`` checks this; ``create_app`` does
        not, for tests that pass short keys in-process.)"""
        problems = [
            f"{where}: key {n} is {len(key)} characters long; an API key needs at least "
            f"{MIN_KEY_LENGTH} (make one with `openssl rand -hex 24`)"
            for where, keys in self._key_sources
            for n, key in enumerate(keys, 1)
            if len(key) < MIN_KEY_LENGTH
        ]
        if problems:
            raise ValueError("\n".join(problems))


def _read_key_file(path: Path | None, variable: str) -> list[str]:
    """One key per line; blank lines and ``#`` comments (indented too) skipped, a byte order
    mark (an editor's) dropped. A file that holds no key is an error: a mounted Secret that is
    empty would otherwise turn the keys off without a word."""
    if path is None:
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ValueError(f"{variable}: cannot read key file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{variable}: key file {path} is not UTF-8 text: {exc.reason}") from exc
    keys = [k for k in (line.strip() for line in text.splitlines()) if k and not k.startswith("#")]
    if not keys:
        raise ValueError(f"{variable}: key file {path} holds no key (one key per line)")
    return _check_keys(keys, f"{variable}: key file {path}: key")


def load_settings(
    overrides: Mapping[str, object] | None = None, *, flags: Mapping[str, str] | None = None
) -> Settings:
    """``Settings`` from the environment and ``overrides``; a ``SettingsError`` naming each
    bad variable (``FIDES_PORT``, or the command-line flag ``flags`` maps the field to)
    instead of pydantic's multi-line ``ValidationError``. Secret values are not repeated."""
    try:
        values: dict[str, Any] = dict(overrides or {})
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(_describe(exc, flags or {})) from None


class SettingsError(ValueError):
    """The settings cannot be used; the message names every problem, one per line."""


def _describe(exc: ValidationError, flags: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        msg = str(err["msg"]).removeprefix("Value error, ")
        loc = [str(p) for p in err["loc"]]
        if not loc:  # a whole-model check (a key file): its message names what it is about
            lines.append(msg)
            continue
        field = loc[0]
        name = flags.get(field) or ENV_PREFIX + field.upper()
        shown = ""
        if field not in _SECRET_FIELDS and isinstance(err.get("input"), str | int | float):
            shown = f"={err['input']!r}"
        lines.append(f"{name}{shown}: {msg}")
    return "\n".join(lines)


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``FIDES_*`` variables that name no setting (typos are otherwise ignored), each with the
    setting it most resembles when one does."""
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    out = []
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        if name.upper() in known or name.upper() in OTHER_PROGRAMS_VARIABLES:
            continue
        close = difflib.get_close_matches(name.upper(), sorted(known), n=1, cutoff=0.75)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return out


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

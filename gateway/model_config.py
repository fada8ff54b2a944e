"""The per-model ``config.yaml`` schema (Triton-like), validated with pydantic.

Unknown keys are an error that names the key and the file: a typo such as
``max_batch_sise`` must not silently fall back to a default.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from enclave_sim.config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_OUTPUTS, served_verifiers
from gateway.datatypes import DATATYPES
from gateway.generation.config import GenerationConfig

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class ConfigError(ValueError):
    """A model configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorConfig(_Strict):
    """One input or output; ``shape`` excludes the batch dimension when batching is on."""

    name: str
    datatype: str
    shape: list[int]

    @model_validator(mode="after")
    def _check(self) -> TensorConfig:
        if self.datatype not in DATATYPES:
            raise ValueError(f"unknown datatype {self.datatype!r}; one of {sorted(DATATYPES)}")
        if any(d < -1 or d == 0 for d in self.shape):
            raise ValueError("shape dimensions must be positive or -1 (variable)")
        return self


class LatestPolicy(_Strict):
    num_versions: int = Field(1, ge=1)


class SpecificPolicy(_Strict):
    versions: list[int] = Field(min_length=1)


class VersionPolicy(_Strict):
    """Exactly one of latest / all / specific (as Triton's ``version_policy``)."""

    latest: LatestPolicy | None = None
    all: dict[str, Any] | None = None
    specific: SpecificPolicy | None = None

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(chosen) > 1:
            raise ValueError(f"version_policy takes one of latest/all/specific, got {chosen}")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions to load out of those present on disk, ascending."""
        available = sorted(available)
        if self.all is not None:
            return available
        if self.specific is not None:
            missing = sorted(set(self.specific.versions) - set(available))
            if missing:
                raise ConfigError(f"version_policy.specific names versions not on disk: {missing}")
            return sorted(self.specific.versions)
        n = self.latest.num_versions if self.latest is not None else 1
        return available[-n:]


class DynamicBatching(_Strict):
    """Server-side batching of concurrent requests (Triton ``dynamic_batching``)."""

    max_queue_delay_microseconds: int = Field(
        500, ge=0, description="How long the first request may wait for others to join a batch."
    )
    preferred_batch_size: list[int] = Field(
        default_factory=list, description="Batch sizes that are dispatched at once when reached."
    )
    max_queue_size: int = Field(
        256, ge=1, description="Requests waiting beyond this are shed with 503 + Retry-After."
    )
    default_timeout_microseconds: int | None = Field(
        None, ge=1, description="Per-request timeout when the request sets none."
    )


class InstanceGroup(_Strict):
    count: int = Field(1, ge=1, le=64, description="Concurrent executions of this model.")
    kind: Literal["cpu", "gpu"] = "cpu"


class OnnxOptions(_Strict):
    intra_op_threads: int = Field(0, ge=0, description="0 lets onnxruntime choose.")
    inter_op_threads: int = Field(0, ge=0)
    providers: list[Literal["cpu", "cuda"]] = Field(
        default_factory=lambda: ["cpu"],  # type: ignore[arg-type]
        description="Execution providers in order of preference; cuda needs onnxruntime-gpu.",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"


class TorchOptions(_Strict):
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    num_threads: int = Field(
        0, ge=0, description="torch intra-op threads (process-wide); 0 keeps the default."
    )


class CircuitBreakerConfig(_Strict):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open it.")
    reset_timeout_s: float = Field(10.0, gt=0, description="Open time before one trial call.")


class UpstreamOptions(_Strict):
    """A remote Open Inference Protocol endpoint (a third-party MLaaS)."""

    url: str = Field(description="Base URL, e.g. http://mlaas.example:8000")
    model_name: str | None = Field(None, description="Remote model name (defaults to ours).")
    model_version: str | None = None
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0, le=10, description="Retries on 5xx / connection errors.")
    backoff_s: float = Field(0.1, ge=0, description="First backoff; doubles each retry.")
    headers: dict[str, str] = Field(default_factory=dict, description="Sent with each call.")
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)


DrillAttack = Literal["switch", "avg", "random_switch", "noise", "substitution"]


class DrillConfig(_Strict):
    """An attack drill: the model behaves like a compromised service (off by default)."""

    attack: DrillAttack = Field(description="What the compromised service does to its answers.")
    rate: float = Field(1.0, gt=0, le=1, description="Share of answers tampered with.")
    substitute: str | None = Field(
        None,
        description="substitution: the (cheaper) model in this repository served instead, or "
        "the model's own enclave verifier (its answers then come from the enclave's).",
    )
    noise_sigma: float = Field(1.5, gt=0, description="noise: std on the log-probabilities.")

    @model_validator(mode="after")
    def _substitute(self) -> DrillConfig:
        if (self.attack == "substitution") != (self.substitute is not None):
            raise ValueError(
                "'substitute' names the model to serve, for attack 'substitution' only"
            )
        return self


class EnclaveConfig(_Strict):
    """The verifier that runs inside the (simulated) enclave for this model."""

    verifier_model: str = Field(
        description="Repository entry whose latest version's model.onnx is the verifier."
    )
    sealed_model: Path | None = Field(
        None,
        description="A sealed verifier (fides enclave seal), relative to the model directory. "
        "Default: the gateway seals verifier_model for the local platform at start.",
    )
    measurement: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{96}$",
        description="Pinned PCR0 (fides enclave measure). Default: measured from verifier_model.",
    )
    outputs: list[str] = Field(
        default_factory=lambda: list(DEFAULT_OUTPUTS), description="Verifier outputs signed."
    )
    max_batch_size: int = Field(
        DEFAULT_MAX_BATCH_SIZE, ge=1, le=4096, description="Rows per enclave call."
    )
    max_queue_delay_microseconds: int = Field(
        500, ge=0, description="How long a verification waits for others to share an enclave call."
    )
    timeout_s: float = Field(5.0, gt=0, description="Enclave call timeout (then the policy).")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra `fides enclave run` options (e.g. --paging)."
    )


class IntegrityConfig(_Strict):
    """Fides verification of this model's answers (see the README's integrity section)."""

    enclave: EnclaveConfig
    detector: str = Field(description="Repository entry of the attack detector (pair model).")
    reclassifier: str = Field(description="Repository entry of the re-classifier (pair model).")
    novelty: str | None = Field(
        None,
        description="Repository entry of the out-of-distribution check (input -> novelty_score, "
        "threshold in its model card): an answer whose input it calls novel is 'unverified' "
        "(reason out_of_distribution), not judged by the detector. None: no such check.",
    )
    output: str = Field(
        "probabilities", description="The service output holding class probabilities."
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="Detector threshold; default: the detector card's."
    )
    sampling_rate: float = Field(1.0, ge=0, le=1, description="Share of requests verified.")
    mode: Literal["monitor", "enforce"] = Field(
        "monitor",
        description="monitor: answer as served and flag; enforce: replace an attacked answer "
        "by the re-classifier's.",
    )
    failure_policy: Literal["fail_closed", "fail_open"] = Field(
        "fail_closed",
        description="Enclave unavailable or late: fail_closed answers 503, fail_open answers "
        "with verdict 'unverified' and a reason.",
    )
    substitution_window: int = Field(
        100, ge=10, description="Recent verified rows in the substitution test."
    )
    substitution_score: Literal["kl", "detector"] = Field(
        "kl",
        description="Per-row score of the substitution test: KL(service || verifier) or the "
        "detector's probability (blind to a low-confidence substitute).",
    )
    substitution_alpha: float = Field(
        0.001,
        gt=0,
        lt=0.5,
        description="Level of the windowed substitution test, run every 10 rows over the last "
        "`substitution_window`: 0.001 keeps false alarms per 100 rows <= 1% (union bound; "
        "verifier.experiment.DetectorConfig.window_alpha, the same default, says more).",
    )
    drill: DrillConfig | None = Field(None, description="An attack drill active from load.")


class ModelConfig(_Strict):
    """Contents of ``<repository>/<model>/config.yaml``."""

    name: str | None = Field(None, description="Must match the directory name when given.")
    platform: Literal["onnx", "torch", "upstream", "causal_lm"]
    max_batch_size: int = Field(
        0, ge=0, description="0: no batch dimension is added and requests run one at a time."
    )
    inputs: list[TensorConfig] | None = Field(None, description="Defaults to the artefact's.")
    outputs: list[TensorConfig] | None = None
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    dynamic_batching: DynamicBatching | None = None
    instance_group: InstanceGroup = Field(default_factory=InstanceGroup)
    allow_non_finite: bool = Field(False, description="Accept NaN/Inf in float inputs.")
    default_model_filename: str | None = Field(
        None, description="Artefact file inside each version dir (default by platform)."
    )
    onnx: OnnxOptions = Field(default_factory=OnnxOptions)
    torch: TorchOptions = Field(default_factory=TorchOptions)
    upstream: UpstreamOptions | None = None
    generation: GenerationConfig | None = Field(
        None, description="causal_lm only: draft, speculative decoding and serving limits."
    )
    integrity: IntegrityConfig | None = Field(
        None, description="Verify answers with the enclave's verifier and the attack detector."
    )
    labels: list[str] | None = Field(None, description="Class names, index-aligned.")
    parameters: dict[str, str] = Field(default_factory=dict, description="Free-form metadata.")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.platform == "upstream" and self.upstream is None:
            raise ValueError("platform 'upstream' needs an 'upstream:' block with a url")
        if self.integrity is not None and self.platform == "causal_lm":
            raise ValueError("an 'integrity:' block is for classifiers, not platform 'causal_lm'")
        if self.generation is not None and self.platform != "causal_lm":
            raise ValueError("a 'generation:' block needs platform 'causal_lm'")
        if self.dynamic_batching is not None and self.max_batch_size == 0:
            raise ValueError("dynamic_batching needs max_batch_size > 0")
        if self.dynamic_batching is not None:
            too_big = [
                b
                for b in self.dynamic_batching.preferred_batch_size
                if b > self.max_batch_size or b < 1
            ]
            if too_big:
                raise ValueError(
                    f"preferred_batch_size {too_big} outside 1..max_batch_size "
                    f"({self.max_batch_size})"
                )
        return self

    @property
    def model_filename(self) -> str:
        if self.default_model_filename:
            return self.default_model_filename
        return {"onnx": "model.onnx", "torch": "model.pt2", "upstream": "", "causal_lm": ""}[
            self.platform
        ]


def format_validation_error(exc: ValidationError, path: Path | str, root: str = "config") -> str:
    """One line naming the file and every problem; an unknown key is named as such."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{loc}'")
        else:
            parts.append(f"{loc or root}: {err['msg']}")
    return f"{path}: " + "; ".join(parts)


def _read_raw(path: Path) -> dict[str, Any] | None:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return None
    return raw if isinstance(raw, dict) else None


def read_verifier_names(root: Path) -> dict[str, str]:
    """Enclave verifiers named by the models of repository ``root``: verifier -> the model it
    verifies (read leniently; a config that does not parse names none)."""
    return {name: v.model for name, v in served_verifiers(root).items()}


def read_platform(path: Path) -> str | None:
    """The ``platform`` a config.yaml names, or None when it cannot be read (no validation)."""
    raw = _read_raw(path)
    platform = raw.get("platform") if raw is not None else None
    return platform if isinstance(platform, str) else None


def load_model_config(path: Path, expected_name: str | None = None) -> ModelConfig:
    """Read and validate one ``config.yaml``; every problem raises :class:`ConfigError`."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: missing config.yaml") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a timestamp like 2001-02-30
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        cfg = ModelConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path)) from exc
    if expected_name is not None and cfg.name is not None and cfg.name != expected_name:
        raise ConfigError(f"{path}: name {cfg.name!r} does not match directory {expected_name!r}")
    return cfg

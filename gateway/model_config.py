"""The per-model ``config.yaml`` schema (Triton-like), validated with pydantic.

Unknown keys are an error that names the key and the file: a typo such as
``max_batch_sise`` must not silently fall back to a default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BeforeValidator, Field, ValidationError, model_validator

from fides_core.config import StrictModel, format_validation_error
from fides_core.enclave_config import served_verifiers
from fides_core.integrity_config import (
    IntegrityConfig,
)
from fides_core.oip import DATATYPES
from gateway.generation.config import GenerationConfig


def _not_a_bool(value: object) -> object:
    # YAML's true/yes would otherwise be taken as 1 (max_batch_size: yes, versions: [true])
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, not the boolean {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]


class ConfigError(ValueError):
    """A model configuration file is missing, unreadable or invalid."""


class TensorConfig(StrictModel):
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


class LatestPolicy(StrictModel):
    num_versions: Int = Field(1, ge=1)


class AllPolicy(StrictModel):
    """``all: {}``: it takes no options (a key inside is a typo, refused by name)."""


class SpecificPolicy(StrictModel):
    versions: list[Annotated[Int, Field(ge=1)]] = Field(min_length=1)


class VersionPolicy(StrictModel):
    """Exactly one of latest / all / specific (as Triton's ``version_policy``)."""

    latest: LatestPolicy | None = None
    all: AllPolicy | None = None
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
            # each once: a version named twice was loaded twice, one copy never unloaded
            return sorted(set(self.specific.versions))
        n = self.latest.num_versions if self.latest is not None else 1
        return available[-n:]


class DynamicBatching(StrictModel):
    """Server-side batching of concurrent requests (Triton ``dynamic_batching``)."""

    max_queue_delay_microseconds: Int = Field(
        500, ge=0, description="How long the first request may wait for others to join a batch."
    )
    dispatch_when_idle: bool = Field(
        True,
        description="While no batch of the model is running, what is queued goes at once "
        "instead of waiting max_queue_delay for more: waiting cannot fill a batch then, and "
        "under load batches fill while the instances are busy. false: always wait (Triton).",
    )
    preferred_batch_size: list[Int] = Field(
        default_factory=list, description="Batch sizes that are dispatched at once when reached."
    )
    max_queue_size: Int = Field(
        256, ge=1, description="Requests waiting beyond this are shed with 503 + Retry-After."
    )
    default_timeout_microseconds: Int | None = Field(
        None, ge=1, description="Per-request timeout when the request sets none."
    )


class InstanceGroup(StrictModel):
    count: Int = Field(1, ge=1, le=64, description="Concurrent executions of this model.")
    kind: Literal["cpu", "gpu"] = "cpu"


class OnnxOptions(StrictModel):
    intra_op_threads: int = Field(0, ge=0, description="0 lets onnxruntime choose.")
    inter_op_threads: int = Field(0, ge=0)
    providers: list[Literal["cpu", "cuda"]] = Field(
        default_factory=lambda: ["cpu"],  # type: ignore[arg-type]
        description="Execution providers in order of preference; cuda needs onnxruntime-gpu.",
    )
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"


class TorchOptions(StrictModel):
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    num_threads: int = Field(
        0, ge=0, description="torch intra-op threads (process-wide); 0 keeps the default."
    )


class CircuitBreakerConfig(StrictModel):
    failure_threshold: int = Field(5, ge=1, description="Consecutive failures that open it.")
    reset_timeout_s: float = Field(10.0, gt=0, description="Open time before one trial call.")


#: Default of ``upstream.max_response_bytes``: a model's JSON outputs, four times the gateway's
#: default request body limit.
DEFAULT_MAX_RESPONSE_BYTES = 256 * 1024 * 1024
#: Its upper bound: an upstream's answer is held whole and parsed in memory.
MAX_RESPONSE_BYTES_LIMIT = 1024 * 1024 * 1024


class UpstreamOptions(StrictModel):
    """A remote Open Inference Protocol endpoint (a third-party MLaaS)."""

    url: str = Field(description="Base URL, e.g. http://mlaas.example:8000")
    model_name: str | None = Field(None, description="Remote model name (defaults to ours).")
    model_version: str | None = None
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0, le=10, description="Retries on 5xx / connection errors.")
    backoff_s: float = Field(0.1, ge=0, description="First backoff; doubles each retry.")
    max_retry_after_s: float = Field(
        5.0,
        ge=0,
        le=3600,
        description="The longest a 429 / 503 answer's Retry-After is honoured before a retry "
        "(a request being served should not wait longer; `fides protect` waits up to 120 s).",
    )
    max_response_bytes: Int = Field(
        DEFAULT_MAX_RESPONSE_BYTES,
        ge=1024,
        le=MAX_RESPONSE_BYTES_LIMIT,
        description="The largest answer read from the upstream, after decompression (gzip / "
        "deflate); a larger one is an invalid response (502). At most 1 GiB: the answer is "
        "held and parsed in memory.",
    )
    headers: dict[str, str] = Field(default_factory=dict, description="Sent with each call.")
    headers_from_env: dict[str, str] = Field(
        default_factory=dict,
        description="Header -> environment variable holding its value (an API key stays out "
        "of config.yaml), e.g. {Authorization: MLAAS_AUTH}.",
    )
    headers_from_file: dict[str, Path] = Field(
        default_factory=dict,
        description="Header -> file holding its value (e.g. a mounted Kubernetes secret); "
        "surrounding whitespace is stripped.",
    )
    circuit_breaker: CircuitBreakerConfig = Field(default_factory=CircuitBreakerConfig)

    def resolved_headers(self) -> dict[str, str]:
        """``headers`` with the ones from the environment and from files; raises
        ``ConfigError`` naming a variable that is unset or a file that cannot be read."""
        out = dict(self.headers)
        for header, var in self.headers_from_env.items():
            value = os.environ.get(var)
            if not value:
                raise ConfigError(
                    f"upstream header {header!r}: environment variable {var} is unset"
                )
            out[header] = value
        for header, path in self.headers_from_file.items():
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"upstream header {header!r}: cannot read {path}: {exc}") from exc
            if not value:
                raise ConfigError(f"upstream header {header!r}: {path} is empty")
            out[header] = value
        return out


class ModelConfig(StrictModel):
    """Contents of ``<repository>/<model>/config.yaml``."""

    name: str | None = Field(None, description="Must match the directory name when given.")
    platform: Literal["onnx", "torch", "upstream", "causal_lm"]
    max_batch_size: Int = Field(
        0, ge=0, description="0: no batch dimension is added and requests run one at a time."
    )
    inputs: list[TensorConfig] | None = Field(None, description="Defaults to the artefact's.")
    outputs: list[TensorConfig] | None = None
    version_policy: VersionPolicy = Field(default_factory=VersionPolicy)
    dynamic_batching: DynamicBatching | None = None
    instance_group: InstanceGroup = Field(default_factory=InstanceGroup)
    execution: Literal["thread", "inline"] = Field(
        "thread",
        description="thread: batches run on the model's worker threads (instance_group). "
        "inline: on the server's event loop, no thread hop; for models whose batch costs tens "
        "of microseconds (a detector, a re-classifier), where the hop and handing the GIL back "
        "cost more than the model. An inline model blocks every request while it runs.",
    )
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
        name = self.default_model_filename
        if name is not None and (
            name in (".", "..") or "/" in name or "\\" in name or "\0" in name
        ):
            # a path would load another model's file, or any file on the host, as this
            # model's version (``../../other/1/model.onnx``, ``/etc/passwd``)
            raise ValueError(
                f"default_model_filename {name!r} must be a file name inside each version "
                "directory, not a path"
            )
        if self.platform == "upstream" and self.upstream is None:
            raise ValueError("platform 'upstream' needs an 'upstream:' block with a url")
        if self.instance_group.kind == "gpu":
            # kind alone places nothing: it loaded and ran on the CPU while the configuration
            # extension reported KIND_GPU (Triton refuses a KIND_GPU model it cannot place)
            on_gpu = {
                "onnx": "cuda" in self.onnx.providers,
                "torch": self.torch.device.startswith("cuda"),
            }.get(self.platform, False)
            if not on_gpu:
                raise ValueError(
                    "instance_group.kind 'gpu' needs the model on a GPU: onnx.providers "
                    "listing 'cuda' (platform onnx) or torch.device 'cuda' / 'cuda:N' "
                    f"(platform torch); platform {self.platform!r} as configured runs on the CPU"
                )
        if self.labels is not None and self.platform == "causal_lm":
            raise ValueError("'labels' name a classifier's classes, not for platform 'causal_lm'")
        if self.labels is not None and not self.labels:
            raise ValueError("'labels' is empty: list one name per class, or leave it out")
        if self.integrity is not None and self.platform == "causal_lm":
            raise ValueError("an 'integrity:' block is for classifiers, not platform 'causal_lm'")
        if self.generation is not None and self.platform != "causal_lm":
            raise ValueError("a 'generation:' block needs platform 'causal_lm'")
        if self.execution == "inline":
            if self.platform not in ("onnx", "torch"):
                raise ValueError(
                    f"execution 'inline' is for onnx and torch models, not {self.platform!r}"
                )
            if self.instance_group.count != 1:
                raise ValueError(
                    "execution 'inline' runs one batch at a time on the event loop: "
                    f"instance_group.count must be 1, not {self.instance_group.count}"
                )
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

    def labels_problem(self, outputs: Sequence[tuple[str, Sequence[int]]]) -> str | None:
        """Why ``labels`` does not fit the model's class output, or None when it does (or there
        are no labels). ``outputs`` are (name, shape) as served, the batch dimension first when
        ``max_batch_size`` > 0. The class output is the integrity block's ``output`` when the
        model has one, else any output; its classes are its last dimension past the batch one
        (1 for one score per row, as a detector's). A variable one (-1) is not checked: only a
        count known at load can be compared."""
        if not self.labels:
            return None
        n = len(self.labels)
        named = self.integrity.output if self.integrity is not None else None
        chosen = [o for o in outputs if o[0] == named] or list(outputs)
        counts: dict[str, int] = {}
        for name, shape in chosen:
            dims = list(shape)[1:] if self.max_batch_size > 0 else list(shape)  # [classes...]
            counts[name] = dims[-1] if dims else 1
        if not counts or any(c == n or c < 0 for c in counts.values()):
            return None
        shown = ", ".join(f"output '{name}' has {c}" for name, c in counts.items())
        return (
            f"labels lists {n} classes but {shown} (its last dimension); give one label per "
            "class, in the order of the output"
        )

    @property
    def model_filename(self) -> str:
        if self.default_model_filename:
            return self.default_model_filename
        return {"onnx": "model.onnx", "torch": "model.pt2", "upstream": "", "causal_lm": ""}[
            self.platform
        ]


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: PyYAML keeps the
    last one, so a block appended to a config that already had it (a second
    ``version_policy:`` or ``dynamic_batching:``) replaced the first without a word. Merge keys
    (``<<: *base``) may still be overridden, as YAML means them to be."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = (key_node.tag, key_node.value)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_model_config(path: Path, expected_name: str | None = None) -> ModelConfig:
    """Read and validate one ``config.yaml``; every problem raises :class:`ConfigError`."""
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
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

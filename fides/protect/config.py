"""``fides protect`` files: YAML read with ``yaml.safe_load``, validated with pydantic.

A protect file is a :class:`~verifier.experiment.RunSpec` (data, verifier, detector, export,
seed, threads: the same blocks as an experiment, see ``experiments/``) plus the service to
protect and how to query it. Unknown keys are errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fides_core.config import StrictModel
from gateway.model_config import UpstreamOptions
from verifier.experiment import RunSpec, load_run_file, validate_file

__all__ = [
    "AnswerKind",
    "ProtectConfig",
    "ProtectConfigError",
    "QueryConfig",
    "ServiceSpec",
    "load_protect_config",
    "parse_protect_config",
]

AnswerKind = Literal["probabilities", "logits", "top_k", "label"]


class ProtectConfigError(ValueError):
    """A protect file is missing or invalid; the message names the file and the key."""


class ServiceSpec(StrictModel):
    """The classifier to protect: a model of the repository (onnx, torch, or an ``upstream``
    entry), or a remote Open Inference Protocol endpoint queried as a black box."""

    model: str | None = Field(
        None, description="A model of --repository (its latest version is queried locally)."
    )
    upstream: UpstreamOptions | None = Field(
        None, description="A remote endpoint (url, model_name, headers / headers_from_env ...)."
    )
    output: str | None = Field(
        None, description="The output that holds the class scores (default: the only output)."
    )
    answers: Literal["auto", "probabilities", "logits", "top_k", "label"] = Field(
        "auto",
        description="What the service answers. auto: probability vectors, top-k vectors (zeros "
        "outside the top k) and one-hot / class-index labels are recognised; logits are named "
        "and refused unless this says 'logits' (they are then softmaxed).",
    )
    num_classes: int | None = Field(
        None, ge=2, description="Classes of a service that answers class indices only."
    )

    @model_validator(mode="after")
    def _one_service(self) -> ServiceSpec:
        if (self.model is None) == (self.upstream is None):
            raise ValueError("give exactly one of service.model and service.upstream")
        return self


class QueryConfig(StrictModel):
    """How the service is queried: every answer is recorded on disk and paid for once."""

    batch_size: int = Field(64, ge=1, le=4096, description="Inputs per request.")
    concurrency: int = Field(4, ge=1, le=64, description="Requests in flight at most.")
    rate_limit: float | None = Field(
        None, gt=0, description="Requests per second at most (None: as fast as answered)."
    )
    max_queries: int | None = Field(
        None,
        ge=1,
        description="Inputs sent to the service at most, over every run with the same answer "
        "store (--max-queries overrides). A run that needs more stops cleanly; rerun with a "
        "larger budget and nothing recorded is asked again.",
    )
    repeat_probe: int = Field(
        64,
        ge=0,
        description="Recorded inputs asked a second time to measure how deterministic the "
        "service is (counted against the budget; 0: not measured).",
    )
    min_service_accuracy: float = Field(
        0.5,
        ge=0,
        le=1,
        description="With labelled inputs: warn when the service's accuracy on them is below "
        "this (a service that answers implausibly while being distilled poisons the verifier).",
    )


class ProtectConfig(RunSpec):
    """``fides protect``: the integrity kit for a classifier the user already has."""

    service: ServiceSpec
    views: int = Field(
        3,
        ge=0,
        le=32,
        description="Augmented copies (data.augment) of each training image, each queried: "
        "the distillation set is (1 + views) x the training images.",
    )
    query: QueryConfig = Field(default_factory=QueryConfig)

    @model_validator(mode="after")
    def _fits_a_given_service(self) -> ProtectConfig:
        aug = self.data.augment
        if self.views and not (aug.crop_padding or aug.hflip):
            raise ValueError(
                "views needs data.augment (crop_padding or hflip): without it every view is "
                "the same image"
            )
        if self.verifier.pretrain.task == "service":
            raise ValueError(
                "verifier.pretrain.task 'service' prunes the service's own filters, which "
                "protect does not have; use 'rotation' or a labelled data set"
            )
        for sub in self.detector.substitutes:
            if sub.kind == "int8":
                raise ValueError(
                    f"detector.substitutes {sub.name!r}: kind 'int8' rounds the service's "
                    "weights, which protect does not have; use kind 'student'"
                )
        if self.service.model is not None and self.export.service_name != self.service.model:
            raise ValueError(
                f"export.service_name {self.export.service_name!r} must be the protected "
                f"model's name {self.service.model!r} (its config.yaml gets the integrity block)"
            )
        taken = {self.export.service_name, self.service.model} - {None}
        if self.export.verifier_name in taken:
            raise ValueError(
                f"export.verifier_name {self.export.verifier_name!r} is the service's own "
                "name: the verifier would overwrite the model it verifies"
            )
        if self.verifier.max_flops is None and self.verifier.max_latency_ms is None:
            raise ValueError(
                "set verifier.max_flops (FLOPs per image) or verifier.max_latency_ms: the "
                "service's own FLOPs are unknown, so max_flops_ratio cannot bound the verifier"
            )
        return self


def parse_protect_config(raw: object, where: Path | str = "<protect>") -> ProtectConfig:
    return validate_file(ProtectConfig, raw, where, "protect", ProtectConfigError)


def load_protect_config(path: Path) -> ProtectConfig:
    return load_run_file(ProtectConfig, path, "protect", ProtectConfigError)

"""The ``integrity:`` block of a served model's ``config.yaml`` (see docs/integrity.md, "Integrity
verification"): what the gateway sets up for the model, and what a client that checks the
evidence itself reads from the provider's published repository. The rest of ``config.yaml`` is
the gateway's (:mod:`gateway.model_config`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fides_core.config import StrictModel
from fides_core.enclave_config import DEFAULT_MAX_BATCH_SIZE, DEFAULT_OUTPUTS

__all__ = ["DrillAttack", "DrillConfig", "EnclaveConfig", "IntegrityConfig"]


DrillAttack = Literal["switch", "avg", "random_switch", "noise", "substitution"]


class DrillConfig(StrictModel):
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


class EnclaveConfig(StrictModel):
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
    dispatch_when_idle: bool = Field(
        True,
        description="While no enclave call is in flight, a verification goes at once instead "
        "of waiting max_queue_delay; under load, calls fill while one is in flight.",
    )
    timeout_s: float = Field(5.0, gt=0, description="Enclave call timeout (then the policy).")
    extra_args: list[str] = Field(
        default_factory=list, description="Extra `fides enclave run` options (e.g. --paging)."
    )


class IntegrityConfig(StrictModel):
    """Fides verification of this model's answers (docs/reference/configuration.md)."""

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
    alarm_alpha: float = Field(
        1e-5,
        gt=0,
        lt=0.5,
        description="False-alarm level of the sequential alarm over the model's answer stream "
        "and each API key's: the average run length to a false alarm is at least 1/alpha "
        "answers per stream (fides_core.sequential).",
    )
    alarm_max_keys: int = Field(
        10_000, ge=1, description="API keys the alarm tracks at most (bounded memory)."
    )
    alarm_incident_requests: int = Field(
        2048,
        ge=16,
        le=100_000,
        description=(
            "Verified requests kept (about 1 KB each) for the incident bundle of an alarm: "
            "the alarmed stream's requests among the model's last this many."
        ),
    )
    drill: DrillConfig | None = Field(None, description="An attack drill active from load.")

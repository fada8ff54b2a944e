"""The verifier's configuration: part of the measurement, sealed with the model.

A YAML (or JSON) file such as::

    outputs: [probabilities]   # which model outputs the enclave returns and signs
    max_batch_size: 64         # rows per verify call; also the activation estimate's batch
    intra_op_threads: 1        # onnxruntime threads inside the enclave

Unknown keys are refused, so a typo cannot silently measure the same as the default. The
measured form is the canonical CBOR of the normalised map (defaults filled in), so an omitted
file and a file that spells out the defaults measure the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import yaml

from fides_core.enclave_errors import BootError


@dataclass(frozen=True)
class EnclaveModelConfig:
    outputs: tuple[str, ...] | None = None  # None: every model output
    max_batch_size: int = 64
    intra_op_threads: int = 1

    def __post_init__(self) -> None:
        if self.outputs is not None and (
            not self.outputs or not all(isinstance(o, str) and o for o in self.outputs)
        ):
            raise BootError("verifier config: outputs must be a non-empty list of names")
        for name in ("max_batch_size", "intra_op_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65536:
                raise BootError(f"verifier config: {name} must be an integer in 1..65536")

    def as_dict(self) -> dict[str, Any]:
        return {
            "outputs": list(self.outputs) if self.outputs is not None else None,
            "max_batch_size": self.max_batch_size,
            "intra_op_threads": self.intra_op_threads,
        }

    def canonical_bytes(self) -> bytes:
        return cbor2.dumps(self.as_dict(), canonical=True)

    @classmethod
    def from_dict(cls, data: Any) -> EnclaveModelConfig:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise BootError("verifier config must be a map")
        unknown = set(data) - {"outputs", "max_batch_size", "intra_op_threads"}
        if unknown:
            raise BootError(f"verifier config: unknown keys {sorted(map(str, unknown))}")
        outputs = data.get("outputs")
        if outputs is not None and not isinstance(outputs, list | tuple):
            raise BootError("verifier config: outputs must be a list of names")
        return cls(
            outputs=tuple(outputs) if outputs is not None else None,
            max_batch_size=data.get("max_batch_size", 64),
            intra_op_threads=data.get("intra_op_threads", 1),
        )

    @classmethod
    def load(cls, path: Path | None) -> EnclaveModelConfig:
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise BootError(f"cannot read verifier config {path}: {exc}") from None
        return cls.from_dict(data)


# The gateway's `integrity.enclave` block of a served model (gateway/model_config.py) says
# which verifier the model's enclave runs and with which of these settings; the defaults are
# the gateway's. The measurement a client pins covers the verifier AND this config, so every
# place that computes it (the gateway, `fides enclave measure`, the client SDK) builds the
# config here.
DEFAULT_OUTPUTS = ("probabilities",)
DEFAULT_MAX_BATCH_SIZE = 64


def from_enclave_block(block: Mapping[str, Any]) -> EnclaveModelConfig:
    """The verifier config of a served model's ``integrity.enclave`` block."""
    outputs = block.get("outputs")
    return EnclaveModelConfig.from_dict(
        {
            "outputs": list(outputs) if outputs is not None else list(DEFAULT_OUTPUTS),
            "max_batch_size": block.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE),
        }
    )


@dataclass(frozen=True)
class ServedVerifier:
    """A verifier named by a served model's ``integrity.enclave`` block."""

    model: str  # the served model it verifies
    verifier: str  # the repository entry of the verifier
    block: Mapping[str, Any]  # the raw integrity.enclave block


def served_verifiers(repository: Path) -> dict[str, ServedVerifier]:
    """Verifier name -> what names it, for every model config in ``repository`` (read
    leniently: a config that does not parse names nothing)."""
    found: dict[str, ServedVerifier] = {}
    if not repository.is_dir():
        return found
    for config in sorted(repository.glob("*/config.yaml")):
        try:
            raw = yaml.safe_load(config.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError, yaml.YAMLError):
            continue
        integrity = raw.get("integrity") if isinstance(raw, dict) else None
        block = integrity.get("enclave") if isinstance(integrity, dict) else None
        name = block.get("verifier_model") if isinstance(block, dict) else None
        if isinstance(block, dict) and isinstance(name, str):
            found.setdefault(name, ServedVerifier(config.parent.name, name, block))
    return found

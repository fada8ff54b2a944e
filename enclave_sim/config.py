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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import yaml

from enclave_sim.errors import BootError


@dataclass(frozen=True)
class VerifierConfig:
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
    def from_dict(cls, data: Any) -> VerifierConfig:
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
    def load(cls, path: Path | None) -> VerifierConfig:
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise BootError(f"cannot read verifier config {path}: {exc}") from None
        return cls.from_dict(data)

"""Attack drills: make a model behave like a compromised service, on purpose.

An operator (or a test, or a demo) turns one on with the admin endpoint or the model config;
every verified answer is then tampered with at the chosen rate *before* the detector sees it,
exactly as a dishonest MLaaS provider would do it. Output attacks reuse
:mod:`fides_core.attacks`; ``substitution`` serves a chosen cheaper model from the repository.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fides_core.attacks import avg, random_noise, random_switch, switch
from fides_core.integrity_config import DrillConfig

__all__ = ["ActiveDrill", "tamper"]


@dataclass
class ActiveDrill:
    config: DrillConfig
    started_at: float = field(default_factory=time.time)
    tampered: int = 0  # rows

    def as_dict(self) -> dict[str, object]:
        return {
            **self.config.model_dump(),
            "started_at": self.started_at,
            "tampered_rows": self.tampered,
        }


def tamper(
    drill: DrillConfig, p: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Apply an output attack to ``rate`` of the rows of ``p`` (``[n, C]``).

    Returns the answer as the compromised service would send it and the mask of rows
    tampered with. ``substitution`` is not an output attack (the data plane serves the
    substitute model instead) and is refused here.
    """
    rows = rng.random(len(p)) < drill.rate  # [n]
    if not rows.any():
        return p, rows
    sub = p[rows]
    if drill.attack == "switch":
        out = switch(sub).probs
    elif drill.attack == "avg":
        out = avg(sub).probs
    elif drill.attack == "random_switch":
        out = random_switch(sub, rng).probs
    elif drill.attack == "noise":
        out = random_noise(sub, drill.noise_sigma, rng).probs
    else:
        raise ValueError(f"{drill.attack!r} is not an output attack")
    tampered = p.astype(np.float32, copy=True)
    tampered[rows] = out
    return tampered, rows

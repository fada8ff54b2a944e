"""How many tokens the draft proposes per round (the lookahead gamma).

* constant: always ``k``;
* adaptive: Hugging Face's "heuristic" schedule, ``gamma <- gamma + 2`` after a round whose
  drafts were all accepted, ``gamma <- max(1, gamma - 1)`` otherwise, capped at a maximum;
* confidence: up to the maximum, but drafting stops after a token whose draft probability is
  below a threshold (HF ``assistant_confidence_threshold``, llama.cpp ``--draft-p-min``).

One schedule object per sequence, so concurrent requests do not steer each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.generation.config import GenerationConfig


@dataclass
class Lookahead:
    gamma: int
    kind: str = "constant"
    maximum: int = 16
    min_confidence: float = 0.0  # confidence schedule only

    @classmethod
    def from_config(cls, cfg: GenerationConfig, has_draft: bool) -> Lookahead:
        k = cfg.num_speculative_tokens if has_draft else 0
        if k == 0:
            return cls(0)
        if cfg.schedule == "confidence":
            return cls(
                cfg.max_speculative_tokens,
                "confidence",
                cfg.max_speculative_tokens,
                cfg.confidence_threshold,
            )
        return cls(min(k, cfg.max_speculative_tokens), cfg.schedule, cfg.max_speculative_tokens)

    def update(self, drafted: int, accepted: int) -> None:
        if self.kind != "adaptive" or drafted == 0:
            return
        if accepted == drafted:
            self.gamma = min(self.maximum, self.gamma + 2)
        else:
            self.gamma = max(1, self.gamma - 1)

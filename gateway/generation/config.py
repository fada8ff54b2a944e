"""The ``generation:`` block of a causal-LM model's ``config.yaml`` (``platform: causal_lm``).

Like vLLM's ``SpeculativeConfig``: the draft model, how many tokens it proposes per round and
how that number is scheduled, plus the serving limits of the model. No torch import here: the
model-config schema imports this module.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fides_core.config import StrictModel

Schedule = Literal["constant", "adaptive", "confidence"]
DType = Literal["float32", "bfloat16", "float16"]
Speculation = Literal["auto", "fixed"]


class GenerationConfig(StrictModel):
    """How a causal LM (optionally with a draft) is served at ``/v1``."""

    target: str = Field(
        ".",
        description="Hugging Face model directory of the target, relative to the version "
        "directory (default: the version directory itself).",
    )
    draft: str | None = Field(
        None,
        description="Hugging Face model directory of the draft (relative to the version "
        "directory, or absolute); it must share the target's vocabulary. None: plain decoding.",
    )
    num_speculative_tokens: int = Field(
        4, ge=0, le=32, description="Draft tokens proposed per round (gamma); 0 disables drafting."
    )
    schedule: Schedule = Field(
        "constant",
        description="constant: always num_speculative_tokens; adaptive: +2 after a fully "
        "accepted round, -1 otherwise, within [1, max_speculative_tokens]; confidence: stop "
        "drafting when the draft's probability of its token falls below confidence_threshold.",
    )
    max_speculative_tokens: int = Field(
        16, ge=1, le=32, description="Upper bound of the adaptive and confidence schedules."
    )
    confidence_threshold: float = Field(
        0.4, ge=0.0, le=1.0, description="Draft-probability cut-off of the confidence schedule."
    )
    dtype: DType = Field("float32", description="Weights and activations dtype.")
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N'.")
    num_threads: int = Field(
        0, ge=0, description="torch intra-op threads (process-wide); 0 keeps the default."
    )
    max_concurrent_sequences: int = Field(
        8,
        ge=1,
        le=64,
        description="Sequences decoded together: the largest batch of the model's engine "
        "(continuous batching: sequences join and leave between steps).",
    )
    speculation: Speculation = Field(
        "auto",
        description="auto: every step, cap the draft tokens per sequence at the number that "
        "gives the most tokens per second for the batch's size, from forward times measured "
        "at load and while serving and the measured acceptance (no speculation once the "
        "batch makes the target compute-bound); fixed: each sequence's schedule alone.",
    )
    prefill_chunk: int = Field(
        256,
        ge=1,
        description="Prompt tokens prefilled per engine step, all new sequences together: a "
        "longer prompt is prefilled over several steps while the batch keeps decoding.",
    )
    max_queue_size: int = Field(
        16, ge=0, description="Requests waiting for a free sequence slot; beyond: 503."
    )
    max_context: int | None = Field(
        None,
        ge=2,
        description="Prompt + completion tokens; default and upper bound: the target's "
        "max_position_embeddings.",
    )
    default_max_tokens: int = Field(
        16, ge=1, description="max_tokens of /v1/completions when the request sets none."
    )
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a /v1 request may take, its wait for a sequence slot included: "
        "past it the sequence is stopped, a plain request answers 504 and a stream ends with "
        "an error event. A request's `timeout` (extension) can only shorten it.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template; default: the tokenizer's, else the built-in "
        "'<|role|>\\ncontent\\n' format ending with '<|assistant|>\\n'.",
    )

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        if self.draft is None and self.num_speculative_tokens and self.schedule != "constant":
            raise ValueError(f"schedule {self.schedule!r} needs a draft")
        return self

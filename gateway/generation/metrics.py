"""Text-generation metrics, named like vLLM's (``vllm:spec_decode_*``) with the ``fides_``
prefix; registered in the app's registry by :class:`gateway.metrics.GatewayMetrics`.

Acceptance rate = accepted / draft tokens; mean acceptance length = 1 + accepted / drafts.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: time to first token spans 1 ms (a cached tiny model) to a minute (long prefill)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TPS_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class GenerationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        m = ["model"]
        self.requests = Counter(
            "fides_generation_requests",
            "Ended generation requests by finish reason: stop, length, cancelled (client "
            "gone), timeout, abort (its model unloaded or reloaded), queue_full (refused), "
            "error.",
            [*m, "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "fides_generation_prompt_tokens", "Prompt tokens processed.", m, registry=r
        )
        self.drafts = Counter(
            "fides_spec_decode_num_drafts",
            "Speculative rounds in which the draft proposed tokens.",
            m,
            registry=r,
        )
        self.draft_tokens = Counter(
            "fides_spec_decode_num_draft_tokens", "Tokens proposed by the draft.", m, registry=r
        )
        self.accepted_tokens = Counter(
            "fides_spec_decode_num_accepted_tokens",
            "Draft tokens accepted by the target.",
            m,
            registry=r,
        )
        self.accepted_per_pos = Counter(
            "fides_spec_decode_num_accepted_tokens_per_pos",
            "Accepted draft tokens by position in the draft (0 = first drafted token).",
            [*m, "position"],
            registry=r,
        )
        self.emitted_tokens = Counter(
            "fides_spec_decode_num_emitted_tokens",
            "Tokens emitted (accepted drafts + one target token per round), EOS included.",
            m,
            registry=r,
        )
        self.ttft = Histogram(
            "fides_generation_time_to_first_token_seconds",
            "Request admitted (queue wait included) to its first token.",
            m,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "fides_generation_inter_token_latency_seconds",
            "Time per output token after the first: a round's time divided by its tokens.",
            m,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Histogram(
            "fides_generation_tokens_per_second",
            "Per request: completion tokens / seconds from admission to the last token.",
            m,
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "fides_generation_running", "Sequences being generated now.", m, registry=r
        )
        self.waiting = Gauge(
            "fides_generation_queue_depth",
            "Requests waiting for a free sequence slot.",
            m,
            registry=r,
        )
        self.batch_size = Histogram(
            "fides_generation_batch_size",
            "Sequences decoded together per engine step (continuous batching).",
            m,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.draft_cap = Gauge(
            "fides_spec_decode_draft_cap",
            "Draft tokens per sequence the speculation policy allowed in the last step "
            "(0: speculation off at this batch size; speculation: auto only).",
            m,
            registry=r,
        )
        self.acceptance_estimate = Gauge(
            "fides_spec_decode_acceptance_estimate",
            "The policy's estimate of the per-token acceptance rate it chooses the cap from.",
            m,
            registry=r,
        )
        self._pos: dict[tuple[str, int], Any] = {}

    def per_position(self, model: str, position: int) -> Any:
        key = (model, position)
        child = self._pos.get(key)
        if child is None:
            child = self._pos[key] = self.accepted_per_pos.labels(model, str(position))
        return child

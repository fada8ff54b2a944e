"""The OIP statistics extension (Triton's ``/v2/models[/{name}[/versions/{v}]]/stats``).

Per model version: requests that succeeded and failed, with their time in the data plane; the
time each request waited in the batcher's queue; and, per execution, the time to assemble the
batch's inputs (``compute_input``: concatenating the requests), to run the model
(``compute_infer``) and to split its outputs back per request (``compute_output``), also per
batch size. Durations are cumulative nanoseconds, as Triton reports them, so a client computes
averages from two snapshots. Counters are updated on the event loop (the batcher reports an
execution's stage times once its worker thread has returned); the lock per model version keeps
a snapshot whole should an update ever come from another thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ModelStatistics", "Statistics"]

_STAGES = ("compute_input", "compute_infer", "compute_output")


@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class ModelStatistics:
    name: str
    version: str
    inference_count: int = 0  # samples answered (a batch of 8 in one request counts 8)
    execution_count: int = 0  # model executions (one per batch the batcher formed)
    last_inference_ms: int = 0  # wall clock, milliseconds since the epoch
    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    stages: dict[str, _Duration] = field(default_factory=lambda: {s: _Duration() for s in _STAGES})
    by_batch_size: dict[int, dict[str, _Duration]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_done(self, ok: bool, seconds: float) -> None:
        """One request through the data plane, answered (``ok``) or refused / failed."""
        with self._lock:
            (self.success if ok else self.fail).add(round(seconds * 1e9))

    def queued(self, waits_s: list[float]) -> None:
        with self._lock:
            self.queue.add(round(sum(waits_s) * 1e9), len(waits_s))

    def executed(self, size: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One model execution over ``size`` samples and the time of each of its stages."""
        ns = dict(zip(_STAGES, (round(s * 1e9) for s in (input_s, infer_s, output_s)), strict=True))
        with self._lock:
            self.inference_count += size
            self.execution_count += 1
            self.last_inference_ms = int(time.time() * 1000)
            per_size = self.by_batch_size.setdefault(size, {s: _Duration() for s in _STAGES})
            for stage, value in ns.items():
                self.stages[stage].add(value)
                per_size[stage].add(value)

    def as_dict(self) -> dict[str, Any]:
        """Triton's ``model_stats`` entry (tritonclient's ``get_inference_statistics``)."""
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.as_dict(),
                    "fail": self.fail.as_dict(),
                    "queue": self.queue.as_dict(),
                    **{s: d.as_dict() for s, d in self.stages.items()},
                    # no response cache: every request is a miss that was never looked up
                    "cache_hit": {"count": 0, "ns": 0},
                    "cache_miss": {"count": 0, "ns": 0},
                },
                "batch_stats": [
                    {"batch_size": size, **{s: d.as_dict() for s, d in stages.items()}}
                    for size, stages in sorted(self.by_batch_size.items())
                ],
                "memory_usage": [],
            }


class Statistics:
    """Every model version's statistics; a version's entry lives as long as the gateway (a
    version unloaded and loaded again keeps counting, as Triton's do)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelStatistics] = {}
        self._lock = threading.Lock()

    def model(self, name: str, version: str) -> ModelStatistics:
        key = (name, version)
        found = self._models.get(key)
        if found is None:
            with self._lock:
                found = self._models.setdefault(key, ModelStatistics(name, version))
        return found

    def snapshot(self, models: list[tuple[str, list[str]]]) -> dict[str, Any]:
        """``{"model_stats": [...]}`` for the given (name, versions) pairs, in that order; a
        version that has not answered yet reports zeros."""
        return {
            "model_stats": [
                self.model(name, v).as_dict() for name, versions in models for v in versions
            ]
        }

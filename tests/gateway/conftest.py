"""Helpers shared by the gateway's tests: a gate that holds chosen models' ONNX loads, to
make a load slow deterministically (never by sleeping)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from gateway.runtimes.onnx import OnnxRuntime

WAIT_S = 30.0  # generous: what is waited for happens at once when the repository is right


class Gate:
    """Holds the ONNX loads of the models named in ``held`` until :meth:`open`; counts, by
    model, the loads under way now and the most there ever were at once."""

    def __init__(self, held: set[str]) -> None:
        self.held = held
        self._open = threading.Event()
        self._lock = threading.Lock()
        self.active: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.begun: dict[str, int] = {}

    def open(self) -> None:
        self._open.set()

    def enter(self, model: str) -> None:
        with self._lock:
            self.active[model] = self.active.get(model, 0) + 1
            self.most[model] = max(self.most.get(model, 0), self.active[model])
            self.begun[model] = self.begun.get(model, 0) + 1
        if model in self.held:
            # never hangs a broken test run: a repository that waits for this load to finish
            # before another one begins fails the test's own (shorter) wait first
            self._open.wait(timeout=WAIT_S * 2)

    def leave(self, model: str) -> None:
        with self._lock:
            self.active[model] -= 1


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate(set())
    load = OnnxRuntime.load

    def gated_load(self: OnnxRuntime) -> None:
        gate.enter(self.name)
        try:
            load(self)
        finally:
            gate.leave(self.name)

    monkeypatch.setattr(OnnxRuntime, "load", gated_load)
    yield gate
    gate.open()  # a failed test leaves no thread waiting

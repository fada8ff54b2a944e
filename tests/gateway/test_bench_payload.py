from __future__ import annotations

import json
from pathlib import Path

import pytest

from fides.bench.payload import run_payload_bench


@pytest.mark.slow
def test_payload_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "payload.json"
    lines: list[str] = []
    doc = run_payload_bench(out, lines.append, repeats=2, sizes=(16, 4096))
    assert json.loads(out.read_text()) == doc
    assert [r["elements"] for r in doc["rows"]] == [16, 4096]
    assert all(r["json_ms"] > 0 and r["binary_ms"] > 0 for r in doc["rows"])
    assert all(r["grpc_ms"] > 0 and r["grpc_speedup"] > 0 for r in doc["rows"])
    table = (tmp_path / "payload.md").read_text()
    assert table.startswith("| elements")
    assert "| gRPC ms |" in table

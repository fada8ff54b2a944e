"""Text generation under concurrency: the default ``code`` pair served by a real gateway, N
closed-loop clients streaming ``/v1/completions`` at once.

One gateway process serves four copies of the pair (the same weights, linked; only the
``generation:`` block differs), measured one after another at each concurrency:

* ``auto``: continuous batching, speculation capped per step by the measured policy (the
  default);
* ``fixed``: continuous batching, every sequence drafts its schedule's tokens whatever the
  batch;
* ``no_draft``: continuous batching, plain decoding;
* ``serial``: one sequence at a time (``max_concurrent_sequences: 1``), speculation fixed: how
  the engine ran before continuous batching (requests queue for the single slot).

Each client sends greedy requests of ``new_tokens`` tokens (``ignore_eos``, so every request
has the same length) with prompts cut from held-out standard-library code, one after another,
for ``duration_s``. Per request: the time to the first streamed token and the time per output
token after it (TPOT); per cell: aggregate completion tokens per second.
"""

from __future__ import annotations

import asyncio
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

Log = Callable[[str], None]

VARIANTS: dict[str, dict[str, Any]] = {
    "auto": {"speculation": "auto"},
    "fixed": {"speculation": "fixed"},
    "no_draft": {"num_speculative_tokens": 0},
    "serial": {"speculation": "fixed", "max_concurrent_sequences": 1},
}


def _repository(source: Path, root: Path, variants: list[str]) -> Path:
    """``root/<variant>/``: config.yaml from the source's with the variant's changes, and
    the version directory linked (no copy of the weights)."""
    base = yaml.safe_load((source / "config.yaml").read_text(encoding="utf-8"))
    for name in variants:
        cfg = copy.deepcopy(base)
        cfg["generation"] = {**cfg.get("generation", {}), **VARIANTS[name]}
        # every client waits for a slot instead of being shed (the serial engine queues them)
        cfg["generation"]["max_queue_size"] = max(cfg["generation"].get("max_queue_size", 0), 64)
        (root / name).mkdir(parents=True)
        (root / name / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
        for version in source.iterdir():
            if version.is_dir() and version.name.isdigit():
                (root / name / version.name).symlink_to(version.resolve())
    return root


def _prompts(count: int, chars: int = 160) -> list[str]:
    from fides.defaults.text import TextRecipe, stdlib_sources

    _, held = stdlib_sources(TextRecipe())
    out = []
    for text in held:
        for i in range(0, max(0, len(text) - chars), 4 * chars):
            out.append(text[i : i + chars])
            if len(out) == count:
                return out
    return out


async def _client(
    http: httpx.AsyncClient,
    model: str,
    prompts: list[str],
    offset: int,
    new_tokens: int,
    until: float,
    rows: list[dict[str, float]],
) -> None:
    i = offset
    while time.perf_counter() < until:
        body = {
            "model": model,
            "prompt": prompts[i % len(prompts)],
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        i += 7
        t0 = time.perf_counter()
        first = None
        tokens = 0
        async with http.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"{model}: HTTP {resp.status_code}: {await resp.aread()!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("error"):
                    raise RuntimeError(f"{model}: {chunk['error']}")
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        t1 = time.perf_counter()
        first = first or t1
        rows.append(
            {
                "start": t0,
                "end": t1,
                "tokens": tokens,
                "ttft": first - t0,
                "tpot": (t1 - first) / max(tokens - 1, 1),
            }
        )


async def _cell(
    base: str, key: str, model: str, prompts: list[str], clients: int, new_tokens: int, s: float
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(
        base_url=base, headers=headers, timeout=120.0, limits=limits
    ) as http:
        # warm-up: one short request, not counted
        await _client(http, model, prompts, 0, 8, time.perf_counter() + 1e-3, [])
        rows: list[dict[str, float]] = []
        t_start = time.perf_counter()
        until = t_start + s
        await asyncio.gather(
            *[_client(http, model, prompts, c, new_tokens, until, rows) for c in range(clients)]
        )
        t_end = time.perf_counter()
    tokens = sum(r["tokens"] for r in rows)
    return {
        "clients": clients,
        "requests": len(rows),
        "seconds": round(t_end - t_start, 2),
        "tokens_per_s": round(tokens / (t_end - t_start), 1),
        "mean_latency_s": round(statistics.fmean(r["end"] - r["start"] for r in rows), 3),
        "p50_ttft_ms": round(statistics.median(r["ttft"] for r in rows) * 1e3, 1),
        "p50_tpot_ms": round(statistics.median(r["tpot"] for r in rows) * 1e3, 2),
    }


def run_generation_load(
    repository: Path,
    log: Log,
    *,
    concurrency: list[int],
    variants: list[str],
    new_tokens: int = 64,
    duration_s: float = 10.0,
) -> dict[str, Any]:
    """The table of module docstring, as a dict (``cells[variant][concurrency]``)."""
    from fides.bench.serving import _machine, _Server

    source = repository / "code"
    if not (source / "config.yaml").is_file():
        raise FileNotFoundError(f"no default pair in {source}: run `fides models build-default`")
    prompts = _prompts(64)
    cells: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fides-genload-") as tmp:
        repo = _repository(source, Path(tmp) / "repository", variants)
        server = _Server(repo, Path(tmp))
        server.start()
        rss: dict[str, float | None] = {"after_start": _rss_mb(server.pid)}
        try:
            for name in variants:
                cells[name] = {}
                for c in concurrency:
                    row = asyncio.run(
                        _cell(server.base, server.key, name, prompts, c, new_tokens, duration_s)
                    )
                    cells[name][str(c)] = row
                    log(
                        f"{name} c={c}: {row['tokens_per_s']} tok/s, mean latency "
                        f"{row['mean_latency_s']} s, p50 TPOT {row['p50_tpot_ms']} ms, p50 TTFT "
                        f"{row['p50_ttft_ms']} ms ({row['requests']} requests)"
                    )
                rss[f"after_{name}"] = _rss_mb(server.pid)
        finally:
            server.stop()
    result: dict[str, Any] = {
        "machine": _machine(),
        "new_tokens": new_tokens,
        "duration_s": duration_s,
        "variants": {k: VARIANTS[k] for k in variants},
        "cells": cells,
        "server_rss_mb": rss,
    }
    one = str(min(concurrency))
    goals = {}
    for name, by_c in cells.items():
        top = str(max(concurrency))
        if one in by_c and top in by_c and one != top:
            goals[name] = {
                "throughput_ratio": round(by_c[top]["tokens_per_s"] / by_c[one]["tokens_per_s"], 2),
                "tpot_ratio": round(by_c[top]["p50_tpot_ms"] / by_c[one]["p50_tpot_ms"], 2),
            }
    result["vs_single_request"] = goals
    return result


def _rss_mb(pid: int) -> float | None:
    from fides.bench.load import _rss_kb

    kb = _rss_kb(pid)
    return None if kb is None else round(kb / 1024, 1)


def markdown(result: dict[str, Any]) -> list[str]:
    """The table: aggregate tokens/s and p50 TPOT per engine variant and concurrency."""
    conc = sorted({int(c) for cells in result["cells"].values() for c in cells})
    lines = [
        "| engine | "
        + " | ".join(f"c={c} tok/s (p50 TPOT ms)" for c in conc)
        + f" | c={conc[-1]} / c={conc[0]} tok/s | TPOT ratio |",
        "|---|" + "---|" * (len(conc) + 2),
    ]
    for name, by_c in result["cells"].items():
        vals = [
            f"{by_c[str(c)]['tokens_per_s']} ({by_c[str(c)]['p50_tpot_ms']})"
            if str(c) in by_c
            else ""
            for c in conc
        ]
        g = result.get("vs_single_request", {}).get(name, {})
        lines.append(
            f"| {name} | "
            + " | ".join(vals)
            + f" | {g.get('throughput_ratio', '')}x | {g.get('tpot_ratio', '')}x |"
        )
    rss = result.get("server_rss_mb")
    if rss:
        lines += [
            "",
            "Gateway resident memory (MB), after start and after each engine's cells: "
            + ", ".join(f"{k.removeprefix('after_')} {v}" for k, v in rss.items())
            + ".",
        ]
    return lines

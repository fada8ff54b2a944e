"""What a verified answer costs end to end (``fides bench integrity``, the first part).

One gateway process serves each model twice: as it is, with its ``integrity:`` block
(``verified``), and as ``<model>_unverified``, a copy of the same folder with the block
removed. The same load generator as ``fides bench serving`` (its own process, closed loop,
binary tensors, one sample per request) drives both at each concurrency, the two modes
interleaved and each cell run ``repeats`` times; the best throughput of the repeats is kept,
with that cell's p50 and p99 (the machine is shared: interference only ever slows a cell).

Every verified cell also reports the verdicts the gateway counted during it, so that a cell
whose answers came back unverified (the enclave timed out or was down) is seen, not counted
as verification's throughput. The breakdown of one verified request comes from the gateway's
own histograms over the concurrency-1 cell (``fides_integrity_stage_duration_seconds``,
``fides_enclave_call_duration_seconds`` and the batchers' queue and compute times), and
the enclave's work inside the round trip from :class:`~enclave_sim.core.EnclaveCore` run in
this process on the same verifier: onnxruntime alone, then hashing, Merkle tree and signing.

Inputs are real samples (the digits test split for the default model, an npz's ``x_test``
otherwise): random tensors would be out of distribution, and the novelty check would mark
every answer unverified.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import yaml

from fides.bench.enclave import _timed
from fides.bench.serving import (
    REQUEST_TIMEOUT_S,
    _decode_response,
    _encode,
    _gateway_cell,
    _http_request,
    _load_model,
    _machine,
    _Model,
    _Server,
)
from gateway.integrity.pipeline import ENCLAVE_PARTS, STAGES  # the histograms' labels

Log = Callable[..., None]
MODES = ("unverified", "verified")
CONCURRENCY = (1, 4, 16)
UNVERIFIED_SUFFIX = "_unverified"
# the goals (issue 25): at concurrency 1 and 16
GOAL_P50_RATIO_C1 = 1.15
GOAL_THROUGHPUT_C16 = 0.85
GOAL_P99_RATIO_C16 = 1.5
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


class BenchSetupError(ValueError):
    """The repository or the inputs cannot give the bench what it needs."""


# -- the repository the bench serves ------------------------------------------------------


def _config(folder: Path) -> dict[str, Any]:
    doc = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
    if not isinstance(doc, dict):
        raise BenchSetupError(f"{folder / 'config.yaml'} is not a mapping")
    return doc


def integrity_models(config: dict[str, Any]) -> list[str]:
    """The repository models a model's ``integrity:`` block needs beside it."""
    block = config.get("integrity") or {}
    names = [block.get("detector"), block.get("reclassifier"), block.get("novelty")]
    names.append((block.get("enclave") or {}).get("verifier_model"))
    return [n for n in names if isinstance(n, str) and n]


def prepare_repository(source: Path, target: Path, models: Sequence[str]) -> None:
    """Copy each model and what its integrity block needs into ``target``, and beside each a
    ``<model>_unverified`` copy of the same folder without the block."""
    target.mkdir(parents=True, exist_ok=True)
    for name in models:
        folder = source / name
        if not (folder / "config.yaml").is_file():
            raise BenchSetupError(f"no model '{name}' in {source} (no {folder / 'config.yaml'})")
        config = _config(folder)
        if not config.get("integrity"):
            raise BenchSetupError(
                f"model '{name}' has no integrity: block in {folder / 'config.yaml'}: there is "
                "nothing to measure verification against"
            )
        for needed in [name, *integrity_models(config)]:
            if not (target / needed).exists():
                if not (source / needed).is_dir():
                    raise BenchSetupError(
                        f"model '{name}' needs '{needed}', which is not in {source}"
                    )
                shutil.copytree(source / needed, target / needed)
        plain = target / f"{name}{UNVERIFIED_SUFFIX}"
        shutil.copytree(folder, plain)
        config = {k: v for k, v in config.items() if k != "integrity"}
        if "name" in config:
            config["name"] = plain.name
        (plain / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


# -- inputs ---------------------------------------------------------------------------------


def digits_inputs() -> np.ndarray:
    """The default model's test split, as the model takes it: FP32 [N, 1, 8, 8]."""
    from fides.defaults.digits import load_split

    return np.asarray(load_split().x_test.numpy(), dtype=np.float32)


def npz_inputs(path: Path, key: str = "x_test") -> np.ndarray:
    with np.load(path) as data:
        if key not in data:
            raise BenchSetupError(f"{path} has no array '{key}' (it has {sorted(data.files)})")
        x = data[key]
    if x.dtype == np.uint8:
        return np.asarray(x, dtype=np.float32) / np.float32(255.0)
    return np.asarray(x, dtype=np.float32)


def _feeds(model: _Model, samples: np.ndarray, count: int) -> list[dict[str, np.ndarray]]:
    """Up to ``count`` single-sample feeds of ``samples``, shaped as the model takes them."""
    (spec,) = model.inputs
    if int(np.prod(samples.shape[1:])) != int(np.prod(spec.shape)):
        raise BenchSetupError(
            f"inputs of shape {list(samples.shape[1:])} per sample do not fit model "
            f"'{model.name}' input '{spec.name}' {list(spec.shape)}"
        )
    return [
        {spec.name: np.ascontiguousarray(x.reshape(spec.shape), dtype=spec.dtype)}
        for x in samples[:count]
    ]


def _requests(
    server: _Server, model: _Model, feeds: list[dict[str, np.ndarray]]
) -> tuple[bytes, ...]:
    """Whole HTTP requests, binary tensors, ready for the load generator."""
    out = []
    for feed in feeds:
        extra, body = _encode(model, feed, binary=True)
        out.append(_http_request(server, model.name, extra, body))
    return tuple(out)


# -- reading the gateway's metrics ----------------------------------------------------------


def scrape(
    server: _Server, http: httpx.Client
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every labelled sample of /metrics: (name, labels) -> value."""
    resp = http.get(f"{server.base}/metrics", headers=server.headers)
    resp.raise_for_status()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in resp.text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[(m.group(1), frozenset(_LABEL.findall(m.group(2))))] = float(m.group(3))
    return out


def _delta(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    want = set(labels.items())
    total = 0.0
    for (n, lab), value in after.items():
        if n == name and want <= lab:
            total += value - before.get((n, lab), 0.0)
    return total


def _mean_us(before: Any, after: Any, name: str, **labels: str) -> float | None:
    count = _delta(before, after, f"{name}_count", **labels)
    if count <= 0:
        return None
    return round(_delta(before, after, f"{name}_sum", **labels) / count * 1e6, 1)


def breakdown(before: Any, after: Any, model: str, pair_models: dict[str, str]) -> dict[str, Any]:
    """Mean microseconds per verified request in each stage over one cell (the gateway's own
    histograms), and each pair model's queue wait and compute per batch."""
    stages = {
        s: _mean_us(before, after, "fides_integrity_stage_duration_seconds", model=model, stage=s)
        for s in STAGES
    }
    enclave = {
        p: _mean_us(before, after, "fides_enclave_call_duration_seconds", model=model, part=p)
        for p in ENCLAVE_PARTS
    }
    batchers = {}
    for role, name in pair_models.items():
        batchers[role] = {
            "model": name,
            "queue_us": _mean_us(
                before, after, "fides_inference_queue_duration_seconds", model=name
            ),
            "compute_us": _mean_us(
                before, after, "fides_inference_compute_duration_seconds", model=name
            ),
        }
    verdicts = {
        v: int(_delta(before, after, "fides_integrity_verdicts_total", model=model, verdict=v))
        for v in ("verified", "attack", "unverified")
    }
    reasons: dict[str, int] = {}
    for (n, lab), value in after.items():
        labels = dict(lab)
        if n == "fides_integrity_unverified_total" and labels.get("model") == model:
            count = int(value - before.get((n, lab), 0.0))
            if count:
                reasons[labels.get("reason", "?")] = count
    return {
        "stages_us": stages,
        "enclave_us": enclave,
        "batchers": batchers,
        "verdicts": verdicts,
        "unverified_reasons": reasons,
    }


# -- the enclave's own work, in this process ------------------------------------------------


def enclave_work(verifier: Path, config: dict[str, Any], sample: np.ndarray) -> dict[str, float]:
    """Median microseconds of the enclave's own work at batch 1 on this verifier: onnxruntime
    alone, the whole :meth:`EnclaveCore.verify` (checks, hashing, Merkle tree, one signature,
    evidence), and one signature alone."""
    import cbor2
    import onnxruntime as ort

    from enclave_sim.core import EnclaveCore
    from enclave_sim.pki import init_ca, load_identity
    from enclave_sim.sealing import seal
    from fides_core import cose
    from fides_core.enclave_config import from_enclave_block
    from fides_core.verify import VerifyRequest, input_specs

    model_bytes = verifier.read_bytes()
    vcfg = from_enclave_block(config)
    (spec,) = input_specs(model_bytes)
    x = sample.reshape([1, *[d for d in spec.shape[1:]]]).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="fides-bench-core-") as tmp:
        platform_dir = Path(tmp)
        init_ca(platform_dir, force=True)
        _, measurement, _ = seal(model_bytes, vcfg, platform_dir)
        core = EnclaveCore(model_bytes, vcfg, measurement, load_identity(platform_dir))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        request = [VerifyRequest("bench-0", b"n" * 16, {spec.name: x})]
        payload = cbor2.dumps({"type": "fides-verification/1", "root": b"r" * 32, "seq": 1})
        key = core._result_cose  # noqa: SLF001 - the key the core signs results with
        ort_us = _timed(lambda: session.run(None, {spec.name: x}), 1.0, 20)["median_us"]
        core_us = _timed(lambda: core.verify(request), 1.0, 20)["median_us"]
        sign_us = _timed(lambda: cose.sign1(payload, key), 1.0, 20)["median_us"]
    return {
        "verifier_ort_us": round(ort_us, 1),
        "core_verify_us": round(core_us, 1),
        "signature_us": round(sign_us, 1),
        "hashing_and_evidence_us": round(core_us - ort_us - sign_us, 1),
    }


# -- the run --------------------------------------------------------------------------------


def _check_modes(server: _Server, model: _Model, feed: dict[str, np.ndarray]) -> None:
    """One request to each mode: the verified one must come back verified with evidence, the
    unverified one without any integrity verdict."""
    extra, body = _encode(model, feed, binary=True)
    headers = dict(line.split(": ", 1) for line in extra.decode().strip().split("\r\n"))
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=server.headers) as client:
        for name, verified in ((model.name, True), (f"{model.name}{UNVERIFIED_SUFFIX}", False)):
            url = f"{server.base}/v2/models/{name}/infer"
            resp = client.post(url, content=body, headers=headers)
            if resp.status_code != 200:
                raise RuntimeError(f"{name} answered {resp.status_code}: {resp.text[:300]}")
            _decode_response(resp)  # the tensors parse
            hlen = resp.headers.get("inference-header-content-length")
            doc = orjson.loads(resp.content if hlen is None else resp.content[: int(hlen)])
            params = doc.get("parameters") or {}
            verdict = params.get("integrity_verdict")
            if verified and (verdict != "verified" or not params.get("integrity_evidence")):
                raise RuntimeError(
                    f"{name}: a verified model answered verdict {verdict!r} "
                    f"({params.get('integrity_reason')}): nothing to measure"
                )
            if not verified and verdict is not None:
                raise RuntimeError(f"{name}: the copy without integrity answered a verdict")


def run_verified_bench(
    repository: Path,
    inputs: dict[str, np.ndarray],
    output: Path,
    log: Log,
    *,
    concurrency: Sequence[int] = CONCURRENCY,
    duration_s: float = 8.0,
    warmup_s: float = 2.0,
    repeats: int = 2,
    samples: int = 256,
    note: str | None = None,
) -> dict[str, Any]:
    """Verified against unverified for each model in ``inputs`` (model name -> samples)."""
    with tempfile.TemporaryDirectory(prefix="fides-bench-verified-") as tmp:
        work = Path(tmp)
        repo = work / "repository"
        prepare_repository(repository, repo, list(inputs))
        env = {
            "FIDES_ENCLAVE_ALLOW_SIMULATED": "1",
            "FIDES_ENCLAVE_INIT_PLATFORM": "1",
            "FIDES_ENCLAVE_PLATFORM_DIR": str(work / "platform"),
            "FIDES_ENCLAVE_RUNTIME_DIR": str(work / "run"),
            "FIDES_INTEGRITY_STATE_DIR": str(work / "state"),
        }
        models: dict[str, dict[str, Any]] = {}
        server = _Server(repo, work, env=env)
        try:
            server.start()
            with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
                for name, x in inputs.items():
                    models[name] = _bench_model(
                        server, http, repo, name, x, concurrency, duration_s, warmup_s,
                        repeats, samples, log,
                    )  # fmt: skip
        finally:
            server.stop()
    doc: dict[str, Any] = {
        "benchmark": "verification_cost",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "settings": {
            "concurrency": list(concurrency),
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "repeats": repeats,
            "distinct_inputs": samples,
            "statistic": "best throughput of the repeats, with that cell's p50 and p99",
        },
        "goals": {
            "p50_ratio_c1": GOAL_P50_RATIO_C1,
            "throughput_share_c16": GOAL_THROUGHPUT_C16,
            "p99_ratio_c16": GOAL_P99_RATIO_C16,
        },
        "models": models,
        "simulated": True,
    }
    if note:
        doc["note"] = note
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    output.with_suffix(".md").write_text(markdown(doc) + "\n", encoding="utf-8")
    for line in markdown(doc).splitlines():
        log(line)
    log(f"results written to {output}")
    return doc


def _bench_model(
    server: _Server,
    http: httpx.Client,
    repo: Path,
    name: str,
    x: np.ndarray,
    concurrency: Sequence[int],
    duration_s: float,
    warmup_s: float,
    repeats: int,
    samples: int,
    log: Log,
) -> dict[str, Any]:
    config = _config(repo / name)
    block = config["integrity"]
    model = _load_model(repo, name)
    plain = _load_model(repo, f"{name}{UNVERIFIED_SUFFIX}")
    feeds = _feeds(model, x, samples)
    _check_modes(server, model, feeds[0])
    requests = {
        "verified": _requests(server, model, feeds),
        "unverified": _requests(server, plain, feeds),
    }
    pair_models = {"service": name}
    for role in ("detector", "reclassifier", "novelty"):
        if block.get(role):
            pair_models[role] = block[role]
    cells: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in MODES}
    stage_c1: dict[str, Any] | None = None
    for c in concurrency:
        for r in range(repeats):
            for mode in MODES:
                target = model if mode == "verified" else plain
                before = scrape(server, http)
                cell = _gateway_cell(
                    server, http, target, mode, requests[mode], c, warmup_s, duration_s
                )
                after = scrape(server, http)
                if mode == "verified":
                    cell["breakdown"] = breakdown(before, after, name, pair_models)
                    v = cell["breakdown"]["verdicts"]
                    cell["answers_not_verified"] = v["unverified"]
                best = cells[mode].get(c)
                if best is None or cell["throughput_rps"] > best["throughput_rps"]:
                    cells[mode][c] = cell
                log(
                    f"  {name} c={c} run {r + 1}/{repeats} {mode}: "
                    f"{cell['throughput_rps']:.0f} req/s, p50 {cell['p50_ms']} ms, "
                    f"p99 {cell['p99_ms']} ms, errors {cell['errors']}"
                )
        stage_c1 = stage_c1 or cells["verified"][concurrency[0]]["breakdown"]
    rows = []
    for c in concurrency:
        u, v = cells["unverified"][c], cells["verified"][c]
        rows.append(
            {
                "concurrency": c,
                "unverified_rps": u["throughput_rps"],
                "verified_rps": v["throughput_rps"],
                "throughput_share": round(v["throughput_rps"] / u["throughput_rps"], 3)
                if u["throughput_rps"]
                else None,
                "unverified_p50_ms": u["p50_ms"],
                "verified_p50_ms": v["p50_ms"],
                "p50_ratio": _ratio(v["p50_ms"], u["p50_ms"]),
                "unverified_p99_ms": u["p99_ms"],
                "verified_p99_ms": v["p99_ms"],
                "p99_ratio": _ratio(v["p99_ms"], u["p99_ms"]),
                "errors": u["errors"] + v["errors"],
                "answers_not_verified": v.get("answers_not_verified", 0),
            }
        )
    verifier = repo / block["enclave"]["verifier_model"]
    version = max(int(p.name) for p in verifier.iterdir() if p.name.isdigit())
    work = enclave_work(verifier / str(version) / "model.onnx", block["enclave"], x[0])
    return {
        "model": name,
        "verifier": block["enclave"]["verifier_model"],
        "pair_models": pair_models,
        "enclave_batching": {
            "max_batch_size": block["enclave"].get("max_batch_size"),
            "max_queue_delay_microseconds": block["enclave"].get("max_queue_delay_microseconds"),
        },
        "service_batching": model.config,
        "rows": rows,
        "cells": {m: {str(c): cell for c, cell in cells[m].items()} for m in MODES},
        "breakdown_c1": stage_c1,
        "enclave_work": work,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def markdown(doc: dict[str, Any]) -> str:
    m, s = doc["machine"], doc["settings"]
    lines = [
        "# What a verified answer costs",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores (client, gateway and "
        f"enclave share them), Python {m['python']}, onnxruntime {m['onnxruntime']}. "
        f"Closed loop, binary tensors, one sample per request, {s['duration_s']:g} s per cell "
        f"after {s['warmup_s']:g} s warm-up, {s['repeats']} runs per cell with the modes "
        f"interleaved ({s['statistic']}). Verified: the model with its integrity block "
        "(SIMULATED enclave); unverified: the same folder without the block, same gateway.",
    ]
    g = doc["goals"]
    for name, r in doc["models"].items():
        lines += [
            "",
            f"## {name}",
            "",
            "| concurrency | unverified req/s | verified req/s | share | p50 unverified ms "
            "| p50 verified ms | p50 ratio | p99 unverified ms | p99 verified ms | p99 ratio "
            "| not verified | errors |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in r["rows"]:
            lines.append(
                f"| {row['concurrency']} | {_f(row['unverified_rps'])} | {_f(row['verified_rps'])} "
                f"| {_f(100 * (row['throughput_share'] or 0))}% "
                f"| {_f(row['unverified_p50_ms'], 2)} | {_f(row['verified_p50_ms'], 2)} "
                f"| {_f(row['p50_ratio'], 2)}x | {_f(row['unverified_p99_ms'], 2)} "
                f"| {_f(row['verified_p99_ms'], 2)} | {_f(row['p99_ratio'], 2)}x "
                f"| {row['answers_not_verified']} | {row['errors']} |"
            )
        lines += ["", _goals(r["rows"], g), "", *breakdown_table(r)]
    return "\n".join(lines)


def _goals(rows: list[dict[str, Any]], g: dict[str, float]) -> str:
    by_c = {row["concurrency"]: row for row in rows}
    parts = []
    if 1 in by_c and by_c[1]["p50_ratio"] is not None:
        ok = by_c[1]["p50_ratio"] <= g["p50_ratio_c1"]
        parts.append(
            f"concurrency 1 p50 ratio {by_c[1]['p50_ratio']:.2f}x (goal <= {g['p50_ratio_c1']}x: "
            f"{'met' if ok else 'not met'})"
        )
    if 16 in by_c and by_c[16]["throughput_share"] is not None:
        row = by_c[16]
        ok = row["throughput_share"] >= g["throughput_share_c16"]
        parts.append(
            f"concurrency 16 throughput {100 * row['throughput_share']:.0f}% of unverified (goal "
            f">= {100 * g['throughput_share_c16']:.0f}%: {'met' if ok else 'not met'})"
        )
        if row["p99_ratio"] is not None:
            ok = row["p99_ratio"] <= g["p99_ratio_c16"]
            parts.append(
                f"p99 ratio {row['p99_ratio']:.2f}x (goal <= {g['p99_ratio_c16']}x: "
                f"{'met' if ok else 'not met'})"
            )
    return "Goals: " + "; ".join(parts) + "." if parts else "Goals: not measured."


def breakdown_table(r: dict[str, Any]) -> list[str]:
    b = r["breakdown_c1"]
    if b is None:
        return []
    st, en, w = b["stages_us"], b["enclave_us"], r["enclave_work"]
    lines = [
        f"One verified request at concurrency 1 (mean µs per request over the cell, from the "
        f"gateway's histograms; the enclave's own work measured in process on verifier "
        f"`{r['verifier']}`, median at batch 1):",
        "",
        "| stage | µs | what it is |",
        "|---|---:|---|",
        f"| service | {_f(st['service'])} | the model's answer, its batcher's queue included "
        f"(queue {_f(b['batchers']['service']['queue_us'])}, compute "
        f"{_f(b['batchers']['service']['compute_us'])}) |",
        f"| enclave, after the service | {_f(st['enclave'])} | waiting for the enclave once "
        "the service answered (the two run side by side) |",
        f"| · enclave batching | {_f(en['batching'])} | waiting for the enclave call to start |",
        f"| · enclave round trip | {_f(en['round_trip'])} | framing, socket, decoding and the "
        "enclave's work: |",
        f"| · · verifier (onnxruntime) | {_f(w['verifier_ort_us'])} | the model alone |",
        f"| · · hashing, Merkle tree, evidence | {_f(w['hashing_and_evidence_us'])} | inputs "
        "hashed, entry encoded |",
        f"| · · signature | {_f(w['signature_us'])} | one COSE_Sign1 per call |",
        f"| · evidence check | {_f(en['check'])} | the gateway checks the result (by the "
        "session's MAC, or by the signature without a session), the Merkle proof and the "
        "input hash |",
        f"| judge | {_f(st['judge'])} | detector"
        + (" and novelty check" if "novelty" in b["batchers"] else "")
        + " ("
        + ", ".join(
            f"{role} queue {_f(v['queue_us'])} compute {_f(v['compute_us'])}"
            for role, v in b["batchers"].items()
            if role in ("detector", "novelty")
        )
        + ") |",
        f"| re-classifier | {_f(st['reclassify'])} | flagged answers only |",
        f"| monitor | {_f(st['monitor'])} | substitution window, alarm, incident record |",
    ]
    v = b["verdicts"]
    lines += [
        "",
        f"Verdicts in that cell: {v['verified']} verified, {v['attack']} attack, "
        f"{v['unverified']} unverified"
        + (
            " (" + ", ".join(f"{k} {n}" for k, n in sorted(b["unverified_reasons"].items())) + ")"
            if b.get("unverified_reasons")
            else ""
        )
        + ".",
    ]
    return lines

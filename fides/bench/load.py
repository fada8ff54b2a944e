"""Open-loop load generator for soak and overload runs against a running gateway (loopback).

Requests are *scheduled* at a fixed rate per phase (open loop: a slow server does not slow the
arrivals down, as it would with a fixed number of clients waiting on their answers) and sent on
a pool of keep-alive HTTP/1.1 connections by a deliberately small client (pre-encoded request
bytes, a status line and ``Content-Length`` parsed by hand), so that the client costs far less
CPU per request than the server it loads. Every request carries its own id (``X-Request-ID``
and the body's ``id``); every answer is checked against it, so a lost, duplicated or mixed-up
answer shows. Latencies are measured from the scheduled time (a request that waited for a free
connection counts that wait). The run is bounded by each phase's duration, by ``max_requests``
and by a per-request timeout; the server's resident memory is sampled from ``/proc``.

``fides bench soak`` / ``fides bench overload`` start a gateway on a generated model whose
compute dominates (so that the model, not the HTTP path, is the bottleneck, and overload
fills its queue: the case load shedding exists for), measure its capacity, and run the phases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import platform
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

Log = Callable[..., None]
MODEL = "load"
REQUEST_TIMEOUT_S = 30.0


# -- the workload -------------------------------------------------------------------------------


def build_load_repository(
    root: Path, *, repeat: int = 512, hidden: int = 512, layers: int = 5
) -> Path:
    """A repository with one model, ``load``: FP32 [N, 64] -> each row tiled ``repeat`` times ->
    ``layers`` ReLU layers of width ``hidden`` -> averaged back to [N, 10]. About
    2 * repeat * hidden^2 * layers FLOPs per row (~1 GFLOP: around ten milliseconds on one
    core) with a few MB of weights: compute-bound, so the model is the bottleneck and not the
    HTTP path. One instance on one onnxruntime thread, one request per batch (a closed-loop
    capacity measurement would otherwise fill batches that an open-loop load at 80% does not),
    a queue of 32."""
    import onnx
    import yaml
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    widths = [64] + [hidden] * layers + [10]
    inits = [
        numpy_helper.from_array(np.array([repeat, 1], np.int64), "repeats"),
        numpy_helper.from_array(np.array([-1, repeat, 10], np.int64), "grouped"),
    ]
    nodes = [helper.make_node("Tile", ["input", "repeats"], ["t"])]  # [N * repeat, 64]
    prev = "t"
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        w = (rng.standard_normal((a, b)) / math.sqrt(a)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]))
        prev = f"m{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Reshape", [prev, "grouped"], ["g"]))  # [N, repeat, 10]
    nodes.append(helper.make_node("ReduceMean", ["g"], ["output"], axes=[1], keepdims=0))
    graph = helper.make_graph(
        nodes,
        MODEL,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph)
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    (root / MODEL / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(root / MODEL / "1" / "model.onnx"))
    config = {
        "platform": "onnx",
        "max_batch_size": 1,
        "dynamic_batching": {"max_queue_delay_microseconds": 0, "max_queue_size": 32},
        "onnx": {"intra_op_threads": 1, "inter_op_threads": 1},
    }
    (root / MODEL / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return root


def infer_request(host: str, port: int, model: str, key: str | None, rid: str, x: bytes) -> bytes:
    """One pre-encoded ``POST /v2/models/<model>/infer`` (JSON body, one row)."""
    body = b'{"id":"' + rid.encode() + b'","inputs":[{"name":"input","shape":[1,64],'
    body += b'"datatype":"FP32","data":' + x + b"}]}"
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-ID: {rid}\r\n"
    )
    if key:
        head += f"Authorization: Bearer {key}\r\n"
    return (head + "\r\n").encode() + body


# -- the client ---------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    rate: float  # offered requests per second
    duration_s: float


@dataclass
class Outcome:
    rid: str
    phase: str
    scheduled: float  # seconds since the run started
    sent: float
    done: float
    status: int  # 0: no HTTP answer (connection lost, timeout)
    id_ok: bool  # the answer named this request's id
    retry_after: bool = False  # a Retry-After header came with it
    error: str = ""


@dataclass
class LoadRun:
    started_wall: str
    outcomes: list[Outcome] = field(default_factory=list)
    rss_kb: list[tuple[float, int]] = field(default_factory=list)  # (seconds, VmRSS)
    scheduled: int = 0
    max_backlog: int = 0  # tickets that waited for a free connection at once

    def phase(self, name: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.phase == name]


class _Connection:
    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, data: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            async with asyncio.timeout(self.timeout_s):
                self.writer.write(data)
                head = await self.reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    headers[k.strip().lower()] = v.strip()
                body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        except BaseException:
            self.close()  # out of step with the server: a new connection for the next one
            raise
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, headers, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


async def run_phases(
    host: str,
    port: int,
    phases: Sequence[Phase],
    *,
    model: str = MODEL,
    key: str | None = None,
    connections: int = 64,
    server_pid: int | None = None,
    max_requests: int = 2_000_000,
    timeout_s: float = REQUEST_TIMEOUT_S,
    seed: int = 0,
) -> LoadRun:
    """Offer each phase's rate for its duration; returns every request's outcome."""
    run = LoadRun(datetime.now(UTC).isoformat(timespec="seconds"))
    rng = np.random.default_rng(seed)
    rows = [orjson.dumps(rng.uniform(-1, 1, 64).astype(np.float32).tolist()) for _ in range(64)]
    tickets: asyncio.Queue[tuple[str, str, float] | None] = asyncio.Queue()
    t0 = time.perf_counter()

    async def worker() -> None:
        conn = _Connection(host, port, timeout_s)
        try:
            while (ticket := await tickets.get()) is not None:
                rid, phase, scheduled = ticket
                data = infer_request(host, port, model, key, rid, rows[int(rid[1:]) % len(rows)])
                status, id_ok, retry, error = 0, False, False, ""
                sent = time.perf_counter() - t0
                try:
                    status, headers, body = await conn.request(data)
                    id_ok = headers.get(b"x-request-id") == rid.encode()
                    retry = b"retry-after" in headers
                    if status == 200:
                        id_ok = id_ok and orjson.loads(body).get("id") == rid
                except TimeoutError:
                    error = "timeout"
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                    error = type(exc).__name__
                done = time.perf_counter() - t0
                run.outcomes.append(
                    Outcome(rid, phase, scheduled, sent, done, status, id_ok, retry, error)
                )
        finally:
            conn.close()

    async def sample_rss() -> None:
        while server_pid is not None:
            rss = _rss_kb(server_pid)
            if rss is not None:
                run.rss_kb.append((time.perf_counter() - t0, rss))
            await asyncio.sleep(0.5)

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    sampler = asyncio.create_task(sample_rss())
    try:
        start = 0.0
        for ph in phases:
            n = int(ph.rate * ph.duration_s)
            for i in range(n):
                if run.scheduled >= max_requests:
                    break
                at = start + i / ph.rate
                delay = at - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                run.scheduled += 1
                tickets.put_nowait((f"L{run.scheduled:08d}", ph.name, at))
                run.max_backlog = max(run.max_backlog, tickets.qsize())
            start += ph.duration_s
        for _ in workers:
            tickets.put_nowait(None)
        await asyncio.wait_for(asyncio.gather(*workers), timeout=timeout_s + 30)
    finally:
        for w in workers:
            w.cancel()
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    return run


async def measure_capacity(
    host: str,
    port: int,
    *,
    model: str = MODEL,
    key: str | None = None,
    concurrency: int = 16,
    duration_s: float = 5.0,
) -> float:
    """Closed loop: ``concurrency`` clients back to back; successful answers per second."""
    x = orjson.dumps(np.zeros(64, np.float32).tolist())
    ok = 0
    t_end = time.perf_counter() + duration_s

    async def client(k: int) -> None:
        nonlocal ok
        conn = _Connection(host, port, REQUEST_TIMEOUT_S)
        i = 0
        try:
            while time.perf_counter() < t_end:
                i += 1
                status, _, _ = await conn.request(
                    infer_request(host, port, model, key, f"C{k}-{i}", x)
                )
                ok += status == 200
        finally:
            conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(concurrency)))
    return ok / (time.perf_counter() - t0)


# -- figures ------------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(outcomes: Sequence[Outcome], duration_s: float) -> dict[str, Any]:
    """Status counts, throughput and latencies (ms) of one phase: ``ok_*`` from the scheduled
    time (what a client at that rate sees), ``shed_*`` from the time the request was sent (how
    quickly the server says no)."""
    ok = [o.done - o.scheduled for o in outcomes if o.status == 200]
    shed = [o.done - o.sent for o in outcomes if o.status in (429, 503)]
    statuses = Counter(str(o.status) for o in outcomes)
    return {
        "requests": len(outcomes),
        "offered_rps": len(outcomes) / duration_s if duration_s else None,
        "ok_rps": len(ok) / duration_s if duration_s else None,
        "statuses": dict(sorted(statuses.items())),
        "shed_share": len(shed) / len(outcomes) if outcomes else 0.0,
        "ok_p50_ms": _ms(_pct(ok, 50)),
        "ok_p99_ms": _ms(_pct(ok, 99)),
        "ok_max_ms": _ms(max(ok) if ok else None),
        "shed_p99_ms": _ms(_pct(shed, 99)),
        "errors": dict(Counter(o.error for o in outcomes if o.error)),
    }


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 2)


def id_check(run: LoadRun) -> dict[str, int]:
    """Every scheduled id answered exactly once, with its own id."""
    answered = Counter(o.rid for o in run.outcomes)
    return {
        "scheduled": run.scheduled,
        "answered": len(answered),
        "lost": run.scheduled - len(answered),
        "duplicated": sum(1 for n in answered.values() if n > 1),
        "wrong_id": sum(1 for o in run.outcomes if o.status and not o.id_ok),
        "no_answer": sum(1 for o in run.outcomes if o.status == 0),
    }


def rss_growth(run: LoadRun, after_s: float) -> dict[str, float | None]:
    """Resident memory after warm-up (median of the first 5 s after ``after_s``) against the end
    of the run (median of the last 5 s) and the peak, in MiB."""
    samples = [(t, kb) for t, kb in run.rss_kb if t >= after_s]
    if len(samples) < 4:
        return {"start_mib": None, "end_mib": None, "peak_mib": None, "growth": None}
    t_first, t_last = samples[0][0], samples[-1][0]
    first = [kb for t, kb in samples if t <= t_first + 5]
    last = [kb for t, kb in samples if t >= t_last - 5]
    start, end = float(np.median(first)), float(np.median(last))
    return {
        "start_mib": round(start / 1024, 1),
        "end_mib": round(end / 1024, 1),
        "peak_mib": round(max(kb for _, kb in samples) / 1024, 1),
        "growth": round(end / start - 1, 4),
    }


def recovery_s(outcomes: Sequence[Outcome], drop_at: float) -> float | None:
    """Seconds after the load dropped until every later request was answered 200 (None: not
    within the phase)."""
    after = sorted((o for o in outcomes if o.scheduled >= drop_at), key=lambda o: o.scheduled)
    if not after:
        return None
    last_bad = max((o.scheduled for o in after if o.status != 200), default=None)
    if last_bad is None:
        return 0.0
    if last_bad >= after[-1].scheduled:
        return None
    return round(last_bad - drop_at, 3)


# -- the benchmarks -----------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import os

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }


def run_soak_bench(output: Path, duration_s: float, load_share: float, log: Log) -> dict[str, Any]:
    """Soak: ``load_share`` of the measured capacity for ``duration_s`` after a warm-up."""
    warmup = max(10.0, duration_s * 0.1)
    return _with_server(
        output,
        log,
        lambda cap: [
            Phase("warmup", cap * load_share, warmup),
            Phase("soak", cap * load_share, duration_s),
        ],
        kind="soak",
        extra=lambda run, cap: _soak_goals(
            {
                "load_share": load_share,
                "duration_s": duration_s,
                "rss": rss_growth(run, after_s=warmup),
            },
            summarize(run.phase("soak"), duration_s),
            id_check(run),
        ),
    )


# The goals, reported (not asserted: the tests assert invariants with margins).
SOAK_MAX_RSS_GROWTH = 0.10
OVERLOAD_MAX_SHED_P99_MS = 100.0
OVERLOAD_MAX_RECOVERY_S = 5.0


def _soak_goals(extra: dict[str, Any], soak: dict[str, Any], ids: dict[str, int]) -> dict[str, Any]:
    growth = extra["rss"]["growth"]
    extra["goals"] = {
        "no_5xx": all(not k.startswith("5") for k in soak["statuses"]),
        "every_id_once": ids["lost"] == ids["duplicated"] == ids["wrong_id"] == 0,
        f"rss_growth_below_{SOAK_MAX_RSS_GROWTH}": growth is not None
        and growth < SOAK_MAX_RSS_GROWTH,
    }
    return extra


def _overload_goals(run: LoadRun, extra: dict[str, Any], over_s: float) -> dict[str, Any]:
    over = summarize(run.phase("overload"), over_s)
    ids = id_check(run)
    statuses = {o.status for o in run.outcomes}
    rec = extra["recovery_s"]
    extra["goals"] = {
        "only_200_and_shed_503": statuses <= {200, 503},
        "every_id_once": ids["lost"] == ids["duplicated"] == ids["wrong_id"] == 0,
        f"shed_p99_below_{OVERLOAD_MAX_SHED_P99_MS:.0f}ms": over["shed_p99_ms"] is not None
        and over["shed_p99_ms"] < OVERLOAD_MAX_SHED_P99_MS,
        f"recovery_below_{OVERLOAD_MAX_RECOVERY_S:.0f}s": rec is not None
        and rec < OVERLOAD_MAX_RECOVERY_S,
    }
    return extra


def run_overload_bench(output: Path, factor: float, overload_s: float, log: Log) -> dict[str, Any]:
    """Overload: 80% of capacity, then ``factor`` x capacity, then 80% again (recovery)."""
    base_s, rec_s = 10.0, 15.0
    return _with_server(
        output,
        log,
        lambda cap: [
            Phase("baseline", cap * 0.8, base_s),
            Phase("overload", cap * factor, overload_s),
            Phase("recovery", cap * 0.8, rec_s),
        ],
        kind="overload",
        extra=lambda run, cap: _overload_goals(
            run,
            {
                "factor": factor,
                "recovery_s": recovery_s(run.phase("recovery"), base_s + overload_s),
                "rss": rss_growth(run, after_s=0),
            },
            overload_s,
        ),
    )


def _with_server(
    output: Path,
    log: Log,
    phases_for: Callable[[float], list[Phase]],
    *,
    kind: str,
    extra: Callable[[LoadRun, float], dict[str, Any]],
) -> dict[str, Any]:
    from fides.bench.serving import _Server

    with tempfile.TemporaryDirectory(prefix="fides-load-") as d:
        repo = build_load_repository(Path(d) / "repo")
        server = _Server(repo, Path(d))
        server.start()
        try:
            host, port = "127.0.0.1", server.port
            cap = asyncio.run(measure_capacity(host, port, key=server.key))
            log(f"capacity: {cap:.0f} requests/s (closed loop, 16 clients)")
            phases = phases_for(cap)
            for ph in phases:
                log(f"  {ph.name}: {ph.rate:.0f} requests/s for {ph.duration_s:.0f}s")
            run = asyncio.run(run_phases(host, port, phases, key=server.key, server_pid=server.pid))
        finally:
            server.stop()
    result: dict[str, Any] = {
        "kind": kind,
        "started": run.started_wall,
        "machine": _machine(),
        "capacity_rps": round(cap, 1),
        "phases": {
            ph.name: {"rate": round(ph.rate, 1), **summarize(run.phase(ph.name), ph.duration_s)}
            for ph in phases
        },
        "ids": id_check(run),
        "max_client_backlog": run.max_backlog,
        **extra(run, cap),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    log(json.dumps(result, indent=2))
    return result

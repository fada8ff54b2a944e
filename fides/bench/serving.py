"""Serving benchmark: raw onnxruntime in-process (the ceiling) against the gateway.

For each client concurrency C (closed loop: C requests of ONE sample each always in flight)
four modes are measured on the same model and batch policy (its ``config.yaml``):

``raw_ort``
    The ceiling. onnxruntime in this process, with the session the gateway itself builds
    (:class:`gateway.runtimes.onnx.OnnxRuntime`, so the same threads and optimisation level),
    running ideal batches back to back: ``b = min(max_batch_size, ceil(C / instances))``
    samples per batch on ``w = min(instances, ceil(C / b))`` threads sharing the session (as
    the gateway's instances do). No queueing, no Python batching, no HTTP. A request's latency
    is ``ceil(C / (b * w))`` batch times (the rounds it waits in a closed loop).
``raw_ort_batcher``
    onnxruntime behind a minimal in-process micro-batcher equivalent to the config
    (``max_batch_size``, ``max_queue_delay_microseconds``, ``preferred_batch_size``, one worker
    thread per instance), fed by C client threads: what batching costs without HTTP.
``gateway_json`` / ``gateway_binary``
    The real server (``python -m gateway.cli serve``) in a subprocess, loaded by a separate
    client process (asyncio, one keep-alive connection per in-flight request, requests
    pre-encoded) over the OIP JSON body, or Triton's binary tensor extension both ways.
``gateway_grpc``
    The same server over gRPC (``inference.GRPCInferenceService/ModelInfer``, raw tensor
    contents both ways), loaded by a client process with grpc.aio over one channel (one HTTP/2
    connection, as tritonclient.grpc uses), requests pre-serialised.

Ratios are gateway throughput over ``raw_ort`` throughput at the same concurrency. Client,
server and raw onnxruntime share the machine's cores: client and server CPU are measured
(``/proc``) and reported per cell so the reader can see what the load generator cost.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.queues import Queue as MPQueue
from multiprocessing.synchronize import Event as MPEvent
from pathlib import Path
from typing import Any, cast

import httpx
import numpy as np
import orjson

from fides_core.layout import versions_on_disk
from gateway.batcher import BatchPolicy
from gateway.runtimes.base import Runtime

CONCURRENCIES: tuple[int, ...] = (1, 8, 32)
GATEWAY_MODES = ("gateway_json", "gateway_binary", "gateway_grpc")
GOAL_CONCURRENCY = 32
GOAL_RATIO = 0.70
REQUEST_TIMEOUT_S = 30.0  # a request without an answer by then is an error
GRPC_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_REQUESTS_PER_CELL = 5_000_000  # requests are bounded by count as well as by time
SERVER_START_TIMEOUT_S = 180.0
_METRIC_RE = re.compile(
    r"^fides_inference_(batch_size|compute_duration_seconds|queue_duration_seconds)_(sum|count)"
    r"\{([^}]*)\}\s+(\S+)\s*$"
)

Log = Callable[..., None]


# -- the model ------------------------------------------------------------------------------


@dataclass
class _InputSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # one request's shape (batch dimension 1 when batched)
    dtype: np.dtype[Any]


@dataclass
class _Model:
    name: str
    version: int
    artefact: Path
    runtime: Runtime
    inputs: list[_InputSpec]
    outputs: list[dict[str, Any]]
    policy: BatchPolicy
    config: dict[str, Any]

    @property
    def batched(self) -> bool:
        return self.policy.max_batch_size > 0


def _load_model(repository: Path, name: str) -> _Model:
    from gateway.model_config import load_model_config
    from gateway.repository import batch_policy
    from gateway.runtimes.onnx import OnnxRuntime

    model_dir = repository / name
    cfg = load_model_config(model_dir / "config.yaml", expected_name=name)
    if cfg.platform != "onnx":
        raise ValueError(f"model '{name}' is platform {cfg.platform!r}; the bench needs onnx")
    versions = cfg.version_policy.select(versions_on_disk(model_dir))
    if not versions:
        raise ValueError(f"model '{name}' has no version directories in {model_dir}")
    version = max(versions)  # what the gateway serves when no version is named
    rt = OnnxRuntime(name, version, model_dir / str(version), cfg)
    rt.load()
    from fides_core.oip import DATATYPES

    batched = cfg.max_batch_size > 0
    inputs = []
    for spec in rt.inputs:
        if spec.datatype in ("BYTES", "BF16"):
            raise ValueError(f"input '{spec.name}' is {spec.datatype}; the bench needs numbers")
        dims = [d if d > 0 else 1 for d in spec.shape]
        if batched:
            dims[0] = 1
        inputs.append(_InputSpec(spec.name, spec.datatype, tuple(dims), DATATYPES[spec.datatype]))
    db = cfg.dynamic_batching
    return _Model(
        name=name,
        version=version,
        artefact=rt.artefact,
        runtime=rt,
        inputs=inputs,
        outputs=[o.as_dict() for o in rt.outputs],
        policy=batch_policy(cfg),
        config={
            "max_batch_size": cfg.max_batch_size,
            "dynamic_batching": db.model_dump() if db is not None else None,
            "instance_group_count": cfg.instance_group.count,
            "onnx_intra_op_threads": cfg.onnx.intra_op_threads,
            "onnx_inter_op_threads": cfg.onnx.inter_op_threads,
            "onnx_graph_optimization": cfg.onnx.graph_optimization,
            "providers": getattr(rt, "providers", None),
        },
    )


def _samples(model: _Model, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """``count`` distinct single-sample requests of random data."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        feed: dict[str, np.ndarray] = {}
        for spec in model.inputs:
            if spec.dtype.kind == "f":
                arr = rng.standard_normal(spec.shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                arr = rng.integers(0, 2, spec.shape).astype(np.bool_)
            else:
                arr = rng.integers(0, 10, spec.shape).astype(spec.dtype)
            feed[spec.name] = arr
        out.append(feed)
    return out


def _batch_of(samples: list[dict[str, np.ndarray]], size: int) -> dict[str, np.ndarray]:
    picked = [samples[i % len(samples)] for i in range(size)]
    if size == 1:
        return picked[0]
    return {n: np.concatenate([s[n] for s in picked], axis=0) for n in picked[0]}


def _timed_runs(
    rt: Runtime, feed: dict[str, np.ndarray], min_s: float, min_runs: int, max_runs: int
) -> list[float]:
    for _ in range(3):
        rt.predict(feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_s):
        t0 = time.perf_counter()
        rt.predict(feed)
        times.append(time.perf_counter() - t0)
    return times


def _batch_sizes(max_batch: int) -> list[int]:
    sizes = {1, max_batch}
    b = 2
    while b < max_batch:
        sizes.add(b)
        b *= 2
    return sorted(s for s in sizes if s >= 1)


# -- statistics and CPU accounting ---------------------------------------------------------


def _pct(values_s: Sequence[float], q: float) -> float | None:
    if not values_s:
        return None
    return round(float(np.percentile(np.asarray(values_s), q)) * 1e3, 3)


def _proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, all its threads (Linux /proc)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float, float] | None:
    """(busy, total, steal) jiffies over all cores, from /proc/stat (steal counts as busy)."""
    try:
        line = Path("/proc/stat").read_text().splitlines()[0]
    except OSError:
        return None
    vals = [float(v) for v in line.split()[1:9]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals), vals[7]


@dataclass
class _CpuSnap:
    t: float
    server: float | None
    me: float
    machine: tuple[float, float, float] | None

    @classmethod
    def take(cls, server_pid: int | None = None) -> _CpuSnap:
        return cls(
            time.perf_counter(),
            _proc_cpu_s(server_pid) if server_pid is not None else None,
            time.process_time(),
            _machine_cpu(),
        )


def _cpu_delta(a: _CpuSnap, b: _CpuSnap) -> dict[str, float | None]:
    wall = max(b.t - a.t, 1e-9)
    server = None
    if a.server is not None and b.server is not None:
        server = round((b.server - a.server) / wall, 3)
    busy = steal = None
    if a.machine is not None and b.machine is not None:
        total = max(b.machine[1] - a.machine[1], 1e-9)
        busy = round((b.machine[0] - a.machine[0]) / total, 3)
        steal = round((b.machine[2] - a.machine[2]) / total, 3)
    return {
        "bench_process_cores": round((b.me - a.me) / wall, 3),
        "server_cores": server,
        "machine_busy": busy,
        "machine_steal": steal,
    }


def _other_cores(cpu: dict[str, float | None], used: float | None) -> None:
    """Cores busy with anything but the processes measured (the machine is shared)."""
    busy = cpu.get("machine_busy")
    if busy is None or used is None:
        return
    cores = os.cpu_count() or 1  # /proc/stat's total covers every online CPU
    cpu["other_cores"] = round(max(0.0, busy * cores - used), 3)


def _cell(
    mode: str,
    concurrency: int,
    latencies_s: Sequence[float],
    measured_s: float,
    completed: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result row; ``completed`` defaults to one request per latency sample."""
    n = len(latencies_s) if completed is None else completed
    doc: dict[str, Any] = {
        "mode": mode,
        "concurrency": concurrency,
        "throughput_rps": round(n / measured_s, 1) if measured_s > 0 else 0.0,
        "p50_ms": _pct(latencies_s, 50),
        "p90_ms": _pct(latencies_s, 90),
        "p99_ms": _pct(latencies_s, 99),
        "max_ms": _pct(latencies_s, 100),
        "mean_ms": round(float(np.mean(latencies_s)) * 1e3, 3) if latencies_s else None,
        "requests": n,
        "measured_s": round(measured_s, 3),
        "errors": 0,
        "mean_batch": None,
    }
    doc.update(extra)
    return doc


# -- raw onnxruntime -------------------------------------------------------------------------


def _raw_ideal(
    model: _Model,
    samples: list[dict[str, np.ndarray]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    """Ideal batches back to back on ``w`` threads sharing the session (see module doc)."""
    p = model.policy
    instances = max(1, p.instances)
    b = min(p.max_batch_size, math.ceil(concurrency / instances)) if model.batched else 1
    workers = min(instances, math.ceil(concurrency / b))
    rounds = math.ceil(concurrency / (b * workers))
    feed = _batch_of(samples, b)
    rt = model.runtime
    start = time.perf_counter()
    t_measure = start + warmup_s
    t_end = t_measure + duration_s
    per_thread: list[list[float]] = [[] for _ in range(workers)]

    def work(out: list[float]) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end or len(out) >= MAX_REQUESTS_PER_CELL:
                return
            rt.predict(feed)
            t1 = time.perf_counter()
            if t_measure <= t1 < t_end:
                out.append(t1 - t0)

    threads = [threading.Thread(target=work, args=(o,), daemon=True) for o in per_thread]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_measure - time.perf_counter()))
    c0 = _CpuSnap.take()
    for t in threads:
        t.join()
    c1 = _CpuSnap.take()
    cpu = _cpu_delta(c0, c1)
    _other_cores(cpu, cpu["bench_process_cores"])
    batch_times = [x for o in per_thread for x in o]
    # every request of a batch sees the same latency: percentiles over batches are exact
    latencies = [bt * rounds for bt in batch_times]
    busy = sum(batch_times) / (duration_s * max(1, p.instances))
    return _cell(
        "raw_ort",
        concurrency,
        latencies,
        duration_s,
        completed=len(batch_times) * b,
        batcher={
            "compute_busy": round(busy, 3),
            "compute_ms_per_sample": round(float(np.mean(batch_times)) / b * 1e3, 4)
            if batch_times
            else None,
            "queue_wait_ms": None,
            "batches": len(batch_times),
        },
        mean_batch=float(b),
        threads=workers,
        rounds=rounds,
        cpu=cpu,
    )


@dataclass(eq=False)
class _Req:
    feed: dict[str, np.ndarray]
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class _ThreadBatcher:
    """A minimal in-process dynamic batcher with the model's batch policy (threads only)."""

    def __init__(self, model: _Model) -> None:
        self.model = model
        self.policy = model.policy
        self._cv = threading.Condition()
        self._queue: deque[_Req] = deque()
        self._closing = False
        self.batches: list[tuple[int, float]] = []  # (size, compute seconds), in order
        self._workers = [
            threading.Thread(target=self._work, daemon=True)
            for _ in range(max(1, self.policy.instances))
        ]
        for w in self._workers:
            w.start()

    def submit(self, feed: dict[str, np.ndarray]) -> None:
        req = _Req(feed, time.perf_counter())
        with self._cv:
            self._queue.append(req)
            self._cv.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        for w in self._workers:
            w.join()

    def _ready(self) -> bool:
        p = self.policy
        n = len(self._queue)
        if p.max_batch_size == 0 or self._closing or n >= p.max_batch_size:
            return True
        if n in p.preferred_batch_sizes:
            return True
        return time.perf_counter() - self._queue[0].enqueued >= p.max_queue_delay_s

    def _work(self) -> None:
        limit = max(1, self.policy.max_batch_size)
        while True:
            with self._cv:
                while True:  # another worker may take the queue while this one waits
                    if not self._queue:
                        if self._closing:
                            return
                        self._cv.wait()
                    elif self._ready():
                        break
                    else:
                        waited = time.perf_counter() - self._queue[0].enqueued
                        self._cv.wait(max(self.policy.max_queue_delay_s - waited, 0.0))
                batch = [self._queue.popleft() for _ in range(min(limit, len(self._queue)))]
            t0 = time.perf_counter()
            try:
                if len(batch) == 1:
                    self.model.runtime.predict(batch[0].feed)
                else:
                    names = list(batch[0].feed)
                    merged = {n: np.concatenate([r.feed[n] for r in batch]) for n in names}
                    out = self.model.runtime.predict(merged)
                    splits = np.cumsum([1] * len(batch))[:-1]
                    for arr in out.values():
                        np.split(arr, splits, axis=0)
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting client
                for r in batch:
                    r.error = exc
            self.batches.append((len(batch), time.perf_counter() - t0))
            for r in batch:
                r.done.set()


def _raw_batcher(
    model: _Model,
    samples: list[dict[str, np.ndarray]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    batcher = _ThreadBatcher(model)
    start = time.perf_counter()
    t_measure = start + warmup_s
    t_end = t_measure + duration_s
    per_client: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    batches_before: list[int] = []

    def client(k: int, out: list[float]) -> None:
        feed = samples[k % len(samples)]
        while time.perf_counter() < t_end and len(out) < MAX_REQUESTS_PER_CELL:
            t0 = time.perf_counter()
            try:
                batcher.submit(feed)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                errors.append(type(exc).__name__)
                continue
            t1 = time.perf_counter()
            if t_measure <= t1 < t_end:
                out.append(t1 - t0)

    threads = [
        threading.Thread(target=client, args=(k, o), daemon=True) for k, o in enumerate(per_client)
    ]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_measure - time.perf_counter()))
    batches_before.append(len(batcher.batches))
    c0 = _CpuSnap.take()
    time.sleep(max(0.0, t_end - time.perf_counter()))
    logged = batcher.batches[batches_before[0] :]
    in_window = [size for size, _ in logged]
    compute = [t for _, t in logged]
    c1 = _CpuSnap.take()
    for t in threads:
        t.join()
    batcher.close()
    latencies = [x for o in per_client for x in o]
    cpu = _cpu_delta(c0, c1)
    _other_cores(cpu, cpu["bench_process_cores"])
    return _cell(
        "raw_ort_batcher",
        concurrency,
        latencies,
        duration_s,
        errors=len(errors),
        mean_batch=round(float(np.mean(in_window)), 2) if in_window else None,
        batcher={
            "compute_busy": round(sum(compute) / (duration_s * max(1, model.policy.instances)), 3),
            "compute_ms_per_sample": round(sum(compute) / sum(in_window) * 1e3, 4)
            if in_window
            else None,
            "queue_wait_ms": None,
            "batches": len(in_window),
        },
        cpu=cpu,
    )


def _model_profile(model: _Model, samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    rt = model.runtime
    single = _timed_runs(rt, samples[0], min_s=1.0, min_runs=20, max_runs=5000)
    doc: dict[str, Any] = {
        "single_sample_ms": {
            "p50": _pct(single, 50),
            "p99": _pct(single, 99),
            "mean": round(float(np.mean(single)) * 1e3, 3),
            "runs": len(single),
        }
    }
    if model.batched:
        rows = []
        for b in _batch_sizes(model.policy.max_batch_size):
            times = _timed_runs(rt, _batch_of(samples, b), min_s=0.3, min_runs=5, max_runs=2000)
            med = float(np.median(times))
            rows.append(
                {"batch": b, "p50_ms": round(med * 1e3, 3), "samples_per_s": round(b / med, 1)}
            )
        doc["batch_profile"] = rows
    return doc


# -- the gateway server ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Server:
    """``python -m gateway.cli serve`` in a subprocess, stopped by pid on exit."""

    def __init__(self, repository: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.repository = repository
        self.env = dict(env or {})  # extra FIDES_* settings for this server
        self.port = _free_port()
        self.grpc_port = _free_port()  # never the default 8001 another gateway may hold
        self.key = secrets.token_urlsafe(24)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self) -> int:
        try:
            return len(self.log_path.read_text(errors="replace").splitlines())
        except OSError:
            return 0

    def start(self) -> None:
        # A clean environment for the gateway's own settings: reproducible, whatever the shell.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIDES_")}
        env.update(
            FIDES_MODEL_REPOSITORY=str(self.repository),
            FIDES_API_KEYS=self.key,
            FIDES_LOG_JSON="1",
            FIDES_LOG_LEVEL="WARNING",
            FIDES_GRPC_PORT=str(self.grpc_port),
        )
        env.update(self.env)
        src_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH", "")) if p)
        cmd = [
            sys.executable,
            "-m",
            "gateway.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        with self.log_path.open("wb") as logf:
            # cwd: `python -m` puts it first on sys.path; the server must run this very code
            self.proc = subprocess.Popen(
                cmd,
                cwd=src_root,
                env=env,
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"gateway exited with code {self.proc.returncode} while starting:\n"
                        + self.log_tail()
                    )
                with suppress(httpx.HTTPError):
                    if client.get(f"{self.base}/v2/health/ready").status_code == 200:
                        return
                time.sleep(0.1)
        raise RuntimeError(
            f"gateway not ready after {SERVER_START_TIMEOUT_S:.0f}s:\n" + self.log_tail()
        )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()  # SIGTERM to our own child, by pid: graceful uvicorn shutdown
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def batcher_totals(self, client: httpx.Client, model: str) -> dict[str, float]:
        """Sums and counts of the model's batcher histograms (all versions), from /metrics.

        Keys: ``batch_size_sum``, ``batch_size_count``, ``compute_duration_seconds_sum``, ...
        """
        resp = client.get(f"{self.base}/metrics", headers=self.headers)
        resp.raise_for_status()
        totals: dict[str, float] = {}
        want = f'model="{model}"'
        for line in resp.text.splitlines():
            m = _METRIC_RE.match(line)
            if m and want in m.group(3).split(","):
                key = f"{m.group(1)}_{m.group(2)}"
                totals[key] = totals.get(key, 0.0) + float(m.group(4))
        return totals


@contextmanager
def _running_server(
    repository: Path, only: str | None = None, env: dict[str, str] | None = None
) -> Iterator[_Server]:
    """A gateway on ``repository``, or on a copy of its model ``only`` alone: the other models
    cost nothing then, and one that cannot be ready here (a verified model, whose enclave
    platform the bench's clean environment does not set up) does not hold readiness back."""
    with tempfile.TemporaryDirectory(prefix="fides-bench-") as tmp:
        if only is not None:
            shutil.copytree(repository / only, Path(tmp) / "repository" / only)
            repository = Path(tmp) / "repository"
        server = _Server(repository, Path(tmp), env)
        try:
            server.start()
            yield server
        finally:
            server.stop()


# -- request encoding and checking -----------------------------------------------------------


def _encode(model: _Model, feed: dict[str, np.ndarray], binary: bool) -> tuple[bytes, bytes]:
    """(extra header lines, body) of one inference request."""
    if not binary:
        doc = {
            "inputs": [
                {
                    "name": s.name,
                    "shape": list(s.shape),
                    "datatype": s.datatype,
                    "data": feed[s.name].ravel(),
                }
                for s in model.inputs
            ]
        }
        body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
        return b"Content-Type: application/json\r\n", body
    raws = [
        np.ascontiguousarray(feed[s.name], dtype=s.dtype.newbyteorder("<")).tobytes()
        for s in model.inputs
    ]
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": s.name,
                    "shape": list(s.shape),
                    "datatype": s.datatype,
                    "parameters": {"binary_data_size": len(raw)},
                }
                for s, raw in zip(model.inputs, raws, strict=True)
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    extra = (
        b"Content-Type: application/octet-stream\r\n"
        + f"Inference-Header-Content-Length: {len(header)}\r\n".encode()
    )
    return extra, header + b"".join(raws)


def _grpc_request(model: _Model, feed: dict[str, np.ndarray]) -> bytes:
    """A serialised ``ModelInferRequest`` with every input in ``raw_input_contents``."""
    from gateway.api.oip_grpc import oip_pb2 as pb

    msg = pb.ModelInferRequest(model_name=model.name)
    for s in model.inputs:
        msg.inputs.add(name=s.name, datatype=s.datatype, shape=list(s.shape))
        msg.raw_input_contents.append(
            np.ascontiguousarray(feed[s.name], dtype=s.dtype.newbyteorder("<")).tobytes()
        )
    return bytes(msg.SerializeToString())


def _decode_grpc_response(payload: bytes) -> dict[str, np.ndarray]:
    from fides_core.oip import DATATYPES
    from gateway.api.oip_grpc import oip_pb2 as pb

    msg = pb.ModelInferResponse.FromString(payload)
    return {
        o.name: np.frombuffer(raw, dtype=DATATYPES[o.datatype].newbyteorder("<")).reshape(
            list(o.shape)
        )
        for o, raw in zip(msg.outputs, msg.raw_output_contents, strict=True)
    }


def _grpc_infer_once(server: _Server, request: bytes) -> bytes:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        call = channel.unary_unary(GRPC_INFER)  # bytes in, bytes out
        return bytes(
            call(request, timeout=REQUEST_TIMEOUT_S, metadata=(("x-api-key", server.key),))
        )


def _http_request(server: _Server, model: str, extra: bytes, body: bytes) -> bytes:
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\n"
        f"Authorization: Bearer {server.key}\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


def _decode_response(resp: httpx.Response) -> dict[str, np.ndarray]:
    from fides_core.oip import DATATYPES

    hlen = resp.headers.get("inference-header-content-length")
    raw = resp.content
    header = raw if hlen is None else raw[: int(hlen)]
    doc = orjson.loads(header)
    offset = 0 if hlen is None else int(hlen)
    out: dict[str, np.ndarray] = {}
    for o in doc["outputs"]:
        dtype = DATATYPES[o["datatype"]]
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(raw[offset : offset + size], dtype=dtype.newbyteorder("<"))
            offset += size
        else:
            arr = np.asarray(o["data"], dtype=dtype)
        out[o["name"]] = arr.reshape(o["shape"])
    return out


def _check_gateway(
    server: _Server, model: _Model, feed: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> None:
    """One JSON and one binary request must give onnxruntime's own answer."""
    with httpx.Client(timeout=REQUEST_TIMEOUT_S, headers=server.headers) as client:
        for binary in (False, True):
            extra, body = _encode(model, feed, binary)
            headers = dict(line.split(": ", 1) for line in extra.decode().strip().split("\r\n"))
            resp = client.post(
                f"{server.base}/v2/models/{model.name}/infer", content=body, headers=headers
            )
            if resp.status_code != 200:
                raise RuntimeError(
                    f"gateway answered {resp.status_code} to a "
                    f"{'binary' if binary else 'JSON'} request: {resp.text[:500]}"
                )
            got = _decode_response(resp)
            for name, want in expected.items():
                if name not in got or not np.allclose(got[name], want, rtol=1e-4, atol=1e-5):
                    raise RuntimeError(
                        f"gateway output '{name}' ({'binary' if binary else 'JSON'}) differs "
                        "from onnxruntime's"
                    )
    got = _decode_grpc_response(_grpc_infer_once(server, _grpc_request(model, feed)))
    for name, want in expected.items():
        if name not in got or not np.allclose(got[name], want, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"gateway output '{name}' (gRPC) differs from onnxruntime's")


# -- the load generator (a separate process) -------------------------------------------------


@dataclass(frozen=True)
class _LoadSpec:
    host: str
    port: int
    requests: tuple[bytes, ...]
    concurrency: int
    warmup_s: float
    duration_s: float
    max_requests: int = MAX_REQUESTS_PER_CELL
    timeout_s: float = REQUEST_TIMEOUT_S
    grpc_key: str | None = None  # set: requests are ModelInferRequest bytes for gRPC


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, gen: _Generator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # full response size once the head is parsed
        self.status = 0
        self.t0 = 0.0
        self.busy = False
        self.timed_out = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.ready.done():
            self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                try:
                    self.status = int(head[9:12])
                    pos = head.index(b"\r\ncontent-length:") + 17
                    stop = head.find(b"\r\n", pos)
                    length = int(head[pos : stop if stop >= 0 else len(head)])
                except ValueError:
                    self.gen.protocol_error(self)
                    return
                self.need = end + 4 + length
            if len(self.buf) < self.need:
                return
            del self.buf[: self.need]
            self.need = -1
            self.gen.complete(self, self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost(self)


class _Generator:
    """Closed loop: each connection sends its next request as soon as the last answer came."""

    def __init__(self, spec: _LoadSpec) -> None:
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.conns: set[_Conn] = set()
        self.t_measure = math.inf
        self.t_end = math.inf
        self.issuing = True
        self.issued = 0
        self.inflight = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.errors_outside: Counter[str] = Counter()
        self.exhausted_at: float | None = None
        self.idle = asyncio.Event()

    async def connect(self) -> _Conn:
        conn = _Conn(self)
        await self.loop.create_connection(lambda: conn, self.spec.host, self.spec.port)
        await asyncio.wait_for(conn.ready, self.spec.timeout_s)
        self.conns.add(conn)
        return conn

    def send(self, conn: _Conn) -> None:
        if not self.issuing or conn.transport is None or conn.transport.is_closing():
            return
        if self.issued >= self.spec.max_requests:
            if self.exhausted_at is None:
                self.exhausted_at = time.perf_counter()
            return
        req = self.spec.requests[self.issued % len(self.spec.requests)]
        self.issued += 1
        self.inflight += 1
        conn.busy = True
        conn.t0 = time.perf_counter()
        conn.transport.write(req)

    def _record(self, t1: float, latency: float | None, error: str | None) -> None:
        if self.t_measure <= t1 < self.t_end:
            if error is None and latency is not None:
                self.latencies.append(latency)
            else:
                self.errors[error or "unknown"] += 1
        elif error is not None:
            self.errors_outside[error] += 1

    def complete(self, conn: _Conn, status: int) -> None:
        t1 = time.perf_counter()
        conn.busy = False
        self.inflight -= 1
        if status == 200:
            self._record(t1, t1 - conn.t0, None)
        else:
            self._record(t1, None, f"http_{status}")
        self.send(conn)
        self._check_idle()

    def protocol_error(self, conn: _Conn) -> None:
        if conn.transport is not None:
            conn.transport.abort()

    def lost(self, conn: _Conn) -> None:
        self.conns.discard(conn)
        if conn.busy:
            conn.busy = False
            self.inflight -= 1
            self._record(
                time.perf_counter(), None, "timeout" if conn.timed_out else "connection_lost"
            )
            if self.issuing:
                self.loop.create_task(self._replace())
        self._check_idle()

    async def _replace(self) -> None:
        try:
            conn = await self.connect()
        except OSError:
            self._record(time.perf_counter(), None, "connect_failed")
            await asyncio.sleep(0.1)
            if self.issuing:
                self.loop.create_task(self._replace())
            return
        self.send(conn)

    def _check_idle(self) -> None:
        if self.inflight == 0 and (not self.issuing or self.exhausted_at is not None):
            self.idle.set()

    async def watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            for conn in list(self.conns):
                if conn.busy and now - conn.t0 > self.spec.timeout_s and conn.transport:
                    conn.timed_out = True
                    conn.transport.abort()


async def _drive(
    spec: _LoadSpec, measuring: MPEvent, measured: MPEvent, stop: MPEvent
) -> dict[str, Any]:
    gen = _Generator(spec)
    conns = [await gen.connect() for _ in range(spec.concurrency)]
    watchdog = asyncio.get_running_loop().create_task(gen.watchdog())
    start = time.perf_counter()
    gen.t_measure = start + spec.warmup_s
    gen.t_end = gen.t_measure + spec.duration_s
    for conn in conns:
        gen.send(conn)
    await asyncio.sleep(max(0.0, gen.t_measure - time.perf_counter()))
    cpu0, t0 = time.process_time(), time.perf_counter()
    measuring.set()
    while time.perf_counter() < gen.t_end and not gen.idle.is_set():
        await asyncio.sleep(min(0.05, max(0.0, gen.t_end - time.perf_counter())))
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    window_end = min(t1, gen.t_end)
    if gen.exhausted_at is not None:
        window_end = min(window_end, max(gen.exhausted_at, t0))
    measured.set()
    # Keep the load on while the parent reads the server's counters, then drain.
    limit = time.perf_counter() + 60.0
    while not stop.is_set() and time.perf_counter() < limit:
        await asyncio.sleep(0.02)
    gen.issuing = False
    gen._check_idle()
    with suppress(TimeoutError):
        await asyncio.wait_for(gen.idle.wait(), spec.timeout_s)
    watchdog.cancel()
    for conn in list(gen.conns):
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0)
    measured_s = max(window_end - t0, 1e-9)
    return {
        "latencies": gen.latencies,
        "errors": dict(gen.errors),
        "errors_outside_window": dict(gen.errors_outside),
        "measured_s": measured_s,
        "issued": gen.issued,
        "client_cpu_s": cpu1 - cpu0,
        "client_wall_s": t1 - t0,
    }


async def _drive_grpc(
    spec: _LoadSpec, measuring: MPEvent, measured: MPEvent, stop: MPEvent
) -> dict[str, Any]:
    """The closed loop of :func:`_drive` over gRPC: ``concurrency`` callers on one channel,
    each sending its next request as soon as its answer came."""
    import grpc

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    errors_outside: Counter[str] = Counter()
    issued = 0
    start = time.perf_counter()
    t_measure = start + spec.warmup_s
    t_end = t_measure + spec.duration_s
    issuing = True
    metadata = (("x-api-key", spec.grpc_key or ""),)
    async with grpc.aio.insecure_channel(
        f"{spec.host}:{spec.port}", options=[("grpc.max_receive_message_length", -1)]
    ) as channel:
        infer = channel.unary_unary(GRPC_INFER)  # bytes in, bytes out: no client decoding

        async def caller() -> None:
            nonlocal issued
            while issuing and issued < spec.max_requests:
                req = spec.requests[issued % len(spec.requests)]
                issued += 1
                t0 = time.perf_counter()
                error: str | None = None
                try:
                    await infer(req, metadata=metadata, timeout=spec.timeout_s)
                except grpc.aio.AioRpcError as exc:
                    error = f"grpc_{exc.code().name}"
                t1 = time.perf_counter()
                if t_measure <= t1 < t_end:
                    if error is None:
                        latencies.append(t1 - t0)
                    else:
                        errors[error] += 1
                elif error is not None:
                    errors_outside[error] += 1

        callers = [asyncio.create_task(caller()) for _ in range(spec.concurrency)]
        await asyncio.sleep(max(0.0, t_measure - time.perf_counter()))
        cpu0, t0 = time.process_time(), time.perf_counter()
        measuring.set()
        while time.perf_counter() < t_end and not all(c.done() for c in callers):
            await asyncio.sleep(min(0.05, max(0.0, t_end - time.perf_counter())))
        t1, cpu1 = time.perf_counter(), time.process_time()
        measured.set()
        limit = time.perf_counter() + 60.0
        while not stop.is_set() and time.perf_counter() < limit:
            await asyncio.sleep(0.02)
        issuing = False
        await asyncio.gather(*callers, return_exceptions=True)
    return {
        "latencies": latencies,
        "errors": dict(errors),
        "errors_outside_window": dict(errors_outside),
        "measured_s": max(min(t1, t_end) - t0, 1e-9),
        "issued": issued,
        "client_cpu_s": cpu1 - cpu0,
        "client_wall_s": t1 - t0,
    }


def _load_worker(
    spec: _LoadSpec,
    measuring: MPEvent,
    measured: MPEvent,
    stop: MPEvent,
    results: MPQueue[dict[str, Any]],
) -> None:
    """Entry point of the load-generator process (uvloop when available)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    drive = _drive if spec.grpc_key is None else _drive_grpc
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            res = runner.run(drive(spec, measuring, measured, stop))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        res = {"fatal": f"{type(exc).__name__}: {exc}"}
        measuring.set()
        measured.set()
    results.put(res)


def _gateway_cell(
    server: _Server,
    http: httpx.Client,
    model: _Model,
    mode: str,
    requests: tuple[bytes, ...],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    measuring, measured, stop = ctx.Event(), ctx.Event(), ctx.Event()
    results: MPQueue[dict[str, Any]] = ctx.Queue()
    if mode == "gateway_grpc":
        spec = _LoadSpec(
            "127.0.0.1",
            server.grpc_port,
            requests,
            concurrency,
            warmup_s,
            duration_s,
            grpc_key=server.key,
        )
    else:
        spec = _LoadSpec("127.0.0.1", server.port, requests, concurrency, warmup_s, duration_s)
    proc = ctx.Process(
        target=_load_worker, args=(spec, measuring, measured, stop, results), daemon=True
    )
    proc.start()
    res: dict[str, Any] | None = None
    try:

        def wait(event: MPEvent, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while not event.wait(0.1):
                if not proc.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"load generator stalled (exit code {proc.exitcode})")

        wait(measuring, warmup_s + 120.0)
        b0, c0 = server.batcher_totals(http, model.name), _CpuSnap.take(server.pid)
        wait(measured, duration_s + 120.0)
        b1, c1 = server.batcher_totals(http, model.name), _CpuSnap.take(server.pid)
        stop.set()
        res = results.get(timeout=REQUEST_TIMEOUT_S + 60.0)
    finally:
        stop.set()
        proc.join(timeout=REQUEST_TIMEOUT_S + 10.0)
        if proc.is_alive():
            proc.kill()  # our own child, by pid
            proc.join()
    assert res is not None
    if "fatal" in res:
        raise RuntimeError(f"load generator failed: {res['fatal']}")
    errors: dict[str, int] = res["errors"]
    latencies: list[float] = res["latencies"]
    window = res["measured_s"]

    def delta(key: str) -> float:
        return b1.get(key, 0.0) - b0.get(key, 0.0)

    n_batches = delta("batch_size_count")
    samples = delta("batch_size_sum")
    compute_s = delta("compute_duration_seconds_sum")
    batcher: dict[str, float | None] = {
        # fraction of the window the model's instances spent computing (1.0 = always busy)
        "compute_busy": round(compute_s / ((c1.t - c0.t) * model.policy.instances), 3),
        "compute_ms_per_sample": round(compute_s / samples * 1e3, 4) if samples else None,
        "queue_wait_ms": round(
            delta("queue_duration_seconds_sum") / delta("queue_duration_seconds_count") * 1e3, 3
        )
        if delta("queue_duration_seconds_count")
        else None,
        "batches": n_batches,
    }
    cpu = _cpu_delta(c0, c1)
    client_cores = res["client_cpu_s"] / max(res["client_wall_s"], 1e-9)
    cpu["client_cores"] = round(client_cores, 3)
    cpu.pop("bench_process_cores", None)
    if cpu["server_cores"] is not None:
        _other_cores(cpu, cpu["server_cores"] + client_cores)
    n = max(len(latencies), 1)
    cpu["client_us_per_request"] = round(res["client_cpu_s"] / n * 1e6, 1)
    if cpu["server_cores"] is not None:
        cpu["server_us_per_request"] = round(cpu["server_cores"] * window / n * 1e6, 1)
    return _cell(
        mode,
        concurrency,
        latencies,
        res["measured_s"],
        errors=sum(errors.values()),
        error_kinds=errors,
        errors_outside_window=res["errors_outside_window"],
        mean_batch=round(samples / n_batches, 2) if n_batches > 0 else None,
        batcher=batcher,
        cpu=cpu,
    )


# -- report ----------------------------------------------------------------------------------


def _machine() -> dict[str, Any]:
    import onnxruntime as ort

    cpu_model = platform.processor() or platform.machine()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    load = None
    with suppress(OSError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "loadavg_at_start": load,
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def serving_markdown(doc: dict[str, Any]) -> list[str]:
    m, mod = doc["machine"], doc["model"]
    single = mod["single_sample_ms"]
    cfg = mod["config"]
    db = cfg["dynamic_batching"] or {}
    lines = [
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores "
        f"(client, server and raw onnxruntime share them), Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}.",
        f"Model: {mod['name']} v{mod['version']}, single-sample compute "
        f"p50 {_fmt(single['p50'], 3)} ms; max_batch_size {cfg['max_batch_size']}, "
        f"max_queue_delay {db.get('max_queue_delay_microseconds', '-')} us, "
        f"instances {cfg['instance_group_count']}, intra_op_threads "
        f"{cfg['onnx_intra_op_threads']}. {doc['settings']['duration_s']:g} s per cell after "
        f"{doc['settings']['warmup_s']:g} s warm-up; closed loop, one sample per request.",
        "",
        "| mode | C | req/s | p50 ms | p99 ms | mean batch | errors | vs raw_ort "
        "| compute busy | ms/sample | serving CPU | client CPU | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in doc["cells"]:
        ratio = doc["ratios"].get(str(c["concurrency"]), {}).get(c["mode"])
        cpu = c.get("cpu") or {}
        bat = c.get("batcher") or {}
        serving_cpu = cpu.get("server_cores")
        if serving_cpu is None:
            serving_cpu = cpu.get("bench_process_cores")
        lines.append(
            f"| {c['mode']} | {c['concurrency']} | {_fmt(c['throughput_rps'])} "
            f"| {_fmt(c['p50_ms'], 2)} | {_fmt(c['p99_ms'], 2)} | {_fmt(c['mean_batch'], 2)} "
            f"| {c['errors']} | {_fmt(ratio, 2) if ratio is not None else '-'} "
            f"| {_fmt(bat.get('compute_busy'), 2)} | {_fmt(bat.get('compute_ms_per_sample'), 3)} "
            f"| {_fmt(serving_cpu, 2)} | {_fmt(cpu.get('client_cores'), 2)} "
            f"| {_fmt(cpu.get('other_cores'), 2)} |"
        )
    goal = doc["goal"]
    others = [(c.get("cpu") or {}).get("other_cores") or 0.0 for c in doc["cells"]]
    steals = [(c.get("cpu") or {}).get("machine_steal") or 0.0 for c in doc["cells"]]
    if max(others, default=0.0) > 0.2 or max(steals, default=0.0) > 0.02:
        lines += [
            "",
            f"Background load during the run: up to {max(others):.2f} cores busy with other "
            f"processes, hypervisor steal up to {max(steals):.0%}; the numbers are noisy.",
        ]
    lines += [
        "",
        f"Goal: gateway throughput at C={goal['concurrency']} >= {goal['target']:.0%} of "
        f"raw_ort. Reached: json {_fmt(goal['json_ratio'], 2)}, binary "
        f"{_fmt(goal['binary_ratio'], 2)}"
        + (f", gRPC {_fmt(goal['grpc_ratio'], 2)}" if goal.get("grpc_ratio") is not None else "")
        + f" ({'met' if goal['met'] else 'not met'}).",
        "compute busy: fraction of the window the model instances spent in onnxruntime "
        "(gateway: fides_inference_compute_duration_seconds); ms/sample: compute time per "
        "sample at the batch sizes reached. "
        "CPU columns are cores in use over the measured window: serving is the gateway "
        "process (raw modes: the bench process, its client threads included), client the "
        "load-generator process, other everything else on the machine (background load: "
        "the machine may be shared).",
    ]
    return lines


def _plain(log: Log) -> Log:
    """A rich ``Console.print`` would read ``[...]`` as markup and wrap the table: not here."""
    owner = getattr(log, "__self__", None)
    if type(owner).__module__.startswith("rich."):

        def say(*parts: Any) -> None:
            log(*parts, markup=False, highlight=False, soft_wrap=True)

        return say
    return log


# what the report's terms mean (written into every report)
DEFINITIONS: dict[str, str] = {
    "raw_ort": "ceiling: onnxruntime in process, the gateway's own session, ideal "
    "batches of b = min(max_batch_size, ceil(C / instances)) run back to back on "
    "w = min(instances, ceil(C / b)) threads; latency = ceil(C / (b * w)) batch times",
    "raw_ort_batcher": "onnxruntime behind a minimal threaded micro-batcher with the "
    "config's batch policy, C client threads in process",
    "gateway_json": "the gateway over HTTP, OIP JSON request and response",
    "gateway_binary": "the gateway over HTTP, binary tensor extension both ways",
    "gateway_grpc": "the gateway over gRPC, raw tensor contents both ways, one channel",
    "mean_batch": "gateway: delta of fides_inference_batch_size sum/count over the "
    "window; raw modes: the executed batch sizes",
    "ratio": "gateway throughput / raw_ort throughput at the same concurrency",
    "compute_busy": "fraction of the window the model's instances spent computing; for "
    "the gateway from fides_inference_compute_duration_seconds, which runs from the "
    "executor hand-off to the event loop seeing the result (thread wake-up and GIL "
    "waits included)",
    "compute_ms_per_sample": "compute time per sample at the batch sizes reached",
    "cpu": "cores in use over the window: server_cores (the gateway process), "
    "client_cores (the load generator), bench_process_cores (raw modes), other_cores "
    "(everything else on the machine), machine_steal (hypervisor steal, fraction)",
    "goal.met": "true when the best of the encodings reaches the target",
}


def run_serving_bench(
    model_repository: Path,
    model: str,
    output: Path,
    duration: float,
    log: Log,
    *,
    concurrencies: Sequence[int] = CONCURRENCIES,
    warmup_s: float | None = None,
    settings: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run every cell, write ``output`` (JSON) and ``output`` with ``.md``; return the doc.
    ``settings``: gateway settings for the measured server (``{"infer_fast_path": "false"}``
    becomes ``FIDES_INFER_FAST_PATH=false``), recorded in the report."""
    if duration <= 0:
        raise ValueError("duration must be positive")
    settings = dict(settings or {})
    server_env = {f"FIDES_{k.upper()}": v for k, v in settings.items()}
    log = _plain(log)
    warmup = warmup_s if warmup_s is not None else min(2.0, max(0.5, 0.2 * duration))
    repository = model_repository.resolve()
    machine = _machine()
    log(
        f"machine: {machine['cpu_model']}, {machine['usable_cores']} usable cores, "
        f"onnxruntime {machine['onnxruntime']}"
    )
    mut = _load_model(repository, model)
    samples = _samples(mut, 16)
    profile = _model_profile(mut, samples)
    single = profile["single_sample_ms"]
    log(
        f"model {model} v{mut.version}: single-sample p50 {single['p50']} ms, "
        f"p99 {single['p99']} ms"
    )
    if single["p50"] is not None and single["p50"] < 1.0:
        log(f"warning: single-sample compute is under 1 ms ({single['p50']} ms)")
    cells: list[dict[str, Any]] = []

    def done(cell: dict[str, Any]) -> None:
        cells.append(cell)
        log(
            f"  {cell['mode']:<16} C={cell['concurrency']:<3} "
            f"{cell['throughput_rps']:>9.1f} req/s  p50 {_fmt(cell['p50_ms'], 2)} ms  "
            f"p99 {_fmt(cell['p99_ms'], 2)} ms  batch {_fmt(cell['mean_batch'], 2)}  "
            f"errors {cell['errors']}"
        )

    expected = mut.runtime.predict(samples[0])
    # Cells of one concurrency run back to back (raw, then gateway) so that a change in the
    # machine's background load skews the ratio as little as possible; the idle server costs
    # no CPU while the raw cells run.
    try:
        with (
            _running_server(repository, only=model, env=server_env) as server,
            httpx.Client(timeout=10.0) as http,
        ):
            _check_gateway(server, mut, samples[0], expected)
            bodies = {
                mode: tuple(
                    _http_request(server, model, *_encode(mut, s, mode == "gateway_binary"))
                    for s in samples
                )
                for mode in ("gateway_json", "gateway_binary")
            }
            bodies["gateway_grpc"] = tuple(_grpc_request(mut, s) for s in samples)
            log(
                "cells: raw onnxruntime in process; the gateway in a subprocess, loaded by a "
                "client process"
            )
            for c in concurrencies:
                done(_raw_ideal(mut, samples, c, warmup, duration))
                done(_raw_batcher(mut, samples, c, warmup, duration))
                for mode in GATEWAY_MODES:
                    done(_gateway_cell(server, http, mut, mode, bodies[mode], c, warmup, duration))
            server_log_lines = server.log_lines()
            server_log_tail = server.log_tail(10) if server_log_lines else ""
    finally:
        mut.runtime.unload()

    ratios, ratios_b = _ratios(cells)
    at_goal = ratios.get(str(GOAL_CONCURRENCY), {})
    json_ratio, binary_ratio = at_goal.get("gateway_json"), at_goal.get("gateway_binary")
    grpc_ratio = at_goal.get("gateway_grpc")
    reached = [r for r in (json_ratio, binary_ratio, grpc_ratio) if r is not None]
    doc: dict[str, Any] = {
        "benchmark": "serving",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "model": {
            "name": mut.name,
            "version": mut.version,
            "artefact": str(mut.artefact),
            "inputs": [
                {"name": s.name, "datatype": s.datatype, "request_shape": list(s.shape)}
                for s in mut.inputs
            ],
            "outputs": mut.outputs,
            "config": mut.config,
            **profile,
        },
        "settings": {
            "duration_s": duration,
            "warmup_s": warmup,
            "concurrencies": list(concurrencies),
            "samples_per_request": 1,
            "gateway_settings": settings,
            "request_timeout_s": REQUEST_TIMEOUT_S,
            "max_requests_per_cell": MAX_REQUESTS_PER_CELL,
            "load_generator": "separate process, asyncio (uvloop when installed) raw HTTP/1.1 "
            "keep-alive, one connection per in-flight request, pre-encoded requests",
        },
        "definitions": DEFINITIONS,
        "cells": cells,
        "ratios": ratios,
        "ratios_vs_raw_ort_batcher": ratios_b,
        "goal": {
            "concurrency": GOAL_CONCURRENCY,
            "target": GOAL_RATIO,
            "json_ratio": json_ratio,
            "binary_ratio": binary_ratio,
            "grpc_ratio": grpc_ratio,
            "met": bool(reached) and max(reached) >= GOAL_RATIO,
        },
        "server_log_lines": server_log_lines,
        "server_log_tail": server_log_tail,
    }
    _write(doc, output, log)
    return doc


def _ratios(
    cells: list[dict[str, Any]],
) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, float | None]]]:
    """Each cell's throughput over raw onnxruntime's (and over the raw micro-batcher's) at the
    same concurrency."""
    raw = {r["concurrency"]: r["throughput_rps"] for r in cells if r["mode"] == "raw_ort"}
    raw_b = {r["concurrency"]: r["throughput_rps"] for r in cells if r["mode"] == "raw_ort_batcher"}
    ratios: dict[str, dict[str, float | None]] = {}
    ratios_b: dict[str, dict[str, float | None]] = {}
    for row in cells:
        if row["mode"] == "raw_ort":
            continue
        conc = row["concurrency"]
        base = raw.get(conc)
        ratios.setdefault(str(conc), {})[row["mode"]] = (
            round(row["throughput_rps"] / base, 3) if base else None
        )
        if row["mode"] in GATEWAY_MODES:
            base_b = raw_b.get(conc)
            ratios_b.setdefault(str(conc), {})[row["mode"]] = (
                round(row["throughput_rps"] / base_b, 3) if base_b else None
            )
    return ratios, ratios_b


def _write(doc: dict[str, Any], output: Path, log: Log) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    lines = serving_markdown(doc)
    md_path = output.with_suffix(".md")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for line in lines:
        log(line)
    log(f"wrote {output} and {md_path}")


__all__ = ["CONCURRENCIES", "run_serving_bench"]

"""What the enclave boundary costs per verification call (``fides bench integrity``).

For batch sizes 1 and 32 (32 one-row requests, as the gateway's batcher forms them), each
call is timed one at a time (closed loop, concurrency 1) in four modes on the same verifier
model and onnxruntime settings (one intra-op thread):

``in_process_ort``
    ``session.run`` on the stacked batch: the verifier alone, the baseline.
``in_process_core``
    :meth:`EnclaveCore.verify` in this process: the model plus input hashing, Merkle tree,
    one ES256 signature and CBOR evidence. What signing costs, without transport.
``socket_enclave``
    :class:`gateway.enclave_client.SocketEnclaveClient` to the real enclave process: CBOR
    frames over the Unix socket both ways, decoding, plus everything above.
``socket_enclave_checked``
    ``socket_enclave`` plus the gateway supervisor's :func:`check_verification` of every
    item (one ES256 verification per batch, one Merkle proof and input re-hash per request).
``socket_enclave_session``
    ``socket_enclave`` under a MAC session agreed at attestation (:mod:`fides_core.session`):
    the enclave also MACs each signed result.
``socket_enclave_mac_checked``
    ``socket_enclave_session`` plus the gateway's check as the supervisor does it with a
    session: the MAC instead of the signature, every other binding as before.

Overhead = socket_enclave - in_process_ort (median per call), and its share of the total
``socket_enclave`` time. Boundary = socket_enclave_mac_checked - in_process_ort: what a call
costs beyond the model as the gateway makes it (issue 25's bar).

Two synthetic verifiers (seeded random weights) unless models are given: a digits-sized MLP
64-256-256-10 (the model costs microseconds, so the boundary dominates) and an MLP
784-2048-2048-10 (5.8 M parameters, 23 MB, well inside the 96 MB budget). Client and
enclave share the machine's cores.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson
from onnx import TensorProto, helper, numpy_helper

from enclave_sim.core import EnclaveCore
from enclave_sim.pki import ROOT_CERT, init_ca, load_identity
from enclave_sim.sealing import seal
from fides_core.attestation import Policy, verify_attestation
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.session import SessionOffer
from fides_core.verify import VerifyRequest
from gateway.enclave_client import EnclaveLaunch

Log = Callable[..., None]
BATCH_SIZES = (1, 32)
MODES = (
    "in_process_ort",
    "in_process_core",
    "socket_enclave",
    "socket_enclave_checked",
    "socket_enclave_session",
    "socket_enclave_mac_checked",
)
READY_TIMEOUT_S = 60.0


def mlp_verifier(path: Path, sizes: tuple[int, ...] = (64, 256, 256, 10), seed: int = 0) -> None:
    """input FP32 [N, 64] -> probabilities FP32 [N, 10]: Gemm/Relu layers, then Softmax."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "input"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"B{i}"),
        ]
        y = f"h{i}" if i < len(sizes) - 2 else "logits"
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"B{i}"], [y]))
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [y], [f"r{i}"]))
            y = f"r{i}"
        x = y
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "mlp_verifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _stats(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)
    return {
        "median_us": statistics.median(us),
        "p90_us": us[min(len(us) - 1, int(0.9 * len(us)))],
        "mean_us": statistics.fmean(us),
        "calls": len(us),
    }


def _timed(fn: Callable[[], Any], duration_s: float, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end or len(samples) < 20:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return _stats(samples)


async def _timed_async(fn: Callable[[], Any], duration_s: float, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        await fn()
    samples: list[float] = []
    end = time.perf_counter() + duration_s
    while time.perf_counter() < end or len(samples) < 20:
        t0 = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - t0)
    return _stats(samples)


def _requests(batch: int, width: int, rng: np.random.Generator) -> list[VerifyRequest]:
    return [
        VerifyRequest(
            f"r{i}", os.urandom(16), {"input": rng.standard_normal((1, width)).astype(np.float32)}
        )
        for i in range(batch)
    ]


def _start_enclave(
    workdir: Path, sealed: Path, platform_dir: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    sock = Path(tempfile.mkdtemp(prefix="fxb-", dir="/tmp")) / "bench.sock"
    log_file = (workdir / "enclave.log").open("wb")
    # the gateway's launch (python -I, the measured code root first), so the boundary measured
    # here is the process the gateway runs
    launch = EnclaveLaunch(socket_path=sock, sealed_model=sealed, platform_dir=platform_dir)
    proc = subprocess.Popen(
        launch.command(),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log_file.close()
    return proc, sock


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


async def _socket_modes(
    sock: Path,
    proc: subprocess.Popen[bytes],
    root_pem: bytes,
    policy: Policy,
    batches: dict[int, list[VerifyRequest]],
    duration_s: float,
    warmup: int,
) -> dict[int, dict[str, dict[str, float]]]:
    from gateway.enclave_client import EnclaveError, SocketEnclaveClient, check_batch

    client = SocketEnclaveClient(sock, timeout_s=60.0, max_connections=1)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the enclave exited with {proc.returncode} at boot")
            try:
                await client.ping()
                break
            except EnclaveError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        nonce, offer = os.urandom(32), SessionOffer.new()
        attested = verify_attestation(
            await client.attest(nonce, session_key=offer.public),
            root=root_pem,
            policy=policy,
            nonce=nonce,
        )
        session = offer.complete(
            attested.claims["fides"]["session"], nonce=nonce, module_id=attested.module_id
        )
        out: dict[int, dict[str, dict[str, float]]] = {}
        for batch, requests in batches.items():

            async def plain(reqs: list[VerifyRequest] = requests) -> None:
                await client.verify(reqs)

            async def checked(reqs: list[VerifyRequest] = requests) -> None:
                check_batch(attested, reqs, await client.verify(reqs))  # by the signature

            async def in_session(reqs: list[VerifyRequest] = requests) -> None:
                await client.verify(reqs, session.id)

            async def mac_checked(reqs: list[VerifyRequest] = requests) -> None:
                result = await client.verify(reqs, session.id)
                if result.mac is None:
                    raise RuntimeError("the enclave did not MAC a result of our session")
                check_batch(attested, reqs, result, session)  # as the supervisor does

            out[batch] = {
                "socket_enclave": await _timed_async(plain, duration_s, warmup),
                "socket_enclave_checked": await _timed_async(checked, duration_s, warmup),
                "socket_enclave_session": await _timed_async(in_session, duration_s, warmup),
                "socket_enclave_mac_checked": await _timed_async(mac_checked, duration_s, warmup),
            }
        return out
    finally:
        await client.close()


# name -> MLP layer sizes: a digits-sized verifier, and one big enough that the model dominates
DEFAULT_MODELS: dict[str, tuple[int, ...]] = {
    "mlp_small": (64, 256, 256, 10),
    "mlp_large": (784, 2048, 2048, 10),
}


def _bench_model(
    name: str,
    model_path: Path,
    work: Path,
    batch_sizes: tuple[int, ...],
    duration_s: float,
    warmup: int,
    log: Log,
) -> dict[int, dict[str, dict[str, float]]]:
    config = EnclaveModelConfig(max_batch_size=max(batch_sizes), intra_op_threads=1)
    model_bytes = model_path.read_bytes()
    platform_dir = work / "platform"
    init_ca(platform_dir, force=True)
    sealed_bytes, measurement, _ = seal(model_bytes, config, platform_dir)
    sealed = work / f"{name}.sealed"
    sealed.write_bytes(sealed_bytes)
    proc, sock = _start_enclave(work, sealed, platform_dir)
    try:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        width = int(inp.shape[1])
        core = EnclaveCore(model_bytes, config, measurement, load_identity(platform_dir))
        rng = np.random.default_rng(0)
        batches = {b: _requests(b, width, rng) for b in batch_sizes}
        results: dict[int, dict[str, dict[str, float]]] = {}
        for batch, requests in batches.items():
            stacked = np.concatenate([r.inputs["input"] for r in requests])  # [batch, width]

            def run_ort(x: np.ndarray = stacked) -> None:
                session.run(None, {"input": x})

            def run_core(reqs: list[VerifyRequest] = requests) -> None:
                core.verify(reqs)

            results[batch] = {
                "in_process_ort": _timed(run_ort, duration_s, warmup),
                "in_process_core": _timed(run_core, duration_s, warmup),
            }
            log(f"  {name} batch {batch}: in-process done")
        policy = Policy.of(measurement.pcr0, allow_simulated=True)
        root_pem = (platform_dir / ROOT_CERT).read_bytes()
        socket_results = asyncio.run(
            _socket_modes(sock, proc, root_pem, policy, batches, duration_s, warmup)
        )
        for batch in batches:
            results[batch].update(socket_results[batch])
        return results
    finally:
        _stop(proc)
        shutil.rmtree(sock.parent, ignore_errors=True)


def run_enclave_bench(
    output: Path,
    log: Log,
    *,
    models: dict[str, Path] | None = None,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    duration_s: float = 2.0,
    warmup: int = 30,
) -> dict[str, Any]:
    """Run the benchmark, write JSON to ``output``, log a markdown table, return the results.

    ``models``: name -> ONNX verifier with one FP32 input [N, width]; default: two synthetic
    MLPs (:data:`DEFAULT_MODELS`)."""
    work = Path(tempfile.mkdtemp(prefix="fides-enclave-bench-"))
    results: dict[str, dict[int, dict[str, dict[str, float]]]] = {}
    descriptions: dict[str, str] = {}
    try:
        if models is None:
            models = {}
            for name, sizes in DEFAULT_MODELS.items():
                models[name] = work / f"{name}.onnx"
                mlp_verifier(models[name], sizes)
                descriptions[name] = "MLP " + "-".join(map(str, sizes)) + " (random weights)"
        log(
            f"enclave benchmark: {len(models)} models x {len(batch_sizes)} batch sizes x "
            f"{len(MODES)} modes, {duration_s:.1f} s each (SIMULATED enclave)"
        )
        for name, path in models.items():
            descriptions.setdefault(name, str(path))
            results[name] = _bench_model(name, path, work, batch_sizes, duration_s, warmup, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = []
    for name in results:
        for batch in batch_sizes:
            r = {mode: results[name][batch][mode]["median_us"] for mode in MODES}
            total = r["socket_enclave"]
            summary.append(
                {
                    "model": name,
                    "batch": batch,
                    **{f"{mode}_us": value for mode, value in r.items()},
                    "signing_us": r["in_process_core"] - r["in_process_ort"],
                    "transport_us": r["socket_enclave"] - r["in_process_core"],
                    "overhead_us": total - r["in_process_ort"],
                    "overhead_share": (total - r["in_process_ort"]) / total if total else 0.0,
                    "gateway_check_us": r["socket_enclave_checked"] - total,
                    "gateway_mac_check_us": (
                        r["socket_enclave_mac_checked"] - r["socket_enclave_session"]
                    ),
                    "boundary_signature_us": r["socket_enclave_checked"] - r["in_process_ort"],
                    "boundary_mac_us": r["socket_enclave_mac_checked"] - r["in_process_ort"],
                }
            )
    report: dict[str, Any] = {
        "benchmark": "enclave",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__,
        },
        "models": descriptions,
        "duration_s": duration_s,
        "statistic": "median microseconds per call, one call at a time",
        "results": {n: {str(b): v for b, v in r.items()} for n, r in results.items()},
        "summary": summary,
        "simulated": True,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    for line in markdown_table(summary):
        log(line)
    log(f"results written to {output}")
    return report


def markdown_table(summary: list[dict[str, Any]]) -> list[str]:
    """The summary as a table; the session columns read "-" for results from before them."""

    def us(s: dict[str, Any], key: str) -> str:
        return f"{s[key]:.0f}" if key in s else "-"

    lines = [
        "| model | batch | ORT in-process (us) | + hash & sign (us) | enclave via socket (us) "
        "| overhead (us) | overhead share | gateway check: signature (us) | gateway check: MAC "
        "(us) | boundary with signature check (us) | boundary with MAC check (us) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(
            f"| {s['model']} | {s['batch']} | {s['in_process_ort_us']:.0f} "
            f"| {s['in_process_core_us']:.0f} "
            f"| {s['socket_enclave_us']:.0f} | {s['overhead_us']:.0f} "
            f"| {100 * s['overhead_share']:.0f}% | {s['gateway_check_us']:.0f} "
            f"| {us(s, 'gateway_mac_check_us')} | {us(s, 'boundary_signature_us')} "
            f"| {us(s, 'boundary_mac_us')} |"
        )
    return lines

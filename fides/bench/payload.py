"""Does Triton's binary tensor extension pay off? JSON vs binary for growing tensors, and
gRPC (raw tensor contents) beside them.

A 1-input FP32 identity model (built here with onnx.helper, so the model costs nothing) is
served by the real gateway process; one client sends sequential requests with tensors of
1 Ki to 4 Mi elements, JSON, binary and gRPC, in and out, and we time the whole round trip as a
client sees it (client-side encoding and decoding included: for gRPC the protobuf message is
built from the array and the answer's raw bytes read back, as tritonclient.grpc does).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import orjson
from onnx import TensorProto, helper

from fides.bench.report import payload_markdown
from fides.bench.serving import GRPC_INFER, _machine, _running_server

SIZES = (1_024, 65_536, 1_048_576, 4_194_304)
MODEL = "identity_fp32"


def _build_repository(root: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / MODEL / "1").mkdir(parents=True)
    onnx.save(model, str(root / MODEL / "1" / "model.onnx"))
    (root / MODEL / "config.yaml").write_text("platform: onnx\nmax_batch_size: 0\n")


def _json_call(client: httpx.Client, x: np.ndarray) -> np.ndarray:
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [x.size], "datatype": "FP32", "data": x}]},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    r = client.post(
        f"/v2/models/{MODEL}/infer", content=body, headers={"Content-Type": "application/json"}
    )
    r.raise_for_status()
    out = orjson.loads(r.content)["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32)


def _binary_call(client: httpx.Client, x: np.ndarray) -> np.ndarray:
    raw = x.astype("<f4").tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [x.size],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    r = client.post(
        f"/v2/models/{MODEL}/infer",
        content=header + raw,
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    r.raise_for_status()
    n = int(r.headers["inference-header-content-length"])
    return np.frombuffer(r.content[n:], dtype="<f4")


def _grpc_caller(server: Any) -> tuple[Callable[[Any, np.ndarray], np.ndarray], Any]:
    """A gRPC ``ModelInfer`` call on one channel (and the channel, to close)."""
    import grpc

    from gateway.api.oip_grpc import oip_pb2 as pb

    channel = grpc.insecure_channel(
        f"127.0.0.1:{server.grpc_port}",
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    infer = channel.unary_unary(
        GRPC_INFER,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    metadata = tuple((k.lower(), v) for k, v in server.headers.items())

    def call(_: Any, x: np.ndarray) -> np.ndarray:
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="input", datatype="FP32", shape=[x.size])
        req.raw_input_contents.append(x.astype("<f4").tobytes())
        reply = infer(req, metadata=metadata, timeout=120)
        return np.frombuffer(reply.raw_output_contents[0], dtype="<f4")

    return call, channel


def run_payload_bench(
    output: Path,
    log: Callable[..., None],
    *,
    repeats: int = 10,
    sizes: tuple[int, ...] = SIZES,
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fides-payload-") as tmp:
        repo = Path(tmp) / "repo"
        _build_repository(repo)
        with (
            _running_server(repo) as server,
            httpx.Client(base_url=server.base, headers=server.headers, timeout=120) as client,
        ):
            grpc_call, channel = _grpc_caller(server)
            calls = (("json", _json_call), ("binary", _binary_call), ("grpc", grpc_call))
            for size in sizes:
                x = rng.standard_normal(size).astype(np.float32)
                row: dict[str, Any] = {"elements": size, "mbytes_raw": round(x.nbytes / 1e6, 3)}
                for mode, call in calls:
                    n = max(2, repeats if size <= 1_048_576 else repeats // 3)
                    np.testing.assert_array_equal(call(client, x), x)  # warm-up and check
                    times = []
                    for _ in range(n):
                        t0 = time.perf_counter()
                        call(client, x)
                        times.append(time.perf_counter() - t0)
                    row[f"{mode}_ms"] = round(statistics.median(times) * 1000, 2)
                row["speedup"] = round(row["json_ms"] / row["binary_ms"], 1)
                row["grpc_speedup"] = round(row["binary_ms"] / row["grpc_ms"], 2)
                rows.append(row)
                log(
                    f"  {size:>9} elements: json {row['json_ms']} ms, binary "
                    f"{row['binary_ms']} ms ({row['speedup']}x), gRPC {row['grpc_ms']} ms"
                )
            channel.close()
    doc = {
        "benchmark": "payload",
        "machine": _machine(),
        "model": "FP32 identity (onnx)",
        "method": "median round trip of sequential requests, client encode/decode included; "
        "gRPC: ModelInfer with raw contents over one channel",
        "rows": rows,
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=2) + "\n")
    lines = payload_markdown(doc)
    output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    for line in lines:
        log(line)
    return doc

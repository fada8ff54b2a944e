"""A torch.export model served through the whole gateway, with dynamic batching."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from fides.defaults.nets import CNNConfig, DigitsCNN
from gateway.settings import Settings
from tests.conftest import USER_KEY, serving
from tests.gateway.test_torch_runtime import export
from tests.model_factory import write_config
from verifier.nets import NamedProbabilities


async def test_torch_model_through_the_gateway(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = NamedProbabilities(DigitsCNN(CNNConfig(channels=4, hidden=8))).eval()
    repo = tmp_path / "repo"
    write_config(
        repo / "digits_torch",
        {
            "platform": "torch",
            "max_batch_size": 32,
            "dynamic_batching": {"max_queue_delay_microseconds": 20_000},
        },
    )
    export(
        net,
        (torch.rand(2, 1, 8, 8),),
        repo / "digits_torch" / "1" / "model.pt2",
        input={0: Dim("batch", min=1, max=1024)},
    )
    settings = Settings(model_repository=repo, api_keys=[USER_KEY], log_json=False)
    xs = np.random.default_rng(0).random((12, 1, 1, 8, 8), dtype=np.float32)
    with torch.inference_mode():
        expected = net(torch.from_numpy(xs[:, 0]))["probabilities"].numpy()  # [12, 10]
    async with serving(settings) as c:
        meta = (await c.get("/v2/models/digits_torch")).json()
        assert meta["platform"] == "torch"
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]

        async def one(i: int) -> np.ndarray:
            body = {
                "inputs": [
                    {
                        "name": "input",
                        "shape": [1, 1, 8, 8],
                        "datatype": "FP32",
                        "data": xs[i].ravel().tolist(),
                    }
                ]
            }
            r = await c.post("/v2/models/digits_torch/infer", json=body)
            assert r.status_code == 200, r.text
            return np.asarray(r.json()["outputs"][0]["data"], dtype=np.float32)

        got = await asyncio.gather(*(one(i) for i in range(12)))
        np.testing.assert_allclose(np.stack(got), expected, rtol=1e-5, atol=1e-6)
        metrics = (await c.get("/metrics")).text
    # 12 concurrent requests within a 20 ms window were batched (fewer than 12 executions)
    count = next(
        line
        for line in metrics.splitlines()
        if line.startswith('fides_inference_batch_size_count{model="digits_torch"')
    )
    assert float(count.split()[-1]) < 12

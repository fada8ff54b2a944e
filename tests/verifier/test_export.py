"""ONNX export: parity with torch, a config the gateway accepts, and a model card."""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gateway.model_config import load_model_config
from verifier.export import ExportError, check_parity, ort_session, write_entry
from verifier.nets import ConvNet, NetConfig


def trained_like_net(pool: str = "gap") -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet(
        NetConfig(
            widths=(4, 8),
            in_channels=3,
            num_classes=5,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            pool=pool,
            image_size=(9, 9),
        )
    )
    with torch.no_grad():  # non-trivial batch-norm statistics, as after training
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("pool", ["gap", "flatten"])
def test_write_entry_exports_a_servable_model(tmp_path: Path, pool: str) -> None:
    net = trained_like_net(pool)
    x = torch.rand(64, 3, 9, 9)  # odd size: ceil-mode pooling
    card = write_entry(
        tmp_path,
        "toy",
        net,
        x,
        list("abcde"),
        {"role": "service"},
        comment="toy",
        latency_repeats=5,
    )
    assert card["onnx_max_abs_diff"] <= 1e-4
    assert card["cpu_latency_ms_batch1"] > 0
    on_disk = json.loads((tmp_path / "toy" / "1" / "model_card.json").read_text())
    assert on_disk == card
    cfg = load_model_config(tmp_path / "toy" / "config.yaml", expected_name="toy")
    assert cfg.platform == "onnx"
    assert cfg.max_batch_size == 64
    assert cfg.labels == list("abcde")
    session = ort_session(tmp_path / "toy" / "1" / "model.onnx")
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.shape[1:]) == ("input", [3, 9, 9])
    assert (out.name, out.shape[1:]) == ("probabilities", [5])
    for batch in (1, 7):
        (probs,) = session.run(None, {"input": x[:batch].numpy()})
        with torch.inference_mode():
            want = net(x[:batch]).softmax(-1).numpy()
        np.testing.assert_allclose(probs, want, atol=1e-4)


def test_parity_check_catches_a_different_model(tmp_path: Path) -> None:
    net = trained_like_net()
    x = torch.rand(16, 3, 9, 9)
    write_entry(tmp_path, "toy", net, x, list("abcde"), {}, comment="toy", latency_repeats=1)
    session = ort_session(tmp_path / "toy" / "1" / "model.onnx")
    with torch.no_grad():
        net.head[-1].bias[0] += 3.0  # type: ignore[index]  # not a constant shift
    with pytest.raises(ExportError, match="differs from torch"):
        check_parity(net, session, x)


def test_a_full_disk_while_exporting_leaves_the_entry_it_replaces(tmp_path: Path) -> None:
    """The gateway may be serving the entry a new export replaces: a write that fails part-way
    (here the file-size limit, which fails torch's own writer as a full disk does) must leave
    the old model, card and config whole, not a truncated model.onnx."""
    x = torch.rand(16, 3, 9, 9)
    write_entry(tmp_path, "toy", trained_like_net(), x, list("abcde"), {}, comment="old")
    before = {p: p.read_bytes() for p in (tmp_path / "toy").rglob("*") if p.is_file()}
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from tests.verifier.test_export import trained_like_net\n"
        "from verifier.export import write_entry\n"
        "net = trained_like_net('flatten')\n"  # another, larger model
        "write_entry(Path(sys.argv[1]), 'toy', net, torch.rand(16, 3, 9, 9), list('abcde'), "
        "{}, comment='new', latency_repeats=1)\n"
    )

    def file_size_limit() -> None:  # in the child: writes past 2 kB fail (EFBIG)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    child = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        preexec_fn=file_size_limit,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode != 0
    assert "could not write the model repository entry" in child.stderr, child.stderr[-2000:]
    after = {p: p.read_bytes() for p in (tmp_path / "toy").rglob("*") if p.is_file()}
    assert after == before  # no staged file left behind either
    ort_session(tmp_path / "toy" / "1" / "model.onnx")  # still a loadable model

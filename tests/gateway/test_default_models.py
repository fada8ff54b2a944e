"""The embedded default model repository (fides.defaults.digits), built once per module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from scipy.stats import binom

from fides.defaults import digits as default
from gateway.model_config import load_model_config
from gateway.runtimes.base import TensorSpec
from gateway.runtimes.torch_runtime import TorchRuntime

# one full build: ~60-90 s on two idle cores, several minutes on a busy machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODELS = (
    "digits",
    "digits_verifier",
    "digits_detector",
    "digits_reclassifier",
    "digits_novelty",
    "digits_lite",
    "digits_torch",
    "digits_heavy",
)
ONNX_MODELS = ("digits", "digits_verifier", "digits_heavy", "digits_lite")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    lines: list[str] = []
    root = tmp_path_factory.mktemp("build") / "model_repository"
    assert default.build_default(root, seed=0, progress=lines.append) == root
    return root, lines


@pytest.fixture(scope="module")
def repo(built: tuple[Path, list[str]]) -> Path:
    return built[0]


@pytest.fixture(scope="module")
def marker(repo: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((repo / ".built").read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    split = default.load_split(seed=0, test_size=0.4)  # the default experiment's test split
    return split.x_test.numpy(), split.y_test.numpy()


def test_layout(repo: Path) -> None:
    names = sorted(p.name for p in repo.iterdir())
    assert names == [".built", *sorted(MODELS)]
    assert (repo / "digits" / "1" / "model.onnx").is_file()
    assert (repo / "digits_torch" / "1" / "model.pt2").is_file()
    assert (repo / "digits_heavy" / "1" / "model.onnx").is_file()
    assert (repo / "digits_verifier" / "1" / "model.onnx").is_file()
    for name in ("digits", "digits_verifier"):
        card = json.loads((repo / name / "1" / "model_card.json").read_text(encoding="utf-8"))
        assert card["name"] == name
        assert card["training_config"]["name"] == "digits"
        assert len(card["training_config_sha256"]) == 64
        for key in ("dataset", "metrics", "params", "flops_per_image", "cpu_latency_ms_batch1"):
            assert key in card, (name, key)
    # the staging directory next to the repository is gone
    assert [p.name for p in repo.parent.iterdir()] == [repo.name]


@pytest.mark.parametrize("name", MODELS)
def test_configs_are_valid(repo: Path, name: str) -> None:
    cfg = load_model_config(repo / name / "config.yaml", expected_name=name)
    assert cfg.platform == ("torch" if name == "digits_torch" else "onnx")
    if name == "digits_novelty":
        assert cfg.labels == ["novelty"]
    assert cfg.model_filename == ("model.pt2" if name == "digits_torch" else "model.onnx")
    assert cfg.max_batch_size == 64
    assert cfg.dynamic_batching is not None
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.dynamic_batching.preferred_batch_size == [16, 32, 64]
    assert cfg.dynamic_batching.max_queue_size == 512
    assert cfg.instance_group.count == 1
    if name != "digits_novelty":
        want = ["attack"] if name == "digits_detector" else [str(i) for i in range(10)]
        assert cfg.labels == want
    assert cfg.version_policy.select([1]) == [1]
    if cfg.platform == "onnx":
        assert cfg.onnx.intra_op_threads == 1


def test_marker_records_accuracy_and_latency(marker: dict[str, Any]) -> None:
    assert set(marker["models"]) == set(MODELS)
    for name in ("digits", "digits_verifier", "digits_torch", "digits_heavy"):
        info = marker["models"][name]
        assert info["max_abs_diff_vs_torch"] <= 1e-4, name
        if name != "digits_verifier":
            assert info["test_accuracy"] >= 0.95, name
    service = marker["models"]["digits"]
    assert service["test_accuracy"] >= 0.96  # issue 3: the distilled student on digits
    assert service["teacher_to_student_flops_ratio"] >= 3
    verifier = marker["models"]["digits_verifier"]
    assert verifier["fidelity_top1"] >= 0.9
    assert verifier["flops_ratio_to_service"] <= 0.25
    assert verifier["inference_memory_mb"] <= 96
    latency = marker["models"]["digits_heavy"]["latency_onnxruntime_1_thread"]
    assert latency["batch1_ms"] > 0
    assert latency["batch64_ms_per_sample"] > 0
    assert marker["build_seconds"] > 0  # how long is a benchmark figure, not a test
    detector = marker["models"]["digits_detector"]
    assert 0 < detector["threshold"] < 1
    # clean FPR <= 1% with probability 0.95 over the calibration draw: enough clean scores
    assert detector["target_fpr"] == 0.01
    assert "probability >= 0.95" in detector["threshold_rule"]
    assert detector["calibration_scores"] >= 299
    # A tolerance from the binomial, not this machine's figure. At a clean FPR of 1 % the
    # count of flagged held-out digits is Binomial(n, 0.01); fail only on a count that has
    # probability < 1e-3 there: 7 or more of 143 (at 1.5 %, the worst a calibration missing
    # its 1 % target is likely to be, 0.6 %). The old "2 of 143" failed 17 % of good builds
    # (seeds 0-3 flagged 1, 3, 0, 0). A threshold at 10 % FPR flags 7 or more of 143 with
    # probability 0.991, one at 5 % with probability 0.58.
    n = detector["evaluation_images"]
    flagged = round(detector["clean_fpr"] * n)  # clean_fpr is flagged / n, rounded
    limit = int(binom.isf(1e-3, n, 0.01))  # P(X > limit | n, 1 %) <= 1e-3
    assert flagged <= limit, (flagged, n, limit)
    novelty = marker["models"]["digits_novelty"]
    assert novelty["calibration_scores"] >= 299
    assert novelty["clean_rate"] <= 0.03
    for kind in ("blank", "inverted", "faint", "noise"):  # honest, unlike any digit
        assert novelty["called_novel"][kind] >= 0.9, (kind, novelty)
    # the substitute is cheap on purpose: a lazy provider's model
    assert marker["models"]["digits_lite"]["test_accuracy"] < service["test_accuracy"]


def test_the_default_service_is_verified(repo: Path) -> None:
    cfg = load_model_config(repo / "digits" / "config.yaml", expected_name="digits")
    assert cfg.integrity is not None
    assert cfg.integrity.enclave.verifier_model == "digits_verifier"
    assert (cfg.integrity.detector, cfg.integrity.reclassifier) == (
        "digits_detector",
        "digits_reclassifier",
    )
    assert cfg.integrity.novelty == "digits_novelty"
    for name in ("digits_detector", "digits_reclassifier", "digits_novelty"):
        pair = load_model_config(repo / name / "config.yaml", expected_name=name)
        assert pair.platform == "onnx"


@pytest.mark.parametrize("name", ONNX_MODELS)
def test_onnx_models(
    repo: Path, marker: dict[str, Any], test_images: tuple[np.ndarray, np.ndarray], name: str
) -> None:
    session = ort.InferenceSession(
        str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type) == ("input", "tensor(float)")
    assert inp.shape[1:] == [1, 8, 8]
    assert isinstance(inp.shape[0], str)  # dynamic batch axis
    assert (out.name, out.type) == ("probabilities", "tensor(float)")
    assert out.shape[1:] == [10]
    x, y = test_images
    for batch in (1, 7, len(x)):
        (probs,) = session.run(None, {"input": x[:batch]})
        assert probs.shape == (batch, 10)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        assert (probs >= 0).all()
    acc = float((probs.argmax(axis=1) == y).mean())
    assert acc == pytest.approx(marker["models"][name]["test_accuracy"])


def test_torch_model_serves_like_the_onnx_one(
    repo: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    cfg = load_model_config(repo / "digits_torch" / "config.yaml", expected_name="digits_torch")
    rt = TorchRuntime("digits_torch", 1, repo / "digits_torch" / "1", cfg)
    rt.load()
    assert rt.inputs == [TensorSpec("input", "FP32", (-1, 1, 8, 8))]
    assert rt.outputs == [TensorSpec("probabilities", "FP32", (-1, 10))]
    session = ort.InferenceSession(
        str(repo / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x, _ = test_images
    for batch in (1, 7, 64):
        got = rt.predict({"input": x[:batch]})["probabilities"]
        (want,) = session.run(None, {"input": x[:batch]})
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    rt.unload()


def test_progress_reports_each_stage(built: tuple[Path, list[str]]) -> None:
    _, lines = built
    text = "\n".join(lines)
    for stage in (
        "data:",
        "digits:",
        "digits_verifier:",
        "digits_detector:",
        "digits_torch:",
        "digits_heavy:",
        "done in",
    ):
        assert stage in text
    assert "ms per single-sample request" in text


def test_failed_build_leaves_no_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_pipeline(_exp: object, run_dir: Path, **kwargs: Any) -> None:
        (kwargs["repository"] / "digits" / "1").mkdir(parents=True)  # half-written entry
        run_dir.mkdir(parents=True)
        raise RuntimeError("export exploded")

    root = tmp_path / "repo"
    root.mkdir()
    (root / ".built").write_text("{}", encoding="utf-8")  # from an earlier build
    (root / "mine").mkdir()  # unrelated models are left alone
    monkeypatch.setattr(default, "run_experiment", broken_pipeline)
    with pytest.raises(RuntimeError, match="export exploded"):
        default.build_default(root)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # staging removed
    assert sorted(p.name for p in root.iterdir()) == ["mine"]

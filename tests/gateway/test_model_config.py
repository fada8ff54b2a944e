from __future__ import annotations

from pathlib import Path

import pytest

from gateway.model_config import ConfigError, load_model_config


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_minimal_config_defaults(tmp_path: Path) -> None:
    cfg = load_model_config(_write(tmp_path, "platform: onnx\n"))
    assert cfg.max_batch_size == 0
    assert cfg.model_filename == "model.onnx"
    assert cfg.version_policy.select([1, 3, 2]) == [3]


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    p = _write(tmp_path, "platform: onnx\nmax_batch_sise: 8\n")
    with pytest.raises(ConfigError) as err:
        load_model_config(p)
    assert "max_batch_sise" in str(err.value)
    assert str(p) in str(err.value)


def test_unknown_nested_key(tmp_path: Path) -> None:
    p = _write(tmp_path, "platform: onnx\nmax_batch_size: 4\ndynamic_batching: {delay: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'dynamic_batching\.delay'"):
        load_model_config(p)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("platform: tensorflow\n", "platform"),
        ("platform: onnx\nmax_batch_size: -1\n", "max_batch_size"),
        ("platform: upstream\n", "upstream"),
        ("platform: onnx\ndynamic_batching: {}\n", "needs max_batch_size"),
        (
            "platform: onnx\nmax_batch_size: 8\ndynamic_batching: {preferred_batch_size: [16]}\n",
            "preferred_batch_size",
        ),
        ("platform: onnx\ninputs: [{name: x, datatype: FLOAT, shape: [3]}]\n", "datatype"),
        ("platform: onnx\ninputs: [{name: x, datatype: FP32, shape: [0]}]\n", "shape"),
        ("platform: onnx\nversion_policy: {all: {}, latest: {num_versions: 2}}\n", "one of"),
        ("- a list\n", "mapping"),
        ("platform: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_configs(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model_config(_write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing config.yaml"):
        load_model_config(tmp_path / "config.yaml")


def test_name_must_match_directory(tmp_path: Path) -> None:
    p = _write(tmp_path, "name: other\nplatform: onnx\n")
    with pytest.raises(ConfigError, match="does not match directory"):
        load_model_config(p, expected_name="mine")


def test_version_policies(tmp_path: Path) -> None:
    latest2 = load_model_config(
        _write(tmp_path, "platform: onnx\nversion_policy: {latest: {num_versions: 2}}\n")
    )
    assert latest2.version_policy.select([1, 2, 3]) == [2, 3]
    all_ = load_model_config(_write(tmp_path, "platform: onnx\nversion_policy: {all: {}}\n"))
    assert all_.version_policy.select([3, 1]) == [1, 3]
    spec = load_model_config(
        _write(tmp_path, "platform: onnx\nversion_policy: {specific: {versions: [1]}}\n")
    )
    assert spec.version_policy.select([1, 2]) == [1]
    with pytest.raises(ConfigError, match="not on disk"):
        spec.version_policy.select([2])

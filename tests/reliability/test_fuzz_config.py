"""Property tests of the model config loader (gateway/model_config.py).

Whatever bytes a ``config.yaml`` holds, ``load_model_config`` returns a valid config or raises
``ConfigError`` naming the file, and ``read_platform`` (used while discovering the repository)
never raises: one bad file must not stop the gateway from starting or serving other models.
A config that loads survives a dump-and-reload unchanged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.model_config import ConfigError, ModelConfig, load_model_config, read_platform
from tests.model_factory import TINY_CONFIG
from tests.reliability.conftest import fuzz_settings, record

VALID: list[dict[str, Any]] = [
    TINY_CONFIG,
    {"platform": "onnx", "max_batch_size": 0},
    {
        "platform": "upstream",
        "max_batch_size": 8,
        "upstream": {"url": "http://127.0.0.1:1", "retries": 1, "headers": {"a": "b"}},
    },
    {
        "platform": "onnx",
        "max_batch_size": 64,
        "integrity": {
            "enclave": {"verifier_model": "v", "timeout_s": 0.5},
            "detector": "d",
            "reclassifier": "r",
            "failure_policy": "fail_open",
            "drill": {"attack": "switch", "rate": 0.5},
        },
        "version_policy": {"specific": {"versions": [1, 3]}},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "labels": ["a", "b"],
    },
]


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    # one directory for every example: hypothesis runs the examples inside one test call
    with tempfile.TemporaryDirectory(prefix="fuzz-config-") as d:
        yield Path(d)


def load(path: Path, content: bytes) -> ModelConfig | None:
    """Write, load; the only failure allowed is a ConfigError that names the file."""
    path.write_bytes(content)
    platform = read_platform(path)  # must not raise either
    assert platform is None or isinstance(platform, str)
    try:
        cfg = load_model_config(path, expected_name="m")
    except ConfigError as exc:
        rejected = exc
    else:
        assert cfg.platform in ("onnx", "torch", "upstream", "causal_lm")
        again = ModelConfig.model_validate(cfg.model_dump(mode="json", exclude_unset=True))
        assert again == cfg, "a loaded config must survive a dump and reload"
        return cfg
    assert str(path) in str(rejected), f"the error must name the file: {rejected}"
    return None


@fuzz_settings(300)
@given(content=st.binary(max_size=300))
def test_arbitrary_bytes(workdir: Path, content: bytes) -> None:
    record("config: arbitrary bytes")
    load(workdir / "config.yaml", content)


yaml_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from(["onnx", "torch", "upstream", "causal_lm", "-1", "1e999", "2001-02-30"])
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=16,
)


@st.composite
def mutated_configs(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with keys dropped, replaced or added, at any depth."""
    cfg: Any = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(VALID))))

    def mutate(node: Any) -> Any:
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node)))
            action = draw(st.sampled_from(["drop", "replace", "add", "descend", "descend"]))
            if action == "drop":
                del node[key]
            elif action == "replace":
                node[key] = draw(yaml_values)
            elif action == "add":
                node[draw(st.text(max_size=8) | st.sampled_from(["name", "dynamic_batching"]))] = (
                    draw(yaml_values)
                )
            else:
                node[key] = mutate(node[key])
        elif isinstance(node, list) and node:
            i = draw(st.integers(0, len(node) - 1))
            node[i] = mutate(node[i]) if draw(st.booleans()) else draw(yaml_values)
        else:
            return draw(yaml_values)
        return node

    for _ in range(draw(st.integers(1, 4))):
        cfg = mutate(cfg)
    return cfg


@fuzz_settings(500)
@given(cfg=mutated_configs())
def test_mutated_valid_configs(workdir: Path, cfg: Any) -> None:
    record("config: mutated valid configs")
    load(workdir / "config.yaml", yaml.safe_dump(cfg, allow_unicode=True).encode("utf-8"))


@fuzz_settings(300)
@given(
    base=st.sampled_from(VALID),
    edits=st.lists(
        st.tuples(st.integers(0, 400), st.integers(0, 3), st.text(max_size=3)), max_size=4
    ),
)
def test_text_edits_of_valid_configs(
    workdir: Path, base: dict[str, Any], edits: list[tuple[int, int, str]]
) -> None:
    record("config: text edits")
    text = yaml.safe_dump(base)
    for pos, cut, insert in edits:
        pos %= len(text) + 1
        text = text[:pos] + insert + text[pos + cut :]
    load(workdir / "config.yaml", text.encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"platform: onnx\nlabels: [\xff\xfe]\n", "not UTF-8"),  # Latin-1 saved by an editor
        (b"platform: onnx\nparameters: {released: 2001-02-30}\n", "not valid YAML"),
        (b"platform: onnx\nlabels: " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid YAML"),
        (b"platform: !!python/object/apply:os.system [id]\n", "not valid YAML"),
        (b"- platform: onnx\n", "mapping at the top level"),
        (b"platform: onnx\nmax_batch_sise: 4\n", "unknown key 'max_batch_sise'"),
    ],
)
def test_known_bad_files_are_a_config_error(tmp_path: Path, content: bytes, message: str) -> None:
    """Regression: the first three escaped as UnicodeDecodeError, ValueError and RecursionError,
    which stopped the whole gateway at start (and read_platform with them)."""
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    assert read_platform(path) in (None, "onnx")
    with pytest.raises(ConfigError, match=message) as info:
        load_model_config(path)
    assert str(path) in str(info.value)

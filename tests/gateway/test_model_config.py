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


@pytest.mark.parametrize(
    "filename",
    ["../../other/1/model.onnx", "/etc/passwd", "sub/model.onnx", "..", "a\\b.onnx"],
)
def test_default_model_filename_is_a_file_name_not_a_path(tmp_path: Path, filename: str) -> None:
    # a path loaded another model's file (or any file on the host) as this model's version
    p = _write(tmp_path, f"platform: onnx\ndefault_model_filename: {filename!r}\n")
    with pytest.raises(ConfigError, match="must be a file name inside each version directory"):
        load_model_config(p)
    ok = load_model_config(_write(tmp_path, "platform: onnx\ndefault_model_filename: m.onnx\n"))
    assert ok.model_filename == "m.onnx"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # each of these loaded before, as something other than what was written
        ("platform: onnx\nversion_policy: {all: {num_versions: 2}}\n", "all.num_versions"),
        ("platform: onnx\nmax_batch_size: yes\n", "not the boolean true"),
        ("platform: onnx\nversion_policy: {specific: {versions: [true]}}\n", "boolean true"),
        ("platform: onnx\nversion_policy: {latest: {num_versions: true}}\n", "boolean true"),
        ("platform: onnx\ninstance_group: {count: true}\n", "boolean true"),
        ("platform: onnx\nversion_policy: {specific: {versions: [0]}}\n", "greater than or equal"),
    ],
)
def test_version_policy_and_counts_take_what_they_say(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model_config(_write(tmp_path, text))


def test_all_and_specific_policies_still_select(tmp_path: Path) -> None:
    every = load_model_config(_write(tmp_path, "platform: onnx\nversion_policy: {all: {}}\n"))
    assert every.version_policy.select([3, 1]) == [1, 3]
    text = "platform: onnx\nmax_batch_size: 4\nversion_policy: {specific: {versions: [2, 2]}}\n"
    some = load_model_config(_write(tmp_path, text))
    assert some.version_policy.select([1, 2, 3]) == [2]
    assert some.max_batch_size == 4


@pytest.mark.parametrize(
    "text",
    [
        "platform: onnx\ninstance_group: {kind: gpu}\n",
        "platform: onnx\ninstance_group: {kind: gpu}\nonnx: {providers: [cpu]}\n",
        "platform: torch\ninstance_group: {kind: gpu}\n",
        "platform: upstream\nupstream: {url: 'http://x'}\ninstance_group: {kind: gpu}\n",
    ],
)
def test_kind_gpu_needs_the_model_on_a_gpu(tmp_path: Path, text: str) -> None:
    # it loaded and ran on the CPU while GET .../config reported KIND_GPU
    with pytest.raises(ConfigError, match="instance_group.kind 'gpu' needs the model on a GPU"):
        load_model_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    "text",
    [
        "platform: onnx\ninstance_group: {kind: gpu}\nonnx: {providers: [cuda, cpu]}\n",
        "platform: torch\ninstance_group: {kind: gpu}\ntorch: {device: 'cuda:1'}\n",
    ],
)
def test_kind_gpu_with_the_model_on_a_gpu(tmp_path: Path, text: str) -> None:
    assert load_model_config(_write(tmp_path, text)).instance_group.kind == "gpu"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        # a block appended to a config that had it: the first was dropped without a word
        (
            "platform: onnx\nversion_policy: {all: {}}\nversion_policy: {latest: {}}\n",
            "version_policy",
        ),
        (
            "platform: onnx\nmax_batch_size: 8\nonnx: {intra_op_threads: 1, intra_op_threads: 2}\n",
            "intra_op_threads",
        ),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"(?s)not valid YAML: found duplicate key '{key}'.*line \d"
    ):
        load_model_config(_write(tmp_path, text))


def test_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    text = (
        "platform: onnx\nmax_batch_size: 8\n"
        "dynamic_batching:\n  <<: {max_queue_size: 4, max_queue_delay_microseconds: 10}\n"
        "  max_queue_size: 6\n"
    )
    cfg = load_model_config(_write(tmp_path, text))
    assert cfg.dynamic_batching is not None
    assert (
        cfg.dynamic_batching.max_queue_size,
        cfg.dynamic_batching.max_queue_delay_microseconds,
    ) == (6, 10)


# -- labels against the class output (the load refuses what does not fit) -----------------------

INTEGRITY = "integrity: {enclave: {verifier_model: v}, detector: d, reclassifier: r}\n"


@pytest.mark.parametrize(
    ("config", "outputs", "problem"),
    [
        # batched: [batch, classes]
        ("max_batch_size: 8\nlabels: [a, b, c]\n", [("p", (-1, 3))], None),
        ("max_batch_size: 8\nlabels: [a, b]\n", [("p", (-1, 3))], "lists 2 classes"),
        # one score per row (a detector's [batch] or [batch, 1]) is one class
        ("max_batch_size: 8\nlabels: [attack]\n", [("s", (-1,))], None),
        ("max_batch_size: 8\nlabels: [attack]\n", [("s", (-1, 1))], None),
        ("max_batch_size: 8\nlabels: [a, b]\n", [("s", (-1,))], "output 's' has 1"),
        # not batched: the shape is the classes'
        ("labels: [a, b]\n", [("p", (2,))], None),
        ("labels: [a, b]\n", [("p", (5,))], "output 'p' has 5"),
        # a class count known only when answering is not checked
        ("max_batch_size: 8\nlabels: [a, b]\n", [("p", (-1, -1))], None),
        # several outputs: one of them must fit
        ("max_batch_size: 8\nlabels: [a, b]\n", [("x", (-1, 4)), ("p", (-1, 2))], None),
        (
            "max_batch_size: 8\nlabels: [a, b]\n",
            [("x", (-1, 4)), ("p", (-1, 3))],
            "output 'x' has 4, output 'p' has 3",
        ),
        ("max_batch_size: 8\n", [("p", (-1, 3))], None),  # no labels, nothing to check
        # a verified model: the integrity block's output holds the classes
        (
            "max_batch_size: 8\nlabels: [a, b]\n" + INTEGRITY,
            [("p", (-1, 2)), ("probabilities", (-1, 3))],
            "output 'probabilities' has 3",
        ),
    ],
)
def test_labels_against_the_class_output(
    tmp_path: Path, config: str, outputs: list[tuple[str, tuple[int, ...]]], problem: str | None
) -> None:
    cfg = load_model_config(_write(tmp_path, "platform: onnx\n" + config))
    why = cfg.labels_problem(outputs)
    if problem is None:
        assert why is None
    else:
        assert why is not None
        assert problem in why


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("platform: onnx\nlabels: []\n", "'labels' is empty"),
        ("platform: causal_lm\nlabels: [a]\n", "not for platform 'causal_lm'"),
    ],
)
def test_labels_that_name_no_class_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model_config(_write(tmp_path, text))

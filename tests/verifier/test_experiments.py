"""Experiment files: every committed one validates; unknown keys and bad values are errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from verifier.defaults import digits_default
from verifier.experiment import ExperimentError, load_experiment, parse_experiment

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


@pytest.mark.parametrize(
    "name",
    sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if not p.stem.startswith("protect_")),
)
def test_committed_experiments_validate(name: str) -> None:
    exp = load_experiment(EXPERIMENTS / f"{name}.yaml")
    assert exp.name == name
    assert len(exp.config_hash()) == 64


def test_digits_yaml_is_the_embedded_default() -> None:
    # the same config (the file's directory, where relative paths are read from, aside)
    assert load_experiment(EXPERIMENTS / "digits.yaml").model_dump() == (
        digits_default().model_dump()
    )


def raw() -> dict[str, object]:
    data = yaml.safe_load((EXPERIMENTS / "digits.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    data = raw()
    data["student"]["trian"] = {"epochs": 1}  # type: ignore[index]
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ExperimentError, match=r"typo\.yaml: unknown key 'student\.trian'"):
        load_experiment(path)


def test_bad_values_and_files(tmp_path: Path) -> None:
    data = raw()
    data["verifier"]["candidates"] = []  # type: ignore[index]
    with pytest.raises(ExperimentError, match="verifier.candidates"):
        parse_experiment(data)
    data = raw()
    data["data"] = {"source": "npz"}
    with pytest.raises(ExperimentError, match="needs a path"):
        parse_experiment(data)
    with pytest.raises(ExperimentError, match="no such file"):
        load_experiment(tmp_path / "missing.yaml")
    data = raw()
    data["data"]["augment"] = {"crop_padding": 0, "hflip": False}  # type: ignore[index]
    data["detector"] = {"augment_views": 2}
    with pytest.raises(ExperimentError, match="augment_views needs data.augment"):
        parse_experiment(data)
    (tmp_path / "list.yaml").write_text("- 1\n", encoding="utf-8")
    with pytest.raises(ExperimentError, match="mapping"):
        load_experiment(tmp_path / "list.yaml")
    (tmp_path / "code.yaml").write_text("name: !!python/name:os.system\n", encoding="utf-8")
    with pytest.raises(ExperimentError, match="not valid YAML"):  # safe_load: no code
        load_experiment(tmp_path / "code.yaml")


def test_hash_changes_with_the_config() -> None:
    a = digits_default()
    assert a.config_hash() == digits_default().config_hash()
    assert a.config_hash() != digits_default(seed=1).config_hash()


@pytest.mark.parametrize(
    ("block", "key", "value"),
    [
        ("detector", "fpr_confidence", 0.95),
        ("detector", "fpr_confidence", None),  # explicit: in expectation, not auto
        ("detector", "novelty", {"target_rate": 0.01}),
        ("data", "test_fraction", 0.3),
    ],
)
def test_fields_added_later_keep_the_config_hash_while_unset(
    block: str, key: str, value: object
) -> None:
    """Experiments run before a field existed keep their hash (and cached stages)."""
    data = raw()
    data[block].pop(key, None)  # type: ignore[attr-defined]
    assert key not in parse_experiment(data).model_dump(mode="json")[block]
    base = parse_experiment(data).config_hash()
    data[block][key] = value  # type: ignore[index]
    assert parse_experiment(data).config_hash() != base


def test_a_bad_fpr_confidence_is_refused() -> None:
    data = raw()
    data["detector"]["fpr_confidence"] = 1.0  # type: ignore[index]
    with pytest.raises(ExperimentError, match="fpr_confidence"):
        parse_experiment(data)


def test_test_fraction_is_for_digits_only() -> None:
    data = raw()
    data["data"] = {"source": "npz", "path": "x.npz", "test_fraction": 0.3}
    with pytest.raises(ExperimentError, match="test_fraction is for data source 'digits'"):
        parse_experiment(data)


def test_pretrain_from_the_service_is_checked_against_the_student() -> None:
    data = raw()
    student = data["student"]["net"]  # type: ignore[index]
    narrower = [max(1, w // 2) for w in student["widths"]]
    data["verifier"]["pretrain"] = {"task": "service"}  # type: ignore[index]
    data["verifier"]["candidates"] = [{**student, "widths": narrower}]  # type: ignore[index]
    parse_experiment(data)  # same architecture, narrower: fine
    for bad, match in [
        ({**student, "widths": [*narrower, 4]}, "cannot be pruned"),
        ({**student, "widths": [w + 1 for w in student["widths"]]}, "cannot be pruned"),
        (
            {
                **student,
                "widths": narrower,
                "pool": "flatten" if student.get("pool") != "flatten" else "gap",
            },
            "pool",
        ),
        (
            {
                **student,
                "widths": narrower,
                "convs_per_block": 2 if student.get("convs_per_block", 1) == 1 else 1,
            },
            "convs_per_block",
        ),
    ]:
        data["verifier"]["candidates"] = [bad]  # type: ignore[index]
        with pytest.raises(ExperimentError, match=match):
            parse_experiment(data)
    data["verifier"]["candidates"] = [{**student, "widths": narrower}]  # type: ignore[index]
    data["verifier"]["pretrain"] = {"task": "service", "checkpoint": "x.pt"}  # type: ignore[index]
    with pytest.raises(ExperimentError, match="no path or checkpoint"):
        parse_experiment(data)


def test_data_paths_are_read_from_the_experiment_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 26: a copied experiment works from any directory."""
    from verifier.data import DataError
    from verifier.pipeline import experiment_splits

    data = tmp_path / "project" / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 255, (40, 8, 8), dtype=np.uint8),
        "y_train": np.arange(40) % 4,
        "x_test": rng.integers(0, 255, (12, 8, 8), dtype=np.uint8),
        "y_test": np.arange(12) % 4,
        "names": np.array(["ant", "bee", "cat", "dog"]),
    }
    np.savez(data / "set.npz", **arrays)
    exp_dir = tmp_path / "project" / "experiments"
    exp_dir.mkdir()
    body = raw()
    body["data"] = {"source": "npz", "path": "../data/set.npz", "classes_key": "names"}
    (exp_dir / "mine.yaml").write_text(yaml.safe_dump(body))
    monkeypatch.chdir(tmp_path)  # anywhere but the experiment's directory
    exp = load_experiment(exp_dir / "mine.yaml")
    splits = experiment_splits(exp)
    assert splits.classes == ["ant", "bee", "cat", "dog"]
    # the old rule (relative to the working directory) still works, and says what to write
    body["data"]["path"] = "project/data/set.npz"
    (exp_dir / "old.yaml").write_text(yaml.safe_dump(body))
    caplog.set_level("WARNING", logger="verifier.experiment")
    assert experiment_splits(load_experiment(exp_dir / "old.yaml")).classes[0] == "ant"
    assert "write ../data/set.npz" in caplog.text
    body["data"] = {"source": "npz", "path": "../data/set.npz", "classes_key": "labels"}
    (exp_dir / "bad.yaml").write_text(yaml.safe_dump(body))
    with pytest.raises(DataError, match="no key 'labels' for the class names"):
        experiment_splits(load_experiment(exp_dir / "bad.yaml"))

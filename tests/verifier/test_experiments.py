"""Experiment files: every committed one validates; unknown keys and bad values are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from verifier.defaults import digits_default
from verifier.experiment import ExperimentError, load_experiment, parse_experiment

EXPERIMENTS = Path(__file__).parents[2] / "experiments"


@pytest.mark.parametrize("name", ["digits", "fashion_mnist", "mnist", "cifar10_subset"])
def test_committed_experiments_validate(name: str) -> None:
    exp = load_experiment(EXPERIMENTS / f"{name}.yaml")
    assert exp.name == name
    assert len(exp.config_hash()) == 64


def test_digits_yaml_is_the_embedded_default() -> None:
    assert load_experiment(EXPERIMENTS / "digits.yaml") == digits_default()


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

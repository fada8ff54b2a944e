"""``fides protect`` on a repository model (the ONNX file is loaded as the gateway loads it,
no HTTP), the pieces the run is made of, and the command's exit codes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from fides.cli import app
from fides.protect.config import parse_protect_config
from fides.protect.distill import AnswerTable, Inputs, load_inputs, split_pool, views_of
from fides.protect.run import protect
from gateway.model_config import load_model_config
from tests.fides.protect.conftest import protect_raw
from verifier.data import load_digits_arrays


def _local(**over: Any) -> dict[str, Any]:
    return protect_raw({"model": "digits"}, **over)


def test_a_repository_model_is_protected_in_place(
    tmp_path: Path, trained_repository: tuple[Path, dict[str, Any]]
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(trained_repository[0], repo)
    for name in ("digits_verifier", "digits_detector", "digits_reclassifier"):
        shutil.rmtree(repo / name)  # the kit builds its own
    result = protect(parse_protect_config(_local()), repository=repo, run_dir=tmp_path / "run")
    report = result.report
    assert report["protect"]["service"].startswith("model 'digits' v1 of ")
    assert report["protect"]["answer_kind"] == "probabilities"
    assert report["protect"]["verifier"]["test_fidelity_top1"] >= 0.85
    assert report["mean_detection_accuracy"] >= 0.8
    assert report["service_eval_accuracy"] >= 0.9  # digits come with labels
    q = report["protect"]["queries"]
    assert q["given_images"] == 1078  # digits' 60% training share: train + validation
    assert q["per_given_image"] == round(q["paid_for_in_all"] / 1078, 3)
    config = load_model_config(repo / "digits" / "config.yaml", "digits")
    assert config.platform == "onnx"
    assert config.integrity is not None
    assert config.integrity.detector == "digits_detector"
    text = (repo / "digits" / "config.yaml").read_text()
    assert text.count("integrity:") == 1  # the earlier block was replaced, not doubled
    assert "(fides protect)" in text
    for name in ("digits_verifier", "digits_detector", "digits_reclassifier"):
        assert (repo / name / "1" / "model.onnx").is_file()
    # the operator's settings in the block survive a rerun; what the kit owns is rewritten
    raw_config = yaml.safe_load(text)
    raw_config["integrity"].update(mode="enforce", sampling_rate=0.5, detector="stale")
    (repo / "digits" / "config.yaml").write_text(yaml.safe_dump(raw_config))
    # a second run with nothing changed asks nothing and trains the verifier from its stage
    again = protect(parse_protect_config(_local()), repository=repo, run_dir=tmp_path / "run")
    rerun = load_model_config(repo / "digits" / "config.yaml", "digits").integrity
    assert rerun is not None
    assert (rerun.mode, rerun.sampling_rate, rerun.detector) == ("enforce", 0.5, "digits_detector")
    assert again.report["protect"]["queries"]["asked_by_this_run"] == 0
    # what the distillation cost, whichever run paid: not the store's running total
    assert again.report["protect"]["queries"]["distillation"] == q["distillation"] > 0
    assert (
        again.report["protect"]["verifier"]["test_fidelity_top1"]
        == report["protect"]["verifier"]["test_fidelity_top1"]
    )


def test_the_answer_table_never_guesses() -> None:
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    p = np.full((5, 10), 0.1, dtype=np.float32)
    p[np.arange(5), np.arange(5)] = 0.9
    table = AnswerTable(x, p)
    import torch

    out = table(torch.from_numpy(x[[3, 1]]))
    assert out.argmax(1).tolist() == [3, 1]
    with pytest.raises(LookupError, match="1 of 2 images have no recorded answer"):
        table(torch.from_numpy(np.concatenate([x[:1], x[:1] + 0.01])))


def test_splits_and_views_are_seeded_and_disjoint() -> None:
    cfg = parse_protect_config(_local(views=2))
    pool = split_pool(load_inputs(cfg), cfg)
    keys = [{r.tobytes() for r in part} for part in (pool.train, pool.val, pool.test)]
    assert not keys[0] & keys[1]
    assert not keys[0] & keys[2]
    assert not keys[1] & keys[2]
    views = views_of(pool.train, cfg)
    assert views.shape == (2 * len(pool.train), *pool.train.shape[1:])
    np.testing.assert_array_equal(views, views_of(pool.train, cfg))  # a rerun asks the same
    assert pool.y_train is not None  # digits have labels: used for the spot check only


def test_copies_of_held_out_images_are_left_out_of_the_splits_before_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Test images that the user's training images also hold (exact copies), and copies of
    validation images among the training images: left out and counted, so the test scores
    only images the verifier never saw."""
    x, y = load_digits_arrays(0)[0][:400], load_digits_arrays(0)[1][:400]
    x_test, y_test = x[:100], y[:100]
    x_train = np.concatenate([x[100:], x_test[:7], x_test[:2]])  # 7 test images, 2 twice
    y_train = np.concatenate([y[100:], y_test[:7], y_test[:2]])
    inputs = Inputs(x_train, y_train, x_test, y_test, None, "dup-test")
    cfg = parse_protect_config(_local())
    pool = split_pool(inputs, cfg)
    assert pool.duplicates_dropped.get("val", 0) + pool.duplicates_dropped["train"] == 9
    keys = [{r.tobytes() for r in part} for part in (pool.train, pool.val, pool.test)]
    assert not keys[0] & keys[1]
    assert not keys[0] & keys[2]
    assert not keys[1] & keys[2]
    assert pool.y_train is not None
    assert len(pool.y_train) == len(pool.train)
    assert "exact copies of held-out images" in caplog.text
    clean = split_pool(Inputs(x[100:], y[100:], x_test, y_test, None, "clean"), cfg)
    assert clean.duplicates_dropped == {}


def test_the_command_names_a_bad_file_and_a_dead_service(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**_local(), "views": -1}))
    r = runner.invoke(app, ["protect", str(bad), "--repository", str(tmp_path / "repo")])
    assert r.exit_code == 2, r.output
    assert "views" in r.output
    dead = tmp_path / "dead.yaml"
    raw = protect_raw(
        {"upstream": {"url": "http://127.0.0.1:9", "model_name": "digits", "retries": 0}}
    )
    dead.write_text(yaml.safe_dump(raw))
    r = runner.invoke(
        app,
        [
            "protect",
            str(dead),
            "--repository",
            str(tmp_path / "repo"),
            "--run-dir",
            str(tmp_path / "run"),
        ],
    )
    assert r.exit_code == 4, r.output
    assert "127.0.0.1:9" in r.output


@pytest.mark.parametrize(
    "name", ["protect_digits", "protect_fashion_mnist", "protect_fashion_mnist_onnx"]
)
def test_the_shipped_protect_files_parse(name: str) -> None:
    from fides.protect.config import load_protect_config

    root = Path(__file__).parents[3]
    cfg = load_protect_config(root / "experiments" / f"{name}.yaml")
    assert cfg.name == name
    if cfg.data.path is not None:  # read from the experiment file's directory
        assert cfg.data.file == root / "experiments" / cfg.data.path


def test_an_export_keeps_the_operators_settings_and_names_the_output() -> None:
    from verifier.integrity_export import integrity_block, merged_block

    exp = parse_protect_config(_local())
    fresh = integrity_block(exp, output="scores")
    assert fresh["output"] == "scores"
    assert "output" not in integrity_block(exp)  # the gateway's default, not written
    old = {
        "enclave": {
            "verifier_model": "old_verifier",
            "timeout_s": 2.0,
            "measurement": "ab" * 48,  # pinned for the old verifier
            "sealed_model": "old.sealed",
        },
        "detector": "old_detector",
        "novelty": "old_novelty",
        "mode": "enforce",
        "failure_policy": "fail_open",
        "threshold": 0.7,
    }
    merged = merged_block({k: v for k, v in fresh.items() if k != "novelty"}, old)
    assert merged["enclave"]["verifier_model"] == fresh["enclave"]["verifier_model"]
    assert merged["enclave"]["timeout_s"] == 2.0
    assert "measurement" not in merged["enclave"]  # void for the new verifier: dropped
    assert "sealed_model" not in merged["enclave"]
    assert merged["enclave"]["max_batch_size"] == fresh["enclave"]["max_batch_size"]
    assert merged["detector"] == fresh["detector"]
    assert "novelty" not in merged  # the kit's own key, no longer set: dropped
    assert (merged["mode"], merged["failure_policy"], merged["threshold"]) == (
        "enforce",
        "fail_open",
        0.7,
    )
    assert merged["output"] == "scores"


def test_a_run_that_fails_in_its_evaluation_leaves_the_repository_as_it_was(
    tmp_path: Path,
    trained_repository: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kit is staged and moved in whole: an exhausted budget (or any failure) during the
    evaluation leaves no new verifier beside the old detector and threshold."""
    import fides.protect.run as run_module
    from fides.protect.query import BudgetExhausted

    repo = tmp_path / "repo"
    shutil.copytree(trained_repository[0], repo)

    def snapshot() -> dict[str, bytes]:
        return {
            str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()
        }

    before = snapshot()

    def out_of_budget(*args: Any, **kwargs: Any) -> Any:
        raise BudgetExhausted(100, 100, 5000, "evaluation images")

    monkeypatch.setattr(run_module, "evaluate_models", out_of_budget)
    with pytest.raises(BudgetExhausted):
        protect(parse_protect_config(_local()), repository=repo, run_dir=tmp_path / "run")
    after = snapshot()
    assert [k for k in after if k not in before] == []  # nothing added (staging included)
    assert all(after[k] == v for k, v in before.items())


def test_labels_named_in_another_order_are_read_in_the_services_order(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An image folder's classes are alphabetical; the service's are its own order. The same
    names in another order are re-indexed (the spot check would otherwise call an honest
    service a tamperer); other names are kept, with a warning."""
    from types import SimpleNamespace

    from fides.protect.distill import Pool
    from fides.protect.run import _in_service_order

    service = SimpleNamespace(
        runtime=SimpleNamespace(config=SimpleNamespace(labels=["shirt", "boot", "bag"]))
    )
    y = np.array([0, 1, 2, 2])
    images = np.zeros((4, 1, 2, 2), np.float32)
    pool = Pool(images, images, images, y, y, y, given=4)
    alphabetical = ["bag", "boot", "shirt"]
    moved, classes = _in_service_order(pool, alphabetical, service)  # type: ignore[arg-type]
    assert classes == ["shirt", "boot", "bag"]
    assert moved.y_train is not None
    assert moved.y_train.tolist() == [2, 1, 0, 0]  # bag -> 2, boot -> 1, shirt -> 0
    same, kept = _in_service_order(pool, ["a", "b", "c"], service)  # type: ignore[arg-type]
    assert same is pool
    assert kept == ["a", "b", "c"]
    assert "not the service's labels" in caplog.text


def test_a_failed_move_into_the_repository_puts_everything_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kit goes in entry by entry, the service's last; a move that fails restores the
    entries already replaced and names the problem."""
    from fides.protect.run import PublishError, _publish

    repo = tmp_path / "repo"
    for name in ("svc", "svc_detector", "svc_verifier"):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.yaml").write_text(f"old {name}")
    staging = repo / ".fides-protect-x"
    for name in ("svc", "svc_detector", "svc_verifier"):
        (staging / name).mkdir(parents=True)
        (staging / name / "config.yaml").write_text(f"new {name}")
    real_rename = Path.rename

    def failing(self: Path, target: Any) -> Any:
        if self.name == "svc" and self.parent == staging:  # the last move, the service's
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(PublishError, match="as it was"):
        _publish(staging, repo, "svc", config_only=False)
    monkeypatch.setattr(Path, "rename", real_rename)
    assert sorted(p.name for p in repo.iterdir()) == ["svc", "svc_detector", "svc_verifier"]
    for name in ("svc", "svc_detector", "svc_verifier"):
        assert (repo / name / "config.yaml").read_text() == f"old {name}"
    # and without a failure, every entry is the new one and nothing is left behind
    for name in ("svc", "svc_detector", "svc_verifier"):
        (staging / name).mkdir(parents=True)
        (staging / name / "config.yaml").write_text(f"new {name}")
    _publish(staging, repo, "svc", config_only=False)
    assert sorted(p.name for p in repo.iterdir()) == ["svc", "svc_detector", "svc_verifier"]
    assert all(
        (repo / n / "config.yaml").read_text() == f"new {n}" for n in ("svc", "svc_detector")
    )

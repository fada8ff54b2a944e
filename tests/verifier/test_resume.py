"""Stages that survive interruption (issue 20): `fides train` killed mid-stage and run again
ends with the same weights, bit for bit, as an uninterrupted run; corrupt and mismatched
checkpoints, a full disk while checkpointing, and a resume against changed data or config are
refused with a message that names the file and what changed."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from verifier.data import Dataset, load_splits
from verifier.defaults import DIGITS_DEFAULT
from verifier.experiment import OptimConfig, parse_experiment
from verifier.losses import cross_entropy
from verifier.nets import ConvNet, NetConfig
from verifier.pipeline import StageError, run_experiment, stage_inputs
from verifier.train import CheckpointError, fit, set_determinism

FIDES = [sys.executable, "-m", "fides.cli"]


def experiment_file(tmp_path: Path, data: dict[str, Any] | None = None, epochs: int = 12) -> Path:
    """A digits experiment small enough for seconds, long enough per stage to be killed in:
    the teacher uses the CIFAR-10 recipe (whitening stem, SGD without decay on norms,
    lookahead, label smoothing, bfloat16, pool after the first conv, GELU), the student the
    default AdamW one."""
    raw = json.loads(json.dumps(DIGITS_DEFAULT))
    if data is not None:
        raw["data"] = data
    raw["data"]["train_limit"] = 600
    raw["data"]["test_limit"] = 200
    raw["teachers"][0]["net"].update(
        convs_per_block=2, pool_after="first_conv", activation="gelu", stem="whiten"
    )
    raw["teachers"][0]["train"] = {
        "epochs": epochs,
        "batch_size": 64,
        "lr": 0.1,
        "optimizer": "sgd",
        "warmup": 0.2,
        "anneal": "linear",
        "label_smoothing": 0.2,
        "precision": "bf16",
        "decay_norms": False,
        "lookahead": True,  # its averaged weights are checkpointed and restored too
    }
    raw["student"]["train"]["epochs"] = epochs
    raw["student"]["min_flops_ratio"] = 1.5  # pooling after the first conv makes it cheap
    raw["verifier"]["pretrain"]["train"]["epochs"] = 1
    raw["verifier"]["step"]["epochs"] = 2
    raw["export"]["latency_repeats"] = 2
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every finished stage's weights, by path relative to the run directory."""
    return {
        str(p.relative_to(run_dir)): torch.load(p, weights_only=True)["model"]
        for p in sorted(run_dir.rglob("done.pt"))
    }


def train(exp: Path, run_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*FIDES, "train", str(exp), "--run-dir", str(run_dir), "--no-results"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_a_killed_run_resumes_to_the_same_weights_bit_for_bit(tmp_path: Path) -> None:
    exp = experiment_file(tmp_path)
    straight = train(exp, tmp_path / "straight")
    stderr = straight.communicate(timeout=600)[1].decode()
    straight.stderr.close()  # type: ignore[union-attr]
    assert straight.returncode == 0, stderr

    with (tmp_path / "killed.log").open("wb") as log:  # nobody reads stderr while it runs
        killed = subprocess.Popen(
            [*FIDES, "train", str(exp), "--run-dir", str(tmp_path / "killed"), "--no-results"],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 300
        # kill once the student stage has written a checkpoint mid-way (the teacher is done)
        while not list((tmp_path / "killed").glob("student-*/last.pt")):
            assert killed.poll() is None, "the run finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "results.json").exists()
    (checkpoint,) = (tmp_path / "killed").glob("student-*/last.pt")
    assert torch.load(checkpoint, weights_only=True)["epoch"] < 12

    resumed = train(exp, tmp_path / "killed")
    stderr = resumed.communicate(timeout=600)[1].decode()
    resumed.stderr.close()  # type: ignore[union-attr]
    assert resumed.returncode == 0, stderr
    assert "resuming after epoch" in stderr

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert any(k.startswith("verifier-") for k in a)
    for stage, state in a.items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b[stage][name]), f"{stage}: {name}"
    results = [
        json.loads((tmp_path / d / "results.json").read_text()) for d in ("straight", "killed")
    ]
    for key in ("student", "verifier"):
        assert results[0][key]["test_accuracy"] == results[1][key]["test_accuracy"]


# ---------------------------------------------------------------- checkpoints


def small_net() -> ConvNet:
    set_determinism(0, 1)
    return ConvNet(NetConfig(widths=(8, 16)))


@pytest.fixture(scope="module")
def digits_train() -> Any:
    return load_splits("digits", seed=0, train_limit=200).train


def ce(z: torch.Tensor, _x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(z, y)


OPTIM = OptimConfig(epochs=3, batch_size=32, lr=3e-3)


class Interrupt(Exception):
    pass


def interrupted_stage(tmp_path: Path, data: Any) -> Path:
    """A stage directory whose last.pt holds epoch 1."""
    calls = 0

    def crash(z: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 9:  # in epoch 2 (7 batches per epoch)
            raise Interrupt
        return ce(z, x, y)

    stage = tmp_path / "stage"
    with pytest.raises(Interrupt):
        fit(small_net(), data, crash, OPTIM, seed=0, stage_dir=stage)
    return stage


def test_a_corrupt_checkpoint_is_refused_by_name(tmp_path: Path, digits_train: Any) -> None:
    stage = interrupted_stage(tmp_path, digits_train)
    last = stage / "last.pt"
    blob = bytearray(last.read_bytes())
    last.write_bytes(bytes(blob[: len(blob) // 2]))  # truncated, as by a crash mid-copy
    with pytest.raises(CheckpointError, match=r"last\.pt: not a readable checkpoint"):
        fit(small_net(), digits_train, ce, OPTIM, seed=0, stage_dir=stage)
    last.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="delete it to train this stage from its start"):
        fit(small_net(), digits_train, ce, OPTIM, seed=0, stage_dir=stage)


def test_a_checkpoint_of_another_network_is_refused(tmp_path: Path, digits_train: Any) -> None:
    stage = interrupted_stage(tmp_path, digits_train)
    set_determinism(0, 1)
    wider = ConvNet(NetConfig(widths=(8, 24)))
    with pytest.raises(CheckpointError, match=r"its model does not fit this stage \(.*size mis"):
        fit(wider, digits_train, ce, OPTIM, seed=0, stage_dir=stage)
    state = torch.load(stage / "last.pt", weights_only=True)
    del state["generator"]
    torch.save(state, stage / "last.pt")
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint \(no generator\)"):
        fit(small_net(), digits_train, ce, OPTIM, seed=0, stage_dir=stage)


def test_a_full_disk_keeps_the_previous_checkpoint(
    tmp_path: Path, digits_train: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync
    syncs = 0

    def fsync_until_the_disk_fills(fd: int) -> None:
        nonlocal syncs
        if stat.S_ISREG(os.fstat(fd).st_mode):  # files; their directories are synced too
            syncs += 1
        if syncs == 2:  # the second epoch's checkpoint: written, then ENOSPC on the flush
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_until_the_disk_fills)
    stage = tmp_path / "stage"
    with pytest.raises(CheckpointError, match="No space left on device.*is as it was before"):
        fit(small_net(), digits_train, ce, OPTIM, seed=0, stage_dir=stage)
    assert not list(stage.glob("*.tmp"))
    assert torch.load(stage / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(os, "fsync", real_fsync)

    straight = small_net()
    fit(straight, digits_train, ce, OPTIM, seed=0)
    resumed = small_net()
    fit(resumed, digits_train, ce, OPTIM, seed=0, stage_dir=stage)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_every_stage_file_is_written_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints, stage manifests, results and latency records go through one writer: the
    file and its directory are flushed to disk, and a write that fails leaves the earlier
    file as it was."""
    from verifier.train import write_durably

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("file" if stat.S_ISREG(os.fstat(fd).st_mode) else "directory")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    target = tmp_path / "manifest.json"
    write_durably(target, b"first")
    assert synced == ["file", "directory"]
    assert target.read_bytes() == b"first"

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(CheckpointError, match="stage manifest .* is as it was before"):
        write_durably(target, b"second", "stage manifest")
    assert target.read_bytes() == b"first"
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------- changed inputs


def write_npz(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = np.arange(400) % 4
    x = (rng.integers(0, 60, (400, 8, 8)) + 40 * y[:, None, None]).astype(np.uint8)
    np.savez(path, x_train=x[:300], y_train=y[:300], x_test=x[300:], y_test=y[300:])


def npz_experiment(path: Path, teacher_epochs: int = 2) -> Any:
    raw = json.loads(json.dumps(DIGITS_DEFAULT))
    raw["data"] = {"source": "npz", "path": str(path), "val_fraction": 0.1}
    raw["teachers"][0]["train"]["epochs"] = teacher_epochs
    raw["student"]["train"]["epochs"] = 1
    raw["verifier"]["pretrain"]["train"]["epochs"] = 1
    raw["verifier"]["step"]["epochs"] = 1
    return parse_experiment(raw)


def test_a_changed_data_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    write_npz(data, seed=0)
    run_experiment(npz_experiment(data), tmp_path / "run")
    write_npz(data, seed=1)  # same path and config, other images
    with pytest.raises(StageError, match=r"teacher_0-\w+ was trained from other inputs \(data_f"):
        run_experiment(npz_experiment(data), tmp_path / "run")


def test_a_config_change_while_a_stage_is_interrupted_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    write_npz(data, seed=0)
    run = tmp_path / "run"
    run_experiment(npz_experiment(data), run)
    (teacher,) = run.glob("teacher_0-*")
    done = torch.load(teacher / "done.pt", weights_only=True)
    (teacher / "done.pt").unlink()
    torch.save({**done, "epoch": 1}, teacher / "last.pt")  # as if killed after epoch 1
    with pytest.raises(
        StageError,
        match=r"teacher_0 was interrupted in .*teacher\.train\.epochs: 2 -> 3.*restore them",
    ):
        run_experiment(npz_experiment(data, teacher_epochs=3), run)
    # a finished stage with other inputs is no obstacle: it stays as a cache
    torch.save(done, teacher / "done.pt")
    (teacher / "last.pt").unlink()
    run_experiment(npz_experiment(data, teacher_epochs=3), run)
    assert len(list(run.glob("teacher_0-*"))) == 2


def test_an_unreadable_stage_record_is_refused_by_name(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    write_npz(data, seed=0)
    run_experiment(npz_experiment(data), tmp_path / "run")
    (record,) = (tmp_path / "run").glob("teacher_0-*/stage.json")
    record.write_text('{"stage": "teacher_0", "inp')  # cut short
    with pytest.raises(StageError, match=r"stage\.json: not a readable stage record"):
        run_experiment(npz_experiment(data), tmp_path / "run")


def test_a_finished_stage_loaded_leaves_the_generator_as_training_it_did(tmp_path: Path) -> None:
    """Dropout, the next stage's fresh head and pruning draw from torch's global generator:
    a run that loads a finished stage (a resume after a kill between two stages) must go on
    from the state an uninterrupted run is in after training it, or what follows differs."""
    g = torch.Generator().manual_seed(0)
    data_x = torch.rand(96, 1, 8, 8, generator=g)
    data_y = torch.randint(0, 10, (96,), generator=g)

    def stage(start_seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        net = ConvNet(NetConfig(widths=(4, 8), image_size=(8, 8), dropout=0.3))
        torch.manual_seed(start_seed)  # what ran before this stage in this process
        cfg = OptimConfig(epochs=2, batch_size=16, lr=0.01)
        fit(
            net,
            Dataset(data_x, data_y),
            lambda z, _x, y: cross_entropy(z, y),
            cfg,
            seed=0,
            stage_dir=tmp_path / "stage",
        )
        return torch.rand(8)  # the next stage's first draw

    trained = stage(1)
    loaded = stage(2)  # a fresh process after a kill: the stage is loaded, not trained
    assert torch.equal(trained, loaded)
    # a kill between writing done.pt and removing last.pt: the leftover goes at the next load
    torch.save({"epoch": 1}, tmp_path / "stage" / "last.pt")
    stage(3)
    assert not (tmp_path / "stage" / "last.pt").exists()


def test_a_finished_stage_with_a_leftover_last_checkpoint_is_not_interrupted(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data.npz"
    write_npz(data, seed=0)
    run = tmp_path / "run"
    run_experiment(npz_experiment(data), run)
    (teacher,) = run.glob("teacher_0-*")
    torch.save({"epoch": 1}, teacher / "last.pt")  # killed before its removal
    run_experiment(npz_experiment(data, teacher_epochs=3), run)  # other inputs: not refused
    assert len(list(run.glob("teacher_0-*"))) == 2


def test_a_pretraining_data_file_is_part_of_the_verifier_stage_record(tmp_path: Path) -> None:
    """The verifier's source data set is fingerprinted by its bytes, like the data file: new
    bytes under the same name are a change the stage record names."""
    data, source = tmp_path / "data.npz", tmp_path / "source.npz"
    write_npz(data, seed=0)
    write_npz(source, seed=1)
    raw = json.loads(json.dumps(DIGITS_DEFAULT))
    raw["data"] = {"source": "npz", "path": str(data), "val_fraction": 0.1}
    raw["verifier"]["pretrain"] = {
        **raw["verifier"]["pretrain"],
        "task": "dataset",
        "path": str(source),
    }
    exp = parse_experiment(raw)
    before = stage_inputs(exp, "sha256:x")["verifier"]["pretrain_file"]
    write_npz(source, seed=2)
    assert stage_inputs(exp, "sha256:x")["verifier"]["pretrain_file"] != before
    plain = npz_experiment(data)  # no source file: the record is what it was
    assert "pretrain_file" not in stage_inputs(plain, "sha256:x")["verifier"]


def test_a_results_file_cut_short_is_replaced_not_fatal(tmp_path: Path) -> None:
    data = tmp_path / "data.npz"
    write_npz(data, seed=0)
    run = tmp_path / "run"
    run_experiment(npz_experiment(data), run)
    (run / "results.json").write_text('{"wall_seconds": 1')  # a crash mid-write, before
    run_experiment(npz_experiment(data), run)
    assert "wall_seconds_total" in json.loads((run / "results.json").read_text())


def test_a_stage_recorded_before_the_pretraining_fingerprint_still_resumes(
    tmp_path: Path,
) -> None:
    """Records written before the pretraining file was fingerprinted lack the entry: not a
    change (the run in progress resumes); a record with it compares it."""
    from verifier.pipeline import checked_stage_dir

    older = {"data_file": "sha256:a", "verifier": {"pretrain": {"path": "src.npz"}}}
    checked_stage_dir(tmp_path, "verifier", "k", older)
    now = {**older, "pretrain_file": "sha256:b"}
    assert checked_stage_dir(tmp_path, "verifier", "k", now) == tmp_path / "verifier-k"
    checked_stage_dir(tmp_path / "new", "verifier", "k", now)
    with pytest.raises(StageError, match="pretrain_file"):
        checked_stage_dir(tmp_path / "new", "verifier", "k", {**now, "pretrain_file": "sha256:c"})

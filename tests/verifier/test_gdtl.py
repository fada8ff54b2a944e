"""The greedy loop on a tiny model: memory budget, threshold, target, the recorded path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from verifier.data import Dataset, Splits
from verifier.experiment import NetSpec, OptimConfig, PretrainConfig, VerifierConfig
from verifier.flops import count_flops, memory_estimate
from verifier.gdtl import _set_trainable, greedy_unfreeze, path_table, select_verifier
from verifier.losses import cross_entropy
from verifier.nets import ConvNet, NetConfig
from verifier.train import fit

SHAPE = (1, 6, 6)


def tiny_data(n: int = 96, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > x[:, 0, 3:].mean((1, 2))).long() + 2 * (
        x[:, 0, :, :3].mean((1, 2)) > x[:, 0, :, 3:].mean((1, 2))
    ).long()  # 4 classes from where the image is brighter
    return Dataset(x, y)


def net(widths: tuple[int, ...] = (4, 6, 8)) -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(NetConfig(widths=widths, num_classes=4))


@pytest.fixture(scope="module")
def service() -> nn.Module:
    """A trained service model, so that agreeing with it is not trivial."""
    torch.manual_seed(1)
    svc = ConvNet(NetConfig(widths=(8, 8, 8), num_classes=4))
    fit(
        svc,
        tiny_data(256, 2),
        lambda logits, _x, y: cross_entropy(logits, y),
        OptimConfig(epochs=15, batch_size=32, lr=1e-2),
        seed=0,
    )
    return svc.eval()


def cfg(**kw: object) -> VerifierConfig:
    base: dict[str, object] = {
        "candidates": [{"widths": [4, 6, 8]}],
        "step": OptimConfig(epochs=1, batch_size=32, lr=1e-2),
        "threshold": 0.0,
        "fidelity_target": 1.0,  # overridden below: unreachable unless a test lowers it
        "memory_budget_mb": 96,
        "memory_batch_size": 8,
        "pretrain": PretrainConfig(train=OptimConfig(epochs=1, batch_size=32)),
    }
    # outside the schema, useful in tests only: a negative threshold keeps every step, a
    # target above 1 is never reached
    update = {"threshold": kw.pop("threshold", 0.0), "fidelity_target": kw.pop("target", 1.01)}
    base.update(kw)
    return VerifierConfig.model_validate(base).model_copy(update=update)


def run(c: VerifierConfig, service: nn.Module, model: ConvNet | None = None):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return greedy_unfreeze(
        model or net(), service, tiny_data(), tiny_data(48, 1), c, seed=0, image_shape=SHAPE
    )


def test_memory_grows_with_unfrozen_blocks() -> None:
    model = net()
    sizes = []
    for k in range(4):
        _set_trainable(model, k)
        sizes.append(memory_estimate(model, SHAPE, 8).total_bytes)
    assert sizes == sorted(sizes)
    assert len(set(sizes)) == 4


def test_the_memory_budget_counts_mb_as_the_enclave_does(service: nn.Module) -> None:
    """MB of 10^6 bytes, the enclave's unit (``memory_budget_bytes = mb * 1e6``): a step
    whose footprint fits the budget read as MiB but not as MB is not taken."""
    model = net()
    _set_trainable(model, 1)
    needed = memory_estimate(model, SHAPE, 8).total_bytes
    assert memory_estimate(model, SHAPE, 8).total_mb == needed / 1e6
    budget = 0.99 * needed / 1e6  # below the footprint in MB, above it in MiB
    assert needed <= budget * 2**20
    result = run(cfg(memory_budget_mb=budget, threshold=-1.0), service)
    assert result.stop_reason == "memory budget"
    assert [r.accepted for r in result.path] == [True, False]


def test_stops_at_the_memory_budget(service: nn.Module) -> None:
    model = net()
    _set_trainable(model, 1)
    one_block = memory_estimate(model, SHAPE, 8).total_mb
    _set_trainable(model, 2)
    two_blocks = memory_estimate(model, SHAPE, 8).total_mb
    budget = (one_block + two_blocks) / 2  # fits one unfrozen block, not two
    result = run(cfg(memory_budget_mb=budget, threshold=-1.0), service)
    assert result.stop_reason == "memory budget"
    assert [r.step for r in result.path] == [0, 1, 2]
    assert [r.accepted for r in result.path] == [True, True, False]
    assert math.isnan(result.path[-1].fidelity)  # never trained
    assert "memory budget" in result.path[-1].note
    assert all(r.memory_mb <= budget for r in result.path if r.accepted)
    assert result.extra["unfrozen_blocks"] == 1
    trainable = {n.rsplit(".", 1)[0] for n, p in result.net.named_parameters() if p.requires_grad}
    # the top block's conv and batch norm, and the head's batch norm and linear layer
    assert trainable == {"blocks.2.0", "blocks.2.1", "head.2", "head.4"}


def test_stops_when_the_gain_is_below_the_threshold(service: nn.Module) -> None:
    result = run(cfg(threshold=0.99), service)  # no step can gain 99 points
    assert [r.accepted for r in result.path] == [True, False]
    assert "not above the threshold" in result.stop_reason
    # the discarded step's weights are gone: the kept fidelity is step 0's
    assert result.fidelity is not None
    assert result.fidelity.agreement == pytest.approx(result.path[0].fidelity, abs=1e-5)
    backbone = [p for n, p in result.net.named_parameters() if n.startswith("blocks.")]
    assert not any(p.requires_grad for p in backbone)


def test_stops_at_the_fidelity_target(service: nn.Module) -> None:
    result = run(cfg(target=0.01), service)
    assert len(result.path) == 1
    assert result.stop_reason.startswith("fidelity target")


def test_path_records_each_step(service: nn.Module) -> None:
    result = run(cfg(threshold=-1.0), service)  # accept everything: all blocks unfrozen
    assert result.stop_reason == "every block is trainable"
    assert [r.unfrozen_blocks for r in result.path] == [0, 1, 2, 3]
    trainable = [r.trainable_params for r in result.path]
    assert trainable == sorted(trainable)
    assert trainable[-1] == result.path[-1].params
    for r in result.path:
        assert 0 <= r.fidelity <= 1
        assert r.mean_kl >= 0
        assert r.wall_s > 0
        assert r.flops > 0
    table = path_table(result.path)
    assert table.count("\n") == 1 + len(result.path)
    assert "| trainable params | FLOPs |" in table


def test_final_step_is_kept_only_when_it_gains(service: nn.Module) -> None:
    final = OptimConfig(epochs=2, batch_size=32, lr=3e-3)
    base = run(cfg(threshold=-1.0), service)
    result = run(cfg(threshold=-1.0, final_step=final), service)
    # the greedy steps are the same as without it; one more row, on what the loop left trainable
    assert [r.fidelity for r in result.path[:-1]] == [r.fidelity for r in base.path]
    last = result.path[-1]
    assert last.step == base.path[-1].step + 1
    assert last.unfrozen_blocks == 3
    assert last.note.startswith("final step (2 epochs, lr 0.003)")
    assert last.accepted
    assert "final step kept" in result.stop_reason
    assert result.fidelity is not None
    assert result.fidelity.agreement == pytest.approx(last.fidelity, abs=1e-5)
    # a threshold no fine-tune can pass: discarded, the loop's weights are back
    strict = run(cfg(threshold=0.99, final_step=final), service)
    assert [r.accepted for r in strict.path] == [True, False, False]
    assert "final step discarded" in strict.stop_reason
    assert strict.fidelity is not None
    assert strict.fidelity.agreement == pytest.approx(strict.path[0].fidelity, abs=1e-5)
    assert result.net.training is False


def test_final_step_unset_keeps_the_config_hash() -> None:
    c = cfg()
    assert "final_step" not in c.model_dump(mode="json")
    with_final = cfg(final_step=OptimConfig(epochs=1))
    assert with_final.model_dump(mode="json")["final_step"]["epochs"] == 1


def test_select_verifier_prefers_the_smallest_and_skips_expensive(service: nn.Module) -> None:
    train, val = tiny_data(), tiny_data(48, 1)
    splits = Splits(train, val, val, 4, list("abcd"), [0.5], [0.3], "test")
    service_flops = count_flops(service, SHAPE)
    specs = [NetSpec(widths=[8, 8, 8]), NetSpec(widths=[2, 2, 2]), NetSpec(widths=[3, 3, 3])]
    c = cfg(target=0.01, max_flops_ratio=0.5)
    result, summary = select_verifier(
        specs, NetConfig(num_classes=4), service, splits, c, seed=0, service_flops=service_flops
    )
    assert result.net.cfg.widths == (2, 2, 2)  # the cheapest reaches the (low) target first
    assert [row["candidate"] for row in summary] == [1]
    c = cfg(max_flops_ratio=0.5)
    result, summary = select_verifier(
        specs, NetConfig(num_classes=4), service, splits, c, seed=0, service_flops=service_flops
    )
    assert [row["candidate"] for row in summary] == [1, 2, 0]
    assert "skipped" in str(summary[-1]["outcome"])  # same FLOPs as the service
    assert float(summary[-1]["flops_ratio_to_service"]) == pytest.approx(1.0)
    assert service_flops > 0


def test_a_black_box_budget_is_absolute_flops_and_measured_latency(service: nn.Module) -> None:
    """No service FLOPs (a black box): ``max_flops`` and ``max_latency_ms`` bound the
    candidates, each skip names its reason, and nothing fits -> a clear error."""
    train, val = tiny_data(), tiny_data(48, 1)
    splits = Splits(train, val, val, 4, list("abcd"), [0.5], [0.3], "test")
    specs = [NetSpec(widths=[8, 8, 8]), NetSpec(widths=[2, 2, 2])]
    small = count_flops(ConvNet(NetConfig(widths=(2, 2, 2), num_classes=4)), SHAPE)
    c = cfg(target=0.01, max_flops=small)
    result, summary = select_verifier(
        specs, NetConfig(num_classes=4), service, splits, c, seed=0, service_flops=None
    )
    assert result.net.cfg.widths == (2, 2, 2)
    assert summary[0]["flops_ratio_to_service"] is None
    c = cfg(target=0.01, max_flops=small - 1)
    with pytest.raises(ValueError, match="no verifier candidate fits"):
        select_verifier(
            specs, NetConfig(num_classes=4), service, splits, c, seed=0, service_flops=None
        )
    c = cfg(target=0.01, max_latency_ms=1e-6)  # no net runs in a nanosecond
    with pytest.raises(ValueError, match="no verifier candidate fits"):
        select_verifier(
            specs, NetConfig(num_classes=4), service, splits, c, seed=0, service_flops=None
        )


def test_the_latency_budget_is_measured_in_the_simulated_enclave() -> None:
    """max_latency_ms bounds what the enclave spends on one call (the model, hashing,
    signing), not the bare model: the enclave's figure is the larger, and a model over the
    enclave's memory budget does not boot at all."""
    from fides_core.enclave_errors import ModelTooLarge
    from verifier.export import enclave_latency_ms, single_image_latency_ms

    net = ConvNet(NetConfig(widths=(4, 4), num_classes=4))
    in_enclave = enclave_latency_ms(net, SHAPE, repeats=20)
    bare = single_image_latency_ms(net, SHAPE)
    assert 0 < bare < in_enclave  # the signature alone takes tens of microseconds
    with pytest.raises(ModelTooLarge):
        enclave_latency_ms(net, SHAPE, memory_budget_mb=1e-4, repeats=1)


def test_pretrain_rotation_then_fresh_head_and_checkpoint_reuse(tmp_path: Path) -> None:
    from verifier.gdtl import pretrain_backbone

    train = tiny_data()
    splits = Splits(train, train, train, 4, list("abcd"), [0.5], [0.3], "test")
    spec = NetConfig(widths=(4, 6), num_classes=4)
    pre = PretrainConfig(train=OptimConfig(epochs=1, batch_size=32))
    net, info = pretrain_backbone(spec, pre, splits, seed=0, stage_dir=tmp_path / "pre")
    assert "rotation" in str(info["source"])
    assert net.head[-1].out_features == 4  # the target's classes, not the 4 rotations' head
    assert (tmp_path / "pre" / "done.pt").is_file()
    torch.save(net.state_dict(), tmp_path / "backbone.pt")
    again, info = pretrain_backbone(
        spec, PretrainConfig(checkpoint=tmp_path / "backbone.pt"), splits, seed=5, stage_dir=None
    )
    assert str(info["source"]).startswith("checkpoint:")
    for (name, a), b in zip(
        net.blocks.state_dict().items(), again.blocks.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    wrong = ConvNet(NetConfig(widths=(3,), num_classes=4))
    torch.save(wrong.state_dict(), tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="no weights for"):
        pretrain_backbone(
            spec, PretrainConfig(checkpoint=tmp_path / "wrong.pt"), splits, seed=0, stage_dir=None
        )


def test_pretrain_from_the_pruned_service_then_greedy_steps(service: nn.Module) -> None:
    from verifier.gdtl import pretrain_backbone

    train = tiny_data()
    splits = Splits(train, tiny_data(48, 1), train, 4, list("abcd"), [0.5], [0.3], "test")
    spec = NetConfig(widths=(4, 6, 8), num_classes=4, dropout=0.0)
    pre = PretrainConfig(task="service")
    pruned, info = pretrain_backbone(spec, pre, splits, seed=0, stage_dir=None, service=service)
    assert "filter-pruned to [4, 6, 8]" in str(info["source"])
    assert count_flops(pruned, SHAPE) < count_flops(service, SHAPE)
    # the service's own head, not a fresh one: the last block keeps all 8 channels, so the
    # head is the service's, unchanged (the pruned values are checked in test_nets.py)
    assert torch.equal(pruned.head[4].weight, service.head[4].weight)
    assert torch.equal(pruned.head[4].bias, service.head[4].bias)
    with pytest.raises(ValueError, match="must be a ConvNet"):
        pretrain_backbone(spec, pre, splits, seed=0, stage_dir=None, service=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="number of blocks"):
        pretrain_backbone(
            NetConfig(widths=(4, 6), num_classes=4),
            pre,
            splits,
            seed=0,
            stage_dir=None,
            service=service,
        )
    c = cfg(pretrain=pre, candidates=[{"widths": [4, 6, 8], "dropout": 0.0}], max_flops_ratio=1.0)
    result, summary = select_verifier(
        c.candidates,
        NetConfig(num_classes=4),
        service,
        splits,
        c,
        seed=0,
        service_flops=count_flops(service, SHAPE),
    )
    assert "filter-pruned" in str(result.extra["pretrain"]["source"])  # type: ignore[index]
    assert result.path[0].note == "head only"
    assert len(result.path) >= 2
    assert summary[0]["flops_ratio_to_service"] < 1.0


def test_a_measured_latency_is_kept_so_a_resumed_run_decides_alike(
    service: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether a candidate fits max_latency_ms is a timing; the stage keeps the first one, so
    a run resumed on a busier (or idler) machine trains the same candidates."""
    import verifier.gdtl as gdtl

    train, val = tiny_data(), tiny_data(48, 1)
    splits = Splits(train, val, val, 4, list("abcd"), [0.5], [0.3], "test")
    specs = [NetSpec(widths=[2, 2, 2])]
    c = cfg(target=0.01, max_latency_ms=1.0)
    timings = iter([0.5, 5.0])  # fits at first; a second measurement would not
    monkeypatch.setattr(gdtl, "enclave_latency_ms", lambda *_, **__: next(timings))
    for _ in range(2):
        result, summary = select_verifier(
            specs,
            NetConfig(num_classes=4),
            service,
            splits,
            c,
            seed=0,
            service_flops=None,
            run_dir=tmp_path,
        )
        assert summary[0]["enclave_latency_ms_batch1"] == 0.5
    assert result.net.cfg.widths == (2, 2, 2)
    assert next(timings) == 5.0  # measured once


def test_a_pruned_candidate_trains_the_same_whichever_candidates_ran_before(
    service: nn.Module, tmp_path: Path
) -> None:
    """Candidate directories are named by the candidate alone, so a run whose list gained a
    cheaper candidate (tried first) reuses the others': each must train as it would alone.
    Pruned from the service (no fresh net seeds torch's generator), its dropout drew from
    whatever the candidate before it left."""
    train, val = tiny_data(), tiny_data(48, 1)
    splits = Splits(train, val, val, 4, list("abcd"), [0.5], [0.3], "test")
    c = cfg(pretrain=PretrainConfig(task="service"), threshold=-1.0)
    alone, cheaper = NetSpec(widths=[4, 6, 8], dropout=0.5), NetSpec(widths=[2, 2, 2])
    assert isinstance(service, ConvNet)

    def candidate_weights(specs: list[NetSpec], run_dir: Path) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        select_verifier(
            specs, service.cfg, service, splits, c, seed=0, service_flops=None, run_dir=run_dir
        )
        (done,) = run_dir.glob("candidate_0-*/step_1/done.pt")  # the first candidate's
        state: dict[str, torch.Tensor] = torch.load(done, weights_only=True)["model"]
        return state

    first = candidate_weights([alone], tmp_path / "alone")
    after = candidate_weights([alone, cheaper], tmp_path / "after")
    for name, tensor in first.items():
        assert torch.equal(tensor, after[name]), name


def test_a_pretraining_checkpoint_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    """verifier.pretrain.checkpoint is a file the user gives: junk, or another network's
    weights of other shapes, is an error naming it (the CLI prints it), not a traceback."""
    from verifier.gdtl import pretrain_backbone
    from verifier.train import CheckpointError

    train = tiny_data()
    splits = Splits(train, train, train, 4, list("abcd"), [0.5], [0.3], "test")
    spec = NetConfig(widths=(4, 6), num_classes=4)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable checkpoint"):
        pretrain_backbone(
            spec, PretrainConfig(checkpoint=tmp_path / "junk.pt"), splits, seed=0, stage_dir=None
        )
    other = ConvNet(NetConfig(widths=(5, 7), num_classes=4))
    torch.save({"model": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt: its blocks do not fit .*\[4, 6\]"):
        pretrain_backbone(
            spec, PretrainConfig(checkpoint=tmp_path / "other.pt"), splits, seed=0, stage_dir=None
        )


def test_a_candidate_changed_while_interrupted_is_refused(
    service: nn.Module, tmp_path: Path
) -> None:
    """As for every stage: a candidate's spec edited while one of its steps is unfinished
    would silently start a new directory beside the dropped work (and leave an unfinished
    step that later looks like an interrupted verifier stage). Refused, naming the change."""
    from verifier.pipeline import StageError

    train, val = tiny_data(), tiny_data(48, 1)
    splits = Splits(train, val, val, 4, list("abcd"), [0.5], [0.3], "test")
    c = cfg(threshold=-1.0)
    base = NetConfig(num_classes=4)

    def select(widths: list[int]) -> None:
        select_verifier(
            [NetSpec(widths=widths)],
            base,
            service,
            splits,
            c,
            seed=0,
            service_flops=None,
            run_dir=tmp_path,
        )

    select([4, 6, 8])
    (step,) = tmp_path.glob("candidate_0-*/step_1")
    (step / "done.pt").rename(step / "last.pt")  # as if killed during step 1
    with pytest.raises(StageError, match=r"candidate 0 was interrupted .*widths: \[4, 6, 8\] -> "):
        select([4, 6, 6])
    assert len(list(tmp_path.glob("candidate_0-*"))) == 1


def test_a_stray_label_in_the_pretraining_data_is_refused(tmp_path: Path) -> None:
    """pretrain task 'dataset' sizes its head by the largest label: one stray label (2**40)
    would ask for a head of that many classes (memory exhausted), not an error naming it."""
    import numpy as np

    from verifier.data import DataError
    from verifier.gdtl import pretrain_backbone

    rng = np.random.default_rng(0)
    y = np.r_[np.arange(39) % 4, 2**40]
    source = tmp_path / "source.npz"
    np.savez(
        source,
        x_train=rng.integers(0, 256, (40, 6, 6), dtype=np.uint8),
        y_train=y,
        x_test=rng.integers(0, 256, (4, 6, 6), dtype=np.uint8),
        y_test=np.arange(4),
    )
    train = tiny_data()
    splits = Splits(train, train, train, 4, list("abcd"), [0.5], [0.3], "test")
    pre = PretrainConfig(task="dataset", path=source, train=OptimConfig(epochs=1))
    with pytest.raises(DataError, match=r"source\.npz: y_train has no examples of class"):
        pretrain_backbone(
            NetConfig(widths=(4, 6), num_classes=4), pre, splits, seed=0, stage_dir=None
        )

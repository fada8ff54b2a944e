"""Filter pruning: the kept filters, exactness where the dropped channels are dead, bad shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from verifier.flops import count_flops
from verifier.nets import ConvNet, NetConfig, new_net, prune_filters, whiten_stem


def trained_like(cfg: NetConfig, seed: int = 0) -> ConvNet:
    """A net with random, non-trivial batch-norm parameters and statistics (as after training)."""
    torch.manual_seed(seed)
    net = ConvNet(cfg)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return net.eval()


def kill_channels(
    net: ConvNet, block: int, channels: list[int], scale: float = 1e-3, conv: int | None = None
) -> None:
    """Make ``channels`` of every conv in ``block`` output exactly 0 after ReLU, and shrink
    their filters so they have the smallest L1 norms: pruning them must not change the net."""
    convs = [m for m in net.blocks[block] if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.blocks[block] if isinstance(m, nn.BatchNorm2d)]
    last = len(convs) - 1
    with torch.no_grad():
        for i, (c, bn) in enumerate(zip(convs, norms, strict=True)):
            if conv is not None and i != conv:
                continue
            c.weight[channels] *= scale
            bn.bias[channels] = -10.0  # ReLU(bn(anything this small)) == 0
            bn.running_mean[channels] = 0.0
        if conv is not None and conv != last:
            return
        if block == len(net.blocks) - 1:  # the head's batch norm maps them to 0 as well
            bn = net.head[2]
            per_channel = bn.num_features // net.cfg.widths[-1]
            for c in channels:
                bn.running_mean[c * per_channel : (c + 1) * per_channel] = 0.0
                bn.bias[c * per_channel : (c + 1) * per_channel] = 0.0


@pytest.mark.parametrize("pool", ["flatten", "gap"])
@pytest.mark.parametrize("convs", [1, 2])
def test_pruning_dead_channels_keeps_the_function(pool: str, convs: int) -> None:
    cfg = NetConfig(widths=(6, 8, 10), convs_per_block=convs, pool=pool, image_size=(9, 9))
    net = trained_like(cfg)
    kill_channels(net, 0, [1, 4])
    kill_channels(net, 2, [2, 5, 6, 9])
    if convs == 1:
        kill_channels(net, 1, [0, 3, 7])
    else:  # each conv of a block chooses its own filters
        kill_channels(net, 1, [0, 3, 7], conv=0)
        kill_channels(net, 1, [1, 2, 6], conv=1)
    small = NetConfig(widths=(4, 5, 6), convs_per_block=convs, pool=pool, image_size=(9, 9))
    pruned = prune_filters(net, small).eval()
    x = torch.rand(16, 1, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), rtol=1e-5, atol=1e-5)
    assert count_flops(pruned, (1, 9, 9)) < count_flops(net, (1, 9, 9))
    # the surviving filters are the live ones, in their original order
    first = [m for m in pruned.blocks[0] if isinstance(m, nn.Conv2d)][0]
    source = [m for m in net.blocks[0] if isinstance(m, nn.Conv2d)][0]
    assert torch.equal(first.weight, source.weight[[0, 2, 3, 5]])


def test_pruning_to_the_same_widths_is_a_copy() -> None:
    cfg = NetConfig(widths=(5, 7), pool="flatten", image_size=(8, 8), dropout=0.3)
    net = trained_like(cfg, seed=3)
    same = prune_filters(net, NetConfig(**{**cfg.as_dict(), "dropout": 0.0})).eval()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(same(x), net(x))
    same.blocks[0][0].weight.data.zero_()  # a copy, not a view of the source's weights
    assert net.blocks[0][0].weight.abs().sum() > 0


def test_pruning_keeps_largest_l1_filters_given_the_kept_inputs() -> None:
    net = trained_like(NetConfig(widths=(4, 6)))
    with torch.no_grad():
        w0, w1 = net.blocks[0][0].weight, net.blocks[1][0].weight
        w0.copy_(torch.tensor([4.0, 1.0, 3.0, 2.0]).view(4, 1, 1, 1).expand_as(w0))
        w1.fill_(0.1)
        w1[5, 1] = 10.0  # the largest filter over all inputs, but only through input 1,
        w1[2, 0] = 1.0  # which is pruned: over the kept inputs 0 and 2, filters 2 and 4
        w1[4, 2] = 2.0  # are the largest
    pruned = prune_filters(net, NetConfig(widths=(2, 2)))
    assert torch.equal(pruned.blocks[0][0].weight, w0[[0, 2]])
    assert torch.equal(pruned.blocks[1][0].weight, w1[[2, 4]][:, [0, 2]])
    assert torch.equal(pruned.head[4].weight, net.head[4].weight[:, [2, 4]])  # gap: 1 per channel
    assert torch.equal(pruned.head[4].bias, net.head[4].bias)
    assert not pruned.training  # the source's mode


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"widths": (2,)}, "number of blocks"),
        ({"widths": (2, 7)}, "number of blocks"),
        ({"widths": (2, 0)}, "number of blocks"),
        ({"pool": "flatten", "image_size": (8, 8)}, "pool"),
        ({"convs_per_block": 2}, "convs_per_block"),
        ({"num_classes": 3}, "num_classes"),
    ],
)
def test_pruning_refuses_another_architecture(change: dict[str, object], match: str) -> None:
    net = trained_like(NetConfig(widths=(4, 6)))
    with pytest.raises(ValueError, match=match):
        prune_filters(net, NetConfig(**{**NetConfig(widths=(2, 3)).as_dict(), **change}))


def test_the_whitening_stem_decorrelates_the_training_patches() -> None:
    """Its first 4C filters map the normalised 2x2 patches to unit-variance, uncorrelated
    outputs (up to eps); the other 4C are their negatives; the filters are not trained."""
    torch.manual_seed(0)
    mixing = torch.randn(12, 12)
    # correlated colour patches: 2x2 RGB patches mixed by a random matrix, tiled to 16x16
    patches = (torch.randn(400, 64, 12) @ mixing).sigmoid()  # [n, positions, 12]
    images = torch.nn.functional.fold(patches.transpose(1, 2), (16, 16), 2, stride=2)
    cfg = NetConfig(widths=(8, 8), in_channels=3, mean=(0.5,) * 3, std=(0.2,) * 3, stem="whiten")
    net = new_net(cfg, images, seed=0)
    conv = net.stem[0]
    assert conv.weight.shape == (24, 3, 2, 2)
    assert not conv.weight.requires_grad
    assert torch.equal(conv.weight[12:], -conv.weight[:12])
    with torch.no_grad():
        out = conv(net.normalize(images))[:, :12]  # [n, 12, 15, 15]
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    var = torch.linalg.eigvalsh(cov)
    assert cov.diagonal().max() <= 1.0
    assert cov.diagonal().min() > 0.5  # unit variance, shrunk a little by eps on small ones
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 0.1 * var.max()
    assert net(images[:4]).shape == (4, 10)


@pytest.mark.parametrize("pool", ["flatten", "gap"])
def test_pruning_keeps_the_whitening_stem(pool: str) -> None:
    cfg = NetConfig(
        widths=(6, 8),
        in_channels=3,
        mean=(0.5,) * 3,
        std=(0.2,) * 3,
        pool=pool,
        image_size=(9, 9),
        stem="whiten",
    )
    net = trained_like(cfg)
    whiten_stem(net, torch.rand(50, 3, 9, 9))
    small = NetConfig(**{**cfg.as_dict(), "widths": (3, 4)})
    pruned = prune_filters(net, small)
    assert torch.equal(pruned.stem[0].weight, net.stem[0].weight)
    assert pruned.blocks[0][0].weight.shape == (3, 24, 3, 3)  # all 24 stem channels kept
    assert pruned(torch.rand(2, 3, 9, 9)).shape == (2, 10)
    # the same widths: the same function
    same = prune_filters(net, cfg)
    x = torch.rand(3, 3, 9, 9)
    torch.testing.assert_close(same(x), net(x))
    with pytest.raises(ValueError, match="stem"):
        prune_filters(net, NetConfig(**{**small.as_dict(), "stem": "none"}))
    assert count_flops(net, (3, 9, 9)) > count_flops(pruned, (3, 9, 9))

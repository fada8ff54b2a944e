"""Filter pruning: the kept filters, exactness where the dropped channels are dead, bad shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from verifier.flops import count_flops
from verifier.nets import ConvNet, NetConfig, prune_filters


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

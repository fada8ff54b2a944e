"""The training loop's recipe options: weight decay kept off batch-norm and bias parameters,
and lookahead's averaged weights as the stage's result."""

from __future__ import annotations

import torch

from verifier.data import Dataset
from verifier.experiment import OptimConfig
from verifier.losses import cross_entropy
from verifier.nets import ConvNet, NetConfig
from verifier.train import _optimizer, fit


def small_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(NetConfig(widths=(4, 8), image_size=(8, 8)))


def test_decay_norms_off_exempts_every_one_dimensional_parameter() -> None:
    net = small_net()
    params = list(net.parameters())
    opt = _optimizer(params, OptimConfig(epochs=1, weight_decay=0.01, decay_norms=False))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == {id(p) for p in params if p.ndim > 1}
    assert exempt == {id(p) for p in params if p.ndim == 1}  # norms' scales and shifts, biases
    default = _optimizer(params, OptimConfig(epochs=1, weight_decay=0.01))
    assert [g["weight_decay"] for g in default.param_groups] == [0.01]


def test_lookahead_changes_the_result_and_keeps_it_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    data = Dataset(torch.rand(256, 1, 8, 8, generator=g), torch.randint(0, 10, (256,), generator=g))

    def run(lookahead: bool) -> dict[str, torch.Tensor]:
        net = small_net()
        cfg = OptimConfig(epochs=3, batch_size=32, lr=0.05, optimizer="sgd", lookahead=lookahead)
        fit(net, data, lambda z, _x, y: cross_entropy(z, y), cfg, seed=0)
        return {k: v.clone() for k, v in net.state_dict().items()}

    plain, first, second = run(False), run(True), run(True)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(plain[k], first[k]) for k in plain if plain[k].is_floating_point())

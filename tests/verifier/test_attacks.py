"""Attack invariants: outputs stay probability vectors; each attack does what it says."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from verifier.attacks import (
    OUTPUT_ATTACKS,
    avg,
    fgsm,
    output_attack,
    quantize_int8,
    random_noise,
    random_switch,
    switch,
    targeted_flip,
)
from verifier.nets import ConvNet, NetConfig


@pytest.fixture
def probs() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.dirichlet(np.full(10, 0.3), size=500).astype(np.float32)  # [500, 10]


def _valid(p: np.ndarray) -> None:
    assert p.dtype == np.float32
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", OUTPUT_ATTACKS)
def test_every_output_attack_keeps_probability_vectors(name: str, probs: np.ndarray) -> None:
    res = output_attack(name, probs, np.random.default_rng(1))
    _valid(res.probs)
    assert res.probs.shape == probs.shape
    np.testing.assert_array_equal(res.flipped, res.probs.argmax(1) != probs.argmax(1))


def test_unknown_attack_is_an_error(probs: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown output attack 'swap'"):
        output_attack("swap", probs, np.random.default_rng(0))


def test_switch_moves_the_label_to_the_runner_up(probs: np.ndarray) -> None:
    res = switch(probs)
    order = np.argsort(-probs, 1)
    assert res.flipped.all()
    np.testing.assert_array_equal(res.probs.argmax(1), order[:, 1])
    # the probability values are only permuted
    np.testing.assert_allclose(np.sort(res.probs, 1), np.sort(probs, 1), atol=1e-6)


def test_avg_is_the_minimal_flip(probs: np.ndarray) -> None:
    res = avg(probs, delta=0.01)
    rows = np.arange(len(probs))
    order = np.argsort(-probs, 1)
    a, b = order[:, 0], order[:, 1]
    mean = (probs[rows, a] + probs[rows, b]) / 2
    assert res.flipped.all()
    np.testing.assert_array_equal(res.probs.argmax(1), b)
    np.testing.assert_allclose(res.probs[rows, b] - res.probs[rows, a], 0.02, atol=1e-5)
    np.testing.assert_allclose(res.probs[rows, b], mean + 0.01, atol=1e-5)
    # every other class is untouched
    others = np.ones_like(probs, dtype=bool)
    others[rows, a] = others[rows, b] = False
    np.testing.assert_allclose(res.probs[others], probs[others], atol=1e-6)


def test_random_switch_never_picks_the_top_class(probs: np.ndarray) -> None:
    res = random_switch(probs, np.random.default_rng(3))
    # a swap with a class of equal probability would not flip; Dirichlet draws have no ties
    assert res.flipped.all()
    assert len(set(res.probs.argmax(1).tolist())) > 1


def test_targeted_flip_reaches_the_target_and_leaves_it_if_already_there(
    probs: np.ndarray,
) -> None:
    res = targeted_flip(probs, 3)
    assert (res.probs.argmax(1) == 3).all()
    already = probs.argmax(1) == 3
    np.testing.assert_array_equal(res.flipped, ~already)
    np.testing.assert_allclose(res.probs[already], probs[already], atol=1e-6)
    with pytest.raises(ValueError, match="target class"):
        targeted_flip(probs, 10)


def test_noise_scales_with_sigma(probs: np.ndarray) -> None:
    small = random_noise(probs, 0.01, np.random.default_rng(0))
    large = random_noise(probs, 3.0, np.random.default_rng(0))
    _valid(small.probs)
    assert small.flip_rate < 0.05 < large.flip_rate


def _tiny_net() -> ConvNet:
    torch.manual_seed(0)
    return ConvNet(NetConfig(widths=(4, 8), num_classes=3)).eval()


def test_fgsm_stays_in_the_budget_and_the_pixel_range() -> None:
    net = _tiny_net()
    x = torch.rand(16, 1, 8, 8)
    adv = fgsm(net, x, 0.05)
    assert adv.shape == x.shape
    assert float((adv - x).abs().max()) <= 0.05 + 1e-6
    assert float(adv.min()) >= 0
    assert float(adv.max()) <= 1
    # it moves against the service's own answer: the loss on that answer goes up
    with torch.no_grad():
        y = net(x).argmax(1)
        before = torch.nn.functional.cross_entropy(net(x), y)
        after = torch.nn.functional.cross_entropy(net(adv), y)
    assert after > before


def test_int8_substitute_is_close_but_not_identical() -> None:
    net = _tiny_net()
    sub = quantize_int8(net)
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        a, b = net(x), sub(x)
    assert not torch.equal(a, b)
    assert float((a - b).abs().max()) < 0.1
    w = sub.blocks[0][0].weight  # int8 levels: at most 255 distinct values per channel
    assert len(torch.unique(w[0])) <= 255

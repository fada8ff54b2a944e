"""Pair features against scipy's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.spatial import distance

from verifier.features import FEATURE_NAMES, feature_count, feature_names, pair_features_np


@pytest.fixture
def pairs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=20).astype(np.float32)
    q = rng.dirichlet(np.ones(6), size=20).astype(np.float32)
    return p, q


def test_shape_and_names(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pairs
    f = pair_features_np(p, q)
    assert f.shape == (20, feature_count(6)) == (20, len(FEATURE_NAMES) + 4 * 6)
    assert len(feature_names(6)) == f.shape[1]
    assert np.isfinite(f).all()


def test_divergences_match_scipy(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pairs
    f = pair_features_np(p, q)
    cls = np.arange(6)
    for i in range(len(p)):
        pi, qi = p[i].astype(np.float64), q[i].astype(np.float64)
        want = {
            "cross_entropy": stats.entropy(pi) + stats.entropy(pi, qi),
            "kl_pq": stats.entropy(pi, qi),
            "kl_qp": stats.entropy(qi, pi),
            "js": distance.jensenshannon(pi, qi) ** 2,
            "hellinger": distance.euclidean(np.sqrt(pi), np.sqrt(qi)) / np.sqrt(2),
            "total_variation": distance.cityblock(pi, qi) / 2,
            "wasserstein": stats.wasserstein_distance(cls, cls, pi, qi),
            "energy": stats.energy_distance(cls, cls, pi, qi),
            "entropy_p": stats.entropy(pi),
            "entropy_q": stats.entropy(qi),
            "spearman": stats.spearmanr(pi, qi).statistic,
        }
        for name, value in want.items():
            got = f[i, feature_names(6).index(name)]
            assert got == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_margins_ranks_and_vectors_by_hand() -> None:
    p = np.array([[0.6, 0.3, 0.1]], dtype=np.float32)
    q = np.array([[0.2, 0.5, 0.3]], dtype=np.float32)
    f = dict(zip(feature_names(3), pair_features_np(p, q)[0], strict=True))
    assert f["margin_p"] == pytest.approx(0.3)
    assert f["margin_q"] == pytest.approx(0.2)
    assert f["q_at_p_top1"] == pytest.approx(0.2)
    assert f["p_at_q_top1"] == pytest.approx(0.3)
    assert f["top1_agree"] == 0
    assert f["rank_of_p_top1_in_q"] == pytest.approx(1.0)  # q ranks class 0 last of 3
    assert [f[f"p_sorted_{i}"] for i in range(3)] == pytest.approx([0.6, 0.3, 0.1])
    assert [f[f"q_in_p_order_{i}"] for i in range(3)] == pytest.approx([0.2, 0.5, 0.3])
    assert [f[f"p_in_q_order_{i}"] for i in range(3)] == pytest.approx([0.3, 0.1, 0.6])


def test_identical_pairs_have_zero_divergence(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    p, _ = pairs
    f = pair_features_np(p, p)
    for name in ("kl_pq", "kl_qp", "js", "total_variation", "wasserstein"):
        np.testing.assert_allclose(f[:, feature_names(6).index(name)], 0, atol=1e-5)
    assert (f[:, feature_names(6).index("top1_agree")] == 1).all()


def test_features_are_differentiable_in_p(pairs: tuple[np.ndarray, np.ndarray]) -> None:
    from verifier.features import pair_features

    p, q = (torch.as_tensor(a) for a in pairs)
    logits = p.log().clone().requires_grad_(True)
    pair_features(logits.softmax(-1), q)[:, :8].sum().backward()
    assert logits.grad is not None
    assert float(logits.grad.abs().sum()) > 0

"""Each loss against values computed by hand or with scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

from verifier import losses

TEACHER = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])  # [2, 3] logits
STUDENT = np.array([[1.0, 1.0, 0.0], [-1.0, 0.5, 1.0]])
LABELS = np.array([0, 2])


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


def kl_rows(p: np.ndarray, q: np.ndarray) -> float:
    return float(rel_entr(p, q).sum(axis=-1).mean())


def test_cross_entropy_by_hand() -> None:
    # row 0: -log(e^1 / (e + e + 1)); row 1: -log(e^1 / (e^-1 + e^0.5 + e^1))
    want = -0.5 * (
        math.log(math.e / (2 * math.e + 1))
        + math.log(math.e / (math.exp(-1) + math.exp(0.5) + math.e))
    )
    got = losses.cross_entropy(t(STUDENT), torch.tensor(LABELS))
    assert float(got) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(("temperature", "alpha", "beta"), [(1.0, 1.0, 0.0), (4.0, 0.9, 0.1)])
def test_hinton_kd_matches_scipy(temperature: float, alpha: float, beta: float) -> None:
    p = softmax(TEACHER / temperature, axis=-1)
    q = softmax(STUDENT / temperature, axis=-1)
    ce = -np.log(softmax(STUDENT, axis=-1)[np.arange(2), LABELS]).mean()
    want = alpha * temperature**2 * kl_rows(p, q) + beta * ce
    got = losses.kd_loss(t(STUDENT), t(TEACHER), torch.tensor(LABELS), temperature, alpha, beta)
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_kd_without_labels_is_the_soft_term() -> None:
    want = 0.8 * 25 * kl_rows(softmax(TEACHER / 5, -1), softmax(STUDENT / 5, -1))
    got = losses.kd_loss(t(STUDENT), t(TEACHER), None, 5.0, 0.8, 0.2)
    assert float(got) == pytest.approx(want, rel=1e-10)


def test_kd_gradient_matches_fides_soft_cross_entropy() -> None:
    """Fides writes the soft term as CE(p, q): same gradient as KL(p || q)."""
    s1 = t(STUDENT).requires_grad_()
    s2 = t(STUDENT).requires_grad_()
    losses.kd_loss(s1, t(TEACHER), None, 5.0, 1.0, 0.0).backward()
    p = torch.softmax(t(TEACHER) / 5, -1)
    (25 * -(p * torch.log_softmax(s2 / 5, -1)).sum(-1).mean()).backward()
    assert s1.grad is not None
    assert s2.grad is not None
    torch.testing.assert_close(s1.grad, s2.grad)


def test_ensemble_kd_averages_the_teachers_softmax() -> None:
    other = np.array([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    p_bar = (softmax(TEACHER / 2, -1) + softmax(other / 2, -1)) / 2
    want = 0.7 * 4 * kl_rows(p_bar, softmax(STUDENT / 2, -1))
    got = losses.ensemble_kd_loss(t(STUDENT), [t(TEACHER), t(other)], None, 2.0, 0.7, 0.3)
    assert float(got) == pytest.approx(want, rel=1e-10)
    # one teacher: the same as Hinton KD
    one = losses.ensemble_kd_loss(t(STUDENT), [t(TEACHER)], torch.tensor(LABELS), 3.0, 0.5, 0.5)
    hinton = losses.kd_loss(t(STUDENT), t(TEACHER), torch.tensor(LABELS), 3.0, 0.5, 0.5)
    assert float(one) == pytest.approx(float(hinton), rel=1e-12)
    with pytest.raises(ValueError, match="at least one teacher"):
        losses.ensemble_kd_loss(t(STUDENT), [], None)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fkl_rkl_match_scipy(temperature: float) -> None:
    p = softmax(TEACHER / temperature, -1)
    q = softmax(STUDENT / temperature, -1)
    assert float(losses.fkl(t(TEACHER), t(STUDENT), temperature)) == pytest.approx(
        kl_rows(p, q), rel=1e-10
    )
    assert float(losses.rkl(t(TEACHER), t(STUDENT), temperature)) == pytest.approx(
        kl_rows(q, p), rel=1e-10
    )
    assert kl_rows(p, q) != pytest.approx(kl_rows(q, p))  # the two directions differ here


def test_jsd_matches_scipy() -> None:
    p, q = softmax(TEACHER, -1), softmax(STUDENT, -1)
    # scipy returns the Jensen-Shannon *distance*, the square root of the divergence
    want = float(np.mean([jensenshannon(p[i], q[i]) ** 2 for i in range(2)]))
    assert float(losses.jsd(t(TEACHER), t(STUDENT))) == pytest.approx(want, rel=1e-9)


def test_generalised_jsd_by_hand() -> None:
    beta = 0.2
    p, q = softmax(TEACHER, -1), softmax(STUDENT, -1)
    m = beta * p + (1 - beta) * q
    want = beta * kl_rows(p, m) + (1 - beta) * kl_rows(q, m)
    assert float(losses.jsd(t(TEACHER), t(STUDENT), beta=beta)) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match="beta"):
        losses.jsd(t(TEACHER), t(STUDENT), beta=1.0)


def test_tvd_by_hand() -> None:
    p, q = softmax(TEACHER, -1), softmax(STUDENT, -1)
    want = float((0.5 * np.abs(p - q).sum(-1)).mean())
    assert float(losses.tvd(t(TEACHER), t(STUDENT))) == pytest.approx(want, rel=1e-12)


def test_divergences_take_sequence_logits_and_vanish_on_equal_inputs() -> None:
    x = torch.randn(2, 5, 7, dtype=torch.float64)  # [batch, seq, vocab]
    for fn in (losses.fkl, losses.rkl, losses.jsd, losses.tvd):
        assert float(fn(x, x)) == pytest.approx(0.0, abs=1e-12)
        assert float(fn(x, x.flip(-1))) > 0

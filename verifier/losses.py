"""Training losses and divergences between categorical distributions.

Every function takes logits (``[..., classes]``; the last axis is the class axis) and reduces
to a scalar mean over all leading positions, so the same code serves image classifiers
(``[batch, classes]``) and language models (``[batch, seq, vocab]``, the DistillSpec issue).
``p`` is always the target (teacher, service or LM target) distribution and ``q`` the model
being trained (student, verifier or draft), both after the temperature ``T``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "cross_entropy",
    "ensemble_kd_loss",
    "fkl",
    "jsd",
    "kd_loss",
    "rkl",
    "soft_kl",
    "tvd",
]


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy with hard labels: ``CE(y, z) = -mean_i log softmax(z_i)[y_i]``.

    The maximum-likelihood loss for a categorical model (e.g. Goodfellow, Bengio and
    Courville, *Deep Learning*, 2016, section 6.2.2.3). With ``label_smoothing`` ``e`` the
    target is ``(1 - e)`` on the label and ``e / C`` spread over every class (Szegedy et al.,
    "Rethinking the Inception Architecture", CVPR 2016, section 7).
    """
    # logits: [n, C], labels: [n]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), label_smoothing=label_smoothing
    )


def soft_kl(
    target_probs: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``mean_i KL(p_i || softmax(z_i / T))`` for a given target distribution ``p``.

    The building block of the KD losses below; terms with ``p = 0`` contribute 0.
    """
    # target_probs, logits: [..., C]
    log_q = F.log_softmax(logits / temperature, dim=-1)
    kl = torch.xlogy(target_probs, target_probs) - target_probs * log_q  # [..., C]
    return kl.sum(dim=-1).mean()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    beta: float = 0.1,
) -> torch.Tensor:
    """Hinton knowledge distillation.

    ``L = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + beta * CE(y, s)``

    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS 2014
    Deep Learning Workshop, arXiv:1503.02531, section 2: the soft-target gradients scale as
    ``1 / T^2``, so the soft term is multiplied by ``T^2`` to keep its weight independent of
    ``T``. Fides (arXiv:2304.00083) writes the soft term as the cross-entropy
    ``CE(softmax(t/T), softmax(s/T))``, which differs from the KL only by the teacher's
    entropy, a constant: the gradients are the same. With ``labels=None`` (no ground truth,
    e.g. distilling on unlabelled images) the hard term is dropped.
    """
    # student_logits, teacher_logits: [n, C]; labels: [n]
    p = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    loss = alpha * temperature**2 * soft_kl(p, student_logits, temperature)
    if labels is not None and beta:
        loss = loss + beta * cross_entropy(student_logits, labels)
    return loss


def ensemble_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    labels: torch.Tensor | None,
    temperature: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.0,
) -> torch.Tensor:
    """Knowledge distillation from an ensemble of teachers.

    ``p_bar = (1/K) sum_k softmax(t_k / T)``;
    ``L = alpha * T^2 * KL(p_bar || softmax(s / T)) + beta * CE(y, s)``

    Shen and Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on
    ImageNet without Tricks", arXiv:2009.08453, section 3 (the teachers' softmax outputs are
    averaged into one soft label; MEAL V2 uses T = 1, alpha = 1, beta = 0, the defaults here).
    With one teacher this is :func:`kd_loss`.
    """
    if not teacher_logits:
        raise ValueError("ensemble_kd_loss needs at least one teacher")
    # each teacher: [n, C] -> stacked [K, n, C] -> mean [n, C]
    p_bar = torch.stack([F.softmax(t.detach() / temperature, dim=-1) for t in teacher_logits]).mean(
        dim=0
    )
    loss = alpha * temperature**2 * soft_kl(p_bar, student_logits, temperature)
    if labels is not None and beta:
        loss = loss + beta * cross_entropy(student_logits, labels)
    return loss


def _probs(
    target_logits: torch.Tensor, logits: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    log_p = F.log_softmax(target_logits / temperature, dim=-1)  # [..., C]
    log_q = F.log_softmax(logits / temperature, dim=-1)  # [..., C]
    return log_p.exp(), log_q.exp(), log_p, log_q


def fkl(
    target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Forward KL ``D_FKL = mean KL(p || q) = mean sum_c p_c (log p_c - log q_c)``.

    Mean-seeking; the standard KD divergence. As named in Agarwal et al., "On-Policy
    Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD),
    arXiv:2306.13649, and Zhou et al., "DistillSpec: Improving Speculative Decoding via
    Knowledge Distillation", arXiv:2310.08461, table 1.
    """
    p, _, log_p, log_q = _probs(target_logits, logits, temperature)
    return (p * (log_p - log_q)).sum(dim=-1).mean()


def rkl(
    target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Reverse KL ``D_RKL = mean KL(q || p) = mean sum_c q_c (log q_c - log p_c)``.

    Mode-seeking (the model puts its mass where the target has it). DistillSpec,
    arXiv:2310.08461, table 1; GKD, arXiv:2306.13649.
    """
    _, q, log_p, log_q = _probs(target_logits, logits, temperature)
    return (q * (log_q - log_p)).sum(dim=-1).mean()


def jsd(
    target_logits: torch.Tensor,
    logits: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence ``JSD[beta]``.

    ``m = beta * p + (1 - beta) * q``;
    ``JSD[beta](p || q) = beta * KL(p || m) + (1 - beta) * KL(q || m)``

    GKD, arXiv:2306.13649, section 3 (beta = 0.5 is the usual symmetric JSD, Lin 1991,
    "Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory 37(1));
    used as a distillation divergence by DistillSpec, arXiv:2310.08461. Natural log (nats).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    p, q, log_p, log_q = _probs(target_logits, logits, temperature)
    # log m computed stably in log space: [..., C]
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log1p(-beta)]), dim=0)
    kl_pm = (p * (log_p - log_m)).sum(dim=-1)
    kl_qm = (q * (log_q - log_m)).sum(dim=-1)
    return (beta * kl_pm + (1.0 - beta) * kl_qm).mean()


def tvd(
    target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Total variation distance ``TVD(p, q) = 1/2 sum_c |p_c - q_c|`` (mean over positions).

    DistillSpec, arXiv:2310.08461, section 3 and table 1: the speculative-decoding acceptance
    rate of a draft q for a target p is exactly ``1 - TVD(p, q)`` (Leviathan et al., "Fast
    Inference from Transformers via Speculative Decoding", ICML 2023, arXiv:2211.17192).
    """
    p, q, _, _ = _probs(target_logits, logits, temperature)
    return 0.5 * (p - q).abs().sum(dim=-1).mean()

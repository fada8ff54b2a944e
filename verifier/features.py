"""Features of a (service probabilities p, verifier probabilities q) pair, in torch.

Written with differentiable torch operations so that the same code (1) trains the GAN's
generator through the detector, and (2) is exported inside the detector's ONNX graph: the
gateway and the client SDK feed raw ``p`` and ``q`` and never re-implement a feature.

All divergences use natural logarithms. The class index is the support of the Wasserstein
and energy distances (classes 0..C-1 one unit apart), as ``scipy.stats`` computes them for
``u_values = v_values = range(C)`` weighted by ``p`` and ``q``; on nominal classes these are
a measure of how far mass moved in the label order, kept because the Fides analysis used them.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "EPS",
    "FEATURE_NAMES",
    "VECTOR_NAMES",
    "feature_count",
    "feature_names",
    "pair_features",
    "pair_features_np",
]

EPS = 1e-7  # floor for probabilities inside logarithms

# Scalar features, in column order; the vectors come after them (see feature_names).
FEATURE_NAMES: tuple[str, ...] = (
    "cross_entropy",  # H(p, q) = -sum_c p_c log q_c  (the research code's single feature)
    "kl_pq",  # KL(p || q) = sum_c p_c (log p_c - log q_c)
    "kl_qp",  # KL(q || p)
    "js",  # JS(p, q) = KL(p || m) / 2 + KL(q || m) / 2, m = (p + q) / 2
    "hellinger",  # sqrt(sum_c (sqrt p_c - sqrt q_c)^2 / 2)
    "total_variation",  # sum_c |p_c - q_c| / 2
    "wasserstein",  # W1 = sum_c |F_p(c) - F_q(c)|  (F = CDF over class indices)
    "energy",  # sqrt(2 sum_c (F_p(c) - F_q(c))^2)  (Szekely; scipy.stats.energy_distance)
    "entropy_p",  # H(p) = -sum_c p_c log p_c
    "entropy_q",
    "margin_p",  # top-1 minus top-2 probability
    "margin_q",
    "q_at_p_top1",  # q's probability of p's top-1 class
    "p_at_q_top1",  # p's probability of q's top-1 class
    "top1_agree",  # 1 if argmax p == argmax q
    "rank_of_p_top1_in_q",  # 0 = q's top-1 ... 1 = q's last, scaled by C - 1
    "spearman",  # Spearman rank correlation between p and q
)


# Vector features, C columns each, after the scalars.
VECTOR_NAMES: tuple[str, ...] = (
    "p_sorted",  # p in descending order
    "q_sorted",  # q in descending order
    "q_in_p_order",  # q re-ordered by p's ranking (what the verifier says of p's top-k)
    "p_in_q_order",
)


def feature_count(num_classes: int) -> int:
    return len(FEATURE_NAMES) + len(VECTOR_NAMES) * num_classes


def feature_names(num_classes: int) -> list[str]:
    vectors = [f"{v}_{i}" for v in VECTOR_NAMES for i in range(num_classes)]
    return [*FEATURE_NAMES, *vectors]


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last axis (0 = smallest), as float. ``[n, C]``."""
    order = torch.argsort(x, dim=-1)
    return torch.argsort(order, dim=-1).to(x.dtype)


def pair_features(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[n, C], [n, C] -> [n, feature_count(C)]``; differentiable in ``p`` and ``q`` except
    for the rank-based columns (top-1 agreement, ranks, Spearman), whose gradient is zero."""
    c = p.shape[-1]  # >= 2 classes (a tensor while ONNX tracing: no Python arithmetic on it)
    p = p.clamp_min(0.0)
    q = q.clamp_min(0.0)
    log_p = p.clamp_min(EPS).log()  # [n, C]
    log_q = q.clamp_min(EPS).log()
    m = 0.5 * (p + q)
    log_m = m.clamp_min(EPS).log()

    ce = -(p * log_q).sum(-1)  # [n]
    kl_pq = (p * (log_p - log_q)).sum(-1)
    kl_qp = (q * (log_q - log_p)).sum(-1)
    js = 0.5 * (p * (log_p - log_m)).sum(-1) + 0.5 * (q * (log_q - log_m)).sum(-1)
    hellinger = ((p.clamp_min(EPS).sqrt() - q.clamp_min(EPS).sqrt()) ** 2).sum(-1).mul(0.5)
    hellinger = hellinger.clamp_min(EPS).sqrt()
    tv = 0.5 * (p - q).abs().sum(-1)
    cdf_gap = torch.cumsum(p, -1) - torch.cumsum(q, -1)  # [n, C]
    wasserstein = cdf_gap.abs().sum(-1)
    energy = (2.0 * (cdf_gap**2).sum(-1)).clamp_min(EPS).sqrt()
    ent_p = -(p * log_p).sum(-1)
    ent_q = -(q * log_q).sum(-1)

    p_sorted, p_order = torch.sort(p, dim=-1, descending=True)  # [n, C]
    q_sorted, q_order = torch.sort(q, dim=-1, descending=True)
    margin_p = p_sorted[:, 0] - p_sorted[:, 1]
    margin_q = q_sorted[:, 0] - q_sorted[:, 1]
    q_in_p_order = torch.gather(q, -1, p_order)  # [n, C]
    p_in_q_order = torch.gather(p, -1, q_order)
    q_at_p_top1 = q_in_p_order[:, 0]
    p_at_q_top1 = p_in_q_order[:, 0]
    top1_agree = (p_order[:, 0] == q_order[:, 0]).to(p.dtype)
    # position of p's top-1 class in q's descending order
    q_desc_rank = (c - 1) - _ranks(q)  # [n, C], 0 = largest
    # (gathered at every position, then the first taken: an index of the data's shape, which
    # onnx's reference evaluator needs where the client SDK runs without onnxruntime)
    rank_in_q = torch.gather(q_desc_rank, -1, p_order)[:, 0] / (c - 1)
    rp, rq = _ranks(p), _ranks(q)
    rp = rp - rp.mean(-1, keepdim=True)
    rq = rq - rq.mean(-1, keepdim=True)
    spearman = (rp * rq).sum(-1) / ((rp**2).sum(-1) * (rq**2).sum(-1)).clamp_min(EPS).sqrt()

    scalars = torch.stack(
        [
            ce,
            kl_pq,
            kl_qp,
            js,
            hellinger,
            tv,
            wasserstein,
            energy,
            ent_p,
            ent_q,
            margin_p,
            margin_q,
            q_at_p_top1,
            p_at_q_top1,
            top1_agree,
            rank_in_q,
            spearman,
        ],
        dim=-1,
    )  # [n, len(FEATURE_NAMES)]
    return torch.cat([scalars, p_sorted, q_sorted, q_in_p_order, p_in_q_order], dim=-1)


def pair_features_np(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """NumPy convenience wrapper of :func:`pair_features` (float32 in, float32 out)."""
    with torch.no_grad():
        out = pair_features(
            torch.as_tensor(p, dtype=torch.float32), torch.as_tensor(q, dtype=torch.float32)
        )
    return out.numpy()

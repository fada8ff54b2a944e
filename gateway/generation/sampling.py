"""Sampling and speculative verification on one sequence (pure tensor functions).

Speculative sampling (Leviathan, Kalman and Matias, "Fast Inference from Transformers via
Speculative Decoding", ICML 2023, arXiv:2211.17192, algorithm 1; Chen et al. 2023,
arXiv:2302.01318): with target distributions ``p_1 .. p_{g+1}`` and draft distributions
``q_1 .. q_g`` of the drafted tokens ``x_1 .. x_g``,

* accept ``x_i`` while ``r_i <= p_i(x_i) / q_i(x_i)``, ``r_i ~ U(0, 1)``;
* at the first rejection ``n + 1`` emit ``y ~ norm(max(0, p_{n+1} - q_{n+1}))``;
* when all ``g`` are accepted emit the bonus ``y ~ p_{g+1}``.

The emitted tokens are distributed exactly as sampling from ``p`` alone. Temperature, top-k
and top-p are applied by :func:`warp` to both ``p`` and ``q`` before this, so the result is
exactly the target's *warped* distribution, the one plain sampling with the same parameters
draws from. Greedy (temperature 0) compares tokens instead: accept while ``x_i`` is the
target's argmax, then emit the target's argmax.

A temperature below :data:`GREEDY_BELOW` (but above 0) is greedy too, as in vLLM
(``_SAMPLING_EPS``): ``softmax(logits / T)`` is the argmax's one-hot long before, and dividing
float32 logits by a temperature such as ``1e-300`` (0 in float32) gives infinities, then NaN
probabilities that ``torch.multinomial`` refuses. Probabilities that are not finite for another
reason (a model that emits NaN logits) raise :class:`SamplingError`, which the engine pins on
that sequence alone.
"""

from __future__ import annotations

import torch

from gateway.generation.params import SamplingParams

__all__ = [
    "GREEDY_BELOW",
    "SamplingError",
    "SamplingParams",
    "is_greedy",
    "sample",
    "verify_greedy",
    "verify_sampled",
    "warp",
]

GREEDY_BELOW = 1e-5  # temperatures in [0, GREEDY_BELOW) decode greedily (module docstring)


class SamplingError(ValueError):
    """One sequence's probabilities are not a distribution (NaN or infinite)."""


def is_greedy(params: SamplingParams) -> bool:
    """Greedy decoding: temperature 0, or so close to it that sampling is the argmax."""
    return params.temperature < GREEDY_BELOW


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus), renormalised.

    ``probs = norm(topp(topk(softmax(logits / T))))``: top-k keeps the k largest logits (ties
    included), top-p keeps the smallest prefix of the sorted distribution whose mass reaches
    ``top_p`` (the token that crosses it included). Below :data:`GREEDY_BELOW` the limit as
    ``T -> 0``: the argmax's one-hot (the first one on a tie, as greedy decoding picks).
    """
    # logits: [n, V] -> probs [n, V] (float32)
    if is_greedy(params):
        best = logits.argmax(dim=-1, keepdim=True)  # [n, 1]
        return torch.zeros_like(logits, dtype=torch.float32).scatter_(-1, best, 1.0)
    scaled = logits.float() / params.temperature
    vocab = scaled.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]  # [n, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [n, V]
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    if not bool(torch.isfinite(probs).all()):
        raise SamplingError(
            f"the probabilities at temperature {params.temperature:g} are not finite "
            "(the model's logits or the temperature)"
        )
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    # probs: [V]
    return int(torch.multinomial(probs, 1, generator=generator).item())


def verify_greedy(target_logits: torch.Tensor, drafts: list[int]) -> tuple[int, int]:
    """(accepted count n, next token): accept while the draft equals the target's argmax."""
    # target_logits: [g + 1, V]
    best = target_logits.argmax(dim=-1).tolist()  # [g + 1]
    n = 0
    while n < len(drafts) and drafts[n] == best[n]:
        n += 1
    return n, int(best[n])


def verify_sampled(
    p: torch.Tensor, q: torch.Tensor, drafts: list[int], generator: torch.Generator
) -> tuple[int, int]:
    """(accepted count n, next token) by speculative sampling (module docstring)."""
    # p: [g + 1, V] target probs, q: [g, V] draft probs, drafts: g token ids
    g = len(drafts)
    if g:
        idx = torch.arange(g)
        x = torch.tensor(drafts)
        ratio = p[idx, x] / q[idx, x]  # [g]; q(x) > 0 since x was drawn from q
        r = torch.rand(g, generator=generator)  # [g]
        rejected = (r > ratio).nonzero()
        n = int(rejected[0, 0]) if len(rejected) else g
    else:
        n = 0
    if n == g:
        return n, sample(p[g], generator)  # the bonus token
    residual = (p[n] - q[n]).clamp_min(0.0)  # [V]
    total = float(residual.sum())
    if total <= 0.0:  # p_n == q_n up to rounding: a rejection then has probability ~0
        return n, sample(p[n], generator)
    return n, sample(residual / total, generator)

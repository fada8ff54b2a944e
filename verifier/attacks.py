"""Attacks on an MLaaS provider's answers: what a dishonest or compromised service returns.

Input and model attacks (FGSM, a quantised substitute) change what the service computes; the
output attacks (switch, avg, random switch, targeted flip, noise) are in
:mod:`fides_core.attacks` (the gateway's drills use them too) and re-exported here, so every
attack the evaluation uses can be imported from one place. The learned attack (the GAN
generator) is in :mod:`verifier.gan`.

Sources: switch, avg, random switch and FGSM follow the Fides research code
(arXiv:2304.00083, github.com/akumar2709/Fides); model substitution is SafetyNets' "lazy
provider" (Ghodsi et al., NeurIPS 2017) that silently serves a cheaper model.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from fides_core.attacks import (
    OUTPUT_ATTACKS,
    Attacked,
    avg,
    normalise,
    output_attack,
    random_noise,
    random_switch,
    switch,
    targeted_flip,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "OUTPUT_ATTACKS",
    "Attacked",
    "avg",
    "fgsm",
    "normalise",
    "output_attack",
    "quantize_int8",
    "random_noise",
    "random_switch",
    "switch",
    "targeted_flip",
]


def fgsm(net: nn.Module, x: torch.Tensor, epsilon: float, batch_size: int = 512) -> torch.Tensor:
    """FGSM (Goodfellow et al., ICLR 2015) on the service model's input:
    ``x' = clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)`` with ``y`` the service's own
    answer on ``x`` (the attacker wants the answer changed, and needs no labels).

    ``x`` is ``[n, C, H, W]`` in [0, 1]; ``epsilon`` is on that scale (8/255 ~ 0.031).
    """
    import torch
    import torch.nn.functional as F

    net.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].clone().requires_grad_(True)
        logits = net(xb)  # [b, C]
        loss = F.cross_entropy(logits, logits.argmax(1).detach())
        (grad,) = torch.autograd.grad(loss, xb)
        out.append((xb + epsilon * grad.sign()).clamp(0.0, 1.0).detach())
    return torch.cat(out)


def quantize_int8(net: nn.Module) -> nn.Module:
    """A copy of ``net`` whose conv and linear weights are rounded to symmetric per-output-
    channel int8 (and stored back as float): the cheap, quantised model a lazy provider might
    serve instead. Biases and batch-norm statistics are kept."""
    import torch
    from torch import nn

    q = copy.deepcopy(net).eval()
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                w = m.weight  # [out, ...]
                scale = w.abs().flatten(1).amax(1).clamp_min(1e-12) / 127.0  # [out]
                shape = (-1,) + (1,) * (w.dim() - 1)
                w.copy_((w / scale.view(shape)).round().clamp(-127, 127) * scale.view(shape))
    return q

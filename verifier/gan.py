"""GAN training of the attack detector against a learned tampering attack.

Generator ``G(p, z) -> p'``: an MLP reads the honest service probabilities ``p`` and noise
``z`` and adds a correction to ``log p``; ``p' = softmax(log p + G(...))`` is always a valid
probability vector. Discriminator ``D(p', q)`` = the :class:`~verifier.detector.AttackDetector`.

Losses (``y`` = the honest top-1 class, ``l' = log p'``, ``d(.)`` = D's logit):

- flip (differentiable, a logit-margin loss as in Carlini and Wagner, S&P 2017):
  ``L_flip = mean relu(l'_y - max_{j != y} l'_j + kappa)`` -- zero once the runner-up leads
  by ``kappa`` nats. The research code's flip term was computed outside the autograd graph
  and gave the generator no gradient; this one does.
- fool: ``L_fool = mean softplus(d(p', q)) = BCE(D(p', q), clean)``.
- ``L_G = w_flip L_flip + w_fool L_fool``.
- ``L_D = BCE(D(clean), 0) / 2 + BCE(D(attacked), 1) / 2``, where the attacked half mixes the
  fixed attacks (switch, avg, ...) with the generator's current outputs that flipped the label
  (an unflipped output is not an attack and is not labelled one).

D and G are updated alternately, one step each per batch (Goodfellow et al., NeurIPS 2014).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from verifier.detector import AttackDetector
from verifier.features import EPS
from verifier.logs import log_epoch

__all__ = ["GanHistory", "Generator", "flip_loss", "train_gan"]

log = logging.getLogger(__name__)


class Generator(nn.Module):
    def __init__(self, num_classes: int, noise_dim: int = 16, hidden: int = 128) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.mlp = nn.Sequential(
            nn.Linear(2 * num_classes + noise_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        log_p = p.clamp_min(EPS).log()  # [n, C]
        delta = self.mlp(torch.cat([p, log_p / 10.0, z], dim=-1))  # [n, C]
        return torch.softmax(log_p + delta, dim=-1)  # [n, C] tampered p'

    @torch.no_grad()
    def attack(self, p: np.ndarray, generator: torch.Generator) -> np.ndarray:
        self.eval()
        pt = torch.as_tensor(p)
        z = torch.randn(len(pt), self.noise_dim, generator=generator)
        out: np.ndarray = self(pt, z).numpy()
        return out


def flip_loss(p_tampered: torch.Tensor, honest: torch.Tensor, kappa: float) -> torch.Tensor:
    """``mean relu(l'_y - max_{j != y} l'_j + kappa)`` on ``l' = log p'`` (see module doc)."""
    log_p = p_tampered.clamp_min(EPS).log()  # [n, C]
    own = log_p.gather(1, honest[:, None])[:, 0]  # [n]
    others = log_p.masked_fill(F.one_hot(honest, log_p.shape[1]).bool(), float("-inf"))
    return F.relu(own - others.max(1).values + kappa).mean()


@dataclass
class GanHistory:
    """Per-epoch means, logged as training goes."""

    d_loss: list[float] = field(default_factory=list)
    g_loss: list[float] = field(default_factory=list)
    g_flip_rate: list[float] = field(default_factory=list)  # G outputs that changed the top-1
    g_fool_rate: list[float] = field(default_factory=list)  # flipped and scored < 0.5 by D
    d_accuracy: list[float] = field(default_factory=list)  # on the batch's clean + attacked

    def as_dict(self) -> dict[str, Any]:
        return {k: [round(v, 5) for v in vals] for k, vals in self.__dict__.items()}


@dataclass(frozen=True)
class _Pairs:
    """The (p, q) pairs the GAN trains on, as tensors."""

    clean_p: torch.Tensor  # [n, C] honest service probabilities
    clean_q: torch.Tensor  # [n, C] the verifier's
    attacked_p: torch.Tensor  # [m, C] the fixed attacks' tampered p' (flipped rows only)
    attacked_q: torch.Tensor  # [m, C]
    honest: torch.Tensor  # [n] the honest top-1


@dataclass(frozen=True)
class _Game:
    """The two players, their optimisers and the generator's loss weights."""

    detector: AttackDetector
    generator: Generator
    opt_d: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    flip_weight: float
    fool_weight: float
    kappa: float
    train_generator: bool


def _d_step(
    game: _Game,
    p: torch.Tensor,
    q: torch.Tensor,
    y: torch.Tensor,
    fixed_p: torch.Tensor,
    fixed_q: torch.Tensor,
    z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D step: clean -> 0; fixed attacks and G's flipped outputs -> 1. Returns D's loss and
    its logits on the clean and the attacked halves."""
    detector = game.detector
    with torch.no_grad():
        fake = game.generator(p, z)  # [b, C]
    flipped = fake.argmax(1) != y
    att_p = torch.cat([fixed_p, fake[flipped]])
    att_q = torch.cat([fixed_q, q[flipped]])
    d_clean = detector.logits(p, q)  # [b]
    d_att = detector.logits(att_p, att_q)  # [b + flipped]
    loss_d = 0.5 * F.binary_cross_entropy_with_logits(
        d_clean, torch.zeros_like(d_clean)
    ) + 0.5 * F.binary_cross_entropy_with_logits(d_att, torch.ones_like(d_att))
    game.opt_d.zero_grad(set_to_none=True)
    loss_d.backward()  # type: ignore[no-untyped-call]
    game.opt_d.step()
    return loss_d, d_clean, d_att


def _g_step(
    game: _Game, p: torch.Tensor, q: torch.Tensor, y: torch.Tensor, z: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """G step: flip the label and look clean to D. Returns G's loss and its outputs."""
    fake = game.generator(p, z)  # [b, C]
    l_flip = flip_loss(fake, y, game.kappa)
    l_fool = F.softplus(game.detector.logits(fake, q)).mean()
    loss_g = game.flip_weight * l_flip + game.fool_weight * l_fool
    game.opt_g.zero_grad(set_to_none=True)
    if game.train_generator:
        loss_g.backward()  # type: ignore[no-untyped-call]
        game.opt_g.step()
    return loss_g, fake


def _epoch(
    game: _Game,
    pairs: _Pairs,
    gen: torch.Generator,
    batch_size: int,
    advance: Callable[[], None],
) -> dict[str, float]:
    """One pass over the clean pairs, one D and one G step per batch; returns the sums of the
    epoch's statistics (``d``, ``g``: losses times batch size; ``flipped``, ``fool``: counts;
    ``acc``: D's batch accuracy times batch size)."""
    game.detector.train()
    game.generator.train(game.train_generator)
    n = len(pairs.clean_p)
    order = torch.randperm(n, generator=gen)
    sums = dict.fromkeys(("d", "g", "flip", "fool", "acc", "flipped"), 0.0)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        b = len(idx)
        p, q, y = pairs.clean_p[idx], pairs.clean_q[idx], pairs.honest[idx]
        fixed = torch.randint(0, len(pairs.attacked_p), (b,), generator=gen)
        z = torch.randn(b, game.generator.noise_dim, generator=gen)
        loss_d, d_clean, d_att = _d_step(
            game, p, q, y, pairs.attacked_p[fixed], pairs.attacked_q[fixed], z
        )
        loss_g, fake = _g_step(game, p, q, y, z)
        with torch.no_grad():
            now_flipped = fake.argmax(1) != y
            fooled = now_flipped & (game.detector.logits(fake, q) < 0)
            correct = (d_clean < 0).sum() + (d_att > 0).sum()
        sums["d"] += loss_d.item() * b
        sums["g"] += loss_g.item() * b
        sums["flipped"] += float(now_flipped.sum())
        sums["fool"] += float(fooled.sum())
        sums["acc"] += float(correct) / (len(d_clean) + len(d_att)) * b
        advance()
    return sums


def train_gan(
    detector: AttackDetector,
    generator: Generator,
    clean_p: np.ndarray,
    clean_q: np.ndarray,
    attacked_p: np.ndarray,
    attacked_q: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 256,
    lr_d: float = 1e-3,
    lr_g: float = 1e-3,
    flip_weight: float = 1.0,
    fool_weight: float = 1.0,
    kappa: float = 1.0,
    seed: int = 0,
    train_generator: bool = True,
    progress: Progress | None = None,
) -> GanHistory:
    """Train ``detector`` (D) and ``generator`` (G) alternately; see the module docstring.

    ``clean_*``: honest (p, q) pairs; ``attacked_*``: the fixed attacks' pairs (flipped rows
    only). Both on data the service and verifier never trained on. With
    ``train_generator=False`` only D learns (fine-tuning against a fixed, trained G). Logs one
    line per epoch (stage ``GAN`` or ``detector fine-tuning``).
    """
    cp = torch.as_tensor(clean_p)
    pairs = _Pairs(
        cp,
        torch.as_tensor(clean_q),
        torch.as_tensor(attacked_p),
        torch.as_tensor(attacked_q),
        cp.argmax(1),
    )
    gen = torch.Generator().manual_seed(seed)
    # scaler over everything D will see at the start: clean, fixed attacks, and G's outputs
    with torch.no_grad():
        g0 = generator(cp, torch.randn(len(cp), generator.noise_dim, generator=gen))
    if train_generator:  # a fine-tuning run keeps the scaler the detector was trained with
        detector.fit_scaler(
            torch.cat([cp, pairs.attacked_p, g0]),
            torch.cat([pairs.clean_q, pairs.attacked_q, pairs.clean_q]),
        )
    game = _Game(
        detector,
        generator,
        torch.optim.Adam(detector.parameters(), lr=lr_d, betas=(0.5, 0.999)),
        torch.optim.Adam(generator.parameters(), lr=lr_g, betas=(0.5, 0.999)),
        flip_weight,
        fool_weight,
        kappa,
        train_generator,
    )
    history = GanHistory()
    n = len(cp)
    label = "GAN" if train_generator else "detector fine-tuning"
    steps = (n + batch_size - 1) // batch_size
    task = progress.add_task(label, total=epochs * steps) if progress is not None else None

    def advance() -> None:
        if progress is not None and task is not None:
            progress.update(task, advance=1)

    t0 = time.perf_counter()
    for epoch in range(epochs):
        sums = _epoch(game, pairs, gen, batch_size, advance)
        history.d_loss.append(sums["d"] / n)
        history.g_loss.append(sums["g"] / n)
        history.g_flip_rate.append(sums["flipped"] / n)
        history.g_fool_rate.append(sums["fool"] / max(sums["flipped"], 1.0))
        history.d_accuracy.append(sums["acc"] / n)
        detail = (
            f"D loss {history.d_loss[-1]:.4f} (acc {history.d_accuracy[-1]:.3f}), "
            f"G loss {history.g_loss[-1]:.4f}, flip rate {history.g_flip_rate[-1]:.3f}, "
            f"fooled D {history.g_fool_rate[-1]:.3f}"
        )
        log_epoch(log, label, epoch + 1, epochs, detail, time.perf_counter() - t0, progress)
    if progress is not None and task is not None:
        progress.remove_task(task)
    detector.eval()
    generator.eval()
    return history

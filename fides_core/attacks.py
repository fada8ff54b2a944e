"""Output attacks: what a dishonest or compromised MLaaS returns instead of its answer.

Each takes the honest service probabilities ``p`` (``[n, C]``, rows summing to 1) and returns
an :class:`Attacked` batch: valid probability vectors ``p'`` and, per row, whether the top-1
class changed. The gateway's attack drills and the training code's evaluation use these same
functions; input and model attacks (FGSM, quantised substitutes) need torch and live in
:mod:`verifier.attacks`, the learned one (the GAN generator) in :mod:`verifier.gan`.

Sources: switch, avg and random switch follow the Fides research code (arXiv:2304.00083,
github.com/akumar2709/Fides).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "OUTPUT_ATTACKS",
    "Attacked",
    "avg",
    "normalise",
    "output_attack",
    "random_noise",
    "random_switch",
    "switch",
    "targeted_flip",
]


@dataclass(frozen=True)
class Attacked:
    name: str
    probs: np.ndarray  # [n, C] float32, each row a probability vector
    flipped: np.ndarray  # [n] bool: the top-1 class differs from the honest answer's

    @property
    def flip_rate(self) -> float:
        return float(self.flipped.mean()) if len(self.flipped) else 0.0


def normalise(p: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and rescale rows to sum to 1 (float32)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    p = p / p.sum(axis=1, keepdims=True)
    return p.astype(np.float32)


def _result(name: str, honest: np.ndarray, tampered: np.ndarray) -> Attacked:
    tampered = normalise(tampered)
    return Attacked(name, tampered, tampered.argmax(1) != honest.argmax(1))


def _top2(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-p, axis=1, kind="stable")
    return order[:, 0], order[:, 1]


def switch(p: np.ndarray) -> Attacked:
    """Swap the top-1 and top-2 probabilities: the label flips to the runner-up."""
    out = p.copy()
    rows = np.arange(len(p))
    a, b = _top2(p)
    out[rows, a], out[rows, b] = p[rows, b], p[rows, a]
    return _result("switch", p, out)


def avg(p: np.ndarray, delta: float = 0.01) -> Attacked:
    """The minimal flip (research code): with ``m`` the mean of the top two probabilities,
    top-1 := m - delta and top-2 := m + delta; every other class is untouched."""
    out = p.copy()
    rows = np.arange(len(p))
    a, b = _top2(p)
    m = 0.5 * (p[rows, a] + p[rows, b])
    out[rows, a] = np.maximum(m - delta, 0.0)
    out[rows, b] = m + delta
    return _result("avg", p, out)


def random_switch(p: np.ndarray, rng: np.random.Generator) -> Attacked:
    """Swap the top-1 probability with a uniformly chosen other class."""
    n, c = p.shape
    out = p.copy()
    rows = np.arange(n)
    top = p.argmax(1)
    other = (top + rng.integers(1, c, size=n)) % c  # never the top-1 itself
    out[rows, top], out[rows, other] = p[rows, other], p[rows, top]
    return _result("random_switch", p, out)


def targeted_flip(p: np.ndarray, target: int | np.ndarray, margin: float = 0.01) -> Attacked:
    """Make ``target`` the top-1 class by the smallest move: raise it to the current maximum
    plus ``margin`` (taking the mass from the other classes proportionally). Rows whose top-1
    already is the target are returned unchanged (``flipped`` False)."""
    n, c = p.shape
    t = np.broadcast_to(np.asarray(target), (n,)).astype(np.int64)
    if ((t < 0) | (t >= c)).any():
        raise ValueError(f"target class must be in [0, {c})")
    rows = np.arange(n)
    out = p.astype(np.float64).copy()
    need = p.argmax(1) != t
    peak = np.minimum(out.max(1) + margin, 1.0)
    rest = 1.0 - out[rows, t]
    new_rest = 1.0 - peak
    scale = np.where(rest > 0, new_rest / np.maximum(rest, 1e-12), 0.0)
    scaled = out * scale[:, None]
    scaled[rows, t] = peak
    out[need] = scaled[need]
    return _result("targeted_flip", p, out)


def random_noise(p: np.ndarray, sigma: float, rng: np.random.Generator) -> Attacked:
    """Gaussian noise of scale ``sigma`` on the log-probabilities, renormalised by softmax."""
    logits = np.log(np.clip(p, 1e-7, None)) + rng.normal(0.0, sigma, size=p.shape)
    logits -= logits.max(1, keepdims=True)
    e = np.exp(logits)
    return _result("noise", p, e / e.sum(1, keepdims=True))


OUTPUT_ATTACKS = ("switch", "avg", "random_switch", "targeted_flip", "noise")


def output_attack(
    name: str,
    p: np.ndarray,
    rng: np.random.Generator,
    *,
    noise_sigma: float = 1.0,
    target: int | None = None,
) -> Attacked:
    """Apply a fixed output attack by name (a registry: an unknown name is an error).

    ``targeted_flip`` without ``target`` flips each row to a random class other than its
    top-1 (the attacker's chosen class varies per request)."""
    if name == "switch":
        return switch(p)
    if name == "avg":
        return avg(p)
    if name == "random_switch":
        return random_switch(p, rng)
    if name == "targeted_flip":
        if target is None:
            c = p.shape[1]
            t = (p.argmax(1) + rng.integers(1, c, size=len(p))) % c
            return targeted_flip(p, t)
        return targeted_flip(p, target)
    if name == "noise":
        return random_noise(p, noise_sigma, rng)
    raise ValueError(f"unknown output attack {name!r}; one of {', '.join(OUTPUT_ATTACKS)}")

"""Novelty of an input: is it like the data the service and the verifier were fitted on?

The detector judges an answer by how it disagrees with the verifier's. On an input unlike
anything either model was fitted on (a blank or inverted image, noise, a faint digit) two honest
models disagree as much as a tampered answer and its verifier do: the detector would accuse an
honest provider. Such an answer is reported ``unverified`` with reason
``out_of_distribution`` instead, when this score is above its calibrated threshold.

The score depends on the input alone, never on the service's answer, so a provider cannot make
a tampered answer look out of distribution. It is the distance to the ``neighbours``-th nearest
of ``reference`` training images (a deep-kNN style novelty score, Sun et al., ICML 2022, here on
the input), in a PCA projection that keeps ``components`` directions plus the norm of what the
projection drops (so noise outside the principal subspace still counts)::

    f(x)    = [ W (x - mu), || (x - mu) - W^T W (x - mu) || ]      W: [components, D]
    s(x)    = k-th smallest || f(x) - f(r_j) ||  over reference images r_j

Its threshold is set on held-out clean images like the detector's (``calibrate_threshold``),
at a small target rate of clean inputs called novel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from fides_core.integrity import NOVELTY_OUTPUT
from verifier.export import ONNX_OPSET, PARITY_ATOL, ExportError, ort_session

__all__ = [
    "NoveltyScorer",
    "export_novelty",
    "fit_novelty",
    "novelty_scores",
    "synthetic_novel_inputs",
]


class NoveltyScorer(nn.Module):
    """``[n, *image] -> [n]`` k-NN distance in the PCA-plus-residual space (see the module)."""

    mean: torch.Tensor
    components: torch.Tensor
    reference: torch.Tensor
    reference_sq: torch.Tensor

    def __init__(
        self, mean: torch.Tensor, components: torch.Tensor, reference: torch.Tensor, k: int
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean)  # [D]
        self.register_buffer("components", components)  # [d, D], orthonormal rows
        self.register_buffer("reference", reference)  # [R, d + 1]
        self.register_buffer("reference_sq", (reference**2).sum(1))  # [R]
        self.k = k

    def features(self, x: torch.Tensor) -> torch.Tensor:
        centred = x.flatten(1) - self.mean  # [n, D]
        z = centred @ self.components.T  # [n, d]
        residual = (centred - z @ self.components).norm(dim=1, keepdim=True)  # [n, 1]
        return torch.cat([z, residual], dim=1)  # [n, d + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # [n, d + 1]
        sq = (f**2).sum(1, keepdim=True) + self.reference_sq - 2 * f @ self.reference.T  # [n, R]
        nearest = torch.topk(sq.clamp_min(0), self.k, dim=1, largest=False).values  # [n, k]
        return nearest[:, -1].sqrt()  # [n]


@dataclass(frozen=True)
class _Fit:
    mean: torch.Tensor
    components: torch.Tensor


def _pca(x: torch.Tensor, components: int) -> _Fit:
    flat = x.flatten(1).double()
    mean = flat.mean(0)
    # the right singular vectors of the centred data are the principal directions
    _, _, vh = torch.linalg.svd(flat - mean, full_matrices=False)
    return _Fit(mean.float(), vh[: min(components, vh.shape[0])].float())


def fit_novelty(
    x_train: torch.Tensor, *, components: int, neighbours: int, reference: int, seed: int
) -> NoveltyScorer:
    """A scorer fitted on training images ``x_train`` ``[n, C, H, W]`` in [0, 1]: PCA on all of
    them, ``reference`` of them (seeded draw) as the neighbours."""
    if len(x_train) <= neighbours:
        raise ValueError(f"novelty needs more than {neighbours} training images")
    fit = _pca(x_train, components)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(x_train)))
    chosen = x_train[order[: min(reference, len(x_train))]]
    scorer = NoveltyScorer(fit.mean, fit.components, torch.zeros(1, 1), neighbours)
    with torch.no_grad():
        ref = scorer.features(chosen)
    return NoveltyScorer(fit.mean, fit.components, ref, neighbours).eval()


def synthetic_novel_inputs(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Honest inputs no service was fitted on, made from clean images ``x`` in [0, 1]: what an
    out-of-distribution check must not call clean (nor the detector an attack)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    return {
        "blank": torch.zeros_like(x[: min(n, 20)]),
        "inverted": 1.0 - x,
        "faint": x * 0.3,
        "noise": torch.rand(x.shape, generator=gen),
    }


def export_novelty(
    scorer: NoveltyScorer, path: Path, x_check: torch.Tensor, input_name: str
) -> float:
    """Export ``scorer`` to ONNX (input ``input_name``, output ``novelty_score``, dynamic batch
    axis); returns the largest |ONNX - torch| relative to the score (raises above 1e-4)."""
    scorer.eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            scorer,
            (x_check[:4],),
            str(path),
            dynamo=False,
            input_names=[input_name],
            output_names=[NOVELTY_OUTPUT],
            dynamic_axes={input_name: {0: "batch"}, NOVELTY_OUTPUT: {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    onnx.checker.check_model(str(path))
    got = ort_session(path).run(None, {input_name: x_check.numpy()})[0]
    with torch.no_grad():
        want = scorer(x_check).numpy()
    diff = float((np.abs(got - want) / np.maximum(1.0, np.abs(want))).max())
    if not diff <= PARITY_ATOL:
        raise ExportError(f"{path}: ONNX differs from torch by {diff:.3g} (limit {PARITY_ATOL})")
    return diff


def novelty_scores(scorer: NoveltyScorer, x: torch.Tensor, batch: int = 1024) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([scorer(x[i : i + batch]).numpy() for i in range(0, len(x), batch)])

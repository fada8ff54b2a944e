"""The attack detector, the re-classifier, threshold calibration and the windowed
model-substitution test.

Both networks take the raw pair (service probabilities ``p``, verifier probabilities ``q``,
each ``[n, C]``) and compute :func:`verifier.features.pair_features` inside, so the exported
ONNX graphs need nothing but the two vectors:

- :class:`AttackDetector`: ``(p, q) -> P(attacked)`` ``[n]``; trained as the GAN's
  discriminator (:mod:`verifier.gan`); flags when the probability exceeds a threshold
  calibrated on clean held-out pairs for a target false-positive rate.
- :class:`Reclassifier`: ``(p, q) -> probabilities [n, C]`` of the class the honest service
  would have returned (not the research code's five "cases").
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from fides_core.integrity import P_INPUT, Q_INPUT
from fides_core.stats import WindowResult, window_test
from verifier.export import ONNX_OPSET, PARITY_ATOL, ExportError, ort_session
from verifier.features import EPS, feature_count, pair_features
from verifier.logs import log_epoch

__all__ = [
    "AttackDetector",
    "Reclassifier",
    "WindowResult",
    "calibrate_threshold",
    "threshold_rule",
    "export_pair_model",
    "tied_rows",
    "train_reclassifier",
    "window_test",
]

log = logging.getLogger(__name__)


class _PairNet(nn.Module):
    """Standardised [features, log p, log q] -> MLP. The standardisation statistics are
    buffers fitted on the training pairs (:meth:`fit_scaler`), so they travel with the
    weights into ONNX."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, num_classes: int, hidden: Sequence[int], out: int, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        width = feature_count(num_classes) + 2 * num_classes
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, out))
        self.mlp = nn.Sequential(*layers)

    def inputs(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        logs = [p.clamp_min(EPS).log(), q.clamp_min(EPS).log()]
        return torch.cat([pair_features(p, q), *logs], dim=-1)  # [n, F + 2C]

    @torch.no_grad()
    def fit_scaler(self, p: torch.Tensor, q: torch.Tensor) -> None:
        x = self.inputs(p, q)
        self.mean.copy_(x.mean(0))
        self.std.copy_(x.std(0).clamp_min(1e-3))

    def raw(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.mlp((self.inputs(p, q) - self.mean) / self.std)  # type: ignore[no-any-return]


class AttackDetector(_PairNet):
    def __init__(self, num_classes: int, hidden: Sequence[int] = (128, 64)) -> None:
        super().__init__(num_classes, hidden, 1)

    def logits(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.raw(p, q)[:, 0]  # [n]

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.raw(p, q))  # [n, 1] P(attacked)

    @torch.no_grad()
    def scores(self, p: np.ndarray, q: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """P(attacked) per pair, ``[n]``."""
        self.eval()
        pt, qt = torch.as_tensor(p), torch.as_tensor(q)
        parts = [
            self(pt[i : i + batch_size], qt[i : i + batch_size])[:, 0]
            for i in range(0, len(pt), batch_size)
        ]
        return torch.cat(parts).numpy() if parts else np.zeros(0, np.float32)


class Reclassifier(_PairNet):
    def __init__(self, num_classes: int, hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__(num_classes, hidden, num_classes)

    def logits(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.raw(p, q)  # [n, C]

    def forward(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.logits(p, q).softmax(-1)  # [n, C]

    @torch.no_grad()
    def predict(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        self.eval()
        return self.logits(torch.as_tensor(p), torch.as_tensor(q)).argmax(-1).numpy()


def train_reclassifier(
    net: Reclassifier,
    p: np.ndarray,
    q: np.ndarray,
    honest: np.ndarray,
    *,
    epochs: int,
    batch_size: int = 256,
    lr: float = 2e-3,
    seed: int = 0,
) -> list[float]:
    """Cross-entropy on (tampered or clean p, q) -> the honest top-1 class. Returns the mean
    loss per epoch."""
    pt, qt = torch.as_tensor(p), torch.as_tensor(q)
    yt = torch.as_tensor(honest, dtype=torch.int64)
    net.fit_scaler(pt, qt)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(yt), generator=gen)
        total = 0.0
        for i in range(0, len(yt), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(net.logits(pt[idx], qt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(yt))
        detail = f"loss {losses[-1]:.4f}"
        log_epoch(log, "re-classifier", epoch + 1, epochs, detail, time.perf_counter() - t0, None)
    net.eval()
    return losses


def calibrate_threshold(
    clean_scores: np.ndarray, target_fpr: float, confidence: float | None = None
) -> float:
    """The smallest threshold ``t`` (flag when ``score > t``) whose false-positive rate on a
    new clean score is at most ``target_fpr``: in expectation (``confidence=None``), or with
    probability at least ``confidence`` over the draw of the calibration scores.

    In expectation: the split-conformal quantile (Vovk et al., 2005; Angelopoulos and Bates,
    2021): with ``n`` exchangeable clean scores, ``t`` = the ``ceil((n + 1)(1 - a))``-th
    smallest, so ``P(score_new > t) <= a``. The realised FPR of one calibration scatters
    around ``a`` (its standard deviation is about ``sqrt(a / n)``).

    With ``confidence``: a training-conditional ("PAC") threshold (Vovk, 2012). The FPR left
    above the ``k``-th smallest of ``n`` continuous scores is above ``a`` exactly when at least
    ``k`` of the scores fall below the clean ``1 - a`` quantile, so
    ``P(FPR > a) = P(Binomial(n, 1 - a) >= k)``; ``t`` is the ``k``-th smallest score for the
    smallest ``k`` that makes this at most ``1 - confidence``.

    With too few scores for the target it returns ``inf`` (nothing is ever flagged) rather
    than a threshold that cannot keep its promise.
    """
    if not 0 < target_fpr < 1:
        raise ValueError(f"target_fpr must be in (0, 1), got {target_fpr}")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))
    n = s.size
    if n == 0:
        raise ValueError("calibration needs clean scores")
    if confidence is None:
        k = math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)  # 1e-9: 200 * 0.99 is 198.00..03
    else:
        ks = np.arange(1, n + 1)
        ok = scipy.stats.binom.sf(ks - 1, n, 1.0 - target_fpr) <= 1.0 - confidence
        k = int(ks[ok][0]) if ok.any() else n + 1
    return float("inf") if k > n else float(s[k - 1])


#: The confidence ``fpr_confidence: auto`` uses when the calibration scores allow it.
AUTO_CONFIDENCE = 0.95


def threshold_rule(
    fpr_confidence: float | str | None, target_fpr: float, n: int
) -> tuple[float | None, str]:
    """The confidence :func:`calibrate_threshold` is given, and why. ``auto``: the stricter
    rule (``AUTO_CONFIDENCE``) whenever ``n`` scores are enough for it (the largest score keeps
    the promise once ``(1 - target)^n <= 1 - confidence``), in expectation otherwise."""
    if fpr_confidence != "auto":
        assert not isinstance(fpr_confidence, str)
        return fpr_confidence, "as configured (detector.fpr_confidence)"
    need = math.ceil(math.log(1 - AUTO_CONFIDENCE) / math.log(1 - target_fpr))
    if n >= need:
        return AUTO_CONFIDENCE, (
            f"auto: {n} calibration scores, enough for {AUTO_CONFIDENCE:g} confidence "
            f"(needs {need})"
        )
    return None, (
        f"auto: {n} calibration scores, fewer than the {need} that {AUTO_CONFIDENCE:g} "
        f"confidence needs for a {target_fpr:g} target: in expectation"
    )


def export_pair_model(
    net: _PairNet, path: Path, p_check: np.ndarray, q_check: np.ndarray, output: str
) -> float:
    """Export ``net`` (inputs ``service_probs``, ``verifier_probs``) to ONNX with a dynamic
    batch axis; returns the max |ONNX - torch| on the check batch (raises above 1e-4)."""
    net.eval()
    sample = (torch.as_tensor(p_check[:4]), torch.as_tensor(q_check[:4]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            net,
            sample,
            str(path),
            dynamo=False,
            input_names=[P_INPUT, Q_INPUT],
            output_names=[output],
            dynamic_axes={P_INPUT: {0: "batch"}, Q_INPUT: {0: "batch"}, output: {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    onnx.checker.check_model(str(path))
    got = ort_session(path).run(None, {P_INPUT: p_check, Q_INPUT: q_check})[0]
    with torch.no_grad():
        want = net(torch.as_tensor(p_check), torch.as_tensor(q_check)).numpy()
    tied = tied_rows(p_check, q_check)
    if tied.all():
        raise ExportError(f"{path}: every check row holds tied probabilities; nothing to compare")
    diff = float(np.abs(got[~tied] - want[~tied]).max())
    if not diff <= PARITY_ATOL:
        raise ExportError(f"{path}: ONNX differs from torch by {diff:.3g} (limit {PARITY_ATOL})")
    if tied.any():
        log.info(
            "%s: %d of %d check rows hold tied probabilities, where torch and ONNX Runtime may "
            "order the tie differently (max |ONNX - torch| there %.3g, not held to the limit; "
            "the ONNX graph is what the gateway and the SDK both run)",
            path.name,
            int(tied.sum()),
            len(tied),
            float(np.abs(got[tied] - want[tied]).max()),
        )
    return diff


def tied_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Rows ([n] bool) where ``p`` or ``q`` holds two equal values. The order features (q in
    p's order, p in q's order, ranks) of such a row depend on how a sort breaks the tie, and
    torch and ONNX Runtime break ties differently: common with many classes and confident
    models (tiny probabilities underflow to the same value)."""

    def has_tie(a: np.ndarray) -> np.ndarray:
        tie: np.ndarray = (np.diff(np.sort(a, axis=1), axis=1) == 0).any(axis=1)
        return tie

    both: np.ndarray = has_tie(p) | has_tie(q)
    return both

"""The protect run's data: the user's images split, their augmented views, and the service
as the distillation and the evaluation see it (recorded answers, not a local network)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fides.protect.config import AnswerKind, ProtectConfig
from fides.protect.query import Querier, as_probabilities
from fides.protect.store import input_key
from verifier.data import (
    DataError,
    Dataset,
    augment,
    load_digits_arrays,
    load_image_folder,
    load_npz_inputs,
)
from verifier.train import predict_logits

log = logging.getLogger(__name__)

__all__ = ["AnswerTable", "Inputs", "Pool", "QueriedPairs", "load_inputs", "split_pool", "views_of"]


@dataclass(frozen=True)
class Inputs:
    """The user's images (float32 NCHW in [0, 1]); labels only where the user has them."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    classes: list[str] | None
    source: str


def load_inputs(cfg: ProtectConfig) -> Inputs:
    d = cfg.data
    if d.source == "digits":
        x_tr, y_tr, x_te, y_te, classes = load_digits_arrays(cfg.seed, d.test_fraction or 0.2)
        return Inputs(x_tr, y_tr, x_te, y_te, classes, "sklearn.datasets.load_digits")
    path = d.file
    assert path is not None  # DataConfig checks it
    if d.source == "npz":
        x_tr2, y_tr2, x_te2, y_te2, classes2 = load_npz_inputs(path, d.classes_key)
        return Inputs(x_tr2, y_tr2, x_te2, y_te2, classes2, f"npz:{path.name}")
    x_tr, y_tr, x_te, y_te, classes = load_image_folder(path)
    return Inputs(x_tr, y_tr, x_te, y_te, classes, f"folder:{path.name}")


@dataclass(frozen=True)
class Pool:
    """The images split (seeded): ``train`` is distilled from, ``val`` picks the verifier's
    steps, ``test`` (the user's own test images, or a held-out share) is scored only."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    y_train: np.ndarray | None
    y_val: np.ndarray | None
    y_test: np.ndarray | None
    given: int  # the training images the user gave (the test images, if carved from them)
    # exact copies of a held-out image dropped from the splits before it (train, val): an
    # image scored in the test is never one the verifier was distilled or selected on
    duplicates_dropped: dict[str, int] = field(default_factory=dict)


def _take(y: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if y is None else y[idx]


def split_pool(inputs: Inputs, cfg: ProtectConfig) -> Pool:
    d = cfg.data
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(inputs.x_train))
    x, y = inputs.x_train[order], _take(inputs.y_train, order)
    if inputs.x_test is not None:
        x_test, y_test = inputs.x_test, inputs.y_test
        if d.test_limit is not None:
            keep = rng.permutation(len(x_test))[: d.test_limit]
            x_test, y_test = x_test[keep], _take(y_test, keep)
    else:  # no test images given: hold out a share of the pool, never distilled from
        n_test = max(1, round(len(x) * (d.test_fraction or 0.2)))
        x_test, y_test, x, y = (
            x[:n_test],
            _take(y, np.arange(n_test)),
            x[n_test:],
            _take(y, np.arange(n_test, len(x))),
        )
    n_val = max(1, round(len(x) * d.val_fraction))
    x_val, y_val, x, y = (
        x[:n_val],
        _take(y, np.arange(n_val)),
        x[n_val:],
        _take(y, np.arange(n_val, len(x))),
    )
    dropped: dict[str, int] = {}
    held_out = set(_keys(x_test))
    x_val, y_val, dropped["val"], val_keys = _without(x_val, y_val, held_out)
    x, y, dropped["train"], _ = _without(x, y, held_out | set(val_keys))
    if any(dropped.values()):
        log.warning(
            "%s: %d validation and %d training images are exact copies of held-out images "
            "(the test, or the validation for training) and are left out of the splits",
            inputs.source,
            dropped["val"],
            dropped["train"],
        )
    if len(x_val) == 0:
        raise DataError(
            f"{inputs.source}: every validation image is a copy of a test image; give more "
            "images, or test images that the training images do not hold"
        )
    if d.train_limit is not None:
        x, y = x[: d.train_limit], _take(y, np.arange(min(d.train_limit, len(x))))
    if len(x) < 10:
        raise DataError(
            f"{inputs.source}: {len(x)} training images after the splits; need 10 or more"
        )
    given = len(inputs.x_train) if d.train_limit is None else len(x) + len(x_val)
    return Pool(x, x_val, x_test, y, y_val, y_test, given, {k: v for k, v in dropped.items() if v})


def _keys(x: np.ndarray) -> list[bytes]:
    return [input_key(row) for row in np.ascontiguousarray(x, np.float32)]


def _without(
    x: np.ndarray, y: np.ndarray | None, held_out: set[bytes]
) -> tuple[np.ndarray, np.ndarray | None, int, list[bytes]]:
    """``x`` (and ``y``) less the images whose exact bytes are in ``held_out``: the kept
    images, their labels, how many were dropped, and the kept images' keys."""
    keys = _keys(x)
    keep = np.array([k not in held_out for k in keys], bool)
    if keep.all():
        return x, y, 0, keys
    kept = [k for k, ok in zip(keys, keep, strict=True) if ok]
    return x[keep], _take(y, np.flatnonzero(keep)), int((~keep).sum()), kept


def views_of(x: np.ndarray, cfg: ProtectConfig) -> np.ndarray:
    """``cfg.views`` augmented copies of every image (seeded: a rerun asks for the same
    inputs, so their answers come from the store), ``[views * n, C, H, W]``."""
    aug = cfg.data.augment
    gen = torch.Generator().manual_seed(cfg.seed + 7)
    t = torch.from_numpy(np.ascontiguousarray(x))
    out = [
        augment(t[i : i + 4096], gen, aug.crop_padding, aug.hflip).numpy()
        for _ in range(cfg.views)
        for i in range(0, len(t), 4096)
    ]
    return np.concatenate(out) if out else x[:0]


class AnswerTable(nn.Module):
    """The service as distillation sees it: the recorded answers of the images it was asked
    about, looked up by content. Returns log-probabilities (valid logits for KD); an image it
    was not asked about is an error, never a guess."""

    def __init__(self, x: np.ndarray, probs: np.ndarray) -> None:
        super().__init__()
        self._index = {
            input_key(row): i for i, row in enumerate(np.ascontiguousarray(x, np.float32))
        }
        self._log_p = torch.from_numpy(np.log(np.clip(probs, 1e-8, None))).float()  # [n, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.detach().float().cpu().contiguous().numpy()
        idx = [self._index.get(input_key(r)) for r in rows]
        if any(i is None for i in idx):
            raise LookupError(
                f"{sum(i is None for i in idx)} of {len(idx)} images have no recorded answer"
            )
        return self._log_p[torch.tensor(idx)]


def detector_view(answers: np.ndarray, kind: AnswerKind, num_classes: int) -> np.ndarray:
    """The service's answers as the fronting gateway's detector sees them: probability,
    top-k and one-hot vectors as answered; class indices one-hot; logits soft-maxed."""
    if kind == "label" and (answers.ndim == 1 or answers.shape[1] == 1):
        idx = answers.reshape(-1).astype(np.int64)
        return np.eye(num_classes, dtype=np.float32)[idx]
    if kind == "logits":
        return as_probabilities(answers, kind, num_classes)
    return answers.astype(np.float32)


@dataclass(frozen=True)
class QueriedPairs:
    """A :class:`verifier.evaluate.PairSource` for a black box: the service's answers come
    from the querier (recorded, or asked once), the verifier runs here; FGSM takes its
    gradients from the verifier (a transfer attack: the service's weights are unknown)."""

    querier: Querier
    verifier: nn.Module
    kind: AnswerKind
    num_classes: int

    def probs(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        raw = self.querier.answers(x.numpy(), "evaluation images")
        p = detector_view(raw, self.kind, self.num_classes)
        q = predict_logits(self.verifier, x).softmax(-1).numpy().astype(np.float32)
        return p, q

    @property
    def attack_surrogate(self) -> nn.Module:
        return self.verifier

    @property
    def service_module(self) -> nn.Module | None:
        return None


def as_dataset(x: np.ndarray, y: np.ndarray) -> Dataset:
    return Dataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64)))

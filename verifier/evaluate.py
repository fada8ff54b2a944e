"""``fides evaluate``: attacks, GAN-trained detector, re-classifier, calibration, and a report.

Data (all from splits the service and verifier weights never saw):

- detector training: the validation split + ``train_fraction`` of the test split, each image
  also as ``augment_views`` shifted / flipped copies;
- calibration: ``calibration_fraction`` of the test split (clean pairs only);
- evaluation: the rest of the test split, unseen by every model in the pipeline.

Every metric in the report is computed on the evaluation part. Detection accuracy is the
balanced accuracy at the calibrated threshold (clean pairs vs attacked pairs whose top-1 the
attack changed); TPR at 1% FPR and ROC-AUC come from the evaluation ROC.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.stats
import torch
from rich.progress import Progress
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from verifier.attacks import Attacked, fgsm, output_attack, quantize_int8
from verifier.data import Dataset, Splits, augment
from verifier.detector import (
    AttackDetector,
    Reclassifier,
    calibrate_threshold,
    threshold_rule,
    train_reclassifier,
    window_test,
)
from verifier.experiment import (
    AugmentConfig,
    Experiment,
    NoveltyConfig,
    RunSpec,
    SubstituteConfig,
)
from verifier.export import OUTPUT_NAME
from verifier.features import pair_features_np
from verifier.gan import GanHistory, Generator, train_gan
from verifier.integrity_export import IntegrityModels, Novelty, export_integrity, integrity_block
from verifier.logs import progress_bar
from verifier.losses import cross_entropy
from verifier.nets import new_net
from verifier.novelty import fit_novelty, novelty_scores, synthetic_novel_inputs
from verifier.pipeline import (
    ExperimentRun,
    net_config,
    run_experiment,
    stage_key,
    training_data,
)
from verifier.streams import ScoredAnswers, delays_markdown, stream_report
from verifier.train import CheckpointError, fit, predict_logits, set_determinism, write_durably

__all__ = [
    "MEAN_DETECTION_ATTACKS",
    "DetectorSplits",
    "Models",
    "PairSource",
    "evaluate_experiment",
    "evaluate_models",
    "integrity_block",
    "report_markdown",
    "split_for_detector",
]

log = logging.getLogger(__name__)

# The attacks the detection-accuracy goal averages over (issue 4).
MEAN_DETECTION_ATTACKS = ("switch", "avg", "random_switch", "gan")
BASELINES = {
    "research_ce_threshold": "cross-entropy H(p, q) alone, threshold at the target FPR "
    "(the Fides research code's single feature)",
    "kl_percentile": "KL(p || q) with a percentile threshold on clean scores (Alibi Detect's "
    "ModelDistillation detector)",
}


@dataclass(frozen=True)
class DetectorSplits:
    """The held-out images, seeded and disjoint."""

    train: Dataset  # the validation split + ``train_fraction`` of the test split
    calibration: Dataset  # ``calibration_fraction`` of the test split
    evaluation: Dataset  # the rest of the test split


def split_for_detector(splits: Splits, exp: RunSpec) -> DetectorSplits:
    cfg = exp.detector
    n = len(splits.test)
    order = torch.from_numpy(np.random.default_rng(exp.seed + 4).permutation(n))
    n_train = int(round(n * cfg.train_fraction))
    n_cal = int(round(n * cfg.calibration_fraction))
    tr, cal, ev = order[:n_train], order[n_train : n_train + n_cal], order[n_train + n_cal :]
    t = splits.test
    train = Dataset(torch.cat([splits.val.x, t.x[tr]]), torch.cat([splits.val.y, t.y[tr]]))
    return DetectorSplits(train, Dataset(t.x[cal], t.y[cal]), Dataset(t.x[ev], t.y[ev]))


def _probs(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    return predict_logits(net, x).softmax(-1).numpy().astype(np.float32)  # [n, C]


class PairSource(Protocol):
    """Where the evaluation gets its (service, verifier) answers."""

    def probs(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(p, q): the service's and the verifier's probabilities on ``x``, each ``[n, C]``."""
        ...

    @property
    def attack_surrogate(self) -> nn.Module:
        """The network FGSM takes its gradients from: the service itself when its weights
        are known, else the verifier (a transfer attack, as an outsider would mount)."""
        ...

    @property
    def service_module(self) -> nn.Module | None:
        """The service's weights (int8 substitutes round them), None for a black box."""
        ...


@dataclass(frozen=True)
class Models:
    """The service model and its verifier, as trained by :func:`run_experiment`."""

    service: nn.Module
    verifier: nn.Module

    def probs(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(p, q): both models' probabilities on the images ``x``, each ``[n, C]``."""
        return _probs(self.service, x), _probs(self.verifier, x)

    @property
    def attack_surrogate(self) -> nn.Module:
        return self.service

    @property
    def service_module(self) -> nn.Module | None:
        return self.service


def _with_views(x: torch.Tensor, views: int, aug: AugmentConfig, seed: int) -> torch.Tensor:
    """``x`` followed by ``views`` randomly augmented copies of it (seeded): more pairs from
    the same held-out images, each still an image no model was fitted on."""
    gen = torch.Generator().manual_seed(seed)
    copies = [augment(x, gen, aug.crop_padding, aug.hflip) for _ in range(views)]
    return torch.cat([x, *copies])  # [(1 + views) n, C, H, W]


def _roc(clean: np.ndarray, attacked: np.ndarray, fpr_at: float = 0.01) -> tuple[float, float]:
    """(ROC-AUC, best TPR with FPR <= fpr_at) of scores where higher means attacked."""
    if len(attacked) == 0 or len(clean) == 0:
        return float("nan"), float("nan")
    y = np.r_[np.zeros(len(clean)), np.ones(len(attacked))]
    s = np.r_[clean, attacked]
    fpr, tpr, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), float(tpr[fpr <= fpr_at].max())


def _rule(confidence: float | None) -> str:
    """How the threshold keeps its FPR target (see ``calibrate_threshold``)."""
    if confidence is None:
        return "FPR <= target in expectation (split conformal)"
    return f"FPR <= target with probability >= {confidence:g} over the calibration draw"


def _fpr_uncertainty(
    clean: np.ndarray, calibration: np.ndarray, threshold: float
) -> dict[str, object]:
    """How far the measured clean FPR is from the threshold's true FPR: the exact (Clopper-
    Pearson) 95% interval of the measurement, and the rule's expected FPR (the true FPR of a
    threshold with m of n calibration scores above it is Beta(m + 1, n - m): mean
    (m + 1) / (n + 1)). An FPR above the target on one evaluation draw, inside that interval,
    is the draw's luck, not the rule's failure; runs with the same seed share one draw."""
    flagged = int((clean > threshold).sum())
    ci = scipy.stats.binomtest(flagged, len(clean)).proportion_ci(method="exact")
    above = int((calibration > threshold).sum())
    return {
        "clean_fpr_ci95": [round(float(ci.low), 5), round(float(ci.high), 5)],
        "clean_fpr_expected_by_rule": round((above + 1) / (len(calibration) + 1), 5),
    }


def _detection_row(
    clean: np.ndarray, attacked: np.ndarray, threshold: float, target_fpr: float
) -> dict[str, Any]:
    auc, tpr1 = _roc(clean, attacked, target_fpr)
    fpr = float((clean > threshold).mean())
    tpr = float((attacked > threshold).mean()) if len(attacked) else float("nan")
    return {
        "n": int(len(attacked)),
        "detection_accuracy": round(0.5 * (1 - fpr) + 0.5 * tpr, 5),
        "tpr_at_threshold": round(tpr, 5),
        "tpr_at_1pct_fpr": round(tpr1, 5),
        "roc_auc": round(auc, 5),
    }


@dataclass(frozen=True)
class Pairs:
    """(p, q) pairs: the service's (possibly tampered) p, the verifier's q, the honest top-1."""

    p: np.ndarray  # [n, C]
    q: np.ndarray  # [n, C]
    honest: np.ndarray  # [n]


def _flipped(att: Attacked, q: np.ndarray, honest: np.ndarray) -> Pairs:
    keep = att.flipped
    return Pairs(att.probs[keep], q[keep], honest[keep])


def _fgsm_pairs(
    models: PairSource, x: torch.Tensor, honest: np.ndarray, eps: float
) -> tuple[Pairs, float]:
    """FGSM on the input images ``x`` (``honest``: the service's top-1 on them, already
    computed by the caller); both models see the perturbed image. Kept: rows whose service
    answer changed. Returns the pairs and the flip rate."""
    x_adv = fgsm(models.attack_surrogate, x, eps)
    p_adv, q_adv = models.probs(x_adv)
    keep = p_adv.argmax(1) != honest
    return Pairs(p_adv[keep], q_adv[keep], honest[keep]), float(keep.mean())


def _windows(
    scores: np.ndarray, reference: np.ndarray, size: int, count: int, alpha: float, seed: int
) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    size = min(size, len(scores))
    flags, stats_ = [], []
    for _ in range(count):
        w = scores[rng.choice(len(scores), size=size, replace=False)]
        r = window_test(w, reference, alpha)
        flags.append(r.flagged)
        stats_.append(r.statistic)
    return {"flag_rate": round(float(np.mean(flags)), 5), "mean_statistic": float(np.mean(stats_))}


# ---------------------------------------------------------------- detector and re-classifier


@dataclass(frozen=True)
class TrainingPairs:
    clean: Pairs  # the detector's training images (with their augmented views)
    attacked: Pairs  # the fixed attacks (and FGSM) on them, rows whose top-1 changed


def training_pairs(
    exp: RunSpec, models: PairSource, images: Dataset, rng: np.random.Generator
) -> TrainingPairs:
    """Clean pairs and the fixed attacks' pairs (+ FGSM) for the detector and re-classifier."""
    cfg = exp.detector
    x_tr = _with_views(images.x, cfg.augment_views, exp.data.augment, exp.seed + 8)
    p_tr, q_tr = models.probs(x_tr)
    honest = p_tr.argmax(1)
    fixed = [
        _flipped(output_attack(a, p_tr, rng, noise_sigma=cfg.noise_sigma), q_tr, honest)
        for a in cfg.train_attacks
    ]
    if cfg.fgsm_train_epsilon is not None:
        fixed.append(_fgsm_pairs(models, x_tr, honest, cfg.fgsm_train_epsilon)[0])
    attacked = Pairs(
        np.concatenate([f.p for f in fixed]),
        np.concatenate([f.q for f in fixed]),
        np.concatenate([f.honest for f in fixed]),
    )
    log.info("training pairs: %d clean, %d attacked (fixed attacks)", len(p_tr), len(attacked.p))
    return TrainingPairs(Pairs(p_tr, q_tr, honest), attacked)


@dataclass(frozen=True)
class Gan:
    detector: AttackDetector  # the discriminator, fine-tuned when configured
    generator: Generator  # the learned tampering attack
    history: GanHistory
    finetune: GanHistory | None


def train_detector(
    exp: RunSpec, pairs: TrainingPairs, num_classes: int, bar: Progress | None
) -> Gan:
    """The detector (GAN discriminator) against the generator, then the detector alone
    fine-tuned against the trained generator."""
    cfg, g = exp.detector, exp.detector.gan
    torch.manual_seed(exp.seed + 7)
    detector = AttackDetector(num_classes, cfg.hidden)
    generator = Generator(num_classes, g.noise_dim)
    clean, att = pairs.clean, pairs.attacked
    gan_kw: dict[str, Any] = {
        "batch_size": g.batch_size,
        "lr_d": g.lr_d,
        "lr_g": g.lr_g,
        "flip_weight": g.flip_weight,
        "fool_weight": g.fool_weight,
        "kappa": g.kappa,
        "progress": bar,
    }
    history = train_gan(
        detector,
        generator,
        clean.p,
        clean.q,
        att.p,
        att.q,
        epochs=g.epochs,
        seed=exp.seed,
        **gan_kw,
    )
    finetune = None
    if cfg.finetune_epochs:
        finetune = train_gan(
            detector,
            generator,
            clean.p,
            clean.q,
            att.p,
            att.q,
            epochs=cfg.finetune_epochs,
            seed=exp.seed + 1,
            train_generator=False,
            **gan_kw,
        )
    return Gan(detector, generator, history, finetune)


@dataclass(frozen=True)
class Reclassified:
    net: Reclassifier
    losses: list[float]  # mean loss per epoch


def fit_reclassifier(
    exp: RunSpec,
    pairs: TrainingPairs,
    generator: Generator,
    num_classes: int,
    tgen: torch.Generator,
) -> Reclassified:
    """(p' or p, q) -> the honest class, on the clean, fixed-attack and generated pairs."""
    cfg = exp.detector
    clean, att = pairs.clean, pairs.attacked
    gan_tr = generator.attack(clean.p, tgen)
    gan_keep = gan_tr.argmax(1) != clean.honest
    net = Reclassifier(num_classes, cfg.reclassifier_hidden)
    losses = train_reclassifier(
        net,
        np.concatenate([clean.p, att.p, gan_tr[gan_keep]]),
        np.concatenate([clean.q, att.q, clean.q[gan_keep]]),
        np.concatenate([clean.honest, att.honest, clean.honest[gan_keep]]),
        epochs=cfg.reclassifier_epochs,
        seed=exp.seed,
    )
    return Reclassified(net, losses)


@dataclass(frozen=True)
class Calibration:
    clean: Pairs  # the calibration images' clean pairs
    scores: np.ndarray  # [n] the detector's scores of them
    threshold: float  # flag when a score is above it
    confidence: float | None  # the rule's (threshold_rule): None = in expectation
    why: str  # why that rule


def calibrate(
    exp: RunSpec, models: PairSource, detector: AttackDetector, images: Dataset
) -> Calibration:
    """The detector's threshold on clean held-out pairs, for the target FPR."""
    cfg = exp.detector
    p_cal, q_cal = models.probs(images.x)
    scores = detector.scores(p_cal, q_cal)
    confidence, why = threshold_rule(cfg.fpr_confidence, cfg.target_fpr, len(scores))
    threshold = calibrate_threshold(scores, cfg.target_fpr, confidence)
    log.info(
        "threshold %.6f for %.1f%% FPR, %s (%s)",
        threshold,
        100 * cfg.target_fpr,
        _rule(confidence),
        why,
    )
    return Calibration(Pairs(p_cal, q_cal, p_cal.argmax(1)), scores, threshold, confidence, why)


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Attacks:
    """Every attack on the evaluation images."""

    clean: Pairs  # the evaluation images' clean pairs
    clean_scores: np.ndarray  # [n] the detector's scores of them
    attacked: dict[str, Pairs]  # by attack, rows whose top-1 the attack changed
    flip_rates: dict[str, float]


def attack_evaluation_images(
    exp: RunSpec,
    models: PairSource,
    gan: Gan,
    images: Dataset,
    rng: np.random.Generator,
    tgen: torch.Generator,
) -> Attacks:
    """The output attacks, the trained generator, and FGSM at each budget."""
    cfg = exp.detector
    p_ev, q_ev = models.probs(images.x)
    honest = p_ev.argmax(1)
    clean_scores = gan.detector.scores(p_ev, q_ev)
    attacked: dict[str, Pairs] = {}
    flip_rates: dict[str, float] = {}
    for a in ("switch", "avg", "random_switch", "targeted_flip", "noise"):
        res = output_attack(a, p_ev, rng, noise_sigma=cfg.noise_sigma)
        attacked[a], flip_rates[a] = _flipped(res, q_ev, honest), res.flip_rate
    gan_ev = gan.generator.attack(p_ev, tgen)
    gan_res = Attacked("gan", gan_ev, gan_ev.argmax(1) != honest)
    attacked["gan"], flip_rates["gan"] = _flipped(gan_res, q_ev, honest), gan_res.flip_rate
    for eps in cfg.fgsm_epsilons:
        name = f"fgsm_eps{eps:g}"
        attacked[name], flip_rates[name] = _fgsm_pairs(models, images.x, honest, eps)
    return Attacks(Pairs(p_ev, q_ev, honest), clean_scores, attacked, flip_rates)


@dataclass(frozen=True)
class Detection:
    """The detector and the re-classifier on the evaluation images."""

    attacks: dict[str, dict[str, Any]]  # a report row per attack
    clean_fpr: float
    mean_detection_accuracy: float  # over MEAN_DETECTION_ATTACKS
    reclassification_accuracy: float
    reclassification_attacks: list[str]


def _attack_row(
    pairs: Pairs,
    flip_rate: float,
    ev: Attacks,
    detector: AttackDetector,
    re: Reclassifier,
    cal: Calibration,
    target_fpr: float,
) -> dict[str, Any]:
    row = _detection_row(
        ev.clean_scores, detector.scores(pairs.p, pairs.q), cal.threshold, target_fpr
    )
    row["flip_rate"] = round(flip_rate, 5)
    if len(pairs.p):
        pred = re.predict(pairs.p, pairs.q)
        row["reclassification_accuracy"] = round(float((pred == pairs.honest).mean()), 5)
        row["verifier_top1_accuracy"] = round(float((pairs.q.argmax(1) == pairs.honest).mean()), 5)
        # pairs no detector can flag from the top-1 alone: the verifier agrees with the
        # tampered answer (an upper bound on what disagreement can show)
        row["verifier_agrees_with_tampered"] = round(
            float((pairs.q.argmax(1) == pairs.p.argmax(1)).mean()), 5
        )
    return row


def measure_detection(
    exp: RunSpec, ev: Attacks, detector: AttackDetector, re: Reclassifier, cal: Calibration
) -> Detection:
    """Detection and re-classification per attack, and the re-classification accuracy over
    the output attacks (every attack but FGSM)."""
    target_fpr = exp.detector.target_fpr
    rows = {
        name: _attack_row(pairs, ev.flip_rates[name], ev, detector, re, cal, target_fpr)
        for name, pairs in ev.attacked.items()
    }
    names = [n for n in ev.attacked if not n.startswith("fgsm")]
    re_pred = np.concatenate([re.predict(ev.attacked[n].p, ev.attacked[n].q) for n in names])
    re_true = np.concatenate([ev.attacked[n].honest for n in names])
    mean_det = float(np.mean([rows[n]["detection_accuracy"] for n in MEAN_DETECTION_ATTACKS]))
    return Detection(
        attacks=rows,
        clean_fpr=float((ev.clean_scores > cal.threshold).mean()),
        mean_detection_accuracy=mean_det,
        reclassification_accuracy=float((re_pred == re_true).mean()),
        reclassification_attacks=names,
    )


def _baseline(name: str, exp: RunSpec, cal: Calibration, ev: Attacks) -> dict[str, Any]:
    """One single-feature detector (see ``BASELINES``) on the same pairs."""
    cfg = exp.detector
    idx = {"research_ce_threshold": 0, "kl_percentile": 1}[name]

    def score(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return pair_features_np(p, q)[:, idx]

    t = calibrate_threshold(score(cal.clean.p, cal.clean.q), cfg.target_fpr, cal.confidence)
    clean = score(ev.clean.p, ev.clean.q)
    rows = {
        n: _detection_row(clean, score(pr.p, pr.q), t, cfg.target_fpr)
        for n, pr in ev.attacked.items()
    }
    return {
        "description": BASELINES[name],
        "threshold": t,
        "clean_fpr": round(float((clean > t).mean()), 5),
        "attacks": rows,
        "mean_detection_accuracy": round(
            float(np.mean([rows[n]["detection_accuracy"] for n in MEAN_DETECTION_ATTACKS])), 5
        ),
    }


def measure_baselines(exp: RunSpec, cal: Calibration, ev: Attacks) -> dict[str, Any]:
    """Each single-feature baseline detector on the same pairs."""
    return {name: _baseline(name, exp, cal, ev) for name in BASELINES}


# ---------------------------------------------------------------- model substitution


def _substitute(
    spec: SubstituteConfig,
    exp: RunSpec,
    splits: Splits,
    service: nn.Module | None,
    run_dir: Path,
    bar: Progress | None,
) -> tuple[nn.Module, float]:
    """The substitute model (trained, or loaded from its finished stage) and its seconds."""
    if spec.kind == "int8":
        if service is None:
            raise ValueError(
                f"substitute {spec.name!r}: kind 'int8' rounds the service's weights, which a "
                "black-box service does not have; use kind 'student'"
            )
        return quantize_int8(service), 0.0
    assert spec.net is not None  # both checked by the config
    assert spec.train is not None
    net = new_net(net_config(spec.net, splits), splits.train.x, seed=exp.seed + 90)
    # what it learns from, by its bytes: the labels (under fides protect the service's top-1
    # answers, so a new service or new answers is a new stage, not the old one reused) and the
    # images (a data file replaced under the same name); and the threads, as every stage's key
    learned = hashlib.sha256(splits.train.y.numpy().tobytes())
    learned.update(splits.train.x.numpy().tobytes())
    key = stage_key(
        training_data(exp),
        exp.seed,
        spec.model_dump(mode="json"),
        learned.hexdigest()[:16],
        exp.threads,
    )
    secs = fit(
        net,
        splits.train,
        lambda logits, _x, y: cross_entropy(logits, y),
        spec.train,
        seed=exp.seed + 90,
        augment_cfg=exp.data.augment,
        stage_dir=run_dir / f"substitute_{spec.name}-{key}",
        progress=bar,
        label=f"substitute {spec.name}",
    )
    return net, secs


@dataclass(frozen=True)
class Substitution:
    report: dict[str, Any]  # a report row per substitute
    nets: dict[str, nn.Module]
    kl_reference: np.ndarray  # [n] KL(p || q) of the clean calibration pairs


def _substitution_row(
    spec: SubstituteConfig,
    p_sub: np.ndarray,
    secs: float,
    exp: RunSpec,
    images: Dataset,
    ev: Attacks,
    detector: AttackDetector,
    cal: Calibration,
    kl_ref: np.ndarray,
) -> dict[str, Any]:
    """Per request (the detector's score) and windowed (the gateway's window test on the
    detector's score and on KL(p || q)), against clean windows' false alarms."""
    cfg = exp.detector
    sub_scores = detector.scores(p_sub, ev.clean.q)
    auc, tpr1 = _roc(ev.clean_scores, sub_scores, cfg.target_fpr)
    kl_sub = pair_features_np(p_sub, ev.clean.q)[:, 1]
    kl_clean = pair_features_np(ev.clean.p, ev.clean.q)[:, 1]
    wkw: dict[str, Any] = {"size": cfg.window_size, "count": cfg.windows, "alpha": cfg.window_alpha}
    seed = exp.seed
    return {
        "kind": spec.kind,
        "train_seconds": round(secs, 1),
        "test_accuracy": round(float((p_sub.argmax(1) == images.y.numpy()).mean()), 5),
        "agreement_with_service": round(float((p_sub.argmax(1) == ev.clean.honest).mean()), 5),
        "per_request": {"roc_auc": round(auc, 5), "tpr_at_1pct_fpr": round(tpr1, 5)},
        "window_detector_score": {
            "substitute": _windows(sub_scores, cal.scores, seed=seed + 11, **wkw),
            "clean_false_alarm": _windows(ev.clean_scores, cal.scores, seed=seed + 12, **wkw),
        },
        "window_kl": {
            "substitute": _windows(kl_sub, kl_ref, seed=seed + 13, **wkw),
            "clean_false_alarm": _windows(kl_clean, kl_ref, seed=seed + 14, **wkw),
        },
    }


def measure_substitution(
    exp: RunSpec,
    splits: Splits,
    models: PairSource,
    detector: AttackDetector,
    cal: Calibration,
    ev: Attacks,
    images: Dataset,
    run_dir: Path,
    bar: Progress | None,
) -> Substitution:
    """Each configured substitute served instead of the service, per request and windowed."""
    # per-request substitution score of the gateway's window test: KL(p || q)
    kl_ref = pair_features_np(cal.clean.p, cal.clean.q)[:, 1]
    report: dict[str, Any] = {}
    nets: dict[str, nn.Module] = {}
    for spec in exp.detector.substitutes:
        nets[spec.name], secs = _substitute(spec, exp, splits, models.service_module, run_dir, bar)
        p_sub = _probs(nets[spec.name], images.x)
        row = _substitution_row(spec, p_sub, secs, exp, images, ev, detector, cal, kl_ref)
        report[spec.name] = row
        w = row["window_kl"]
        log.info(
            "substitute %s: agreement with service %.2f%%, windows flagged %.1f%% (clean false "
            "alarms %.1f%%)",
            spec.name,
            100 * row["agreement_with_service"],
            100 * w["substitute"]["flag_rate"],
            100 * w["clean_false_alarm"]["flag_rate"],
        )
    return Substitution(report, nets, kl_ref)


# ---------------------------------------------------------------- streams


def measure_streams(
    exp: RunSpec,
    detector: AttackDetector,
    cal: Calibration,
    ev: Attacks,
    subst: Substitution,
    images: Dataset,
) -> dict[str, Any]:
    """The sequential monitor over simulated answer streams (verifier.streams): each
    attack of the mean-detection set, each substitute and the verifier itself served as the
    answer, at tamper rates from 100% to 1%; and clean streams' run length to a false alarm."""

    def scored(p: np.ndarray, q: np.ndarray) -> ScoredAnswers:
        return ScoredAnswers(detector.scores(p, q), pair_features_np(p, q)[:, 1])

    attacks = {n: scored(ev.attacked[n].p, ev.attacked[n].q) for n in MEAN_DETECTION_ATTACKS}
    for name, net in subst.nets.items():
        attacks[f"substitute_{name}"] = scored(_probs(net, images.x), ev.clean.q)
    attacks["substitute_verifier"] = scored(ev.clean.q, ev.clean.q)  # the verifier as answer
    report = stream_report(
        scored(cal.clean.p, cal.clean.q),
        ScoredAnswers(ev.clean_scores, pair_features_np(ev.clean.p, ev.clean.q)[:, 1]),
        attacks,
        seed=exp.seed + 21,
    )
    c = report["clean"]
    log.info(
        "streams: %d false alarms in %d clean answers (run length >= %d, 95%%); median "
        "answers to the alarm at 1%% tampering: %s",
        c["false_alarms"],
        c["answers"],
        c["run_length_lower_95"],
        {n: d["0.01"]["median"] for n, d in report["delays"].items()},
    )
    return report


# ---------------------------------------------------------------- novelty


def _novelty(
    nc: NoveltyConfig,
    x_train: torch.Tensor,
    data: DetectorSplits,
    models: PairSource,
    detector: AttackDetector,
    cal: Calibration,
    seed: int,
) -> Novelty:
    """Fit the out-of-distribution check on the training images, set its threshold on the
    calibration images, and measure it on the evaluation split and on honest novel inputs made
    from it (blank, inverted, faint, noise): how often the detector alone would accuse the
    provider there, and how often it still does behind the check."""
    scorer = fit_novelty(
        x_train,
        components=nc.components,
        neighbours=nc.neighbours,
        reference=nc.reference,
        seed=seed + 15,
    )
    cal_scores = novelty_scores(scorer, data.calibration.x)
    threshold = calibrate_threshold(cal_scores, nc.target_rate, nc.confidence)
    ev = novelty_scores(scorer, data.evaluation.x)
    inputs = {}
    for name, x in synthetic_novel_inputs(data.evaluation.x, seed + 16).items():
        novel = novelty_scores(scorer, x) > threshold
        accused = detector.scores(*models.probs(x)) > cal.threshold
        inputs[name] = {
            "n": len(x),
            "called_novel": round(float(novel.mean()), 5),
            "detector_alone_accuses": round(float(accused.mean()), 5),
            "accused_behind_the_check": round(float((accused & ~novel).mean()), 5),
        }
    report: dict[str, Any] = {
        "threshold": threshold,
        "target_rate": nc.target_rate,
        "threshold_rule": _rule(nc.confidence),
        "calibration_scores": len(cal_scores),
        "clean_rate": round(float((ev > threshold).mean()), 5),
        "inputs": inputs,
    }
    log.info(
        "novelty check: threshold %.4f; clean inputs called novel %.2f%%",
        threshold,
        100 * report["clean_rate"],
    )
    return Novelty(scorer, threshold, ev, report)


# ---------------------------------------------------------------- the report


def assemble_report(
    exp: RunSpec,
    *,
    streams: dict[str, Any] | None = None,
    data: DetectorSplits,
    num_classes: int,
    cal: Calibration,
    ev: Attacks,
    detection: Detection,
    baselines: dict[str, Any],
    substitution: Substitution,
    gan: Gan,
    reclassified: Reclassified,
    novelty: Novelty | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The evaluation report (before export and wall time)."""
    cfg = exp.detector
    honest = ev.clean.honest
    report: dict[str, Any] = {
        "experiment": exp.name,
        "config_sha256": exp.config_hash(),
        "data": {
            "detector_train": len(data.train),
            "detector_train_augmented_views": cfg.augment_views,
            "calibration": len(data.calibration),
            "evaluation": len(data.evaluation),
            "num_classes": num_classes,
        },
        "service_eval_accuracy": round(float((honest == data.evaluation.y.numpy()).mean()), 5),
        "verifier_eval_fidelity": round(float((ev.clean.q.argmax(1) == honest).mean()), 5),
        "target_fpr": cfg.target_fpr,
        "fpr_confidence": cal.confidence,
        "threshold_rule": _rule(cal.confidence),
        "threshold_rule_why": cal.why,
        "threshold": cal.threshold,
        "calibration_scores": len(cal.scores),
        "clean_fpr": round(detection.clean_fpr, 5),
        **_fpr_uncertainty(ev.clean_scores, cal.scores, cal.threshold),
        "attacks": detection.attacks,
        "mean_detection_accuracy": round(detection.mean_detection_accuracy, 5),
        "mean_detection_attacks": list(MEAN_DETECTION_ATTACKS),
        "reclassification_accuracy": round(detection.reclassification_accuracy, 5),
        "reclassification_attacks": detection.reclassification_attacks,
        "substitution": substitution.report,
        "baselines": baselines,
        "gan": {
            "history": gan.history.as_dict(),
            "finetune": gan.finetune.as_dict() if gan.finetune else None,
        },
        "reclassifier_loss": [round(v, 5) for v in reclassified.losses],
        "seconds": timings,
    }
    if streams is not None:
        report["streams"] = streams
    if novelty is not None:
        report["novelty"] = novelty.report
        flagged_in = (ev.clean_scores > cal.threshold) & (novelty.eval_scores <= novelty.threshold)
        report["clean_fpr_in_distribution"] = round(float(flagged_in.mean()), 5)
    return report


# ---------------------------------------------------------------- the whole evaluation


def evaluate_experiment(
    exp: Experiment,
    run_dir: Path,
    *,
    repository: Path | None = None,
    show_progress: bool = False,
    run: ExperimentRun | None = None,
) -> dict[str, Any]:
    """Train (or resume) the experiment's models, then the detector and re-classifier, and
    evaluate them; export both into ``repository`` when given. Returns the report.

    ``run``: the experiment's finished :func:`run_experiment` (its service and verifier, and
    their export into ``repository``), when the caller has it; run (or resumed) here
    otherwise. ``show_progress``: rich progress bars, when stderr is a terminal.
    """
    t_start = time.perf_counter()
    if run is None:  # the service student and the verifier are exported beside the detector
        run = run_experiment(exp, run_dir, repository=repository, show_progress=show_progress)
    models = Models(run.student, run.verifier)
    report = evaluate_models(
        exp, models, run.splits, run_dir, repository=repository, show_progress=show_progress
    )
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _pairs_digest(pairs: TrainingPairs) -> str:
    h = hashlib.sha256()
    for part in (pairs.clean, pairs.attacked):
        for a in (part.p, part.q, part.honest):
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def _trained_detector(
    exp: RunSpec,
    pairs: TrainingPairs,
    num_classes: int,
    tgen: torch.Generator,
    run_dir: Path,
    bar: Progress | None,
    timings: dict[str, float],
) -> tuple[Gan, Reclassified]:
    """The GAN-trained detector and the re-classifier: trained, or loaded from the stage an
    earlier run finished with the same training pairs and config (keyed by both), with the
    random states it left, so what follows is what an uninterrupted run computes."""
    key = stage_key(_pairs_digest(pairs), exp.detector.model_dump(mode="json"), exp.seed)
    path = run_dir / f"detector-{key}" / "trained.pt"
    if path.is_file():
        try:  # written by this function, below (whole, then renamed), unless damaged since
            saved = torch.load(path, weights_only=False)
            if not isinstance(saved, dict) or not {"gan", "reclassified", "tgen"} <= set(saved):
                raise TypeError("not a detector stage")
        except Exception as exc:  # pickle errors, a truncated zip, EOFError, ...
            raise CheckpointError(
                f"{path}: not a readable stage result ({type(exc).__name__}: {exc}); delete "
                f"{path.parent} to train the detector and re-classifier again"
            ) from exc
        tgen.set_state(saved["tgen"])
        torch.set_rng_state(saved["torch"])
        timings.update(saved["timings"])
        log.info("detector and re-classifier: loaded from %s", path.parent)
        return saved["gan"], saved["reclassified"]
    t0 = time.perf_counter()
    gan = train_detector(exp, pairs, num_classes, bar)
    timings["gan"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    reclassified = fit_reclassifier(exp, pairs, gan.generator, num_classes, tgen)
    timings["reclassifier"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(
        {
            "gan": gan,
            "reclassified": reclassified,
            "tgen": tgen.get_state(),
            "torch": torch.get_rng_state(),
            "timings": {k: timings[k] for k in ("gan", "reclassifier")},
        },
        buffer,
    )
    write_durably(path, buffer.getbuffer(), "stage result")  # never a half-written stage
    return gan, reclassified


def evaluate_models(
    exp: RunSpec,
    models: PairSource,
    splits: Splits,
    run_dir: Path,
    *,
    repository: Path | None = None,
    show_progress: bool = False,
    note: str = "fides evaluate",
    service_output: str = OUTPUT_NAME,
) -> dict[str, Any]:
    """The detector and re-classifier for a service and its verifier (``models``), trained
    and evaluated on ``splits`` (see the module docstring for which part serves what), and
    exported into ``repository`` when given (``note``: the command, for config.yaml's
    comment; ``service_output``: the service's output the integrity block verifies).
    Returns the report."""
    cfg = exp.detector
    t_start = time.perf_counter()
    set_determinism(exp.seed, exp.threads)
    data = split_for_detector(splits, exp)
    log.info(
        "detector data: %d train (val + test part) / %d calibration / %d evaluation",
        len(data.train),
        len(data.calibration),
        len(data.evaluation),
    )
    rng = np.random.default_rng(exp.seed + 5)
    tgen = torch.Generator().manual_seed(exp.seed + 6)
    c = splits.num_classes
    timings: dict[str, float] = {}
    with progress_bar(show_progress) as bar:
        pairs = training_pairs(exp, models, data.train, rng)
        gan, reclassified = _trained_detector(exp, pairs, c, tgen, run_dir, bar, timings)
        cal = calibrate(exp, models, gan.detector, data.calibration)
        t0 = time.perf_counter()
        ev = attack_evaluation_images(exp, models, gan, data.evaluation, rng, tgen)
        detection = measure_detection(exp, ev, gan.detector, reclassified.net, cal)
        base = measure_baselines(exp, cal, ev)
        subst = measure_substitution(
            exp, splits, models, gan.detector, cal, ev, data.evaluation, run_dir, bar
        )
        timings["evaluation"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        streams = measure_streams(exp, gan.detector, cal, ev, subst, data.evaluation)
        timings["streams"] = round(time.perf_counter() - t0, 1)
        novelty = None
        if cfg.novelty is not None:
            novelty = _novelty(
                cfg.novelty, splits.train.x, data, models, gan.detector, cal, exp.seed
            )
    report = assemble_report(
        exp,
        streams=streams,
        data=data,
        num_classes=c,
        cal=cal,
        ev=ev,
        detection=detection,
        baselines=base,
        substitution=subst,
        gan=gan,
        reclassified=reclassified,
        novelty=novelty,
        timings=timings,
    )
    # on disk before the export, which can still fail: nothing measured is lost
    write_durably(
        run_dir / "evaluation.json", (json.dumps(report, indent=2) + "\n").encode(), "results file"
    )
    if repository is not None:
        trained = IntegrityModels(
            detector=gan.detector,
            reclassifier=reclassified.net,
            substitutes=subst.nets,
            novelty=novelty,
            p_check=cal.clean.p,
            q_check=cal.clean.q,
            calibration_scores=cal.scores,
            calibration_kl=subst.kl_reference,
            x_check=data.evaluation.x,
            labels=splits.classes,
        )
        diff = export_integrity(repository, exp, trained, report, note, service_output)
        log.info("exported the detector, re-classifier and substitutes to %s", repository)
        report["repository"] = str(repository)
        report["onnx_max_abs_diff"] = diff
    report["machine"] = f"{platform.machine()}, torch {torch.__version__}, {exp.threads} thread(s)"
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return report


def _fpr_note(report: dict[str, Any]) -> str:
    """The measured FPR's 95% interval and the rule's expected FPR (reports from before
    they were recorded: nothing)."""
    ci, expected = report.get("clean_fpr_ci95"), report.get("clean_fpr_expected_by_rule")
    if ci is None or expected is None:
        return ""
    return (
        f" (95% interval {_pct(ci[0])}-{_pct(ci[1])} over {report['data']['evaluation']} "
        f"images; the threshold's expected FPR {_pct(expected)})"
    )


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{x:.2%}"  # NaN-safe


def report_markdown(report: dict[str, Any], command: str) -> str:
    lines = [
        f"# Integrity evaluation: {report['experiment']}",
        "",
        f"Command: `{command}`  ",
        f"Wall time {report['wall_seconds']:.0f} s ({report['machine']}). Evaluation split: "
        f"{report['data']['evaluation']} images never used in any training; service accuracy "
        f"{_pct(report['service_eval_accuracy'])}, verifier fidelity "
        f"{_pct(report['verifier_eval_fidelity'])}.",
        "",
        f"Threshold {report['threshold']:.5g} (target FPR {report['target_fpr']:.0%}, "
        f"{report['threshold_rule']}); clean "
        f"FPR on the evaluation split **{_pct(report['clean_fpr'])}**{_fpr_note(report)}. "
        "Mean detection accuracy "
        f"over {', '.join(report['mean_detection_attacks'])}: "
        f"**{_pct(report['mean_detection_accuracy'])}**. Re-classification accuracy on attacked "
        f"samples: **{_pct(report['reclassification_accuracy'])}**.",
        "",
        "| attack | flip rate | n | detection acc. | TPR @ 1% FPR | ROC-AUC | re-class. acc. "
        "| CE baseline acc. | KL baseline acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    b_ce = report["baselines"]["research_ce_threshold"]["attacks"]
    b_kl = report["baselines"]["kl_percentile"]["attacks"]
    for name, r in report["attacks"].items():
        lines.append(
            f"| {name} | {_pct(r['flip_rate'])} | {r['n']} | {_pct(r['detection_accuracy'])} | "
            f"{_pct(r['tpr_at_1pct_fpr'])} | {r['roc_auc']:.4f} | "
            f"{_pct(r.get('reclassification_accuracy', float('nan')))} | "
            f"{_pct(b_ce[name]['detection_accuracy'])} | {_pct(b_kl[name]['detection_accuracy'])} |"
        )
    lines += [
        "",
        "## Model substitution",
        "",
        "| substitute | agreement with service | per-request TPR @ 1% FPR | AUC "
        "| windows flagged (detector score) | clean false alarms | windows flagged (KL) "
        "| clean false alarms (KL) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in report["substitution"].items():
        wd, wk = s["window_detector_score"], s["window_kl"]
        lines.append(
            f"| {name} ({s['kind']}) | {_pct(s['agreement_with_service'])} | "
            f"{_pct(s['per_request']['tpr_at_1pct_fpr'])} | {s['per_request']['roc_auc']:.4f} | "
            f"{_pct(wd['substitute']['flag_rate'])} | {_pct(wd['clean_false_alarm']['flag_rate'])} "
            f"| {_pct(wk['substitute']['flag_rate'])} | "
            f"{_pct(wk['clean_false_alarm']['flag_rate'])} |"
        )
    h = report["gan"]["history"]
    lines += [
        "",
        "## GAN training (per epoch)",
        "",
        "| epoch | D loss | D acc. | G loss | G flip rate | G fooled D |",
        "|---|---|---|---|---|---|",
        *[
            f"| {i + 1} | {h['d_loss'][i]:.4f} | {h['d_accuracy'][i]:.3f} | {h['g_loss'][i]:.4f} "
            f"| {h['g_flip_rate'][i]:.3f} | {h['g_fool_rate'][i]:.3f} |"
            for i in range(len(h["d_loss"]))
        ],
        "",
    ]
    st = report.get("streams")  # reports written before the sequential monitor have none
    if st is not None:
        c = st["clean"]
        lines += [
            "## Answer streams: the sequential monitor",
            "",
            f"Mixture e-detector at false-alarm level {st['alpha']:g} (average run length to "
            f"a false alarm >= {1 / st['alpha']:,.0f} answers), calibrated on "
            f"{st['calibration_answers']:,} clean answers (guarantee holds with probability "
            f"{1 - st['delta']:g} over that draw). Clean streams: {c['false_alarms']} false "
            f"alarms in {c['answers']:,} answers (run length >= {c['run_length_lower_95']:,} "
            "at 95% confidence). Median answers to the alarm:",
            "",
            *delays_markdown(st),
            "",
            "One client of 100 attacked at 100%: "
            + "; ".join(
                f"{n}: its key after {_answers(d['key'])}, the model after {_answers(d['model'])}"
                for n, d in st["one_client_of_100"].items()
            ),
            "",
        ]
    return "\n".join(lines)


def _answers(n: float | None) -> str:
    return "more than the horizon" if n is None else f"{n:.0f} answers"

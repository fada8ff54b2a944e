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

import json
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.progress import Progress
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from fides_core.integrity import DETECTOR_OUTPUT, P_INPUT, Q_INPUT, RECLASSIFIER_OUTPUT
from verifier.attacks import Attacked, fgsm, output_attack, quantize_int8
from verifier.data import Dataset, Splits, augment
from verifier.detector import (
    AttackDetector,
    Reclassifier,
    calibrate_threshold,
    export_pair_model,
    train_reclassifier,
    window_test,
)
from verifier.experiment import AugmentConfig, Experiment, NoveltyConfig
from verifier.export import INPUT_NAME, serving_config, write_entry
from verifier.features import pair_features_np
from verifier.gan import Generator, train_gan
from verifier.losses import cross_entropy
from verifier.nets import ConvNet
from verifier.novelty import (
    NoveltyScorer,
    export_novelty,
    fit_novelty,
    novelty_scores,
    synthetic_novel_inputs,
)
from verifier.pipeline import experiment_splits, net_config, run_experiment, stage_key
from verifier.train import fit, predict_logits, set_determinism

__all__ = ["MEAN_DETECTION_ATTACKS", "evaluate_experiment", "report_markdown", "split_for_detector"]

Say = Callable[[str], None]

# The attacks the detection-accuracy goal averages over (issue 4).
MEAN_DETECTION_ATTACKS = ("switch", "avg", "random_switch", "gan")
BASELINES = {
    "research_ce_threshold": "cross-entropy H(p, q) alone, threshold at the target FPR "
    "(the Fides research code's single feature)",
    "kl_percentile": "KL(p || q) with a percentile threshold on clean scores (Alibi Detect's "
    "ModelDistillation detector)",
}


def split_for_detector(splits: Splits, exp: Experiment) -> tuple[Dataset, Dataset, Dataset]:
    """(detector training, calibration, evaluation); seeded, disjoint."""
    cfg = exp.detector
    n = len(splits.test)
    order = torch.from_numpy(np.random.default_rng(exp.seed + 4).permutation(n))
    n_train = int(round(n * cfg.train_fraction))
    n_cal = int(round(n * cfg.calibration_fraction))
    tr, cal, ev = order[:n_train], order[n_train : n_train + n_cal], order[n_train + n_cal :]
    t = splits.test
    train = Dataset(torch.cat([splits.val.x, t.x[tr]]), torch.cat([splits.val.y, t.y[tr]]))
    return train, Dataset(t.x[cal], t.y[cal]), Dataset(t.x[ev], t.y[ev])


def _probs(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    return predict_logits(net, x).softmax(-1).numpy().astype(np.float32)  # [n, C]


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


class _Pairs:
    """Attacked pairs of one attack: tampered p', the verifier's q, the honest top-1."""

    def __init__(self, p: np.ndarray, q: np.ndarray, honest: np.ndarray) -> None:
        self.p, self.q, self.honest = p, q, honest


def _flipped(att: Attacked, q: np.ndarray, honest: np.ndarray) -> _Pairs:
    keep = att.flipped
    return _Pairs(att.probs[keep], q[keep], honest[keep])


def _fgsm_pairs(
    service: nn.Module, verifier: nn.Module, x: torch.Tensor, honest: np.ndarray, eps: float
) -> tuple[_Pairs, float]:
    """FGSM on the input images ``x`` (``honest``: the service's top-1 on them, already
    computed by the caller); both models see the perturbed image. Kept: rows whose service
    answer changed. Returns the pairs and the flip rate."""
    x_adv = fgsm(service, x, eps)
    p_adv, q_adv = _probs(service, x_adv), _probs(verifier, x_adv)
    keep = p_adv.argmax(1) != honest
    return _Pairs(p_adv[keep], q_adv[keep], honest[keep]), float(keep.mean())


def _substitute(
    spec_name: str, exp: Experiment, splits: Splits, service: nn.Module, run_dir: Path, bar: Any
) -> tuple[nn.Module, float]:
    spec = next(s for s in exp.detector.substitutes if s.name == spec_name)
    if spec.kind == "int8":
        return quantize_int8(service), 0.0
    assert spec.net is not None  # both checked by the config
    assert spec.train is not None
    torch.manual_seed(exp.seed + 90)
    net = ConvNet(net_config(spec.net, splits))
    key = stage_key(exp.data.model_dump(mode="json"), exp.seed, spec.model_dump(mode="json"))
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


def _write_pair_entry(
    root: Path,
    name: str,
    net: nn.Module,
    p: np.ndarray,
    q: np.ndarray,
    output: str,
    labels: list[str],
    card: dict[str, Any],
    comment: str,
) -> dict[str, Any]:
    version = root / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    diff = export_pair_model(net, version / "model.onnx", p[:256], q[:256], output)  # type: ignore[arg-type]
    body = yaml.safe_dump(serving_config(labels), sort_keys=False, default_flow_style=None)
    (root / name / "config.yaml").write_text(f"# {comment}\n{body}", encoding="utf-8")
    card = {**card, "name": name, "onnx_max_abs_diff": diff}
    (version / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


@dataclass
class Novelty:
    scorer: NoveltyScorer
    threshold: float
    eval_scores: np.ndarray  # [n evaluation images]
    report: dict[str, Any]


def _novelty(
    nc: NoveltyConfig,
    x_train: torch.Tensor,
    x_cal: torch.Tensor,
    x_eval: torch.Tensor,
    models: tuple[nn.Module, nn.Module, AttackDetector],
    det_threshold: float,
    seed: int,
) -> Novelty:
    """Fit the out-of-distribution check on the training images, set its threshold on the
    calibration images, and measure it on the evaluation split and on honest novel inputs made
    from it (blank, inverted, faint, noise): how often the detector alone would accuse the
    provider there, and how often it still does behind the check."""
    service, verifier, detector = models
    scorer = fit_novelty(
        x_train,
        components=nc.components,
        neighbours=nc.neighbours,
        reference=nc.reference,
        seed=seed + 15,
    )
    cal = novelty_scores(scorer, x_cal)
    threshold = calibrate_threshold(cal, nc.target_rate, nc.confidence)
    ev = novelty_scores(scorer, x_eval)
    inputs = {}
    for name, x in synthetic_novel_inputs(x_eval, seed + 16).items():
        novel = novelty_scores(scorer, x) > threshold
        accused = detector.scores(_probs(service, x), _probs(verifier, x)) > det_threshold
        inputs[name] = {
            "n": len(x),
            "called_novel": round(float(novel.mean()), 5),
            "detector_alone_accuses": round(float(accused.mean()), 5),
            "accused_behind_the_check": round(float((accused & ~novel).mean()), 5),
        }
    report = {
        "threshold": threshold,
        "target_rate": nc.target_rate,
        "threshold_rule": _rule(nc.confidence),
        "calibration_scores": len(cal),
        "clean_rate": round(float((ev > threshold).mean()), 5),
        "inputs": inputs,
    }
    return Novelty(scorer, threshold, ev, report)


def _write_novelty_entry(
    root: Path, exp: Experiment, novelty: Novelty, x_check: torch.Tensor, common: dict[str, Any]
) -> None:
    name = f"{exp.export.service_name}_novelty"
    version = root / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    diff = export_novelty(novelty.scorer, version / "model.onnx", x_check, INPUT_NAME)
    cfg = {**serving_config(["novelty"], exp.export.max_batch_size)}
    body = yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
    (root / name / "config.yaml").write_text(
        f"# {exp.name}: out-of-distribution check (verifier.novelty)\n{body}", encoding="utf-8"
    )
    card = {
        **common,
        "name": name,
        "role": "novelty",
        "inputs": [INPUT_NAME],
        "threshold": novelty.threshold,
        "target_rate": novelty.report["target_rate"],
        "threshold_rule": novelty.report["threshold_rule"],
        "calibration_scores": novelty.report["calibration_scores"],
        "novelty_config": exp.detector.novelty.model_dump(mode="json")
        if exp.detector.novelty
        else None,
        "metrics": {"clean_rate": novelty.report["clean_rate"]},
        "onnx_max_rel_diff": diff,
    }
    (version / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")


def integrity_block(exp: Experiment) -> dict[str, Any]:
    """The ``integrity:`` block that pairs the service with its verifier and detector."""
    ex = exp.export
    return {
        "enclave": {"verifier_model": ex.verifier_name, "max_batch_size": ex.max_batch_size},
        "detector": f"{ex.service_name}_detector",
        "reclassifier": f"{ex.service_name}_reclassifier",
        "mode": "monitor",
        "failure_policy": "fail_closed",
        "substitution_window": exp.detector.window_size,
        "substitution_alpha": exp.detector.window_alpha,
        **({"novelty": f"{ex.service_name}_novelty"} if exp.detector.novelty is not None else {}),
    }


def _enable_integrity(repository: Path, exp: Experiment) -> None:
    path = repository / exp.export.service_name / "config.yaml"
    text = path.read_text(encoding="utf-8")
    block = yaml.safe_dump(
        {"integrity": integrity_block(exp)}, sort_keys=False, default_flow_style=None
    )
    path.write_text(
        text.rstrip("\n")
        + "\n# verified by its GDTL verifier in the enclave (fides evaluate)\n"
        + block,
        encoding="utf-8",
    )


def evaluate_experiment(
    exp: Experiment,
    run_dir: Path,
    *,
    repository: Path | None = None,
    show_progress: bool = False,
    say: Say | None = None,
) -> dict[str, Any]:
    """Train (or resume) the experiment's models, then the detector and re-classifier, and
    evaluate them; export both into ``repository`` when given. Returns the report."""
    log: Say = say or (lambda _m: None)
    cfg = exp.detector
    t_start = time.perf_counter()
    trained: dict[str, nn.Module] = {}
    # the service student and the verifier are exported beside the detector
    run_experiment(
        exp,
        run_dir,
        repository=repository,
        show_progress=show_progress,
        say=log,
        trained=trained,
    )
    set_determinism(exp.seed, exp.threads)
    service, verifier = trained["student"], trained["verifier"]
    splits = experiment_splits(exp)
    det_train, calib, evald = split_for_detector(splits, exp)
    log(
        f"detector data: {len(det_train)} train (val + test part) / {len(calib)} calibration / "
        f"{len(evald)} evaluation"
    )
    rng = np.random.default_rng(exp.seed + 5)
    tgen = torch.Generator().manual_seed(exp.seed + 6)
    c = splits.num_classes
    timings: dict[str, float] = {}
    bar = Progress(transient=True) if show_progress else None
    with bar if bar is not None else nullcontext():
        # --- training pairs: clean + fixed attacks (+ FGSM) ---
        t0 = time.perf_counter()
        x_tr = _with_views(det_train.x, cfg.augment_views, exp.data.augment, exp.seed + 8)
        p_tr, q_tr = _probs(service, x_tr), _probs(verifier, x_tr)
        honest_tr = p_tr.argmax(1)
        fixed = [
            _flipped(output_attack(a, p_tr, rng, noise_sigma=cfg.noise_sigma), q_tr, honest_tr)
            for a in cfg.train_attacks
        ]
        if cfg.fgsm_train_epsilon is not None:
            fixed.append(_fgsm_pairs(service, verifier, x_tr, honest_tr, cfg.fgsm_train_epsilon)[0])
        att_p = np.concatenate([f.p for f in fixed])
        att_q = np.concatenate([f.q for f in fixed])
        att_honest = np.concatenate([f.honest for f in fixed])
        log(f"training pairs: {len(p_tr)} clean, {len(att_p)} attacked (fixed attacks)")

        # --- GAN: detector (discriminator) vs generator, then detector fine-tuning ---
        torch.manual_seed(exp.seed + 7)
        detector = AttackDetector(c, cfg.hidden)
        generator = Generator(c, cfg.gan.noise_dim)
        g = cfg.gan
        gan_kw: dict[str, Any] = {
            "batch_size": g.batch_size,
            "lr_d": g.lr_d,
            "lr_g": g.lr_g,
            "flip_weight": g.flip_weight,
            "fool_weight": g.fool_weight,
            "kappa": g.kappa,
            "progress": bar,
            "log": log,
        }
        history = train_gan(
            detector, generator, p_tr, q_tr, att_p, att_q, epochs=g.epochs, seed=exp.seed, **gan_kw
        )
        finetune = None
        if cfg.finetune_epochs:
            finetune = train_gan(
                detector,
                generator,
                p_tr,
                q_tr,
                att_p,
                att_q,
                epochs=cfg.finetune_epochs,
                seed=exp.seed + 1,
                train_generator=False,
                **gan_kw,
            )
        timings["gan"] = round(time.perf_counter() - t0, 1)

        # --- re-classifier: (p' or p, q) -> honest class ---
        t0 = time.perf_counter()
        gan_tr = generator.attack(p_tr, tgen)
        gan_keep = gan_tr.argmax(1) != honest_tr
        reclassifier = Reclassifier(c, cfg.reclassifier_hidden)
        re_losses = train_reclassifier(
            reclassifier,
            np.concatenate([p_tr, att_p, gan_tr[gan_keep]]),
            np.concatenate([q_tr, att_q, q_tr[gan_keep]]),
            np.concatenate([honest_tr, att_honest, honest_tr[gan_keep]]),
            epochs=cfg.reclassifier_epochs,
            seed=exp.seed,
        )
        timings["reclassifier"] = round(time.perf_counter() - t0, 1)

        # --- calibration on clean held-out pairs ---
        p_cal, q_cal = _probs(service, calib.x), _probs(verifier, calib.x)
        cal_scores = detector.scores(p_cal, q_cal)
        threshold = calibrate_threshold(cal_scores, cfg.target_fpr, cfg.fpr_confidence)
        log(
            f"threshold {threshold:.6f} for {cfg.target_fpr:.1%} FPR, {_rule(cfg.fpr_confidence)} "
            f"({len(cal_scores)} scores)"
        )

        # --- evaluation ---
        t0 = time.perf_counter()
        p_ev, q_ev = _probs(service, evald.x), _probs(verifier, evald.x)
        honest_ev = p_ev.argmax(1)
        clean_scores = detector.scores(p_ev, q_ev)
        attacked: dict[str, _Pairs] = {}
        flip_rates: dict[str, float] = {}
        for a in ("switch", "avg", "random_switch", "targeted_flip", "noise"):
            res = output_attack(a, p_ev, rng, noise_sigma=cfg.noise_sigma)
            attacked[a], flip_rates[a] = _flipped(res, q_ev, honest_ev), res.flip_rate
        gan_ev = generator.attack(p_ev, tgen)
        gan_res = Attacked("gan", gan_ev, gan_ev.argmax(1) != honest_ev)
        attacked["gan"], flip_rates["gan"] = _flipped(gan_res, q_ev, honest_ev), gan_res.flip_rate
        for eps in cfg.fgsm_epsilons:
            name = f"fgsm_eps{eps:g}"
            attacked[name], flip_rates[name] = _fgsm_pairs(
                service, verifier, evald.x, honest_ev, eps
            )

        attacks_report: dict[str, dict[str, Any]] = {}
        for name, pairs in attacked.items():
            row = _detection_row(
                clean_scores, detector.scores(pairs.p, pairs.q), threshold, cfg.target_fpr
            )
            row["flip_rate"] = round(flip_rates[name], 5)
            if len(pairs.p):
                pred = reclassifier.predict(pairs.p, pairs.q)
                row["reclassification_accuracy"] = round(float((pred == pairs.honest).mean()), 5)
                row["verifier_top1_accuracy"] = round(
                    float((pairs.q.argmax(1) == pairs.honest).mean()), 5
                )
                # pairs no detector can flag from the top-1 alone: the verifier agrees with
                # the tampered answer (an upper bound on what disagreement can show)
                row["verifier_agrees_with_tampered"] = round(
                    float((pairs.q.argmax(1) == pairs.p.argmax(1)).mean()), 5
                )
            attacks_report[name] = row
        reclass_names = [n for n in attacked if not n.startswith("fgsm")]
        re_pred = np.concatenate(
            [reclassifier.predict(attacked[n].p, attacked[n].q) for n in reclass_names]
        )
        re_true = np.concatenate([attacked[n].honest for n in reclass_names])
        clean_fpr = float((clean_scores > threshold).mean())

        # --- baselines on the same pairs ---
        def baseline(col: str) -> dict[str, Any]:
            idx = {"research_ce_threshold": 0, "kl_percentile": 1}[col]

            def score(p: np.ndarray, q: np.ndarray) -> np.ndarray:
                return pair_features_np(p, q)[:, idx]

            t = calibrate_threshold(score(p_cal, q_cal), cfg.target_fpr, cfg.fpr_confidence)
            clean = score(p_ev, q_ev)
            rows = {
                n: _detection_row(clean, score(pr.p, pr.q), t, cfg.target_fpr)
                for n, pr in attacked.items()
            }
            return {
                "description": BASELINES[col],
                "threshold": t,
                "clean_fpr": round(float((clean > t).mean()), 5),
                "attacks": rows,
                "mean_detection_accuracy": round(
                    float(np.mean([rows[n]["detection_accuracy"] for n in MEAN_DETECTION_ATTACKS])),
                    5,
                ),
            }

        baselines = {name: baseline(name) for name in BASELINES}

        # --- model substitution: per request and windowed ---
        # per-request substitution score of the gateway's window test: KL(p || q)
        kl_ref = pair_features_np(p_cal, q_cal)[:, 1]
        kl_clean = pair_features_np(p_ev, q_ev)[:, 1]
        substitution: dict[str, Any] = {}
        substitutes: dict[str, nn.Module] = {}
        for spec in cfg.substitutes:
            sub, secs = _substitute(spec.name, exp, splits, service, run_dir, bar)
            substitutes[spec.name] = sub
            p_sub = _probs(sub, evald.x)
            sub_scores = detector.scores(p_sub, q_ev)
            auc, tpr1 = _roc(clean_scores, sub_scores, cfg.target_fpr)
            kl_sub = pair_features_np(p_sub, q_ev)[:, 1]
            wkw: dict[str, Any] = {
                "size": cfg.window_size,
                "count": cfg.windows,
                "alpha": cfg.window_alpha,
            }
            substitution[spec.name] = {
                "kind": spec.kind,
                "train_seconds": round(secs, 1),
                "test_accuracy": round(float((p_sub.argmax(1) == evald.y.numpy()).mean()), 5),
                "agreement_with_service": round(float((p_sub.argmax(1) == honest_ev).mean()), 5),
                "per_request": {"roc_auc": round(auc, 5), "tpr_at_1pct_fpr": round(tpr1, 5)},
                "window_detector_score": {
                    "substitute": _windows(sub_scores, cal_scores, seed=exp.seed + 11, **wkw),
                    "clean_false_alarm": _windows(
                        clean_scores, cal_scores, seed=exp.seed + 12, **wkw
                    ),
                },
                "window_kl": {
                    "substitute": _windows(kl_sub, kl_ref, seed=exp.seed + 13, **wkw),
                    "clean_false_alarm": _windows(kl_clean, kl_ref, seed=exp.seed + 14, **wkw),
                },
            }
            w = substitution[spec.name]["window_kl"]
            log(
                f"substitute {spec.name}: agreement with service "
                f"{substitution[spec.name]['agreement_with_service']:.2%}, windows flagged "
                f"{w['substitute']['flag_rate']:.1%} (clean false alarms "
                f"{w['clean_false_alarm']['flag_rate']:.1%})"
            )
        timings["evaluation"] = round(time.perf_counter() - t0, 1)
        novelty: Novelty | None = None
        if cfg.novelty is not None:
            novelty = _novelty(
                cfg.novelty,
                splits.train.x,
                calib.x,
                evald.x,
                (service, verifier, detector),
                threshold,
                exp.seed,
            )
            log(
                f"novelty check: threshold {novelty.threshold:.4f}; clean inputs called novel "
                f"{novelty.report['clean_rate']:.2%}"
            )

    mean_det = float(
        np.mean([attacks_report[n]["detection_accuracy"] for n in MEAN_DETECTION_ATTACKS])
    )
    report: dict[str, Any] = {
        "experiment": exp.name,
        "config_sha256": exp.config_hash(),
        "data": {
            "detector_train": len(det_train),
            "detector_train_augmented_views": cfg.augment_views,
            "calibration": len(calib),
            "evaluation": len(evald),
            "num_classes": c,
        },
        "service_eval_accuracy": round(float((honest_ev == evald.y.numpy()).mean()), 5),
        "verifier_eval_fidelity": round(float((q_ev.argmax(1) == honest_ev).mean()), 5),
        "target_fpr": cfg.target_fpr,
        "fpr_confidence": cfg.fpr_confidence,
        "threshold_rule": _rule(cfg.fpr_confidence),
        "threshold": threshold,
        "calibration_scores": len(cal_scores),
        "clean_fpr": round(clean_fpr, 5),
        "attacks": attacks_report,
        "mean_detection_accuracy": round(mean_det, 5),
        "mean_detection_attacks": list(MEAN_DETECTION_ATTACKS),
        "reclassification_accuracy": round(float((re_pred == re_true).mean()), 5),
        "reclassification_attacks": reclass_names,
        "substitution": substitution,
        "baselines": baselines,
        "gan": {"history": history.as_dict(), "finetune": finetune.as_dict() if finetune else None},
        "reclassifier_loss": [round(v, 5) for v in re_losses],
        "seconds": timings,
    }
    if novelty is not None:
        report["novelty"] = novelty.report
        flagged_in = (clean_scores > threshold) & (novelty.eval_scores <= novelty.threshold)
        report["clean_fpr_in_distribution"] = round(float(flagged_in.mean()), 5)
    if repository is not None:
        ex = exp.export
        common = {
            "format": 1,
            "experiment": exp.name,
            "service_model": ex.service_name,
            "verifier_model": ex.verifier_name,
            "training_config_sha256": exp.config_hash(),
            "detector_config": cfg.model_dump(mode="json"),
            "torch_version": torch.__version__,
        }
        det_card = _write_pair_entry(
            repository,
            f"{ex.service_name}_detector",
            detector,
            p_cal,
            q_cal,
            DETECTOR_OUTPUT,
            ["attack"],
            {
                **common,
                "role": "detector",
                "inputs": [P_INPUT, Q_INPUT],
                "threshold": threshold,
                "target_fpr": cfg.target_fpr,
                "fpr_confidence": cfg.fpr_confidence,
                "window": {"size": cfg.window_size, "alpha": cfg.window_alpha},
                # the clean reference of the windowed substitution test, in score order
                "calibration_scores": [round(float(s), 7) for s in np.sort(cal_scores)],
                # the clean reference of the gateway's windowed substitution test: KL(p || q)
                "calibration_kl": [round(float(s), 7) for s in np.sort(kl_ref)],
                "metrics": {
                    "clean_fpr": report["clean_fpr"],
                    "mean_detection_accuracy": report["mean_detection_accuracy"],
                },
            },
            f"{exp.name}: attack detector (verifier.evaluate)",
        )
        _write_pair_entry(
            repository,
            f"{ex.service_name}_reclassifier",
            reclassifier,
            p_cal,
            q_cal,
            RECLASSIFIER_OUTPUT,
            splits.classes,
            {
                **common,
                "role": "reclassifier",
                "inputs": [P_INPUT, Q_INPUT],
                "metrics": {"reclassification_accuracy": report["reclassification_accuracy"]},
            },
            f"{exp.name}: re-classifier (verifier.evaluate)",
        )
        # cheaper substitutes, for the gateway's substitution drills (int8 copies are not
        # exported: onnxruntime would run them in float anyway)
        for spec in cfg.substitutes:
            if spec.kind != "student":
                continue
            sub_name = f"{ex.service_name}_{spec.name}"
            write_entry(
                repository,
                sub_name,
                substitutes[spec.name],
                evald.x[:64],
                splits.classes,
                {
                    **common,
                    "role": "substitute",
                    "substitute": spec.model_dump(mode="json"),
                    "metrics": {
                        "test_accuracy": substitution[spec.name]["test_accuracy"],
                        "agreement_with_service": substitution[spec.name]["agreement_with_service"],
                    },
                },
                comment=f"{exp.name}: a cheaper substitute for substitution drills",
                max_batch_size=ex.max_batch_size,
                latency_repeats=10,
            )
        if novelty is not None:
            _write_novelty_entry(repository, exp, novelty, evald.x[:64], common)
        _enable_integrity(repository, exp)
        report["repository"] = str(repository)
        report["onnx_max_abs_diff"] = det_card["onnx_max_abs_diff"]
    report["machine"] = f"{platform.machine()}, torch {torch.__version__}, {exp.threads} thread(s)"
    report["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    return report


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
        f"FPR on the evaluation split **{_pct(report['clean_fpr'])}**. Mean detection accuracy "
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
    return "\n".join(lines)

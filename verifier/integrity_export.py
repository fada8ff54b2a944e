"""The repository entries ``fides evaluate`` exports beside the service and its verifier: the
attack detector, the re-classifier, the cheaper substitutes, the novelty check, and the
service's ``integrity:`` block that pairs them (layout: :mod:`verifier.export`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from fides_core.integrity import DETECTOR_OUTPUT, P_INPUT, Q_INPUT, RECLASSIFIER_OUTPUT
from verifier.detector import AttackDetector, Reclassifier, export_pair_model
from verifier.experiment import RunSpec
from verifier.export import INPUT_NAME, OUTPUT_NAME, execution_for, serving_config, write_entry
from verifier.novelty import NoveltyScorer, export_novelty

__all__ = [
    "IntegrityModels",
    "Novelty",
    "enable_integrity",
    "export_integrity",
    "integrity_block",
]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Novelty:
    """The fitted out-of-distribution check and what it measured."""

    scorer: NoveltyScorer
    threshold: float
    eval_scores: np.ndarray  # [n evaluation images]
    report: dict[str, Any]


@dataclass(frozen=True)
class IntegrityModels:
    """What ``fides evaluate`` trained, with the data their export needs."""

    detector: AttackDetector
    reclassifier: Reclassifier
    substitutes: dict[str, nn.Module]  # by substitute name
    novelty: Novelty | None
    p_check: np.ndarray  # [n, C] clean calibration pairs: the pair models' parity batch
    q_check: np.ndarray
    calibration_scores: np.ndarray  # [n] the detector's scores of those pairs
    calibration_kl: np.ndarray  # [n] their KL(p || q)
    x_check: torch.Tensor  # [n, C, H, W] evaluation images: the image models' parity batch
    labels: list[str]


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
    rows = np.resize(np.arange(len(p)), 64)  # a full batch, however few rows were given
    feeds = {
        P_INPUT: p[rows].astype(np.float32),
        Q_INPUT: q[rows].astype(np.float32),
    }
    execution = execution_for(version / "model.onnx", feeds)
    body = yaml.safe_dump(
        serving_config(labels, execution=execution), sort_keys=False, default_flow_style=None
    )
    (root / name / "config.yaml").write_text(f"# {comment}\n{body}", encoding="utf-8")
    card = {**card, "name": name, "onnx_max_abs_diff": diff}
    (version / "model_card.json").write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def _write_novelty_entry(
    root: Path, exp: RunSpec, novelty: Novelty, x_check: torch.Tensor, common: dict[str, Any]
) -> None:
    name = f"{exp.export.service_name}_novelty"
    version = root / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    diff = export_novelty(novelty.scorer, version / "model.onnx", x_check, INPUT_NAME)
    rows = np.resize(np.arange(len(x_check)), exp.export.max_batch_size)
    feeds = {INPUT_NAME: x_check.numpy()[rows]}
    execution = execution_for(version / "model.onnx", feeds)
    cfg = {**serving_config(["novelty"], exp.export.max_batch_size, execution=execution)}
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


#: The keys of the ``integrity:`` block that an export owns (rewritten each time); the others
#: (mode, failure_policy, threshold, sampling_rate, alarm settings, the enclave's timeouts...)
#: are the operator's, kept from the block already there.
OWNED_KEYS = (
    "detector",
    "reclassifier",
    "novelty",
    "output",
    "substitution_window",
    "substitution_alpha",
)
# the verifier's identity: a new verifier voids a pinned measurement and a sealed file
OWNED_ENCLAVE_KEYS = ("verifier_model", "measurement", "sealed_model")


def integrity_block(exp: RunSpec, output: str = OUTPUT_NAME) -> dict[str, Any]:
    """The ``integrity:`` block that pairs the service with its verifier and detector;
    ``output``: the service's output holding the class probabilities."""
    ex = exp.export
    return {
        "enclave": {"verifier_model": ex.verifier_name, "max_batch_size": ex.max_batch_size},
        "detector": f"{ex.service_name}_detector",
        "reclassifier": f"{ex.service_name}_reclassifier",
        **({"output": output} if output != OUTPUT_NAME else {}),
        "mode": "monitor",
        "failure_policy": "fail_closed",
        "substitution_window": exp.detector.window_size,
        "substitution_alpha": exp.detector.window_alpha,
        **({"novelty": f"{ex.service_name}_novelty"} if exp.detector.novelty is not None else {}),
    }


def merged_block(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """``new`` over the block already there: the export's own keys from ``new`` (one it no
    longer sets, such as a novelty check now off, is dropped), every other key as the
    operator left it."""
    if not isinstance(old, dict):
        return new
    out = {k: v for k, v in old.items() if k not in OWNED_KEYS and k != "enclave"}
    out.update({k: v for k, v in new.items() if k in OWNED_KEYS})
    for k, v in new.items():
        out.setdefault(k, v)
    found = old.get("enclave")
    enclave: dict[str, Any] = found if isinstance(found, dict) else {}
    out["enclave"] = {
        **{k: v for k, v in new["enclave"].items() if k not in enclave},
        **{k: v for k, v in enclave.items() if k not in OWNED_ENCLAVE_KEYS},
        **{k: v for k, v in new["enclave"].items() if k in OWNED_ENCLAVE_KEYS},
    }
    for key in ("measurement", "sealed_model"):
        if key in enclave:
            log.warning(
                "integrity.enclave.%s was set for the verifier this export replaces: dropped; "
                "pin (or seal) the new verifier again",
                key,
            )
    if "threshold" in out:
        log.warning(
            "integrity.threshold %s is kept from the earlier block, though it was set for the "
            "detector this export replaces (the new detector's card has its own threshold)",
            out["threshold"],
        )
    return {"enclave": out.pop("enclave"), **out}


def enable_integrity(
    repository: Path, exp: RunSpec, note: str = "fides evaluate", output: str = OUTPUT_NAME
) -> None:
    """Add the ``integrity:`` block to the service's ``config.yaml``; one already there (an
    earlier export) is updated (:func:`merged_block`), keeping the file's leading comments."""
    path = repository / exp.export.service_name / "config.yaml"
    text = path.read_text(encoding="utf-8")
    raw = yaml.safe_load(text) or {}
    old = None
    if "integrity" in raw:
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        header = header.split("# verified by its GDTL verifier")[0]
        old = raw.pop("integrity")
        text = header + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None)
    block = yaml.safe_dump(
        {"integrity": merged_block(integrity_block(exp, output), old)},
        sort_keys=False,
        default_flow_style=None,
    )
    path.write_text(
        text.rstrip("\n") + f"\n# verified by its GDTL verifier in the enclave ({note})\n" + block,
        encoding="utf-8",
    )


def _write_substitutes(
    repository: Path,
    exp: RunSpec,
    models: IntegrityModels,
    substitution: dict[str, Any],
    common: dict[str, Any],
) -> None:
    """The cheaper substitutes, for the gateway's substitution drills (int8 copies are not
    exported: onnxruntime would run them in float anyway)."""
    ex = exp.export
    for spec in exp.detector.substitutes:
        if spec.kind != "student":
            continue
        row = substitution[spec.name]
        write_entry(
            repository,
            f"{ex.service_name}_{spec.name}",
            models.substitutes[spec.name],
            models.x_check[:64],
            models.labels,
            {
                **common,
                "role": "substitute",
                "substitute": spec.model_dump(mode="json"),
                "metrics": {
                    "test_accuracy": row["test_accuracy"],
                    "agreement_with_service": row["agreement_with_service"],
                },
            },
            comment=f"{exp.name}: a cheaper substitute for substitution drills",
            max_batch_size=ex.max_batch_size,
            latency_repeats=10,
        )


def export_integrity(
    repository: Path,
    exp: RunSpec,
    models: IntegrityModels,
    report: dict[str, Any],
    note: str = "fides evaluate",
    output: str = OUTPUT_NAME,
) -> float:
    """Every entry, then the service's ``integrity:`` block; ``report`` is the evaluation
    report (the cards quote it), ``output`` the service's output of class probabilities.
    Returns the detector's ONNX parity (max |ONNX - torch|)."""
    ex, cfg = exp.export, exp.detector
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
        models.detector,
        models.p_check,
        models.q_check,
        DETECTOR_OUTPUT,
        ["attack"],
        {
            **common,
            "role": "detector",
            "inputs": [P_INPUT, Q_INPUT],
            "threshold": report["threshold"],
            "target_fpr": cfg.target_fpr,
            "fpr_confidence": report["fpr_confidence"],
            "window": {"size": cfg.window_size, "alpha": cfg.window_alpha},
            # the clean reference of the windowed substitution test, in score order
            "calibration_scores": [round(float(s), 7) for s in np.sort(models.calibration_scores)],
            # the clean reference of the gateway's windowed substitution test: KL(p || q)
            "calibration_kl": [round(float(s), 7) for s in np.sort(models.calibration_kl)],
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
        models.reclassifier,
        models.p_check,
        models.q_check,
        RECLASSIFIER_OUTPUT,
        models.labels,
        {
            **common,
            "role": "reclassifier",
            "inputs": [P_INPUT, Q_INPUT],
            "metrics": {"reclassification_accuracy": report["reclassification_accuracy"]},
        },
        f"{exp.name}: re-classifier (verifier.evaluate)",
    )
    _write_substitutes(repository, exp, models, report["substitution"], common)
    if models.novelty is not None:
        _write_novelty_entry(repository, exp, models.novelty, models.x_check[:64], common)
    enable_integrity(repository, exp, note, output)
    return float(det_card["onnx_max_abs_diff"])

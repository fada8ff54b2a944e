"""Experiment files: YAML read with ``yaml.safe_load``, validated with pydantic.

Unknown keys are errors (a typo such as ``epoch:`` must not silently train with a default).
The config hash (SHA-256 of the canonical JSON of the validated config) names the run
directory and is written into every model card.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal, Protocol, TypeVar, get_args

import yaml
from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from fides_core.config import StrictModel, format_validation_error

__all__ = [
    "Experiment",
    "ExperimentError",
    "RunSpec",
    "load_experiment",
    "load_run_file",
    "pruning_mismatch",
    "read_yaml",
    "validate_file",
]

_M = TypeVar("_M", bound=StrictModel)
_R = TypeVar("_R", bound="RunSpec")
log = logging.getLogger(__name__)


class ExperimentError(ValueError):
    """An experiment file is missing or invalid; the message names the file and the key."""


class AugmentConfig(StrictModel):
    crop_padding: int = Field(0, ge=0, le=8, description="Random shift by up to this many px.")
    hflip: bool = Field(False, description="Random horizontal flips (not for digits/letters).")


class DataConfig(StrictModel):
    source: Literal["digits", "npz", "folder"] = Field(
        description="digits: scikit-learn's bundled set; npz: x_train/y_train/x_test/y_test; "
        "folder: <path>/{train,test}/<class>/*.png|jpg|jpeg|bmp|webp|npy"
    )
    path: Path | None = Field(
        None, description="File or directory, relative to the experiment file."
    )
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Held out from train.")
    train_limit: int | None = Field(None, ge=10, description="Keep this many train images.")
    test_limit: int | None = Field(None, ge=10, description="Keep this many test images.")
    test_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="digits only: the share held out as the test split (default 0.2; npz and "
        "folder data bring their own test split).",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    classes_key: str = Field(
        "classes", description="npz: the key holding the class names, index-aligned."
    )
    group_key: str | None = Field(
        None,
        description="npz: the key holding a group id per training image (e.g. the object "
        "it shows); the validation split then keeps each group on one side. Without it the "
        "split is random and checked for near-duplicates across it.",
    )

    _added_later: ClassVar[tuple[str, ...]] = ("test_fraction", "classes_key", "group_key")
    _base: Path | None = PrivateAttr(None)  # the experiment file's directory

    def anchor(self, base: Path) -> None:
        """Read a relative ``path`` from ``base`` (the experiment file's directory)."""
        self._base = base

    @property
    def file(self) -> Path | None:
        """``path`` as it is read: relative to the experiment file; a path that exists only
        relative to the working directory (files written before this rule) still works, and
        the log says so."""
        if self.path is None or self.path.is_absolute() or self._base is None:
            return self.path
        anchored = self._base / self.path
        if not anchored.exists() and self.path.exists():
            log.warning(
                "data.path %s is read relative to the working directory; relative paths are "
                "read from the experiment file's directory (%s): write %s",
                self.path,
                self._base,
                os.path.relpath(self.path.resolve(), self._base.resolve()),
            )
            return self.path
        return anchored

    @model_validator(mode="after")
    def _path(self) -> DataConfig:
        if self.source != "digits" and self.path is None:
            raise ValueError(f"data source {self.source!r} needs a path")
        if self.source != "digits" and self.test_fraction is not None:
            raise ValueError(f"test_fraction is for data source 'digits', not {self.source!r}")
        return self


class NetSpec(StrictModel):
    widths: list[int] = Field(min_length=1, description="Output channels of each block.")
    convs_per_block: int = Field(1, ge=1, le=4)
    dropout: float = Field(0.2, ge=0, lt=1)
    pool: Literal["gap", "flatten"] = Field(
        "gap",
        description="Head: global average pooling (Fides' verifier head) or the flattened last "
        "feature map (better for small service models on small images).",
    )
    pool_after: Literal["block", "first_conv"] = Field(
        "block",
        description="Where each block halves the map: after its last conv (VGG), or after its "
        "first, so the block's other convs run at the lower resolution (the fast CIFAR-10 "
        "nets of Page's DAWNBench ResNet-9 and Jordan's airbench: conv, pool, BN, act).",
    )
    activation: Literal["relu", "gelu"] = Field("relu")
    stem: Literal["none", "whiten"] = Field(
        "none",
        description="whiten: a first 2x2 conv (stride 1, no padding) whose frozen filters whiten "
        "the training images' 2x2 patches (each eigenvector of their covariance over the square "
        "root of its eigenvalue, with its negative), then the activation: Jordan's airbench "
        "patch-whitening initialisation. The blocks then see 2 x 4 x channels inputs.",
    )

    _added_later: ClassVar[tuple[str, ...]] = ("pool_after", "activation", "stem")


class _Layout(Protocol):
    """What :class:`NetSpec` and ``verifier.nets.NetConfig`` share."""

    @property
    def widths(self) -> Sequence[int]: ...
    @property
    def convs_per_block(self) -> int: ...
    @property
    def pool(self) -> str: ...
    @property
    def pool_after(self) -> str: ...
    @property
    def activation(self) -> str: ...
    @property
    def stem(self) -> str: ...


def pruning_mismatch(source: _Layout, target: _Layout) -> str | None:
    """Why filter pruning cannot turn a net of layout ``source`` into one of layout ``target``
    (same blocks, convs per block and pool; each width 1..the source's), or None."""
    layout = ("convs_per_block", "pool", "pool_after", "activation", "stem")
    want = tuple(getattr(source, k) for k in layout)
    got = tuple(getattr(target, k) for k in layout)
    if got != want:
        return f"{', '.join(layout)} must be the source net's {want}, not {got}"
    if len(target.widths) != len(source.widths) or any(
        w < 1 or w > s for w, s in zip(target.widths, source.widths, strict=True)
    ):
        return (
            f"widths {list(target.widths)} cannot be pruned from {list(source.widths)}: pruning "
            "keeps the number of blocks and can only remove filters (each width 1..the source's)"
        )
    return None


class OptimConfig(StrictModel):
    epochs: int = Field(ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (one-cycle schedule).")
    weight_decay: float = Field(5e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="sgd: SGD with Nesterov momentum (the fast CIFAR-10 recipes)."
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: Nesterov momentum (fixed).")
    warmup: float = Field(
        0.3, gt=0, lt=1, description="Share of the steps spent raising the learning rate."
    )
    anneal: Literal["cos", "linear"] = Field("cos", description="The one-cycle ramps' shape.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Hard-label cross-entropy with smoothed targets (teachers)."
    )
    decay_norms: bool = Field(
        True,
        description="Weight decay on batch-norm and bias parameters too; false exempts every "
        "one-dimensional parameter, as the fast CIFAR-10 recipes do.",
    )
    lookahead: bool = Field(
        False,
        description="Lookahead (Zhang et al. 2019) as airbench uses it: every 5 steps the "
        "weights move to an exponential average of themselves whose decay rises from 0 to "
        "0.95^5 as the cube of training progress; the average is the stage's result.",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: forward and backward under CPU bfloat16 autocast with channels-last "
        "tensors (weights, optimizer state and batch-norm statistics stay float32); about 1.8x "
        "faster where the CPU has bfloat16 units (AVX512-BF16 / AMX), slower where it has not.",
    )

    _added_later: ClassVar[tuple[str, ...]] = (
        "optimizer",
        "momentum",
        "warmup",
        "anneal",
        "label_smoothing",
        "precision",
        "decay_norms",
        "lookahead",
    )


class KDConfig(StrictModel):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, description="Weight of the soft (teacher) term.")
    beta: float = Field(0.1, ge=0, description="Weight of the hard-label cross-entropy.")


class TeacherConfig(StrictModel):
    net: NetSpec
    train: OptimConfig


class StudentConfig(StrictModel):
    net: NetSpec
    train: OptimConfig
    kd: KDConfig = Field(default_factory=KDConfig)
    min_flops_ratio: float = Field(
        3.0, ge=1, description="The cheapest teacher must cost this many times the student."
    )


class PretrainConfig(StrictModel):
    """The source task of the verifier's backbone (no downloads: the pipeline makes it)."""

    task: Literal["rotation", "dataset", "service"] = Field(
        "rotation",
        description="rotation: predict 0/90/180/270 degree rotations of the target's train "
        "images, labels unused (Gidaris et al., ICLR 2018); dataset: supervised on another "
        "data set (npz) with the same number of channels; service: no source task, the "
        "service model itself pruned to the candidate's widths (each layer keeps its filters "
        "of largest L1 norm, Li et al., ICLR 2017), head included; the candidate needs the "
        "service's block count, convs_per_block and pool, and `train` is unused.",
    )
    path: Path | None = Field(None, description="The other data set's .npz (task: dataset).")
    checkpoint: Path | None = Field(
        None, description="Use this earlier backbone checkpoint (a .pt state dict) instead."
    )
    train: OptimConfig = Field(default_factory=lambda: OptimConfig(epochs=2))

    @model_validator(mode="after")
    def _path(self) -> PretrainConfig:
        if self.task == "dataset" and self.path is None and self.checkpoint is None:
            raise ValueError("pretrain task 'dataset' needs a path")
        if self.task == "service" and (self.path is not None or self.checkpoint is not None):
            raise ValueError("pretrain task 'service' prunes the service: no path or checkpoint")
        return self


class VerifierConfig(StrictModel):
    candidates: list[NetSpec] = Field(
        min_length=1, description="Verifier sizes, tried smallest-FLOPs first."
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    step: OptimConfig = Field(description="Fine-tuning at each greedy step.")
    final_step: OptimConfig | None = Field(
        None,
        description="After the greedy loop stops: one more fine-tune of the blocks it left "
        "trainable (e.g. more epochs at a lower learning rate), kept only if fidelity rises by "
        "more than threshold, like every other step.",
    )
    kd: KDConfig = Field(
        default_factory=lambda: KDConfig(temperature=5.0, alpha=0.8, beta=0.2),
        description="Fides' GDTL loss: T=5, alpha=0.8, beta=0.2.",
    )
    threshold: float = Field(
        0.002, ge=0, description="Keep a step only if top-1 fidelity rises by more than this."
    )
    fidelity_target: float = Field(0.95, gt=0, le=1, description="Stop once reached.")
    max_flops_ratio: float = Field(
        0.25, gt=0, description="Candidates above this fraction of the service FLOPs are skipped."
    )
    max_flops: int | None = Field(
        None,
        ge=1,
        description="Candidates above this many FLOPs per image are skipped (absolute: the "
        "budget of a verifier for a black box, whose FLOPs nobody knows).",
    )
    max_latency_ms: float | None = Field(
        None,
        gt=0,
        description="Candidates whose single-image latency in the simulated enclave (one "
        "verify call: onnxruntime on one thread, hashing, signing; the socket excluded) is "
        "above this are skipped.",
    )
    memory_budget_mb: float = Field(
        96.0,
        gt=0,
        description="Enclave memory budget in MB of 10^6 bytes (the enclave's own unit).",
    )
    memory_batch_size: int = Field(64, ge=1, description="Batch size of the memory estimate.")
    freeze_batchnorm: bool = Field(
        True, description="Keep the backbone's batch-norm statistics frozen (as Fides)."
    )

    _added_later: ClassVar[tuple[str, ...]] = ("final_step", "max_flops", "max_latency_ms")


OutputAttackName = Literal["switch", "avg", "random_switch", "targeted_flip", "noise"]


class GanConfig(StrictModel):
    """The GAN that trains the attack detector (verifier.gan)."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=2)
    lr_d: float = Field(1e-3, gt=0)
    lr_g: float = Field(1e-3, gt=0)
    noise_dim: int = Field(16, ge=1)
    flip_weight: float = Field(1.0, ge=0, description="Weight of the logit-margin flip loss.")
    fool_weight: float = Field(1.0, ge=0, description="Weight of the fool-the-detector loss.")
    kappa: float = Field(1.0, ge=0, description="Margin (nats) the flip loss asks for.")


class SubstituteConfig(StrictModel):
    """A cheaper model a lazy provider might serve instead of the service student."""

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    kind: Literal["student", "int8"] = Field(
        description="student: a smaller / less-trained net trained here with cross-entropy; "
        "int8: the service student with int8-rounded weights."
    )
    net: NetSpec | None = None
    train: OptimConfig | None = None

    @model_validator(mode="after")
    def _net(self) -> SubstituteConfig:
        if self.kind == "student" and (self.net is None or self.train is None):
            raise ValueError(f"substitute {self.name!r} of kind 'student' needs net and train")
        return self


class NoveltyConfig(StrictModel):
    """The out-of-distribution check (:mod:`verifier.novelty`): an answer whose input is unlike
    the training images is reported ``unverified`` (reason ``out_of_distribution``) instead of
    being judged by the detector."""

    components: int = Field(32, ge=1, description="PCA directions kept (plus the residual).")
    neighbours: int = Field(3, ge=1, description="The score is the distance to the k-th nearest.")
    reference: int = Field(2000, ge=10, description="Training images kept as neighbours.")
    target_rate: float = Field(
        0.005, gt=0, lt=0.5, description="Share of clean inputs called novel (the threshold)."
    )
    confidence: float | None = Field(
        None, gt=0.5, lt=1, description="As detector.fpr_confidence, for target_rate."
    )


class DetectorConfig(StrictModel):
    """Attack detector, re-classifier and their evaluation (``fides evaluate``).

    The test split is cut (seeded) into detector training, calibration and evaluation parts;
    the detector also trains on the validation split. Neither was used to fit the service or
    the verifier's weights.
    """

    train_fraction: float = Field(
        0.4, gt=0, lt=1, description="Share of the test split for detector training."
    )
    calibration_fraction: float = Field(
        0.2, gt=0, lt=1, description="Share of the test split for threshold calibration."
    )
    augment_views: int = Field(
        0,
        ge=0,
        description="Extra randomly augmented copies (the data block's crop / flip) of the "
        "detector's training images: more (p, q) pairs from the same held-out images for the "
        "detector, the GAN and the re-classifier. Calibration and evaluation stay unaugmented.",
    )
    hidden: list[int] = Field(default_factory=lambda: [128, 64], min_length=1)
    reclassifier_hidden: list[int] = Field(default_factory=lambda: [256, 128], min_length=1)
    reclassifier_epochs: int = Field(30, ge=1)
    finetune_epochs: int = Field(
        10, ge=0, description="Detector epochs against the final generator after the GAN."
    )
    train_attacks: list[OutputAttackName] = Field(
        default_factory=lambda: list(get_args(OutputAttackName)),
        min_length=1,
        description="Fixed attacks mixed into the detector's training.",
    )
    noise_sigma: float = Field(1.5, gt=0, description="Std of the noise on log-probabilities.")
    fgsm_epsilons: list[float] = Field(
        default_factory=lambda: [0.04, 0.1], description="FGSM budgets on [0, 1] pixels."
    )
    fgsm_train_epsilon: float | None = Field(
        0.04, gt=0, description="FGSM budget mixed into detector training (None: not used)."
    )
    substitutes: list[SubstituteConfig] = Field(
        default_factory=lambda: [SubstituteConfig(name="int8", kind="int8")]
    )
    target_fpr: float = Field(0.01, gt=0, lt=0.5, description="Clean false-positive target.")
    fpr_confidence: float | Literal["auto"] | None = Field(
        "auto",
        description="auto: 0.95 whenever the calibration scores are enough for it (299 or "
        "more for a 1% target), in expectation otherwise; the report says which and why. "
        "None: the threshold keeps the clean FPR at target_fpr in expectation (split "
        "conformal; one calibration's realised FPR scatters around the target). A "
        "probability such as 0.9: the FPR is at most target_fpr with that probability over "
        "the calibration draw (a stricter threshold; needs enough calibration scores, e.g. "
        "230 or more for 1% at 0.9, or nothing is flagged).",
    )

    @field_validator("fpr_confidence")
    @classmethod
    def _confidence(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float) and not 0.5 < v < 1:
            raise ValueError(f"fpr_confidence must be 'auto', null or in (0.5, 1), got {v}")
        return v

    novelty: NoveltyConfig | None = Field(
        None, description="An out-of-distribution check exported beside the detector."
    )
    window_size: int = Field(100, ge=5, description="Requests per substitution-test window.")
    window_alpha: float = Field(
        0.001,
        gt=0,
        lt=0.5,
        description="Window test level, fixed a priori: the gateway tests its sliding window "
        "of 100 every 10 requests, so 10 tests cover each 100 requests; 1% / 10 keeps the "
        "false alarms per 100 requests <= 1% (union bound), and leaves room for the finite "
        "clean reference (simulated with 2,000 reference scores: 97.7% of references give "
        "<= 0.3% false alarms per window, against 1.3% at level 0.005).",
    )
    windows: int = Field(400, ge=10, description="Windows drawn per condition in evaluation.")
    gan: GanConfig = Field(default_factory=GanConfig)

    _added_later: ClassVar[tuple[str, ...]] = ("fpr_confidence", "novelty")

    @model_validator(mode="after")
    def _fractions(self) -> DetectorConfig:
        if self.train_fraction + self.calibration_fraction >= 0.9:
            raise ValueError("train_fraction + calibration_fraction must leave >= 10% to test")
        return self


class ExportConfig(StrictModel):
    service_name: str
    verifier_name: str
    max_batch_size: int = Field(64, ge=1)
    latency_repeats: int = Field(200, ge=1, description="Single-image runs for the CPU latency.")


class RunSpec(StrictModel):
    """What every run that ends in a verifier and a detector shares: ``fides train`` /
    ``fides evaluate`` (:class:`Experiment`, which also trains the service) and
    ``fides protect`` (which distils from a service it is given)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = 0
    threads: int = Field(
        1, ge=1, description="torch intra-op threads (fixed: results depend on it)."
    )
    data: DataConfig
    verifier: VerifierConfig
    export: ExportConfig
    detector: DetectorConfig = Field(default_factory=DetectorConfig)

    @model_validator(mode="after")
    def _views_need_augmentation(self) -> RunSpec:
        aug = self.data.augment
        if self.detector.augment_views and not (aug.crop_padding or aug.hflip):
            raise ValueError(
                "detector.augment_views needs data.augment (crop_padding or hflip): "
                "without it every view is the same image"
            )
        return self

    def config_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


class Experiment(RunSpec):
    """``fides train`` / ``fides evaluate``: teachers, the service student distilled from
    them, its verifier and detector."""

    teachers: list[TeacherConfig] = Field(min_length=1)
    student: StudentConfig

    @model_validator(mode="after")
    def _prunable_from_the_service(self) -> Experiment:
        """``pretrain: {task: service}`` prunes the service student: say a mismatch now, not
        after the teachers and the student have trained."""
        if self.verifier.pretrain.task != "service":
            return self
        for i, candidate in enumerate(self.verifier.candidates):
            problem = pruning_mismatch(self.student.net, candidate)
            if problem is not None:
                raise ValueError(f"verifier.candidates[{i}]: pretrain task 'service': {problem}")
        return self


def validate_file(
    model: type[_M], raw: object, where: Path | str, what: str, error: type[ValueError]
) -> _M:
    """``raw`` (a parsed YAML document) as ``model``; ``error`` names ``where`` and the key."""
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a mapping at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise error(format_validation_error(exc, where, what)) from exc


def read_yaml(path: Path, error: type[ValueError]) -> object:
    """The YAML document at ``path`` (``yaml.safe_load``); ``error`` when missing or invalid."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{path}: no such file") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from exc


def parse_experiment(raw: object, where: Path | str = "<experiment>") -> Experiment:
    return validate_file(Experiment, raw, where, "experiment", ExperimentError)


def load_run_file(model: type[_R], path: Path, what: str, error: type[ValueError]) -> _R:
    """The YAML file at ``path`` as ``model``; its relative ``data.path`` is read from the
    file's directory."""
    spec = validate_file(model, read_yaml(path, error), path, what, error)
    spec.data.anchor(Path(path).parent)
    return spec


def load_experiment(path: Path) -> Experiment:
    return load_run_file(Experiment, path, "experiment", ExperimentError)

"""Greedy Distillation Transfer Learning (GDTL) for the verification model.

Fides (Kumar et al., arXiv:2304.00083) builds its verifier from a backbone pretrained on
another task, frozen, with a new head, and fine-tunes "the last layers incrementally" with
knowledge distillation from the service model. Its research code has no greedy loop (the
number of unfrozen layers is a manual parameter). Here the loop is real:

1. the backbone is pretrained on a source task (:func:`pretrain_backbone`: rotation
   prediction on the target's images without labels, or another labelled data set, or an
   earlier checkpoint), then frozen; the head is fresh. Or (task ``service``) the backbone
   and head are the service model's own, filter-pruned to the candidate's widths
   (:func:`verifier.nets.prune_filters`): a start built from the service's strongest
   filters, retrained by the same steps;
2. step 0 fine-tunes the head alone with KD from the service model's outputs;
3. each further step unfreezes the next block from the top and fine-tunes; the step is kept
   only if top-1 fidelity (agreement with the service model on a held-out split) rises by
   more than ``threshold``, otherwise its weights are discarded and the loop stops; it also
   stops when the fidelity target is reached, when every block is trainable, or when the
   next step would exceed the enclave memory budget (:func:`verifier.flops.memory_estimate`);
4. optionally (``final_step``), the blocks the loop left trainable are fine-tuned once more
   (e.g. longer, at a lower learning rate); kept only if fidelity rises by more than
   ``threshold``, like a step;
5. candidate sizes are tried smallest-FLOPs first; the first that reaches the target wins.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from fides_core.enclave_errors import ModelTooLarge
from verifier.data import DataError, Dataset, Splits, absent_classes, load_npz
from verifier.experiment import (
    AugmentConfig,
    NetSpec,
    OptimConfig,
    PretrainConfig,
    VerifierConfig,
)
from verifier.export import enclave_latency_ms
from verifier.flops import MB, count_flops, memory_estimate
from verifier.losses import cross_entropy, kd_loss
from verifier.nets import ConvNet, NetConfig, count_parameters, new_net, prune_filters
from verifier.train import CheckpointError, StageError, fit, predict_logits, write_durably

__all__ = [
    "NoVerifierFits",
    "Fidelity",
    "GreedyResult",
    "StepRecord",
    "fidelity",
    "greedy_unfreeze",
    "pretrain_backbone",
    "select_verifier",
]


class NoVerifierFits(ValueError):
    """Every verifier candidate is over the budget (FLOPs, memory or latency); the message
    gives each candidate's reason."""


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fidelity:
    agreement: float  # top-1 agreement with the service model
    mean_kl: float  # mean KL(service || verifier), nats
    accuracy: float  # against the true labels


def fidelity(
    verifier_logits: torch.Tensor, service_logits: torch.Tensor, y: torch.Tensor
) -> Fidelity:
    # logits: [n, C]; y: [n]
    agree = (verifier_logits.argmax(-1) == service_logits.argmax(-1)).float().mean()
    log_p = F.log_softmax(service_logits, -1)
    log_q = F.log_softmax(verifier_logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    acc = (verifier_logits.argmax(-1) == y).float().mean()
    return Fidelity(float(agree), float(kl), float(acc))


@dataclass
class StepRecord:
    candidate: int
    step: int
    unfrozen_blocks: int
    trainable_params: int
    params: int
    flops: int
    memory_mb: float
    fidelity: float
    mean_kl: float
    val_accuracy: float
    wall_s: float
    accepted: bool
    note: str = ""


@dataclass
class GreedyResult:
    net: ConvNet
    path: list[StepRecord]
    stop_reason: str
    fidelity: Fidelity | None  # of the kept weights, on the validation split
    extra: dict[str, object] = field(default_factory=dict)


# ---------------------------------------------------------------- pretraining


def _rotation_dataset(data: Dataset, seed: int) -> Dataset:
    """Each image rotated by a random multiple of 90 degrees; the label is that multiple."""
    if data.x.shape[-1] != data.x.shape[-2]:
        raise ValueError("rotation pretraining needs square images")
    gen = torch.Generator().manual_seed(seed)
    k = torch.randint(0, 4, (len(data),), generator=gen)  # [n]
    x = data.x.clone()  # [n, C, H, W]
    for r in range(1, 4):
        sel = k == r
        x[sel] = torch.rot90(data.x[sel], r, dims=(-2, -1))
    return Dataset(x, k)


def pretrain_backbone(
    spec: NetConfig,
    cfg: PretrainConfig,
    splits: Splits,
    *,
    seed: int,
    stage_dir: Path | None,
    progress: Progress | None = None,
    label: str = "pretrain",
    service: nn.Module | None = None,
) -> tuple[ConvNet, dict[str, object]]:
    """A network of architecture ``spec`` whose blocks are trained on the source task, with a
    fresh head for the target's classes; or, for task ``service``, the ``service`` model
    pruned to ``spec`` (its head kept). Returns the net and a description for the card."""
    if cfg.checkpoint is None and cfg.task == "service":
        if not isinstance(service, ConvNet):
            raise ValueError(
                "pretrain task 'service' prunes the service model, which must be a ConvNet "
                f"(got {type(service).__name__})"
            )
        widths = list(service.cfg.widths)
        # the greedy steps' dropout draws from torch's generator: seeded here, as new_net
        # seeds the other tasks, so a candidate trains the same whichever candidates trained
        # before it (a candidate directory an earlier run left is what this run would compute)
        torch.manual_seed(seed)
        return prune_filters(service, spec), {
            "source": f"the service model {widths} filter-pruned to {list(spec.widths)} "
            "(largest L1 norm per layer), head included"
        }
    net = new_net(spec, splits.train.x, seed=seed)
    if cfg.checkpoint is not None:
        try:
            state = torch.load(cfg.checkpoint, weights_only=True)
        except Exception as exc:  # a missing file, pickle errors, a truncated zip, ...
            raise CheckpointError(
                f"{cfg.checkpoint}: not a readable checkpoint ({type(exc).__name__}: {exc}); "
                "verifier.pretrain.checkpoint takes a state dict saved with torch.save"
            ) from exc
        if isinstance(state, dict):
            state = state.get("model", state)
        if not isinstance(state, dict):
            raise CheckpointError(f"{cfg.checkpoint}: not a state dict ({type(state).__name__})")
        blocks = {k: v for k, v in state.items() if k.startswith("blocks.")}
        missing = [k for k in net.state_dict() if k.startswith("blocks.") and k not in blocks]
        if missing:
            raise ValueError(f"{cfg.checkpoint}: no weights for {missing[:3]}...")
        try:
            net.load_state_dict(blocks, strict=False)
        except RuntimeError as exc:  # another architecture's weights: shapes that differ
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
            raise CheckpointError(
                f"{cfg.checkpoint}: its blocks do not fit the candidate {list(spec.widths)} "
                f"({lines[min(1, len(lines) - 1)]})"
            ) from exc
        info: dict[str, object] = {"source": f"checkpoint:{cfg.checkpoint}"}
    else:
        if cfg.task == "rotation":
            source = _rotation_dataset(splits.train, seed)
            classes = 4
            info = {"source": "rotation prediction on the target's train images (no labels)"}
        else:
            assert cfg.path is not None
            x_tr, y_tr, _, _, _ = load_npz(cfg.path)
            if x_tr.shape[1] != spec.in_channels:
                raise ValueError(
                    f"{cfg.path}: {x_tr.shape[1]} channels, the target has {spec.in_channels}"
                )
            source = Dataset(torch.from_numpy(x_tr), torch.from_numpy(y_tr))
            classes = int(y_tr.max()) + 1
            first, absent = absent_classes(np.unique(y_tr), classes)
            if absent:  # a stray label (2**40) would make a head of that many classes
                more = f" and {absent - len(first)} more" if absent > len(first) else ""
                raise DataError(
                    f"{cfg.path}: y_train has no examples of class(es) {first}{more} "
                    f"(labels run to {classes - 1})"
                )
            info = {"source": f"supervised on {cfg.path.name}"}
        net.new_head(classes)
        seconds = fit(
            net,
            source,
            lambda logits, _x, y: cross_entropy(logits, y),
            cfg.train,
            seed=seed,
            stage_dir=stage_dir,
            progress=progress,
            label=label,
        )
        info["seconds"] = round(seconds, 2)
        info["epochs"] = cfg.train.epochs
    net.new_head(spec.num_classes)
    return net, info


# ---------------------------------------------------------------- the greedy loop


def _set_trainable(net: ConvNet, unfrozen_blocks: int) -> None:
    for p in net.parameters():
        p.requires_grad_(False)
    for p in net.head.parameters():
        p.requires_grad_(True)
    n = len(net.blocks)
    for block in list(net.blocks)[n - unfrozen_blocks :] if unfrozen_blocks else []:
        for p in block.parameters():
            p.requires_grad_(True)


def _frozen_modules(net: ConvNet, unfrozen_blocks: int, freeze_bn: bool) -> list[nn.Module]:
    """Modules kept in eval mode: every frozen block, and the unfrozen blocks' batch norms."""
    n = len(net.blocks)
    frozen: list[nn.Module] = list(net.blocks)[: n - unfrozen_blocks]
    if freeze_bn:
        for block in list(net.blocks)[n - unfrozen_blocks :]:
            frozen += [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    return frozen


def _step_row(
    net: nn.Module, candidate: int, step: int, unfrozen: int, flops: int, memory_mb: float
) -> dict[str, Any]:
    """The fields of a :class:`StepRecord` known before the step trains."""
    return dict(
        candidate=candidate,
        step=step,
        unfrozen_blocks=unfrozen,
        trainable_params=count_parameters(net, trainable_only=True),
        params=count_parameters(net),
        flops=flops,
        memory_mb=round(memory_mb, 3),
    )


def _record(
    row: dict[str, Any], fid: Fidelity, wall: float, accepted: bool, note: str
) -> StepRecord:
    return StepRecord(
        **row,
        fidelity=round(fid.agreement, 5),
        mean_kl=round(fid.mean_kl, 5),
        val_accuracy=round(fid.accuracy, 5),
        wall_s=round(wall, 2),
        accepted=accepted,
        note=note,
    )


@dataclass(frozen=True)
class _Candidate:
    """What every step of one candidate's greedy loop shares."""

    service: nn.Module
    train: Dataset
    val: Dataset
    service_val: torch.Tensor  # [n_val, C] the service's logits on the validation split
    cfg: VerifierConfig
    seed: int
    image_shape: tuple[int, int, int]
    flops: int
    augment_cfg: AugmentConfig | None
    run_dir: Path | None
    progress: Progress | None
    candidate: int

    def kd_loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kd = self.cfg.kd
        with torch.no_grad():
            teacher = self.service(x)  # [b, C]
        return kd_loss(logits, teacher, y, kd.temperature, kd.alpha, kd.beta)

    def start(self, net: ConvNet, step: int, unfrozen: int) -> tuple[dict[str, Any], int]:
        """Make ``unfrozen`` blocks trainable; the step's known fields and the bytes it needs
        to fine-tune."""
        _set_trainable(net, unfrozen)
        mem = memory_estimate(net, self.image_shape, self.cfg.memory_batch_size, training=True)
        row = _step_row(net, self.candidate, step, unfrozen, self.flops, mem.total_mb)
        return row, mem.total_bytes

    def fine_tune(
        self, net: ConvNet, step: int, unfrozen: int, optim: OptimConfig, stage: str, label: str
    ) -> tuple[Fidelity, float]:
        """Fine-tune what is trainable (from the checkpoint when this stage finished in an
        earlier run); its validation fidelity and wall seconds."""
        seconds = fit(
            net,
            self.train,
            self.kd_loss,
            optim,
            seed=self.seed + 1000 * self.candidate + step,
            augment_cfg=self.augment_cfg,
            stage_dir=self.run_dir / stage if self.run_dir is not None else None,
            progress=self.progress,
            label=label,
            frozen_modules=_frozen_modules(net, unfrozen, self.cfg.freeze_batchnorm),
        )
        t0 = time.perf_counter()
        fid = fidelity(predict_logits(net, self.val.x), self.service_val, self.val.y)
        return fid, seconds + time.perf_counter() - t0


@dataclass(frozen=True)
class _Stopped:
    """Where the greedy loop stopped: the steps taken, the kept weights and their fidelity."""

    path: list[StepRecord]
    best: Fidelity | None
    best_state: dict[str, torch.Tensor] | None
    unfrozen: int
    stop: str


def _greedy_steps(c: _Candidate, net: ConvNet) -> _Stopped:
    """Steps 0, 1, ...: unfreeze one more block from the top and fine-tune, while the step
    fits the memory budget, raises fidelity by more than the threshold, and the target is not
    reached. A rejected step's weights are discarded."""
    cfg = c.cfg
    path: list[StepRecord] = []
    best: Fidelity | None = None
    best_state: dict[str, torch.Tensor] | None = None
    unfrozen = 0
    stop = "every block is trainable"
    for step in range(len(net.blocks) + 1):
        unfrozen = step
        row, needed = c.start(net, step, unfrozen)
        if needed > cfg.memory_budget_mb * MB:
            nan = Fidelity(float("nan"), float("nan"), float("nan"))
            note = f"exceeds the memory budget ({cfg.memory_budget_mb} MB)"
            path.append(_record(row, nan, 0.0, False, note))
            stop = "memory budget"
            unfrozen = step - 1
            break
        label = f"verifier {c.candidate} step {step}"
        fid, wall = c.fine_tune(net, step, unfrozen, cfg.step, f"step_{step}", label)
        gain = fid.agreement - best.agreement if best is not None else float("inf")
        accepted = gain > cfg.threshold
        path.append(
            _record(row, fid, wall, accepted, "head only" if step == 0 else f"gain {gain:+.4f}")
        )
        log.info(
            "%s: %d block(s) unfrozen, fidelity %.2f%% (KL %.4f), %s",
            label,
            unfrozen,
            100 * fid.agreement,
            fid.mean_kl,
            "kept" if accepted else "discarded",
        )
        if not accepted:
            assert best_state is not None
            net.load_state_dict(best_state)
            unfrozen = step - 1
            stop = f"gain {gain:+.4f} not above the threshold {cfg.threshold}"
            break
        best, best_state = fid, copy.deepcopy(net.state_dict())
        if fid.agreement >= cfg.fidelity_target:
            stop = f"fidelity target {cfg.fidelity_target} reached"
            break
    return _Stopped(path, best, best_state, max(unfrozen, 0), stop)


def _final_step(c: _Candidate, net: ConvNet, loop: _Stopped) -> tuple[Fidelity | None, str]:
    """One more fine-tune of what the loop left trainable (e.g. longer, at a lower lr), judged
    by the same rule as every step. Returns the kept fidelity and the stop reason."""
    final = c.cfg.final_step
    if final is None or loop.best is None or loop.best_state is None:
        return loop.best, loop.stop
    step = loop.path[-1].step + 1
    row, _ = c.start(net, step, loop.unfrozen)
    label = f"verifier {c.candidate} final step"
    fid, wall = c.fine_tune(net, step, loop.unfrozen, final, "final", label)
    gain = fid.agreement - loop.best.agreement
    accepted = gain > c.cfg.threshold
    note = f"final step ({final.epochs} epochs, lr {final.lr:g}): gain {gain:+.4f}"
    loop.path.append(_record(row, fid, wall, accepted, note))
    log.info(
        "%s: fidelity %.2f%% (KL %.4f), %s",
        label,
        100 * fid.agreement,
        fid.mean_kl,
        "kept" if accepted else "discarded",
    )
    if accepted:
        return fid, loop.stop + f"; final step kept (gain {gain:+.4f})"
    net.load_state_dict(loop.best_state)
    return loop.best, loop.stop + f"; final step discarded (gain {gain:+.4f})"


def greedy_unfreeze(
    net: ConvNet,
    service: nn.Module,
    train: Dataset,
    val: Dataset,
    cfg: VerifierConfig,
    *,
    seed: int,
    image_shape: tuple[int, int, int],
    augment_cfg: AugmentConfig | None = None,
    run_dir: Path | None = None,
    progress: Progress | None = None,
    candidate: int = 0,
) -> GreedyResult:
    """Run the greedy unfreezing loop on ``net`` (backbone pretrained, head fresh; or both
    pruned from the service), then the optional final step."""
    service.eval()
    c = _Candidate(
        service=service,
        train=train,
        val=val,
        service_val=predict_logits(service, val.x),
        cfg=cfg,
        seed=seed,
        image_shape=image_shape,
        flops=count_flops(net, image_shape),
        augment_cfg=augment_cfg,
        run_dir=run_dir,
        progress=progress,
        candidate=candidate,
    )
    loop = _greedy_steps(c, net)
    best, stop = _final_step(c, net, loop)
    _set_trainable(net, loop.unfrozen)
    net.eval()
    return GreedyResult(net, loop.path, stop, best, {"unfrozen_blocks": loop.unfrozen})


def _candidate_configs(specs: list[NetSpec], base: NetConfig) -> list[NetConfig]:
    """Each candidate's architecture, with the data-dependent fields of ``base``."""
    return [base.with_layout(s) for s in specs]


def _train_candidate(
    i: int,
    spec: NetSpec,
    net_cfg: NetConfig,
    service: nn.Module,
    splits: Splits,
    cfg: VerifierConfig,
    *,
    seed: int,
    augment_cfg: AugmentConfig | None,
    run_dir: Path | None,
    progress: Progress | None,
) -> GreedyResult:
    """Pretrain candidate ``i``'s backbone, then its greedy loop, in its own directory."""
    cand_dir = _checked_candidate_dir(run_dir, i, spec) if run_dir is not None else None
    net, pre = pretrain_backbone(
        net_cfg,
        cfg.pretrain,
        splits,
        seed=seed + 100 + i,
        stage_dir=cand_dir / "pretrain" if cand_dir is not None else None,
        progress=progress,
        label=f"verifier {i} pretrain",
        service=service,
    )
    log.info("verifier %d %s: backbone pretrained (%s)", i, list(net_cfg.widths), pre["source"])
    result = greedy_unfreeze(
        net,
        service,
        splits.train,
        splits.val,
        cfg,
        seed=seed + 200,
        image_shape=splits.image_shape,
        augment_cfg=augment_cfg,
        run_dir=cand_dir,
        progress=progress,
        candidate=i,
    )
    result.extra["pretrain"] = pre
    result.extra["candidate"] = i
    return result


def _candidate_dir(run_dir: Path, i: int, spec: NetSpec) -> Path:
    """Candidate ``i``'s directory, named by its spec."""
    key = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()[:8]
    return run_dir / f"candidate_{i}-{key}"


CANDIDATE_RECORD = "candidate.json"  # the spec a candidate directory was made for


def _checked_candidate_dir(run_dir: Path, i: int, spec: NetSpec) -> Path:
    """Candidate ``i``'s directory, after checking that no other directory of candidate ``i``
    holds an unfinished step: a spec changed while the candidate was interrupted is refused
    (as a stage's config is), not started over silently beside the dropped work. The
    directory records its spec, for the message."""
    here = _candidate_dir(run_dir, i, spec)
    now = spec.model_dump(mode="json")
    for other in sorted(run_dir.glob(f"candidate_{i}-*")):
        unfinished = [
            last for last in other.rglob("last.pt") if not (last.parent / "done.pt").is_file()
        ]
        if other == here or not unfinished:
            continue
        try:
            before = json.loads((other / CANDIDATE_RECORD).read_text(encoding="utf-8"))
            changed = "; ".join(
                f"{k}: {before.get(k, '(unset)')!r} -> {now.get(k, '(unset)')!r}"
                for k in sorted(set(before) | set(now))
                if before.get(k, "(unset)") != now.get(k, "(unset)")
            )
        except (OSError, ValueError, AttributeError):
            changed = "its spec was not recorded"
        raise StageError(
            f"verifier candidate {i} was interrupted in {other}, as another spec ({changed}): "
            f"restore it to resume, or delete {other} to start the candidate over as this one"
        )
    here.mkdir(parents=True, exist_ok=True)
    if not (here / CANDIDATE_RECORD).is_file():
        write_durably(
            here / CANDIDATE_RECORD, (json.dumps(now, indent=2) + "\n").encode(), "stage manifest"
        )
    return here


LATENCY_MEASURE = "enclave_verify_batch1"  # what a latency record holds (see below)


def _recorded_latency_ms(
    probe: ConvNet,
    image_shape: tuple[int, int, int],
    record: Path | None,
    memory_budget_mb: float,
) -> float:
    """The candidate's single-image latency in the simulated enclave
    (:func:`verifier.export.enclave_latency_ms`), measured once per stage directory: a
    timing decides whether the candidate is trained, and a resumed run (another sitting,
    another load on the machine) must decide as the first did: a record made by an earlier
    version (a bare onnxruntime session) is kept too, and said so."""
    if record is not None and record.is_file():
        try:
            saved = json.loads(record.read_text(encoding="utf-8"))
            if saved.get("measure") != LATENCY_MEASURE:
                log.info(
                    "%s was measured on a bare onnxruntime session by an earlier version: "
                    "kept, so the resumed run decides as it did",
                    record,
                )
            return float(saved["ms"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            log.warning("%s is unreadable: the latency is measured again", record)
    latency = enclave_latency_ms(probe, image_shape, memory_budget_mb=memory_budget_mb)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        write_durably(
            record,
            (json.dumps({"ms": latency, "measure": LATENCY_MEASURE}) + "\n").encode(),
            "latency record",
        )
    return latency


def _over_budget(
    probe: ConvNet,
    flops: int,
    service_flops: int | None,
    cfg: VerifierConfig,
    image_shape: tuple[int, int, int],
    row: dict[str, object],
    latency_record: Path | None = None,
) -> str | None:
    """Why a candidate does not fit the verifier budget (None when it fits); a measured
    latency goes into ``row`` (and ``latency_record``, read back by a resumed run)."""
    if service_flops is not None and flops > cfg.max_flops_ratio * service_flops:
        return f"above {cfg.max_flops_ratio:.0%} of the service FLOPs"
    if cfg.max_flops is not None and flops > cfg.max_flops:
        return f"above max_flops {cfg.max_flops:,}"
    inference = memory_estimate(probe, image_shape, cfg.memory_batch_size, training=False)
    if inference.total_bytes > cfg.memory_budget_mb * MB:
        return "does not fit the memory budget"
    if cfg.max_latency_ms is not None:
        try:
            latency = _recorded_latency_ms(probe, image_shape, latency_record, cfg.memory_budget_mb)
        except ModelTooLarge as exc:
            return f"does not boot in the simulated enclave: {exc}"
        row["enclave_latency_ms_batch1"] = latency
        if latency > cfg.max_latency_ms:
            return (
                f"{latency:.3f} ms per image in the simulated enclave, above max_latency_ms "
                f"{cfg.max_latency_ms:g}"
            )
    return None


def select_verifier(
    specs: list[NetSpec],
    base: NetConfig,
    service: nn.Module,
    splits: Splits,
    cfg: VerifierConfig,
    *,
    seed: int,
    service_flops: int | None,
    augment_cfg: AugmentConfig | None = None,
    run_dir: Path | None = None,
    progress: Progress | None = None,
) -> tuple[GreedyResult, list[dict[str, object]]]:
    """Try candidate sizes smallest-FLOPs first; the first reaching the fidelity target wins,
    else the one with the best fidelity. Returns it and one summary row per candidate.

    ``service_flops``: the service's FLOPs per image (``max_flops_ratio`` is a share of it);
    None for a service whose cost is unknown (a black box): then only ``max_flops``, the
    memory budget and ``max_latency_ms`` bound the candidates.
    """
    image_shape = splits.image_shape
    configs = _candidate_configs(specs, base)
    order = sorted(range(len(configs)), key=lambda i: count_flops(ConvNet(configs[i]), image_shape))
    summary: list[dict[str, object]] = []
    search_path: list[StepRecord] = []  # every candidate's steps, in the order tried
    chosen: GreedyResult | None = None
    for i in order:
        net_cfg = configs[i]
        probe = ConvNet(net_cfg)
        flops = count_flops(probe, image_shape)
        row: dict[str, object] = {
            "candidate": i,
            "widths": list(net_cfg.widths),
            "flops": flops,
            "flops_ratio_to_service": round(flops / service_flops, 4) if service_flops else None,
            "params": count_parameters(probe),
        }
        record = _candidate_dir(run_dir, i, specs[i]) / "latency.json" if run_dir else None
        skipped = _over_budget(probe, flops, service_flops, cfg, image_shape, row, record)
        if skipped is not None:
            row["outcome"] = f"skipped: {skipped}"
        else:
            result = _train_candidate(
                i,
                specs[i],
                net_cfg,
                service,
                splits,
                cfg,
                seed=seed,
                augment_cfg=augment_cfg,
                run_dir=run_dir,
                progress=progress,
            )
            search_path += result.path
            fid = result.fidelity.agreement if result.fidelity else float("nan")
            row.update(outcome=result.stop_reason, fidelity=fid)
            if chosen is None or (
                result.fidelity is not None
                and (chosen.fidelity is None or fid > chosen.fidelity.agreement)
            ):
                chosen = result
            if result.fidelity is not None and fid >= cfg.fidelity_target:
                chosen = result
                summary.append(row)
                break
        summary.append(row)
    if chosen is None:
        reasons = "; ".join(f"{r['widths']}: {r.get('outcome', 'not tried')}" for r in summary)
        raise NoVerifierFits(f"no verifier candidate fits the budget ({reasons})")
    chosen.extra["search_path"] = search_path
    return chosen, summary


def path_table(path: list[StepRecord]) -> str:
    """The path taken, as a Markdown table."""
    head = (
        "| cand | step | unfrozen | trainable params | FLOPs | memory MB | fidelity | KL "
        "| val acc | wall s | kept | note |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = [
        f"| {r.candidate} | {r.step} | {r.unfrozen_blocks} | {r.trainable_params:,} | "
        f"{r.flops:,} | {r.memory_mb:.2f} | {r.fidelity:.4f} | {r.mean_kl:.4f} | "
        f"{r.val_accuracy:.4f} | {r.wall_s:.1f} | {'yes' if r.accepted else 'no'} | {r.note} |"
        for r in path
    ]
    return "\n".join([head, *rows])


def path_rows(path: list[StepRecord]) -> list[dict[str, object]]:
    return [asdict(r) for r in path]

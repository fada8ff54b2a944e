"""The training loop shared by every stage: seeded, resumable, with a progress bar on a
terminal and one log line per epoch (:func:`verifier.logs.log_epoch`).

One stage = one network trained for a number of epochs. A stage writes
``<dir>/last.pt`` (model, optimizer, schedule, random-number states) after every epoch and
``<dir>/done.pt`` when finished, so re-running an interrupted experiment resumes where it
stopped and a finished stage is loaded rather than retrained.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import Progress
from torch import nn

from verifier.data import Dataset, augment
from verifier.experiment import AugmentConfig, OptimConfig
from verifier.logs import log_epoch

__all__ = [
    "CheckpointError",
    "LossFn",
    "StageError",
    "fit",
    "predict_logits",
    "set_determinism",
    "stage_throughput",
]

# (logits of the net being trained [b, C], augmented inputs [b, C, H, W], labels [b]) -> loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

log = logging.getLogger(__name__)


def set_determinism(seed: int, threads: int) -> None:
    """Same seed, same thread count, same CPU -> the same weights, bit for bit."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def predict_logits(net: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        out = torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    net.train(was_training)
    return out  # [n, C]


class CheckpointError(RuntimeError):
    """A stage checkpoint could not be written, or one on disk cannot be used; the message
    names the file and what to do."""


class StageError(ValueError):
    """A stage directory does not belong to this run's config or data; the message names the
    directory, what changed and what to do."""


def write_durably(path: Path, data: bytes | memoryview, what: str = "checkpoint") -> None:
    """Write ``data`` to ``path`` atomically and durably: into a temporary file, flushed to
    disk, renamed over ``path``, then the directory flushed too (so the rename itself
    survives a power cut). A crash or a full disk mid-write leaves the previous file as it
    was; a failure is a :class:`CheckpointError` that says so."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before the rename, not only in the page cache
        tmp.replace(path)  # never a half-written file
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        kept = f"{path} is as it was before" if path.exists() else f"no earlier {what}"
        raise CheckpointError(
            f"could not write the {what} {path} ({exc.strerror or exc}); {kept}: free the "
            "space and run again to resume from it"
        ) from exc
    try:  # the new file is in place: a directory that cannot be synced is only logged
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)  # the directory entry too, so the rename survives a power cut
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("%s written, but its directory could not be synced: %s", path, exc)


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` with :func:`write_durably`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialised first: torch's own file writer reports a full disk
    write_durably(path, buffer.getbuffer())  # as a RuntimeError, Python's file writes as ENOSPC


def _load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError, ...
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc}); delete it to "
            "train this stage from its start"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a stage checkpoint (no model state)")
    return state


def _load_into(path: Path, what: str, load: Callable[[Any], Any], state: Any) -> None:
    try:
        load(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        # load_state_dict's message is a header line, then one line per problem
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        more = f", and {len(lines) - 2} more" if len(lines) > 2 else ""
        raise CheckpointError(
            f"{path}: its {what} does not fit this stage ({detail}{more}); it was written for "
            "another network or optimizer: delete it to train this stage from its start"
        ) from exc


@dataclass(frozen=True)
class _Resumed:
    done: bool  # the stage finished in an earlier run: ``net`` holds its final weights
    epoch: int  # epochs already trained
    seconds: float  # training seconds so far
    cpu_seconds: float = 0.0  # CPU seconds of this process's threads over those epochs
    samples: int = 0  # training images processed so far


def _resume(
    stage_dir: Path,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator,
    lookahead: _Lookahead | None = None,
) -> _Resumed:
    """Load ``stage_dir``'s checkpoint, if any, into the net (and, from an unfinished stage,
    the optimizer, the schedule and the random-number states)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    done, last = stage_dir / "done.pt", stage_dir / "last.pt"
    if done.is_file():
        state = _load(done)
        _load_into(done, "model", net.load_state_dict, state["model"])
        if "torch_rng" in state:  # what an uninterrupted run leaves for the stages after it
            _load_into(done, "random-number state", torch.set_rng_state, state["torch_rng"])
        last.unlink(missing_ok=True)  # left by a kill between writing done.pt and this
        net.eval()
        return _Resumed(True, 0, float(state.get("seconds", 0.0)))
    if not last.is_file():
        return _Resumed(False, 0, 0.0)
    state = _load(last)
    missing = {"optimizer", "scheduler", "generator", "torch_rng", "epoch"} - set(state)
    if missing:
        raise CheckpointError(f"{last}: an incomplete checkpoint (no {', '.join(sorted(missing))})")
    _load_into(last, "model", net.load_state_dict, state["model"])
    _load_into(last, "optimizer state", opt.load_state_dict, state["optimizer"])
    _load_into(last, "schedule", sched.load_state_dict, state["scheduler"])
    _load_into(last, "data-order generator", gen.set_state, state["generator"])
    _load_into(last, "random-number state", torch.set_rng_state, state["torch_rng"])
    if lookahead is not None:
        if "lookahead" not in state:
            raise CheckpointError(f"{last}: an incomplete checkpoint (no lookahead weights)")
        _load_into(last, "lookahead weights", lookahead.load, state["lookahead"])
    return _Resumed(
        False,
        int(state["epoch"]),
        float(state["seconds"]),
        float(state.get("cpu_seconds", 0.0)),
        int(state.get("samples", 0)),
    )


def stage_throughput(stage_dir: Path) -> dict[str, float]:
    """Training wall and CPU seconds and images per second of the finished stages under
    ``stage_dir`` (one stage, or a tree of them such as a GDTL search), from their
    ``done.pt``; checkpoints written before CPU time was recorded count wall time only."""
    wall = cpu = samples = 0.0
    for done in sorted(stage_dir.rglob("done.pt")):
        state = _load(done)
        wall += float(state.get("seconds", 0.0))
        cpu += float(state.get("cpu_seconds", 0.0))
        samples += float(state.get("samples", 0))
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1),
        "images": int(samples),
        "images_per_s": round(samples / wall, 1) if wall > 0 else 0.0,
    }


def _optimizer(params: list[nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over ``params``; with ``decay_norms`` off, the one-dimensional
    parameters (batch-norm scales and shifts, biases) form a second group without decay."""
    groups: list[dict[str, Any]] = [{"params": params}]
    if not optim.decay_norms:
        groups = [
            group
            for group in (
                {"params": [p for p in params if p.ndim > 1]},
                {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
            )
            if group["params"]
        ]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(
            groups,
            lr=optim.lr,
            momentum=optim.momentum,
            nesterov=True,
            weight_decay=optim.weight_decay,
        )
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


class _Lookahead:
    """Lookahead as airbench schedules it: every ``every`` steps the trainable weights move to
    ``slow = decay * slow + (1 - decay) * fast`` (and start again from there), ``decay``
    rising as ``0.95^5 * progress^3``; at the end the weights are the slow ones (Zhang, Lucas,
    Hinton and Ba, "Lookahead Optimizer: k steps forward, 1 step back", NeurIPS 2019)."""

    def __init__(self, params: list[nn.Parameter], total_steps: int, every: int = 5) -> None:
        self.params, self.total, self.every = params, max(1, total_steps), every
        self.slow = [p.detach().clone() for p in params]

    def step(self, done_steps: int) -> None:
        if done_steps % self.every:
            return
        decay = 0.95**5 * (done_steps / self.total) ** 3
        with torch.no_grad():
            for slow, p in zip(self.slow, self.params, strict=True):
                slow.lerp_(p.detach(), 1.0 - decay)
                p.copy_(slow)

    def finish(self) -> None:
        with torch.no_grad():
            for slow, p in zip(self.slow, self.params, strict=True):
                p.copy_(slow)

    def load(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.slow) or any(
            a.shape != b.shape for a, b in zip(state, self.slow, strict=True)
        ):
            raise ValueError("the lookahead weights do not match the trainable parameters")
        self.slow = [t.clone() for t in state]


def fit(
    net: nn.Module,
    data: Dataset,
    loss_fn: LossFn,
    optim: OptimConfig,
    *,
    seed: int,
    augment_cfg: AugmentConfig | None = None,
    stage_dir: Path | None = None,
    progress: Progress | None = None,
    label: str = "train",
    frozen_modules: Iterable[nn.Module] = (),
) -> float:
    """Train the parameters of ``net`` that require grad; returns the training seconds.

    AdamW (or SGD with Nesterov momentum) under a one-cycle learning-rate schedule; with
    ``optim.precision == "bf16"`` the forward and backward passes run under bfloat16 autocast
    on channels-last tensors and the loss is computed in float32. ``frozen_modules`` stay in
    eval mode (their batch-norm statistics do not move). ``optim.lookahead`` averages the
    weights as :class:`_Lookahead` says. With ``stage_dir`` the stage checkpoints and resumes.
    """
    frozen = list(frozen_modules)
    aug = augment_cfg or AugmentConfig()
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{label}: nothing to train (every parameter is frozen)")
    opt = _optimizer(params, optim)
    n = len(data)
    steps = (n + optim.batch_size - 1) // optim.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=optim.lr,
        total_steps=optim.epochs * steps,
        pct_start=optim.warmup,
        anneal_strategy=optim.anneal,
        cycle_momentum=optim.optimizer == "adamw",  # SGD keeps its Nesterov momentum fixed
    )
    lookahead = _Lookahead(params, optim.epochs * steps) if optim.lookahead else None
    bf16 = optim.precision == "bf16"
    if bf16:
        net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    gen = torch.Generator().manual_seed(seed)
    start_epoch, elapsed, cpu, samples = 0, 0.0, 0.0, 0
    if stage_dir is not None:
        resumed = _resume(stage_dir, net, opt, sched, gen, lookahead)
        if resumed.done:
            log.info("%s: loaded from %s (finished in an earlier run)", label, stage_dir)
            if bf16:  # as a net trained in this run leaves: float32 kernels see one layout
                net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
            return resumed.seconds
        if resumed.epoch:
            log.info("%s: resuming after epoch %d/%d", label, resumed.epoch, optim.epochs)
        start_epoch, elapsed = resumed.epoch, resumed.seconds
        cpu, samples = resumed.cpu_seconds, resumed.samples
    task = (
        progress.add_task(label, total=optim.epochs * steps, completed=start_epoch * steps)
        if progress is not None
        else None
    )
    for epoch in range(start_epoch, optim.epochs):
        t0, c0 = time.perf_counter(), time.process_time()
        net.train()
        for m in frozen:
            m.eval()
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for i in range(0, n, optim.batch_size):
            idx = order[i : i + optim.batch_size]
            x = augment(data.x[idx], gen, aug.crop_padding, aug.hflip)  # [b, C, H, W]
            if len(idx) == 1:  # batch norm cannot train on a single sample
                continue
            if bf16:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                # the loss sees float32 logits; a teacher it runs on x runs under autocast too
                loss = loss_fn(net(x).float(), x, data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            if lookahead is not None:
                lookahead.step(sched.last_epoch)  # the steps taken so far, resumes included
            total, seen = total + loss.item() * len(idx), seen + len(idx)
            if progress is not None and task is not None:
                progress.update(task, advance=1, description=f"{label} loss {loss.item():.3f}")
        elapsed += time.perf_counter() - t0
        cpu += time.process_time() - c0
        samples += seen
        detail = f"loss {total / max(seen, 1):.4f}"
        log_epoch(log, label, epoch + 1, optim.epochs, detail, elapsed, progress)
        if stage_dir is not None:
            _save(
                stage_dir / "last.pt",
                {
                    "model": net.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "epoch": epoch + 1,
                    "seconds": elapsed,
                    "cpu_seconds": cpu,
                    "samples": samples,
                    **({"lookahead": lookahead.slow} if lookahead is not None else {}),
                },
            )
    if lookahead is not None:
        lookahead.finish()
    net.eval()
    if bf16:
        net.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if stage_dir is not None:
        _save(
            stage_dir / "done.pt",
            {
                "model": net.state_dict(),
                "seconds": elapsed,
                "cpu_seconds": cpu,
                "samples": samples,
                # the global generator as this stage leaves it (dropout, the next stage's new
                # head and pruning draw from it): a run that loads this stage instead of
                # training it goes on from the same state, so what follows is bit for bit
                # what an uninterrupted run computes
                "torch_rng": torch.get_rng_state(),
            },
        )
        (stage_dir / "last.pt").unlink(missing_ok=True)
    if progress is not None and task is not None:
        progress.remove_task(task)
    return elapsed

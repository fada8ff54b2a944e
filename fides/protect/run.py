"""``fides protect``: the integrity kit for a classifier the user already has.

1. Open the service (a repository model, or a remote OIP endpoint queried as a black box) and
   the user's images; check they fit each other.
2. Ask the service about the training images and ``views`` augmented copies of each, the
   validation and the test images (every answer recorded once, :mod:`fides.protect.query`).
3. Distil the verifier from the recorded answers with GDTL (:func:`verifier.gdtl.
   select_verifier`) inside the absolute budget (FLOPs, enclave memory, measured latency).
4. Train, calibrate and evaluate the detector and re-classifier as ``fides evaluate`` does
   (:func:`verifier.evaluate.evaluate_models`), the service's answers again from the store.
5. Write the verifier, detector, re-classifier and the service's ``integrity:`` block into
   the repository (for a remote service, an ``upstream`` entry that fronts it) and a report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fides.protect.config import AnswerKind, ProtectConfig, ProtectConfigError
from fides.protect.distill import (
    AnswerTable,
    Pool,
    QueriedPairs,
    as_dataset,
    load_inputs,
    split_pool,
    views_of,
)
from fides.protect.query import AnswerError, Querier, answer_kind, as_probabilities
from fides.protect.service import Service, ServiceError, open_service
from fides.protect.store import AnswerStore
from verifier.cards import model_card
from verifier.data import Splits
from verifier.evaluate import evaluate_models
from verifier.export import write_entry
from verifier.flops import count_flops, memory_estimate
from verifier.gdtl import fidelity, select_verifier
from verifier.logs import progress_bar
from verifier.nets import ConvNet, count_parameters
from verifier.pipeline import net_config, stage_key
from verifier.train import predict_logits, set_determinism

__all__ = ["ProtectResult", "protect"]

log = logging.getLogger(__name__)

LOWER_FIDELITY = {
    "top_k": "the service answers only its top-k scores: the verifier is distilled from less "
    "than the full distribution, and fidelity is lower than with probability vectors",
    "label": "the service answers labels only: the verifier learns the decision, not the "
    "confidence, and fidelity and detection of confidence-changing attacks are lower",
    "logits": "the service answers logits; they are soft-maxed to distil from, and the "
    "fronting gateway's detector sees soft-maxed answers only if the service is served so",
}


@dataclass(frozen=True)
class ProtectResult:
    report: dict[str, Any]
    repository: Path


@dataclass(frozen=True)
class _Answered:
    """Every image the distillation uses, with the service's probability rows."""

    kind: AnswerKind
    k: int
    num_classes: int
    x_distil: np.ndarray  # train images, then their views
    p_distil: np.ndarray
    p_val: np.ndarray
    p_test: np.ndarray

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.p_distil, self.p_val, self.p_test):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def _ask_everything(
    cfg: ProtectConfig, pool: Pool, querier: Querier, service: Service
) -> _Answered:
    """Originals first (the most useful answers when the budget runs out), then val and
    test, then the views."""
    raw_train = querier.answers(pool.train, "training images")
    kind, k = answer_kind(raw_train, cfg.service.answers, service.identity)
    if kind == "label":
        num_classes = cfg.service.num_classes or (
            raw_train.shape[1] if raw_train.ndim == 2 and raw_train.shape[1] > 1 else 0
        )
        if num_classes < 2:
            raise AnswerError(f"{service.identity} answers class indices: set service.num_classes")
    else:
        num_classes = int(raw_train.shape[1])
    if kind != "probabilities":
        log.warning("%s", LOWER_FIDELITY[kind])
    raw_val = querier.answers(pool.val, "validation images")
    raw_test = querier.answers(pool.test, "test images")
    views = views_of(pool.train, cfg)
    raw_views = querier.answers(views, "augmented views") if len(views) else raw_train[:0]

    def probs(raw: np.ndarray) -> np.ndarray:
        return as_probabilities(raw, kind, num_classes)

    return _Answered(
        kind,
        k,
        num_classes,
        np.concatenate([pool.train, views]),
        np.concatenate([probs(raw_train), probs(raw_views)]),
        probs(raw_val),
        probs(raw_test),
    )


def _spot_check(cfg: ProtectConfig, pool: Pool, ans: _Answered) -> dict[str, Any]:
    """With labels: the service's accuracy while it was distilled from (threat model: a
    service that answers implausibly now poisons the verifier)."""
    if pool.y_train is None:
        return {"labelled": False}
    n = len(pool.y_train)
    acc = float((ans.p_distil[:n].argmax(1) == pool.y_train).mean())
    if acc < cfg.query.min_service_accuracy:
        log.warning(
            "the service's accuracy on the labelled training images is %.1f%%, below "
            "query.min_service_accuracy %.0f%%: if it is not this bad in normal operation, it "
            "may be tampering while being distilled from, and the verifier learns the tampering",
            100 * acc,
            100 * cfg.query.min_service_accuracy,
        )
    return {
        "labelled": True,
        "train_accuracy": round(acc, 5),
        "warned": acc < cfg.query.min_service_accuracy,
    }


def _splits(
    cfg: ProtectConfig, pool: Pool, ans: _Answered, classes: list[str], source: str
) -> Splits:
    """The distillation splits: labels are the service's own top-1 (test: the user's labels
    where given, for the accuracy figures only)."""
    x = torch.from_numpy(pool.train)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    y_test = pool.y_test if pool.y_test is not None else ans.p_test.argmax(1)
    return Splits(
        train=as_dataset(ans.x_distil, ans.p_distil.argmax(1)),
        val=as_dataset(pool.val, ans.p_val.argmax(1)),
        test=as_dataset(pool.test, y_test),
        num_classes=ans.num_classes,
        classes=classes,
        mean=[round(float(m), 6) for m in mean],
        std=[round(float(s), 6) for s in std],
        source=source,
    )


def _distil(
    cfg: ProtectConfig, splits: Splits, ans: _Answered, pool: Pool, run_dir: Path, show: bool
) -> tuple[ConvNet, dict[str, Any]]:
    """GDTL from the recorded answers; the stage directory is keyed by the answers and the
    config, so a rerun with both unchanged resumes (or reuses) it."""
    table = AnswerTable(
        np.concatenate([ans.x_distil, pool.val, pool.test]),
        np.concatenate([ans.p_distil, ans.p_val, ans.p_test]),
    )
    base = net_config(cfg.verifier.candidates[0], splits)
    key = stage_key(
        ans.digest(),
        cfg.verifier.model_dump(mode="json", exclude={"candidates"}),
        cfg.seed,
        cfg.threads,
    )
    t0 = time.perf_counter()
    with progress_bar(show) as bar:
        result, candidates = select_verifier(
            cfg.verifier.candidates,
            base,
            table,
            splits,
            cfg.verifier,
            seed=cfg.seed,
            service_flops=None,
            augment_cfg=None,  # the views are in the training set, answered by the service
            run_dir=run_dir / f"verifier-{key}",
            progress=bar,
        )
    net, shape = result.net, splits.image_shape
    test_logits = predict_logits(net, splits.test.x)
    test_fid = fidelity(test_logits, table(splits.test.x), splits.test.y)
    mem = memory_estimate(net, shape, cfg.verifier.memory_batch_size, training=False)
    info = {
        "widths": list(net.cfg.widths),
        "params": count_parameters(net),
        "flops": count_flops(net, shape),
        "max_flops": cfg.verifier.max_flops,
        "inference_memory_mb": round(mem.total_mb, 3),
        "memory_budget_mb": cfg.verifier.memory_budget_mb,
        "stop_reason": result.stop_reason,
        "val_fidelity": None if result.fidelity is None else round(result.fidelity.agreement, 5),
        "test_fidelity_top1": round(test_fid.agreement, 5),
        "test_mean_kl": round(test_fid.mean_kl, 5),
        "test_accuracy": round(float((test_logits.argmax(1) == splits.test.y).float().mean()), 5)
        if pool.y_test is not None
        else None,
        "candidates": candidates,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info("verifier %s: test fidelity %.2f%%", info["widths"], 100 * test_fid.agreement)
    return net, info


STAGING_PREFIX = ".fides-protect-"  # not a model name: the gateway never serves it


class PublishError(RuntimeError):
    """The built kit could not be moved into the repository (which is left as it was)."""


def _publish(staging: Path, repository: Path, service_entry: str, config_only: bool) -> None:
    """Move the staged entries into the repository: the replaced ones aside first, then the
    new ones in, the service's entry last (its integrity block switches the kit on; with
    ``config_only``, the protected model's own entry, only its config.yaml changes). A
    failure puts back what was moved aside and raises PublishError."""
    entries = sorted(p.name for p in staging.iterdir() if p.is_dir() and p.name != service_entry)
    aside: list[tuple[Path, Path]] = []  # (the replaced entry's place, where it waits)
    placed: list[Path] = []
    try:
        for name in entries:
            target = repository / name
            if target.exists():
                hold = staging / f".{name}.replaced"
                target.rename(hold)
                aside.append((target, hold))
            (staging / name).rename(target)
            placed.append(target)
        staged_service = staging / service_entry
        if config_only:
            os.replace(staged_service / "config.yaml", repository / service_entry / "config.yaml")
        else:
            target = repository / service_entry
            if target.exists():
                hold = staging / f".{service_entry}.replaced"
                target.rename(hold)
                aside.append((target, hold))
            staged_service.rename(target)
    except BaseException as exc:
        for target in placed:
            shutil.rmtree(target, ignore_errors=True)
        for target, hold in aside:
            if not target.exists():
                hold.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):
            raise PublishError(
                f"cannot move the kit into {repository} ({exc}); the repository is as it was"
            ) from exc
        raise
    shutil.rmtree(staging, ignore_errors=True)


def _check_upstream_name(where: Path) -> None:
    """The upstream entry's folder is free, or the entry of an earlier protect run; never a
    model of the repository (checked before a single query is paid for)."""
    earlier = where / "config.yaml"
    if not earlier.is_file():
        return
    try:
        before = yaml.safe_load(earlier.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ProtectConfigError(f"{earlier}: unreadable ({exc})") from None
    if not isinstance(before, dict) or before.get("platform") != "upstream":
        raise ProtectConfigError(
            f"{where} is a model of the repository, not the upstream entry of an earlier run: "
            "choose another export.service_name (protect would overwrite it)"
        )


def _upstream_entry(
    cfg: ProtectConfig, service: Service, repository: Path, classes: list[str], into: Path
) -> None:
    """The fronting gateway's entry for a remote service: ``platform: upstream`` with the
    endpoint (credentials only by reference: headers_from_env / headers_from_file), its
    tensors (so it loads while the remote is down) and class names."""
    up = cfg.service.upstream
    assert up is not None
    # not the batch client's Retry-After patience: the served entry waits the gateway's 5 s
    options = up.model_dump(
        mode="json", exclude={"headers", "max_retry_after_s"}, exclude_defaults=True
    )
    options["url"] = up.url
    entry = {
        "platform": "upstream",
        "max_batch_size": cfg.export.max_batch_size,
        "inputs": [
            {
                "name": service.input.name,
                "datatype": service.input.datatype,
                "shape": list(service.item_shape),
            }
        ],
        "outputs": [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape[1:])}
            for s in service.runtime.outputs
            if s.name == service.output
        ],
        "upstream": options,
        "labels": classes,
    }
    earlier = repository / cfg.export.service_name / "config.yaml"
    if earlier.is_file():  # an earlier protect run's entry: its integrity block is kept
        before = yaml.safe_load(earlier.read_text(encoding="utf-8")) or {}
        if isinstance(before, dict) and isinstance(before.get("integrity"), dict):
            entry["integrity"] = before["integrity"]  # the operator's settings, merged later
    where = into / cfg.export.service_name  # staged: moved into the repository at the end
    where.mkdir(parents=True, exist_ok=True)
    comment = f"# {service.identity}, fronted and verified here (fides protect)\n"
    if up.headers:
        comment += (
            "# upstream.headers are not written here (secrets): give them with "
            "headers_from_env or headers_from_file\n"
        )
    (where / "config.yaml").write_text(
        comment + yaml.safe_dump(entry, sort_keys=False, default_flow_style=None), encoding="utf-8"
    )


def _write_verifier(
    cfg: ProtectConfig,
    net: ConvNet,
    splits: Splits,
    info: dict[str, Any],
    service: Service,
    ans: _Answered,
    repository: Path,
    dataset: dict[str, Any],
) -> dict[str, Any]:
    card = model_card(
        cfg,
        role="verifier",
        dataset=dataset,
        architecture={"type": "ConvNet", **net.cfg.as_dict()},
        metrics={
            "fidelity_top1": info["test_fidelity_top1"],
            "mean_kl": info["test_mean_kl"],
            "test_accuracy": info["test_accuracy"],
        },
        params=info["params"],
        flops=info["flops"],
        extra={"distilled_from": service.identity, "answer_kind": ans.kind},
    )
    return write_entry(
        repository,
        cfg.export.verifier_name,
        net,
        splits.test.x[:256],
        splits.classes,
        card,
        comment=f"GDTL verifier of {service.identity} (fides protect)",
        max_batch_size=cfg.export.max_batch_size,
        latency_repeats=cfg.export.latency_repeats,
    )


def _in_service_order(
    pool: Pool, classes: list[str] | None, service: Service
) -> tuple[Pool, list[str] | None]:
    """The user's labels as the service's class indices. Data whose class names are the
    service's labels in another order (an image folder's are alphabetical) is re-indexed;
    names that differ are taken in the data's order, with a warning: the spot check and the
    accuracy figures then assume the data's class i is the service's class i."""
    labels = service.runtime.config.labels
    if classes is None or labels is None or list(classes) == list(labels):
        return pool, classes
    if sorted(classes) == sorted(labels) and len(set(labels)) == len(labels):
        to_service = np.array([list(labels).index(c) for c in classes])
        log.info("the data's class names are the service's labels in another order: re-indexed")

        def remap(y: np.ndarray | None) -> np.ndarray | None:
            return None if y is None else to_service[y]

        return (
            replace(
                pool,
                y_train=remap(pool.y_train),
                y_val=remap(pool.y_val),
                y_test=remap(pool.y_test),
            ),
            list(labels),
        )
    log.warning(
        "the data's class names %s are not the service's labels %s: the data's class i is "
        "taken to be the service's class i (the spot check and the accuracy figures assume it)",
        classes[:5],
        list(labels)[:5],
    )
    return pool, classes


def _classes(inputs_classes: list[str] | None, service: Service, n: int) -> list[str]:
    labels = service.runtime.config.labels
    if inputs_classes is not None and len(inputs_classes) == n:
        return inputs_classes
    if labels is not None and len(labels) == n:
        return list(labels)
    return [str(i) for i in range(n)]


def _legacy_ids(service: Service) -> list[str]:
    """What earlier versions recorded as a store's service for ``service``: its identity
    with a URL's user info, and (where the service has one output, the only one it can have
    read) without the output; such a store is adopted and re-recorded."""
    old = service.legacy_identity
    ids = [f"{old}, output {service.output}"] if old else []
    if len(service.runtime.outputs) == 1:
        ids += [service.identity, old] if old else [service.identity]
    return ids


def protect(
    cfg: ProtectConfig,
    *,
    repository: Path,
    run_dir: Path,
    answers: Path | None = None,
    max_queries: int | None = None,
    show_progress: bool = False,
    retry_unusable: bool = False,
) -> ProtectResult:
    """The whole kit (see the module docstring). Raises ServiceError, AnswerError,
    BudgetExhausted, QueryFailed, DataError or StoreError with a message for the user;
    every answer paid for is in the answer store whatever happens. ``retry_unusable``: ask
    again for the inputs an earlier run got unusable (NaN / Inf) answers for."""
    t_start = time.perf_counter()
    set_determinism(cfg.seed, cfg.threads)
    inputs = load_inputs(cfg)
    pool = split_pool(inputs, cfg)
    svc = cfg.service
    service = open_service(
        repository=repository if svc.model is not None else None,
        model=svc.model,
        upstream=svc.upstream,
        output=svc.output,
        max_batch_size=cfg.query.batch_size,
    )
    try:
        if svc.upstream is not None:
            _check_upstream_name(repository / cfg.export.service_name)
        if service.index_answers:  # refused before a single query is paid for
            raise ServiceError(
                f"{service.identity} answers a class index per input (output "
                f"{service.output!r}); the gateway verifies an answer by comparing its row of "
                "class probabilities with the verifier's, so the integrity block would fail "
                "every request: serve the probabilities, or one-hot rows"
            )
        service.check_images(tuple(pool.train.shape[1:]))
        pool, classes_in = _in_service_order(pool, inputs.classes, service)
        store = AnswerStore(
            answers or run_dir / "answers.sqlite",
            f"{service.identity}, output {service.output}",
            # a store made before stores named the output is taken over only where the
            # service has one output (it can only have read that one)
            legacy_ids=_legacy_ids(service),
        )
        if retry_unusable:
            forgotten = store.forget_unusable()
            if forgotten:
                log.warning("%d unusable answers will be asked for again", forgotten)
        try:
            return _protect(
                cfg,
                classes_in,
                inputs.source,
                pool,
                service,
                store,
                repository,
                run_dir,
                max_queries,
                show_progress,
                t_start,
            )
        finally:
            store.close()
    finally:
        service.close()


def _protect(
    cfg: ProtectConfig,
    classes_in: list[str] | None,
    source: str,
    pool: Pool,
    service: Service,
    store: AnswerStore,
    repository: Path,
    run_dir: Path,
    max_queries: int | None,
    show: bool,
    t_start: float,
) -> ProtectResult:
    with progress_bar(show) as bar:
        querier = Querier(service, store, cfg.query, max_queries=max_queries, progress=bar)
        ans = _ask_everything(cfg, pool, querier, service)
        distil_queries = len(querier.distinct)  # train, views, validation, test
        determinism = querier.repeat_probe(pool.train[: cfg.query.repeat_probe])
    querier.progress = None  # the evaluation has bars of its own
    spot = _spot_check(cfg, pool, ans)
    classes = _classes(classes_in, service, ans.num_classes)
    splits = _splits(cfg, pool, ans, classes, source)
    net, info = _distil(cfg, splits, ans, pool, run_dir, show)
    dataset = {
        "source": source,
        "train": len(pool.train),
        "views": cfg.views,
        "val": len(pool.val),
        "test": len(pool.test),
        "duplicates_dropped": pool.duplicates_dropped,
    }
    repository.mkdir(parents=True, exist_ok=True)
    # every entry is written into a staging folder and moved into the repository only once
    # the whole kit is built: a run that fails half-way (an exhausted budget in the
    # evaluation) leaves the repository as it was, never a new verifier beside an old detector
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=repository))
    try:
        if cfg.service.upstream is not None:
            _upstream_entry(cfg, service, repository, classes, into=staging)
        else:  # the integrity block goes into a copy of the model's config.yaml
            (staging / cfg.export.service_name).mkdir()
            shutil.copy2(
                repository / cfg.export.service_name / "config.yaml",
                staging / cfg.export.service_name / "config.yaml",
            )
        card = _write_verifier(cfg, net, splits, info, service, ans, staging, dataset)
        info["cpu_latency_ms_batch1"] = card["cpu_latency_ms_batch1"]
        eval_splits = replace(
            splits, train=as_dataset(pool.train, ans.p_distil[: len(pool.train)].argmax(1))
        )
        pairs = QueriedPairs(querier, net, ans.kind, ans.num_classes)
        report = evaluate_models(
            cfg,
            pairs,
            eval_splits,
            run_dir,
            repository=staging,
            show_progress=show,
            note="fides protect",
            service_output=service.output,
        )
    except BaseException:  # nothing of a failed run reaches the repository
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(
        staging,
        repository,
        cfg.export.service_name,
        config_only=cfg.service.model is not None,
    )
    report["repository"] = str(repository)
    if pool.y_test is None:
        report["service_eval_accuracy"] = None  # no labels: the service is scored against itself
    report["protect"] = {
        "service": service.identity,
        "answer_kind": ans.kind,
        "top_k": ans.k if ans.kind == "top_k" else None,
        "lower_fidelity_warning": LOWER_FIDELITY.get(ans.kind),
        "detector_sees": "the answers as served" if ans.kind != "logits" else "soft-maxed logits",
        "queries": {
            "paid_for_in_all": store.spent,
            "asked_by_this_run": querier.asked,
            "distillation": distil_queries,
            "given_images": pool.given,
            "per_given_image": round(store.spent / pool.given, 3),
            "per_training_image": round(store.spent / len(pool.train), 3),
            "distillation_per_training_image": round(distil_queries / len(pool.train), 3),
            "answers_recorded": len(store),
            "answer_store": str(store.path),
        },
        "determinism": determinism,
        "spot_check": spot,
        "dataset": dataset,
        "verifier": info,
    }
    report["command_seconds"] = round(time.perf_counter() - t_start, 1)
    return ProtectResult(report, repository)


def report_markdown(report: dict[str, Any], command: str) -> str:
    """The protect report's summary above ``fides evaluate``'s tables."""
    from verifier.evaluate import report_markdown as evaluation_markdown

    pr = report["protect"]
    q, v, det = pr["queries"], pr["verifier"], pr["determinism"]
    lines = [
        f"# fides protect: {report['experiment']}",
        "",
        f"Command: `{command}`  ",
        f"Service: {pr['service']}, answers: **{pr['answer_kind']}**"
        + (f" (k = {pr['top_k']})" if pr["top_k"] else "")
        + (f". Warning: {pr['lower_fidelity_warning']}" if pr["lower_fidelity_warning"] else "")
        + ".",
        "",
        f"Queries paid for: **{q['paid_for_in_all']:,}** ("
        + (f"{q['per_given_image']} per image given, " if "per_given_image" in q else "")
        + f"{q['per_training_image']} per image distilled from; {q['distillation']:,} for "
        f"distillation), {q['asked_by_this_run']:,} asked by this run; wall "
        f"{report['command_seconds']:.0f} s.",
        f"Verifier {v['widths']}: {v['flops']:,} FLOPs per image, {v['params']:,} parameters, "
        f"{v['inference_memory_mb']} MB of {v['memory_budget_mb']} MB, "
        f"{v['cpu_latency_ms_batch1']:.3f} ms per image; test fidelity "
        f"**{v['test_fidelity_top1']:.2%}** (KL {v['test_mean_kl']:.4f}).",
        "Determinism: "
        + (
            f"{det['inputs']} repeated inputs, top-1 changed for {det['top1_changed']}, "
            f"max |difference| {det['max_abs_diff']:.3g}."
            if det
            else "not measured (query.repeat_probe 0)."
        ),
        "",
    ]
    body = evaluation_markdown(report, command).splitlines()[3:]  # below its title and command
    return "\n".join(lines + body) + "\n"

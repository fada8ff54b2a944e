"""The model repository: discovery, loading, hot reload and unloading of model versions.

Layout (Triton-like): ``<root>/<model>/config.yaml`` and ``<root>/<model>/<version>/<file>``,
versions being positive integers. Loading a model that is already serving builds the new
versions next to the old ones and swaps them in only when every one loaded, so a broken new
version leaves the old one serving; the old versions drain their queues before unloading.

Loads and unloads are serialised per model, as Triton's are: those of one model run one after
the other, in the order they were asked for, while those of different models run at once (an
unload of one model waited for a load of another, an enclave boot of seconds included). Every
change to the repository's own state (the models served, their states, readiness, slots) is
made on the event loop with no ``await`` inside it, so concurrent operations on different
models see it whole.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

from fides_core.layout import (
    MAX_VERSION_DIGITS,
    MODEL_NAME_RULE,
    is_model_name,
    is_version,
    versions_on_disk,
)
from gateway.batcher import BatchObserver, BatchPolicy, DynamicBatcher
from gateway.errors import BadRequest, GatewayError, ModelLoadError, NotFound, Unavailable
from gateway.generation.service import TextModel, load_text_model
from gateway.model_config import (
    ConfigError,
    ModelConfig,
    load_model_config,
    read_verifier_names,
)
from gateway.runtimes import Runtime, runtime_class
from gateway.servables import (
    InferenceServable,
    ModelSlot,
    Servable,
    TensorServable,
    TextServable,
)

log = logging.getLogger(__name__)

ObserverFactory = Callable[[str, int], BatchObserver]
# (model, its new config, its freshly loaded versions) -> the servables to serve; raises
# ModelLoadError to refuse the load (the old versions keep serving). The integrity service's
# wrap: a model with an integrity block is served verified.
Wrapper = Callable[[str, ModelConfig, list[TensorServable]], Awaitable[list[Servable]]]


@dataclass
class ServedModel:
    name: str
    config: ModelConfig
    versions: dict[int, Servable] = field(default_factory=dict)

    @property
    def latest(self) -> Servable:
        return self.versions[max(self.versions)]


@dataclass
class ModelState:
    """What the repository index reports for a model directory."""

    state: str  # READY | UNAVAILABLE | LOADING
    reason: str = ""


_MISNAMED = f"invalid model name: {MODEL_NAME_RULE} (rename the directory)"
_GONE = "its directory is no longer in the repository"
_GONE_SERVING = f"{_GONE}: it serves until it is unloaded"


def validate_model_name(name: str) -> str:
    """Reject names that could escape the repository (``..``, slashes, odd Unicode)."""
    if not is_model_name(name):
        raise BadRequest(f"invalid model name {name!r}: {MODEL_NAME_RULE}")
    return name


def parse_version(version: str) -> int:
    if not is_version(version):
        shown = (
            repr(version) if len(version) <= 40 else f"{version[:20]!r}... ({len(version)} chars)"
        )
        raise BadRequest(
            f"invalid model version {shown}: expected a positive integer of at most "
            f"{MAX_VERSION_DIGITS} digits"
        )
    return int(version)


def batch_policy(cfg: ModelConfig) -> BatchPolicy:
    db = cfg.dynamic_batching
    instances = cfg.instance_group.count
    if db is None:
        # batch dimension but no dynamic batching: each request is its own batch
        return BatchPolicy(
            max_batch_size=cfg.max_batch_size,
            max_queue_delay_s=0.0,
            instances=instances,
            max_queue_size=256,
            inline=cfg.execution == "inline",
        )
    return BatchPolicy(
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_s=db.max_queue_delay_microseconds / 1e6,
        dispatch_when_idle=db.dispatch_when_idle,
        preferred_batch_sizes=tuple(db.preferred_batch_size),
        max_queue_size=db.max_queue_size,
        instances=instances,
        inline=cfg.execution == "inline",
    )


class ModelRepository:
    """Owns every served model. Its state changes on the event loop; the loads and unloads of
    one model hold that model's lock (those of different models run concurrently), and
    ``load_all`` loads up to ``load_concurrency`` models at once (Triton's default: 4)."""

    def __init__(
        self,
        root: Path,
        observer_factory: ObserverFactory | None = None,
        on_state: Callable[[str, int, bool], None] | None = None,
        on_runtime: Callable[[Runtime], None] | None = None,
        on_load: Callable[[str, bool], None] | None = None,
        drain_timeout_s: float = 30.0,
        serve_verifiers: bool = False,
        load_concurrency: int = 4,
    ) -> None:
        if load_concurrency < 1:
            raise ValueError(f"load_concurrency must be at least 1, not {load_concurrency}")
        self.root = root
        self.serve_verifiers = serve_verifiers
        self._observer_factory = observer_factory or (lambda _n, _v: BatchObserver())
        self._on_state = on_state or (lambda _n, _v, _r: None)
        self._on_runtime = on_runtime or (lambda _rt: None)
        self._on_load = on_load or (lambda _n, _ok: None)
        self._drain_timeout_s = drain_timeout_s
        self._models: dict[str, ServedModel] = {}
        self._states: dict[str, ModelState] = {}
        self._wanted: set[str] = set()  # models that should be serving (for readiness)
        self._slots: dict[str, ModelSlot] = {}
        # one per model asked to load or unload: its loads and unloads run one at a time, in
        # the order they were asked for (asyncio.Lock is fair); never removed (a few bytes
        # per model directory that ever loaded)
        self._locks: dict[str, asyncio.Lock] = {}
        self._load_concurrency = load_concurrency
        self._closed = False
        # true while load_all runs: models load beside each other, so one may need another
        # that is not loaded yet (the integrity service waits for the end to set them up)
        self.starting = False
        # loads and unloads whose caller left before they ended (see _to_the_end)
        self._orphans: set[asyncio.Task[None]] = set()
        # set by the app once the integrity service exists (it needs this repository's slots)
        self.wrap: Wrapper | None = None

    # -- queries --------------------------------------------------------------------------------

    def model_dir(self, name: str) -> Path:
        # The validated name has no separators and no "..", so it names a direct child of
        # the root; the child itself may be a symlink (Kubernetes volumes use them).
        return self.root / validate_model_name(name)

    def discover(self) -> list[str]:
        """Model directories on disk (those holding a config.yaml) that are served: every one
        but the enclave verifiers (:meth:`private_verifiers`)."""
        if not self.root.is_dir():
            return []
        private = self.private_verifiers()
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir()
            and (p / "config.yaml").is_file()
            and is_model_name(p.name)
            and p.name not in private
        )

    def misnamed(self) -> list[str]:
        """Directories holding a config.yaml whose name is not a model name: not served, and
        listed in the index and the start-up log with why (they were skipped without a word).
        Hidden ones (``.git``, Kubernetes' ``..data``) are left out."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith(".")
            and not is_model_name(p.name)
            and p.is_dir()
            and (p / "config.yaml").is_file()
        )

    def private_verifiers(self) -> dict[str, str]:
        """Verifier -> the model whose enclave it runs in. A verifier is not served on the
        data plane: whoever can query it can serve its answers in place of the model's, the
        cheapest substitution there is, and the answers would then agree with the enclave's
        perfectly. Empty with ``serve_verifiers`` (development only)."""
        return {} if self.serve_verifiers else read_verifier_names(self.root)

    def index(self) -> list[dict[str, str]]:
        """The models the repository holds now, with version and state (repository extension),
        as Triton lists them: those on disk, and those not on disk any more that still matter
        (a model serving, loading, or wanted by readiness), their reason saying the directory
        is gone. A model unloaded or never loaded whose directory was removed is not listed
        (it stayed for good, as 'unloaded')."""
        rows: list[dict[str, str]] = []
        on_disk = set(self.discover())
        names = sorted(on_disk | set(self._models) | self._wanted | self._loading())
        for name in names:
            served = self._models.get(name)
            state = self._states.get(name, ModelState("UNAVAILABLE", "not loaded"))
            reason = state.reason
            if name not in on_disk:
                gone = _GONE_SERVING if served is not None else _GONE
                reason = f"{reason}; {gone}" if reason else gone
            if served is not None:
                rows.extend(
                    {"name": name, "version": str(v), "state": "READY", "reason": reason}
                    for v in sorted(served.versions)
                )
            else:
                rows.append({"name": name, "version": "", "state": state.state, "reason": reason})
        rows.extend(
            {"name": name, "version": "", "state": "UNAVAILABLE", "reason": _MISNAMED}
            for name in self.misnamed()
        )
        return rows

    def _loading(self) -> set[str]:
        return {n for n, st in self._states.items() if st.state == "LOADING"}

    def slot(self, name: str) -> ModelSlot:
        """The stable handle on ``name`` (whether it serves now or not)."""
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = ModelSlot(validate_model_name(name))
            served = self._models.get(name)
            slot.served = served
        return slot

    def get(self, name: str, version: str | None = None) -> InferenceServable:
        """A tensor model's version for /v2 (the latest when ``version`` is None): 404 for an
        unknown model or version, 503 while it does not serve."""
        servable = self.servable(name, version)
        if not isinstance(servable, InferenceServable):
            raise NotFound(
                f"model '{name}' is a text model (platform {servable.platform}): it is served "
                "at /v1 (OpenAI-compatible), not over the Open Inference Protocol"
            )
        return servable

    def text_model(self, name: str) -> TextModel:
        """A text model for /v1 (NotFound for an unknown or tensor model, Unavailable while it
        does not serve)."""
        servable = self.servable(name, None)
        if not isinstance(servable, TextServable):
            raise NotFound(f"model '{name}' is not a text model")
        return servable.model

    def text_models(self) -> list[TextModel]:
        return [
            s.model
            for name in sorted(self._models)
            if isinstance(s := self._models[name].latest, TextServable)
        ]

    def servable(self, name: str, version: str | None = None) -> Servable:
        validate_model_name(name)
        served = self._models.get(name)
        if served is None:
            if name in self.private_verifiers():
                raise NotFound(f"unknown model '{name}' (an enclave verifier is not served)")
            # 503 for a model the repository holds (or that loads or is wanted); one unloaded
            # and then removed from disk is unknown (404), as it is gone from the index
            on_disk = (self.root / name / "config.yaml").is_file()
            if on_disk or name in self._wanted or name in self._loading():
                state = self._states.get(name, ModelState("UNAVAILABLE", "not loaded"))
                reason = state.reason or ("loading" if state.state == "LOADING" else "not loaded")
                raise Unavailable(f"model '{name}' is not ready: {reason}")
            raise NotFound(f"unknown model '{name}'")
        if version is None:
            return served.latest
        v = parse_version(version)
        if v not in served.versions:
            raise NotFound(
                f"model '{name}' has no loaded version {v} (loaded: {sorted(served.versions)})"
            )
        return served.versions[v]

    def served(self, name: str) -> ServedModel:
        validate_model_name(name)
        try:
            return self._models[name]
        except KeyError:
            raise NotFound(f"unknown model '{name}'") from None

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when every wanted model serves; else the names that do not."""
        missing = sorted(n for n in self._wanted if n not in self._models)
        return not missing, missing

    def loaded_names(self) -> list[str]:
        return sorted(self._models)

    # -- mutations ------------------------------------------------------------------------------

    async def load_all(self) -> None:
        """Load every model on disk; failures are logged and leave the model unavailable.
        A start: a repository closed by an earlier shutdown of the same app (a test client's
        second lifespan) serves again."""
        self._closed = False
        for name in self.misnamed():
            log.error("model directory %r is not served: %s", name, _MISNAMED)
        # Up to load_concurrency at once, started in name order: one slow model (a big
        # artefact, an enclave boot) no longer holds back every other model's start. Cut
        # short (a signal during start-up), the models not begun are never loaded; those
        # loading finish (see _to_the_end) and close() unloads them.
        gate = asyncio.Semaphore(self._load_concurrency)

        async def load_one(name: str) -> None:
            async with gate:
                try:
                    await self.load(name)
                except GatewayError as exc:
                    log.error("model %s failed to load: %s", name, exc.message)

        self.starting = True
        tasks = [asyncio.ensure_future(load_one(name)) for name in self.discover()]
        try:
            await asyncio.gather(*tasks)
        finally:  # one failed unexpectedly, or the start was cancelled: the rest do not begin
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.starting = False

    async def load(self, name: str) -> list[int]:
        """(Re)load ``name`` from disk; atomically replaces the versions it serves. Returns the
        versions it serves now. Runs to the end when the caller leaves (see _to_the_end)."""
        path = self.model_dir(name)
        verified = self.private_verifiers().get(name)
        if verified is not None:
            raise ModelLoadError(
                f"model '{name}' is the enclave verifier of '{verified}' and is not served on "
                "the data plane: anyone who could query it could serve its answers in place of "
                f"'{verified}' (set FIDES_SERVE_VERIFIERS=1 for development only)"
            )
        if name not in self._models and not (path / "config.yaml").is_file():
            # before any state changes: an unknown name must not become a model that is
            # "wanted" (the server would stay not ready) or listed in the index
            raise NotFound(f"unknown model '{name}': no {name}/config.yaml in the repository")
        versions: list[int] = []
        # the lock exists from now on: an unload asked for while this load waits for its
        # turn finds the model (and runs after it) instead of answering "not loaded"
        lock = self._lock(name)
        await self._to_the_end(self._load(name, path, versions, lock))
        return versions

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def _load(self, name: str, path: Path, versions: list[int], lock: asyncio.Lock) -> None:
        async with lock:
            if self._closed:
                raise Unavailable("the gateway is shutting down: no model is loaded now")
            self._wanted.add(name)
            self._states[name] = ModelState("LOADING")
            try:
                served = await self._build(name, path)
            except ModelLoadError as exc:
                if name in self._models:  # the old versions keep serving
                    self._states[name] = ModelState("READY", f"last load failed: {exc.message}")
                else:
                    self._states[name] = ModelState("UNAVAILABLE", exc.message)
                    self.slot(name).reason = exc.message
                self._on_load(name, False)
                raise
            old = self._models.get(name)
            self._models[name] = served
            self.slot(name).served = served
            self._states[name] = ModelState("READY")
            self._on_load(name, True)
            for v in served.versions:
                self._on_state(name, v, True)
        if old is not None:
            gone = set(old.versions) - set(served.versions)
            for v in gone:
                self._on_state(name, v, False)
            await self._retire(old)
        versions.extend(sorted(served.versions))
        gc.freeze()  # keep the new model's objects out of full collections (see app.py)
        log.info("model %s serving versions %s", name, sorted(served.versions))

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: its versions drain, then unload. Runs to the end when the
        caller leaves (see _to_the_end)."""
        validate_model_name(name)
        if name not in self._models and name not in self._states and name not in self._locks:
            raise NotFound(f"model '{name}' is not loaded")  # and leaves no trace
        await self._to_the_end(self._unload(name, self._lock(name)))

    async def _unload(self, name: str, lock: asyncio.Lock) -> None:
        async with lock:
            self._wanted.discard(name)
            served = self._models.pop(name, None)
            slot = self.slot(name)
            slot.served, slot.reason = None, "unloaded"
            self._states[name] = ModelState("UNAVAILABLE", "unloaded")
            if served is None:
                # a model whose load failed (or that is unloaded already): it is not wanted any
                # more, which is what was asked (a 404 here read as a failure although the
                # server had just become ready again), and Triton's unload succeeds too
                return
            for v in served.versions:
                self._on_state(name, v, False)
        await self._retire(served)

    async def _to_the_end(self, work: Coroutine[object, object, None]) -> None:
        """Run a load or an unload as its own task and wait for it. A caller that leaves
        (a gRPC deadline, a cancelled task) cancels its wait, not the work: cancelled half
        way, a load left the model LOADING for good (the server not ready) and the versions
        it had loaded, or a drain it had begun, never unloaded. The work's outcome stays in
        the index and the log; an orphan's error is retrieved so that it is not reported
        as never retrieved."""
        task = asyncio.ensure_future(work)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._orphans.add(task)
            task.add_done_callback(self._orphan_done)
            raise

    def _orphan_done(self, task: asyncio.Task[None]) -> None:
        self._orphans.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("a load or unload whose caller left failed: %s", exc)

    async def close(self) -> None:
        """Stop serving every model. A load begun before finishes first (a load thread cannot
        be interrupted) and its model is then unloaded with the others; a load that had not
        begun refuses (the gateway is shutting down)."""
        self._closed = True

        async def take(name: str, lock: asyncio.Lock) -> ServedModel | None:
            async with lock:  # after the operation on this model now running, if any
                if (slot := self._slots.get(name)) is not None:
                    slot.served, slot.reason = None, "the gateway is shutting down"
                return self._models.pop(name, None)

        taken = await asyncio.gather(*(take(n, lock) for n, lock in list(self._locks.items())))
        models = [served for served in taken if served is not None]
        for name in list(self._models):  # none: every model loads under its lock
            models.append(self._models.pop(name))
        for slot in self._slots.values():
            slot.served, slot.reason = None, "the gateway is shutting down"
        for served in models:
            await self._retire(served)
        # a load or unload whose caller left may still be draining the versions it replaced
        await asyncio.gather(*self._orphans, return_exceptions=True)

    async def _retire(self, served: ServedModel) -> None:
        """Drain (in-flight requests finish), then free what each version holds."""
        await self._stop(list(served.versions.values()))

    async def _stop(self, versions: list[Servable]) -> None:
        """Close every version, each in turn; one that fails to close is logged and the others
        are still closed (their schedulers and threads would leak otherwise)."""
        for v in versions:
            try:
                await v.close(self._drain_timeout_s)
            except Exception:  # noqa: BLE001 - logged; the next version is closed all the same
                log.exception("closing a version of model %s failed", getattr(v, "name", "?"))

    async def _build(self, name: str, path: Path) -> ServedModel:
        t0 = time.perf_counter()
        try:
            cfg = load_model_config(path / "config.yaml", expected_name=name)
            versions = cfg.version_policy.select(versions_on_disk(path))
            # "007" counts as version 7, whose files are then looked for in "7"
            padded = sorted(
                p.name
                for p in path.iterdir()
                if p.is_dir() and is_version(p.name) and p.name != str(int(p.name))
            )
        except ConfigError as exc:
            raise ModelLoadError(f"model '{name}': {exc}") from exc
        except OSError as exc:
            raise ModelLoadError(f"model '{name}': cannot list {path}: {exc}") from exc
        if padded:
            raise ModelLoadError(
                f"model '{name}': version directories {padded} in {path} have leading zeros; "
                f"name them {[str(int(d)) for d in padded]}"
            )
        if cfg.platform == "causal_lm":
            return await self._build_text(name, path, cfg)
        if not versions and not cfg.model_filename:
            versions = [1]  # a remote model (upstream) has no artefact: no version folder needed
        if not versions:
            raise ModelLoadError(f"model '{name}': no version directories (1, 2, ...) in {path}")
        cls = runtime_class(cfg.platform)
        loaded: list[Runtime] = []
        try:
            for v in versions:
                rt = cls(name, v, path / str(v), cfg)
                try:
                    await asyncio.to_thread(rt.load)
                except ModelLoadError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a broken artefact must not crash us
                    raise ModelLoadError(
                        f"model '{name}' version {v}: {type(exc).__name__}: {exc}"
                    ) from exc
                loaded.append(rt)
                self._on_runtime(rt)
                if not rt.inputs or not rt.outputs:
                    raise ModelLoadError(
                        f"model '{name}' version {v}: no input/output metadata; "
                        "declare inputs and outputs in config.yaml"
                    )
                # labels that do not fit answered with wrong or missing class names
                why = cfg.labels_problem([(o.name, o.shape) for o in rt.outputs])
                if why is not None:
                    raise ModelLoadError(f"model '{name}' version {v}: {why}")
        except ModelLoadError as exc:
            for rt in loaded:
                await asyncio.to_thread(rt.unload)
            if not exc.message.startswith(f"model '{name}'"):
                exc.message = f"model '{name}': {exc.message}"
            raise
        policy = batch_policy(cfg)
        built = []
        for rt in loaded:
            batcher = DynamicBatcher(rt, policy, self._observer_factory(name, rt.version))
            batcher.start()
            built.append(TensorServable(rt, batcher))
        servables: list[Servable] = list(built)
        if self.wrap is not None:
            try:
                servables = await self.wrap(name, cfg, built)
            except ModelLoadError:
                await self._stop(list(built))
                raise
        served = ServedModel(name, cfg, {s.version: s for s in servables})
        log.info("built model %s versions %s in %.2fs", name, versions, time.perf_counter() - t0)
        return served

    async def _build_text(self, name: str, path: Path, cfg: ModelConfig) -> ServedModel:
        """A causal LM: its latest selected version, loaded off the event loop."""
        try:
            model = await asyncio.to_thread(load_text_model, name, path, cfg)
        except ModelLoadError:
            raise
        except Exception as exc:  # noqa: BLE001 - a broken model directory must not crash us
            raise ModelLoadError(f"model '{name}': {type(exc).__name__}: {exc}") from exc
        return ServedModel(name, cfg, {model.version: TextServable(model, cfg)})


__all__ = ["ModelRepository", "ServedModel"]

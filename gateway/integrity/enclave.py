"""Starting a model's enclave, and batching verifications into enclave calls.

:func:`enclave_for_model` turns an ``integrity.enclave`` config into a running
:class:`~gateway.enclave_client.EnclaveSupervisor`: it finds the verifier in the repository,
measures it (or takes the pinned measurement), seals it for the local platform unless a sealed
file is given, and pins the platform's root certificate and that measurement.

:class:`EnclaveBatcher` groups concurrent verifications into one enclave call (one signature
over a Merkle root covers the batch; each client still gets only its own entry and proof).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from enclave_sim.pki import ROOT_CERT, init_ca
from enclave_sim.sealing import seal
from fides_core.attestation import AttestedEnclave, Policy
from fides_core.enclave_config import from_enclave_block
from fides_core.integrity_config import EnclaveConfig
from fides_core.layout import latest_version_file
from fides_core.measurement import measure
from gateway.enclave_client import (
    AttachedEnclave,
    EnclaveClient,
    EnclaveError,
    EnclaveLaunch,
    EnclaveSupervisor,
    RejectedItem,
    VerifiedItem,
    VerifyRequest,
)
from gateway.errors import GatewayError
from gateway.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["EnclaveBatcher", "IntegritySetupError", "enclave_for_model", "verifier_file"]


class IntegritySetupError(GatewayError):
    """The integrity block of a model cannot be set up (missing verifier, platform, ...)."""

    status, reason = 503, "integrity_setup"


def verifier_file(repository: Path, name: str) -> Path:
    """The latest version's ``model.onnx`` of repository entry ``name``."""
    try:
        return latest_version_file(repository / name)
    except FileNotFoundError as exc:
        raise IntegritySetupError(f"verifier model '{name}': {exc}") from None


def _write_whole(path: Path, data: bytes) -> None:
    """Write all of ``data`` or nothing (a full disk leaves no torn file behind), and name
    the file in the error: a failed write's ``OSError`` does not ("[Errno 28] No space left
    on device" alone, tests/reliability/test_faults.py)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise IntegritySetupError(f"cannot write {path}: {exc.strerror or exc}") from exc


def enclave_for_model(
    model: str, cfg: EnclaveConfig, repository: Path, settings: Settings
) -> tuple[EnclaveSupervisor, str]:
    """A supervisor (not started) for ``model``'s enclave and the pinned measurement (hex)."""
    onnx_bytes = verifier_file(repository, cfg.verifier_model).read_bytes()
    vcfg = from_enclave_block(cfg.model_dump())
    platform = settings.enclave_platform_dir
    if settings.enclave_external:  # a sidecar: pin its root and measurement, attach
        root = platform / ROOT_CERT
        if not root.is_file():
            raise IntegritySetupError(f"no pinned enclave root certificate at {root}")
        measurement = cfg.measurement or measure(onnx_bytes, vcfg).pcr0.hex()
        attached = AttachedEnclave(
            settings.enclave_runtime_dir / f"{model}.sock",
            root=root.read_bytes(),
            policy=Policy.of(measurement, allow_simulated=settings.enclave_simulated_allowed),
            call_timeout_s=cfg.timeout_s,
        )
        return attached, measurement
    if not (platform / ROOT_CERT).is_file():
        if not settings.enclave_may_init_platform:
            raise IntegritySetupError(
                f"no enclave platform in {platform} (run `fides enclave init-ca --platform-dir "
                f"{platform}` or set FIDES_ENCLAVE_INIT_PLATFORM=1)"
            )
        log.warning("creating a simulated enclave platform (root CA + secret) in %s", platform)
        init_ca(platform)
    runtime = settings.enclave_runtime_dir
    runtime.mkdir(parents=True, exist_ok=True, mode=0o700)
    if cfg.sealed_model is not None:
        sealed = repository / model / cfg.sealed_model
        if not sealed.is_file():
            raise IntegritySetupError(f"sealed verifier {sealed} is missing")
    else:
        # its own rollback counter: sealing another model later does not refuse this one's
        # restarts (enclave_sim.sealing)
        data, _, version = seal(onnx_bytes, vcfg, platform, model_id=model)
        sealed = runtime / f"{model}.sealed"
        _write_whole(sealed, data)
        log.info("sealed %s's verifier (version %d) for this platform", model, version)
    measurement = cfg.measurement or measure(onnx_bytes, vcfg).pcr0.hex()
    launch = EnclaveLaunch(
        socket_path=runtime / f"{model}.sock",
        sealed_model=sealed,
        platform_dir=platform,
        extra_args=tuple(cfg.extra_args),
        log_path=runtime / f"{model}.log",
    )
    policy = Policy.of(measurement, allow_simulated=settings.enclave_simulated_allowed)
    supervisor = EnclaveSupervisor(
        launch,
        root=(platform / ROOT_CERT).read_bytes(),
        policy=policy,
        call_timeout_s=cfg.timeout_s,
    )
    return supervisor, measurement


@dataclass
class _Pending:
    request: VerifyRequest
    rows: int
    future: asyncio.Future[VerifiedItem]
    queued: float  # time.perf_counter() when it joined the batcher
    # told the signed answer that came after its waiter gave up (timed out, cancelled)
    late: Callable[[VerifiedItem], None] | None = None


class EnclaveBatcher:
    """Collects verifications for up to ``delay_s`` or ``max_rows`` rows, then makes one
    enclave call. With ``when_idle``, a verification that finds no call in flight goes at
    once, and what gathered while calls were in flight goes when the last of them ends (or
    at ``delay_s``, whichever is first). Errors of a call go to every request in it; nothing
    is retried here (the integrity pipeline's failure policy decides).

    ``on_boot``: told, after each call that returned, the attested enclave boot the client
    checked that call's evidence against (a supervisor's ``attested``; clients without one are
    not asked), so the boot that signed an answer is known even when the enclave has restarted
    by the time the answer is used (incident bundles keep its attestation document).

    A request whose waiter gave up before its call returned (its timeout passed, it was
    cancelled) stays in its batch: the enclave signs it with the others. Its ``late`` (a
    :meth:`verify` argument) is told its signed answer then, so the answer is not lost: a
    signed batch is checked whole in incident bundles."""

    def __init__(
        self,
        client: EnclaveClient,
        max_rows: int,
        delay_s: float,
        on_wait: Callable[[float], None] | None = None,
        when_idle: bool = False,
        on_boot: Callable[[AttestedEnclave], None] | None = None,
    ) -> None:
        self.client = client
        self.max_rows = max_rows
        self.delay_s = delay_s
        self.when_idle = when_idle
        self.on_wait = on_wait  # seconds each request waited for its call to start (metrics)
        self.on_boot = on_boot
        self._pending: list[_Pending] = []
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._batches: dict[asyncio.Task[None], Sequence[_Pending]] = {}  # each call's requests

    async def verify(
        self,
        request: VerifyRequest,
        rows: int,
        late: Callable[[VerifiedItem], None] | None = None,
    ) -> VerifiedItem:
        """The request's signed answer; ``late``: told it instead when it comes after this
        wait was given up (a timeout, a cancellation)."""
        loop = asyncio.get_running_loop()
        item = _Pending(request, rows, loop.create_future(), time.perf_counter(), late)
        if self._rows + rows > self.max_rows:
            self._flush()
        self._pending.append(item)
        self._rows += rows
        if self._rows >= self.max_rows or self.delay_s <= 0 or (self.when_idle and not self._tasks):
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.delay_s, self._flush)
        return await item.future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending, self._rows = self._pending, [], 0
        task = asyncio.get_running_loop().create_task(self._call(batch))
        self._tasks.add(task)
        self._batches[task] = batch
        task.add_done_callback(self._call_done)

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._batches.pop(task, None)
        if self.when_idle and not self._tasks and self._pending:
            self._flush()  # they gathered while the enclave was busy: a batch, ready now

    async def _call(self, batch: Sequence[_Pending]) -> None:
        if self.on_wait is not None:
            now = time.perf_counter()
            for p in batch:
                self.on_wait(now - p.queued)
        # Read with no await before the call: a supervisor's verify takes its attested boot
        # before its first await, so this is the boot it checks the batch's evidence against
        # (its module id and key), however the enclave restarts while the call is out.
        boot: AttestedEnclave | None = getattr(self.client, "attested", None)
        try:
            result = await self.client.verify([p.request for p in batch])
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        late: list[tuple[Callable[[VerifiedItem], None], VerifiedItem]] = []
        for p, item in zip(batch, result.items, strict=True):
            if p.future.done():  # its waiter gave up (only this batcher sets a result)
                if p.late is not None and isinstance(item, VerifiedItem):
                    late.append((p.late, item))
                continue
            if isinstance(item, RejectedItem):  # this request alone; the others verified
                p.future.set_exception(
                    EnclaveError(f"the enclave refused the request: {item.message}", code=item.code)
                )
            else:
                p.future.set_result(item)
        if boot is not None and self.on_boot is not None:  # before any waiter resumes
            self.on_boot(boot)
        for tell, item in late:
            try:
                tell(item)
            except Exception:  # one request's bookkeeping must not fail the others
                log.exception("a late signed answer (request %s) not taken", item.id)

    async def close(self, grace_s: float | None = None) -> None:
        """Send what gathered and wait for the calls in flight (their late answers told),
        for at most ``grace_s`` (None: as long as they take). A call still out after it (a
        hung enclave) is abandoned: cancelled, its requests' ids logged; their waiters were
        answered long before (their own timeout), so only their signed answers are lost, and
        a shutdown no longer lasts as long as the enclave hangs."""
        self._flush()
        tasks = list(self._tasks)
        if not tasks:
            return
        done, out = await asyncio.wait(tasks, timeout=grace_s)
        for task in done:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                task.result()
        if out:
            ids = [p.request.id for task in out for p in self._batches.get(task, ())]
            log.warning(
                "closing with %d enclave call(s) still out after %.1f s (the enclave hangs?): "
                "abandoned; the signed answers of requests %s will not be recorded",
                len(out),
                grace_s or 0.0,
                ", ".join(ids[:20]) + (", ..." if len(ids) > 20 else ""),
            )
            for task in out:
                task.cancel()
            await asyncio.gather(*out, return_exceptions=True)

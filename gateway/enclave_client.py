"""The gateway's side of the enclave boundary.

- :class:`EnclaveClient`: the typed protocol every enclave implementation satisfies (the
  integrity pipeline depends on this, never on a concrete class).
- :class:`SocketEnclaveClient`: the real one, over the enclave's Unix socket (length-prefixed
  CBOR frames, see :mod:`fides_core.enclave_wire`), with a small connection pool and timeouts.
- :class:`EnclaveSupervisor`: starts the enclave process, waits for its socket, attests it with
  its own nonce against the pinned root and policy, restarts it with exponential backoff when
  it dies or stops answering, re-attests after every restart, and exposes its state. It is
  itself an :class:`EnclaveClient` that refuses calls unless the enclave is up and attested,
  and checks every signed result against the attested key before returning it.

Fail closed: any failure raises (:class:`EnclaveUnavailable` when the enclave cannot be
reached or died mid-call, :class:`EnclaveError` otherwise). No method returns a partial or
unchecked result, so a verification that did not complete can never be reported as verified.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

from cryptography import x509

from fides_core import enclave_wire as protocol
from fides_core.attestation import (
    AttestationError,
    AttestedEnclave,
    BindingError,
    Policy,
    SignatureError,
    accept_authenticated_result,
    check_verification,
    decode_result_evidence,
    load_root,
    verify_attestation,
)
from fides_core.enclave_errors import EnclaveFailure as EnclaveSideError
from fides_core.enclave_errors import ProtocolError
from fides_core.measurement import CODE_ROOT
from fides_core.session import SessionError, SessionKey, SessionOffer
from fides_core.tensors import decode_tensors
from fides_core.verify import RejectedItem, VerifiedItem, VerifyRequest, encode_requests
from gateway.errors import GatewayError

log = logging.getLogger(__name__)

__all__ = [
    "AttachedEnclave",
    "EnclaveClient",
    "EnclaveError",
    "EnclaveHealth",
    "EnclaveLaunch",
    "EnclaveState",
    "EnclaveSupervisor",
    "EnclaveUnavailable",
    "RejectedItem",
    "SocketEnclaveClient",
    "VerifiedItem",
    "VerifyRequest",
    "VerifyResult",
]


class EnclaveError(GatewayError):
    """The enclave answered with an error, or its answer could not be accepted.
    ``code`` is the enclave's error code (``bad_request``, ``batch_too_large``, ...)."""

    status, reason = 502, "enclave_error"

    def __init__(self, message: str, *, code: str = "enclave_error") -> None:
        super().__init__(message)
        self.code = code


class EnclaveUnavailable(EnclaveError):
    """The enclave cannot be reached, is not up and attested, or died during the call."""

    status, reason = 503, "enclave_unavailable"

    def __init__(self, message: str, *, code: str = "unavailable", retry_after_s: int = 1) -> None:
        super().__init__(message, code=code)
        self.headers = {"Retry-After": str(retry_after_s)}


@dataclass(frozen=True)
class VerifyResult:
    """One verified batch: the enclave's sequence number and, in request order, each
    request's outputs and per-request evidence (base64 it into ``integrity_evidence``), or a
    :class:`RejectedItem` for a request the enclave refused on its own. ``mac``: the session's
    MAC of the batch's signed result, when the call named a session the enclave knows
    (:mod:`fides_core.session`); it is for the gateway's check only, never evidence."""

    seq: int
    items: list[VerifiedItem | RejectedItem]
    mac: bytes | None = None


class EnclaveState(enum.StrEnum):
    STARTING = "starting"
    UP = "up"
    RESTARTING = "restarting"
    DOWN = "down"


@dataclass(frozen=True)
class EnclaveHealth:
    """What readiness and the metrics need to know about an enclave."""

    state: EnclaveState
    reason: str = ""  # why it is not up (empty while up)
    restarts: int = 0  # successful restarts so far

    @property
    def up(self) -> bool:
        return self.state is EnclaveState.UP


@runtime_checkable
class EnclaveClient(Protocol):
    """What the gateway needs from a (simulated or real) trusted execution module."""

    def health(self) -> EnclaveHealth:
        """Its state now; ``up`` means calls can succeed (started and attested)."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Details for the integrity status endpoint (state, pid, counters, ...)."""
        ...

    async def ping(self) -> None: ...

    async def info(self) -> dict[str, Any]: ...

    async def attest(self, nonce: bytes, user_data: bytes | None = None) -> bytes:
        """An attestation document (COSE_Sign1) bound to ``nonce``; check it with
        :func:`fides_core.attestation.verify_attestation`."""
        ...

    async def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        """Run the verifier on one batch (one frame) and return signed results."""
        ...

    async def close(self) -> None: ...


def _result_from_wire(result: Mapping[str, Any], requests: Sequence[VerifyRequest]) -> VerifyResult:
    seq, items, mac = result.get("seq"), result.get("items"), result.get("mac")
    if not isinstance(seq, int) or not isinstance(items, list) or len(items) != len(requests):
        raise EnclaveError("malformed verify answer", code="malformed_answer")
    if mac is not None and not isinstance(mac, bytes):
        raise EnclaveError("malformed MAC in a verify answer", code="malformed_answer")
    out: list[VerifiedItem | RejectedItem] = []
    for req, item in zip(requests, items, strict=True):
        if not isinstance(item, dict) or item.get("id") != req.id:
            raise EnclaveError("verify answer out of order", code="malformed_answer")
        error = item.get("error")
        if error is not None:  # the enclave refused this request alone
            if not isinstance(error, dict):
                raise EnclaveError("malformed error in a verify answer", code="malformed_answer")
            out.append(RejectedItem(req.id, str(error.get("code")), str(error.get("message"))))
            continue
        evidence = item.get("evidence")
        if not isinstance(evidence, bytes):
            raise EnclaveError("verify answer without evidence", code="malformed_answer")
        try:
            outputs = decode_tensors(item.get("outputs"), what=f"outputs of {req.id}")
        except EnclaveSideError as exc:
            raise EnclaveError(str(exc), code="malformed_answer") from None
        out.append(VerifiedItem(req.id, outputs, evidence))
    return VerifyResult(seq, out, mac)


def check_batch(
    attested: AttestedEnclave,
    requests: Sequence[VerifyRequest],
    result: VerifyResult,
    session: SessionKey | None = None,
) -> None:
    """Every item bound to its request's exact inputs, id, nonce and returned outputs.

    With a ``session`` and a result that carries its MAC, the batch's signed result is
    authenticated by the MAC (a hash) instead of its ES256 signature (an ECDSA verify and a
    COSE decode); every other check runs as before. A wrong MAC is refused, never retried as
    a signature: nothing but the enclave and this gateway can make a right one."""
    verified: dict[bytes, dict[str, Any]] = {}  # the batch's one signed result, checked once
    if session is not None and result.mac is not None:
        first = next((it for it in result.items if isinstance(it, VerifiedItem)), None)
        if first is not None:
            signed = decode_result_evidence(first.evidence)["result"]
            if not session.check(signed, result.mac):
                raise SignatureError("the batch's MAC does not check under our enclave session")
            accept_authenticated_result(signed, attested, verified)
    for req, item in zip(requests, result.items, strict=True):
        if isinstance(item, RejectedItem):
            continue  # nothing was signed for it, and it is never reported verified
        check_verification(
            item.evidence,
            attested=attested,
            inputs=req.inputs,
            nonce=req.nonce,
            request_id=req.id,
            outputs=item.outputs,
            verified_results=verified,
        )


# -- the real client ------------------------------------------------------------------------


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class SocketEnclaveClient:
    """An EnclaveClient over the enclave's Unix socket.

    Up to ``max_connections`` calls run at once, each on its own connection (the enclave
    serves a connection one frame at a time); idle connections are kept for reuse. A
    connection that failed, timed out or lost step is closed, never reused. ``timeout_s``
    bounds a whole call (send + enclave work + answer).
    """

    def __init__(
        self,
        socket_path: Path | str,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES,
        max_connections: int = 4,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._ids = itertools.count(1)
        self._closed = False

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.socket_path)),
                timeout=self.connect_timeout_s,
            )
        except (OSError, TimeoutError) as exc:
            raise EnclaveUnavailable(
                f"cannot connect to the enclave at {self.socket_path}: {exc}"
            ) from None
        return _Connection(reader, writer)

    def reset(self) -> None:
        """Drop idle connections (after the enclave restarted they lead nowhere)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def _exchange(
        self, conn: _Connection, frame: bytes, request_id: int, timeout_s: float
    ) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            conn.writer.write(frame)
            await conn.writer.drain()
            body = await protocol.read_frame(conn.reader, self.max_frame_bytes, None)
        if body.get("id") != request_id and not ("error" in body and body.get("id") is None):
            raise ProtocolError(f"answer id {body.get('id')!r} for request {request_id}")
        return body

    async def _call(self, op: str, timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
        if self._closed:
            raise EnclaveUnavailable("the enclave client is closed")
        request_id = next(self._ids)
        try:
            frame = protocol.encode_frame(
                protocol.request(request_id, op, **args), self.max_frame_bytes
            )
        except ProtocolError as exc:
            raise EnclaveError(str(exc), code=exc.code) from None
        timeout = self.timeout_s if timeout_s is None else timeout_s
        async with self._slots:
            for attempt in range(2):
                reused = bool(self._idle)
                conn = self._idle.pop() if reused else await self._connect()
                keep = False
                try:
                    body = await self._exchange(conn, frame, request_id, timeout)
                    keep = "result" in body or body.get("id") == request_id
                except (protocol.ConnectionClosed, BrokenPipeError, ConnectionResetError) as exc:
                    # a pooled connection whose enclave went away meanwhile: one fresh try
                    if reused and attempt == 0:
                        continue
                    raise EnclaveUnavailable(
                        f"the enclave closed the connection ({op}): {exc!r}"
                    ) from None
                except TimeoutError:
                    raise EnclaveUnavailable(
                        f"the enclave did not answer {op} in {timeout} s"
                    ) from None
                except (OSError, asyncio.IncompleteReadError) as exc:
                    raise EnclaveUnavailable(
                        f"enclave connection failed during {op}: {exc!r}"
                    ) from None
                except ProtocolError as exc:
                    raise EnclaveUnavailable(f"bad frame from the enclave ({op}): {exc}") from None
                finally:
                    if keep and not self._closed:
                        self._idle.append(conn)
                    else:
                        conn.close()
                break
        error = body.get("error")
        if error is not None:
            code = error.get("code") if isinstance(error, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            raise EnclaveError(f"enclave refused {op}: {message}", code=str(code))
        result = body.get("result")
        if not isinstance(result, dict):
            raise EnclaveError(f"malformed answer to {op}", code="malformed_answer")
        return result

    def health(self) -> EnclaveHealth:
        # a bare socket client knows nothing of attestation: up unless closed
        if self._closed:
            return EnclaveHealth(EnclaveState.DOWN, "the enclave client is closed")
        return EnclaveHealth(EnclaveState.UP)

    def snapshot(self) -> dict[str, Any]:
        return {"state": self.health().state.value, "socket": str(self.socket_path)}

    async def ping(self) -> None:
        await self._call("ping")

    async def info(self) -> dict[str, Any]:
        return await self._call("info")

    async def attest(
        self, nonce: bytes, user_data: bytes | None = None, session_key: bytes | None = None
    ) -> bytes:
        """``session_key``: offer a MAC session (:mod:`fides_core.session`)."""
        args: dict[str, Any] = {"nonce": nonce, "user_data": user_data}
        if session_key is not None:
            args["session_key"] = session_key
        evidence = (await self._call("attest", **args)).get("evidence")
        if not isinstance(evidence, bytes):
            raise EnclaveError("attest answer without evidence", code="malformed_answer")
        return evidence

    async def verify(
        self, requests: Sequence[VerifyRequest], session: bytes | None = None
    ) -> VerifyResult:
        """``session``: a session id; the enclave then MACs the result if it knows it."""
        args: dict[str, Any] = {"requests": encode_requests(requests)}
        if session is not None:
            args["session"] = session
        result = await self._call("verify", **args)
        return _result_from_wire(result, requests)

    async def close(self) -> None:
        self._closed = True
        self.reset()


# -- the supervisor -------------------------------------------------------------------------


# Run by ``python -I -c``: puts the measured source root first on sys.path (argv[1]) and runs
# the enclave's command line as ``python -m enclave_sim.cli`` would.
_ENCLAVE_BOOTSTRAP = (
    "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); "
    "runpy.run_module('enclave_sim.cli', run_name='__main__', alter_sys=True)"
)


@dataclass
class EnclaveLaunch:
    """How to start the enclave process: ``enclave_sim.cli run ...`` from ``code_root``.

    The interpreter runs isolated (``-I``: no PYTHON* variables, no user site, neither the
    working directory nor a script's folder on ``sys.path``), with ``code_root`` first on its
    path: the enclave runs the ``enclave_sim`` and ``fides_core`` that the gateway measured
    (``fides_core.measurement.CODE_ROOT``), never a package of the same name in the directory
    it is started from (``python -m`` puts that first) or on ``PYTHONPATH``. Installed
    libraries (numpy, onnxruntime, cryptography) still come from the interpreter's
    site-packages. ``cwd`` (default: the gateway's) only anchors relative paths."""

    socket_path: Path
    sealed_model: Path
    platform_dir: Path
    extra_args: Sequence[str] = ()  # e.g. ("--transition-us", "5", "--paging")
    python: str = sys.executable
    cwd: Path | None = None
    env: Mapping[str, str] | None = None  # default: this process's environment
    log_path: Path | None = None  # default: inherit stderr
    code_root: Path = CODE_ROOT

    def command(self) -> list[str]:
        return [
            self.python,
            "-I",
            "-c",
            _ENCLAVE_BOOTSTRAP,
            str(self.code_root),
            "run",
            "--socket",
            str(self.socket_path),
            "--sealed-model",
            str(self.sealed_model),
            "--platform-dir",
            str(self.platform_dir),
            "--exit-with-parent",  # no orphan enclave when the gateway is killed outright
            *self.extra_args,
        ]


@dataclass
class SupervisorCounters:
    starts: int = 0  # processes started, first start and restarts
    restarts: int = 0  # successful restarts after a crash
    crashes: int = 0  # the process exited or stopped answering while up
    failed_starts: int = 0  # starts that did not reach an attested "up"
    check_failures: int = 0  # results whose evidence did not check (never returned)
    mac_checks: int = 0  # batches authenticated by the session's MAC
    signature_checks: int = 0  # batches authenticated by their signature (no session MAC)
    session_renewals: int = 0  # MAC sessions agreed again after the enclave dropped ours
    last_error: str = ""


def _same_boot(a: AttestedEnclave, b: AttestedEnclave) -> bool:
    """Whether two attestations are of one enclave boot (its module id and result key)."""
    return a.module_id == b.module_id and (
        a.public_key.public_numbers() == b.public_key.public_numbers()
    )


# Input bytes of a verify call below which the gateway checks its evidence on the event loop
# (about 0.2 ms of hashing and one signature check at this size; docs/enclave.md).
INLINE_CHECK_BYTES = 64 * 1024


class EnclaveSupervisor:
    """Starts, attests, watches and restarts the enclave process; an EnclaveClient itself.

    ``root``: the pinned root certificate (PEM or object); ``policy``: the measurements we
    accept. Calls made while the state is not ``up`` raise :class:`EnclaveUnavailable`.
    Restart backoff: ``backoff_initial_s`` doubling to ``backoff_max_s``; after
    ``max_consecutive_failures`` failed restarts the state is ``down`` and it gives up.
    A running enclave is pinged every ``health_interval_s`` (0: never); ``health_failures``
    missed pings in a row count as a crash (the process is killed and restarted).
    When the enclave drops the MAC session (its table holds a bounded number), results are
    checked by their signatures and a new session is agreed with the same boot in the
    background, at most once per ``session_renew_interval_s``.
    """

    def __init__(
        self,
        launch: EnclaveLaunch,
        *,
        root: x509.Certificate | bytes | str,
        policy: Policy,
        ready_timeout_s: float = 60.0,
        call_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_consecutive_failures: int = 10,
        health_interval_s: float = 5.0,
        health_failures: int = 3,
        stop_timeout_s: float = 10.0,
        check_results: bool = True,
        session_renew_interval_s: float = 5.0,
    ) -> None:
        self.launch = launch
        self.root = load_root(root)
        self.policy = policy
        self.ready_timeout_s = ready_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.max_consecutive_failures = max_consecutive_failures
        self.health_interval_s = health_interval_s
        self.health_failures = health_failures
        self.stop_timeout_s = stop_timeout_s
        self.check_results = check_results
        self.session_renew_interval_s = session_renew_interval_s
        self.counters = SupervisorCounters()
        # (round trip, evidence check) seconds of each successful call, for the metrics
        self.on_timing: Callable[[float, float], None] | None = None
        self._client = SocketEnclaveClient(launch.socket_path, timeout_s=call_timeout_s)
        self._state = EnclaveState.DOWN
        self._process: asyncio.subprocess.Process | None = None
        self._log_file: IO[bytes] | None = None
        self._attested: AttestedEnclave | None = None
        self._session: SessionKey | None = None  # agreed with the attested boot
        self._renewal: asyncio.Task[None] | None = None  # a new session being agreed
        self._last_renewal = -math.inf  # time.monotonic() of the last attempt
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False
        self._up = asyncio.Event()

    # -- state ---------------------------------------------------------------------------

    @property
    def state(self) -> EnclaveState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def attested(self) -> AttestedEnclave | None:
        """The attested identity of the running enclave (None unless up)."""
        return self._attested if self._state is EnclaveState.UP else None

    @property
    def restarts(self) -> int:
        return self.counters.restarts

    def health(self) -> EnclaveHealth:
        reason = "" if self._state is EnclaveState.UP else self.counters.last_error
        if self._state is EnclaveState.STARTING and not reason:
            reason = "not attested yet"
        return EnclaveHealth(self._state, reason, self.counters.restarts)

    def snapshot(self) -> dict[str, Any]:
        """For health endpoints and metrics."""
        attested = self.attested
        return {
            "state": self._state.value,
            "pid": self.pid,
            "module_id": attested.module_id if attested else None,
            "measurement": attested.measurement.hex() if attested else None,
            "simulated": attested.simulated if attested else None,
            "starts": self.counters.starts,
            "restarts": self.counters.restarts,
            "crashes": self.counters.crashes,
            "failed_starts": self.counters.failed_starts,
            "check_failures": self.counters.check_failures,
            "session": self._session is not None and attested is not None,
            "mac_checks": self.counters.mac_checks,
            "signature_checks": self.counters.signature_checks,
            "session_renewals": self.counters.session_renewals,
            "last_error": self.counters.last_error,
        }

    async def wait_up(self, timeout_s: float) -> None:
        """Wait until the state is ``up`` (after a restart); EnclaveUnavailable on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._state is not EnclaveState.UP:
            if self._state is EnclaveState.DOWN and self._monitor is None:
                raise EnclaveUnavailable(f"the enclave is down: {self.counters.last_error}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise EnclaveUnavailable(f"the enclave is not up after {timeout_s} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), timeout=min(left, 0.5))

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start and attest the enclave; raises EnclaveUnavailable if it does not come up."""
        if self._monitor is not None:
            return
        self._stopping = False
        self._set_state(EnclaveState.STARTING)
        try:
            await self._launch()
        except Exception as exc:
            self.counters.last_error = self.counters.last_error or f"{type(exc).__name__}: {exc}"
            self._set_state(EnclaveState.DOWN)
            raise EnclaveUnavailable(
                f"the enclave did not start: {type(exc).__name__}: {exc}"
            ) from exc
        self._monitor = asyncio.create_task(self._watch(), name="enclave-supervisor")

    async def stop(self) -> None:
        """Stop watching and stop the process by its pid (SIGTERM, then SIGKILL)."""
        self._stopping = True
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._renewal
            self._renewal = None
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._monitor
            self._monitor = None
        await self._terminate()
        self._client.reset()
        self._set_state(EnclaveState.DOWN)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _set_state(self, state: EnclaveState) -> None:
        if state is not self._state:
            log.info("enclave state %s -> %s", self._state.value, state.value)
        self._state = state
        if state is EnclaveState.UP:
            self._up.set()
        else:
            self._up.clear()
            self._attested = None
            self._session = None

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.launch.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.launch.log_path is not None and self._log_file is None:
            self._log_file = self.launch.log_path.open("ab")
        env = dict(self.launch.env) if self.launch.env is not None else dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.counters.starts += 1
        return await asyncio.create_subprocess_exec(
            *self.launch.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file is not None else None,
            cwd=self.launch.cwd,
            env=env,
            start_new_session=True,  # a Ctrl-C to the gateway does not reach it; stop() does
        )

    async def _launch(self) -> None:
        """Spawn, wait for the socket, attest; on any failure the process is stopped."""
        self._client.reset()
        self._process = await self._spawn()
        try:
            await self._wait_ready(self._process)
            attested, session = await self._attest_with_own_nonce()
        except BaseException as exc:
            self.counters.failed_starts += 1
            self.counters.last_error = f"{type(exc).__name__}: {exc}"
            await self._terminate()
            raise
        self._set_state(EnclaveState.UP)
        self._attested, self._session = attested, session
        log.warning(
            "enclave pid %d up and attested: %s, measurement %s%s",
            self._process.pid,
            attested.module_id,
            attested.measurement.hex()[:16],
            " (SIMULATED)" if attested.simulated else "",
        )

    async def _attest_with_own_nonce(self) -> tuple[AttestedEnclave, SessionKey | None]:
        """Challenge the enclave behind the socket, offering a MAC session, and check its
        evidence against the pinned root and the policy (raises AttestationError or
        EnclaveError). The session is None when the enclave does not offer one (it predates
        sessions): its results are then checked by their signatures."""
        nonce = secrets.token_bytes(32)
        offer = SessionOffer.new()
        evidence = await self._client.attest(nonce, session_key=offer.public)
        attested = verify_attestation(evidence, root=self.root, policy=self.policy, nonce=nonce)
        fides_claims = attested.claims.get("fides")
        answer = fides_claims.get("session") if isinstance(fides_claims, dict) else None
        if answer is None:
            log.warning("the enclave %s offers no MAC session", attested.module_id)
            return attested, None
        try:
            return attested, offer.complete(answer, nonce=nonce, module_id=attested.module_id)
        except SessionError as exc:
            raise BindingError(f"the attested session is not ours: {exc}") from None

    def _renew_session(self, attested: AttestedEnclave) -> None:
        """Agree a new MAC session with the boot ``attested`` in the background (one at a
        time, at most once per ``session_renew_interval_s``: a peer on the socket that keeps
        pushing ours out of the enclave's table costs an attestation that often, no more)."""
        now = time.monotonic()
        if self._renewal is not None or now - self._last_renewal < self.session_renew_interval_s:
            return
        self._last_renewal = now
        self._renewal = asyncio.create_task(self._renew(attested), name="enclave-session")

    async def _renew(self, attested: AttestedEnclave) -> None:
        try:
            fresh, session = await self._attest_with_own_nonce()
            if session is None:
                return  # the enclave no longer offers sessions: signatures it is
            if self._attested is not attested or not _same_boot(fresh, attested):
                # restarted meanwhile: the new boot's start agreed its own session
                log.info("a new MAC session was agreed with another boot; not used")
                return
            self._session = session
            self.counters.session_renewals += 1
            log.warning("a new MAC session agreed with the enclave %s", attested.module_id)
        except (EnclaveError, AttestationError, OSError) as exc:
            log.warning("could not agree a new MAC session (checking signatures): %s", exc)
        finally:
            self._renewal = None

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        last = "no answer yet"
        while True:
            if process.returncode is not None:
                raise EnclaveUnavailable(
                    f"the enclave process exited with status {process.returncode} at boot"
                    + (f" (log: {self.launch.log_path})" if self.launch.log_path else "")
                )
            if self.launch.socket_path.exists():
                try:
                    await self._client._call("ping", timeout_s=2.0)
                    return
                except EnclaveError as exc:
                    last = str(exc)
            if time.monotonic() > deadline:
                raise EnclaveUnavailable(
                    f"the enclave did not answer within {self.ready_timeout_s} s: {last}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), timeout=0.1)

    async def _terminate(self, *, kill: bool = False) -> None:
        """Stop the process by its pid: SIGTERM (SIGKILL when ``kill``, for a hung enclave
        that would not handle SIGTERM), then SIGKILL after ``stop_timeout_s``."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout=self.stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                await asyncio.wait_for(process.wait(), timeout=self.stop_timeout_s)
        if self._log_file is not None and process is not None:
            self._log_file.flush()

    async def _until_unhealthy(self, process: asyncio.subprocess.Process) -> str:
        """Return why the running enclave must be replaced (exited, or stopped answering)."""
        missed = 0
        while True:
            interval = self.health_interval_s if self.health_interval_s > 0 else None
            try:
                rc = await asyncio.wait_for(process.wait(), timeout=interval)
                return f"the enclave process exited with status {rc}"
            except TimeoutError:
                pass
            try:
                await self._client._call("ping", timeout_s=max(1.0, self.health_interval_s))
                missed = 0
            except EnclaveError as exc:
                missed += 1
                if missed >= self.health_failures:
                    return f"the enclave missed {missed} health checks: {exc}"

    async def _watch(self) -> None:
        while not self._stopping:
            process = self._process
            if process is None:
                return
            why = await self._until_unhealthy(process)
            if self._stopping:
                return
            self.counters.crashes += 1
            self.counters.last_error = why
            log.error("enclave pid %d crashed: %s; restarting", process.pid, why)
            self._set_state(EnclaveState.RESTARTING)
            await self._terminate(kill=True)
            delay = self.backoff_initial_s
            failures = 0
            while not self._stopping:
                await asyncio.sleep(delay)
                try:
                    await self._launch()
                except Exception as exc:
                    failures += 1
                    log.error("enclave restart %d failed: %s", failures, exc)
                    if failures >= self.max_consecutive_failures:
                        self._set_state(EnclaveState.DOWN)
                        log.error("enclave down after %d failed restarts; giving up", failures)
                        self._monitor = None
                        return
                    delay = min(delay * 2, self.backoff_max_s)
                    continue
                self.counters.restarts += 1
                break

    # -- EnclaveClient -------------------------------------------------------------------

    def _require_up(self) -> AttestedEnclave:
        attested = self.attested
        if attested is None:
            raise EnclaveUnavailable(f"the enclave is {self._state.value}")
        return attested

    async def ping(self) -> None:
        self._require_up()
        await self._client.ping()

    async def info(self) -> dict[str, Any]:
        self._require_up()
        return await self._client.info()

    async def attest(self, nonce: bytes, user_data: bytes | None = None) -> bytes:
        """Relay a client's challenge (the client checks the evidence itself)."""
        self._require_up()
        return await self._client.attest(nonce, user_data)

    async def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        """Verify a batch; each result is checked against the attested key, inputs and
        nonce before it is returned. A result from another boot (the enclave restarted in
        between) fails the check and raises EnclaveUnavailable: never reported verified."""
        attested, session = self._require_up(), self._session
        t0 = time.perf_counter()
        result = await self._client.verify(requests, session.id if session else None)
        t1 = time.perf_counter()
        if self.check_results:
            signed = any(isinstance(it, VerifiedItem) for it in result.items)
            if signed and session is not None and result.mac is None and self._session is session:
                # the enclave no longer knows our session (dropped from its table): checked
                # by the signature until a new one is agreed, and the status says so
                log.warning("the enclave dropped our MAC session; checking signatures")
                self._session = None
                self._renew_session(attested)
            try:
                # One MAC (or ES256 signature) per batch plus hashing per item: on the event
                # loop for small batches (a thread hop and the GIL hand-back cost more than
                # the check), off it when re-hashing the inputs takes long.
                size = sum(a.nbytes for r in requests for a in r.inputs.values())
                if size <= INLINE_CHECK_BYTES:
                    check_batch(attested, requests, result, session)
                else:
                    await asyncio.to_thread(check_batch, attested, requests, result, session)
                if signed and session is not None and result.mac is not None:
                    self.counters.mac_checks += 1
                elif signed:
                    self.counters.signature_checks += 1
            except AttestationError as exc:
                self.counters.check_failures += 1
                if self.attested is not attested:
                    raise EnclaveUnavailable(
                        f"the enclave restarted during the call: {exc}"
                    ) from None
                raise EnclaveError(
                    f"enclave evidence rejected: {type(exc).__name__}: {exc}",
                    code="evidence_rejected",
                ) from None
        if self.on_timing is not None:
            self.on_timing(t1 - t0, time.perf_counter() - t1)
        return result

    async def close(self) -> None:
        await self.stop()
        await self._client.close()


class AttachedEnclave(EnclaveSupervisor):
    """An enclave started elsewhere (a sidecar container sharing only the socket), attached
    to instead of spawned: the same attestation (our own nonce, the pinned root and
    measurement), the same check of every result, and the same states; no process to start
    or kill. When the enclave stops answering (``health_failures`` missed pings) or answers
    with evidence from another boot, the state goes to ``restarting`` and it is re-attested
    (with backoff) before it is used again, whoever restarted it.
    """

    def __init__(
        self,
        socket_path: Path,
        *,
        root: x509.Certificate | bytes | str,
        policy: Policy,
        ready_timeout_s: float = 30.0,
        call_timeout_s: float = 10.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        health_interval_s: float = 2.0,
        health_failures: int = 2,
    ) -> None:
        launch = EnclaveLaunch(socket_path=socket_path, sealed_model=Path(), platform_dir=Path())
        super().__init__(
            launch,
            root=root,
            policy=policy,
            ready_timeout_s=ready_timeout_s,
            call_timeout_s=call_timeout_s,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            health_interval_s=health_interval_s,
            health_failures=health_failures,
        )
        self._reattach = asyncio.Event()

    async def _attach(self) -> None:
        self._client.reset()
        if not self.launch.socket_path.exists():
            raise EnclaveUnavailable(f"no enclave socket at {self.launch.socket_path}")
        await self._client._call("ping", timeout_s=2.0)
        attested, session = await self._attest_with_own_nonce()
        self.counters.starts += 1
        self._set_state(EnclaveState.UP)
        self._attested, self._session = attested, session
        log.warning(
            "attached to the enclave at %s: %s, measurement %s%s",
            self.launch.socket_path,
            attested.module_id,
            attested.measurement.hex()[:16],
            " (SIMULATED)" if attested.simulated else "",
        )

    async def start(self) -> None:
        """Attach (waiting up to ``ready_timeout_s`` for the socket); keeps retrying in the
        background when it is not there yet, and raises EnclaveUnavailable meanwhile."""
        if self._monitor is not None:
            return
        self._stopping = False
        self._set_state(EnclaveState.STARTING)
        self._monitor = asyncio.create_task(self._watch(), name="enclave-attach")
        await self.wait_up(self.ready_timeout_s)

    async def _watch(self) -> None:
        delay, was_up, failures = self.backoff_initial_s, False, 0
        while not self._stopping:
            if self._state is not EnclaveState.UP:
                try:
                    await self._attach()
                except (EnclaveError, AttestationError, OSError) as exc:
                    self.counters.failed_starts += 1
                    self.counters.last_error = f"{type(exc).__name__}: {exc}"
                    failures += 1
                    if failures >= self.max_consecutive_failures and (
                        self._state is EnclaveState.RESTARTING
                    ):
                        # not a passing restart any more (a replaced sidecar the policy
                        # refuses, a socket gone): down, so readiness says so; still retried
                        log.error(
                            "enclave at %s: %d attempts to re-attach failed (%s); down, "
                            "still retrying",
                            self.launch.socket_path,
                            failures,
                            self.counters.last_error,
                        )
                        self._set_state(EnclaveState.DOWN)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.backoff_max_s)
                    continue
                delay, failures = self.backoff_initial_s, 0
                if was_up:
                    self.counters.restarts += 1
                was_up = True
            why = await self._until_gone()
            if self._stopping:
                return
            self.counters.crashes += 1
            self.counters.last_error = why
            log.error("enclave at %s lost: %s; re-attaching", self.launch.socket_path, why)
            self._set_state(EnclaveState.RESTARTING)

    async def _until_gone(self) -> str:
        missed = 0
        while True:
            self._reattach.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reattach.wait(), timeout=self.health_interval_s)
                return "it answered with evidence from another boot"
            try:
                await self._client._call("ping", timeout_s=max(1.0, self.health_interval_s))
                missed = 0
            except EnclaveError as exc:
                missed += 1
                if missed >= self.health_failures:
                    return f"it missed {missed} health checks: {exc}"

    async def verify(self, requests: Sequence[VerifyRequest]) -> VerifyResult:
        try:
            return await super().verify(requests)
        except EnclaveError as exc:
            if exc.code == "evidence_rejected":  # a new boot behind the socket: re-attest first
                self._reattach.set()
                raise EnclaveUnavailable(f"the enclave must be re-attested: {exc}") from None
            raise

"""The enclave process's server: a Unix-socket server in front of an EnclaveCore.

Only a Unix socket, mode 0600, no network listener. One thread per connection, blocking
sockets: a thread reads a frame, runs the call (the model, hashing, signing) and writes the
answer, with no event loop and no hand-off between threads on the way. Connections are
independent, so a client that sends garbage or hangs up mid-frame only loses its own
connection, and calls on different connections run side by side (onnxruntime releases the
GIL). The gateway keeps a small pool of connections per enclave, so the number of threads
stays small; beyond ``max_connections`` a new connection is told ``busy`` and closed.

Why threads rather than asyncio (issue 25): a one-row verify through the asyncio server (its
loop, then its thread pool for the model) took 533-556 µs per call, through this one 401-405
µs, measured one call at a time from the gateway's client on the development machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from enclave_sim.core import EnclaveCore
from fides_core import enclave_wire as protocol
from fides_core.enclave_errors import (
    BootError,
    EnclaveFailure,
    FrameTooLarge,
    InvalidRequest,
    MalformedFrame,
    ProtocolError,
    UnknownOperation,
)
from fides_core.tensors import encode_tensor
from fides_core.verify import RejectedItem, parse_requests

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 64


class _Closed(Exception):
    """The peer closed the connection cleanly between two frames."""


class _Dropped(Exception):
    """The connection broke or stalled mid-frame: it is closed without an answer."""


def _recv_exact(conn: socket.socket, size: int, deadline: float | None) -> bytes:
    """``size`` bytes; before ``deadline`` (monotonic seconds) when one is given."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            conn.settimeout(left)
        n = conn.recv_into(view[got:])
        if n == 0:
            if got == 0 and deadline is None:
                raise _Closed
            raise _Dropped(f"connection closed after {got} of {size} bytes")
        got += n
    return bytes(buf)


def claim_socket_path(path: Path) -> None:
    """Remove a stale socket left by a crashed enclave; refuse to take over a live one or a
    file that is not a socket."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BootError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: a crashed enclave's socket
        return
    except OSError as exc:
        raise BootError(f"cannot probe the existing socket {path}: {exc}") from None
    finally:
        probe.close()
    raise BootError(f"another process already serves {path}")


class EnclaveServer:
    """Serves an :class:`EnclaveCore` on a Unix socket until :meth:`close`."""

    def __init__(
        self,
        core: EnclaveCore,
        socket_path: Path,
        *,
        max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES,
        body_timeout_s: float = 30.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.core = core
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._lock = threading.Lock()
        self._closing = False

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def start(self) -> None:
        claim_socket_path(self.socket_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            listener.bind(str(self.socket_path))
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        listener.listen(self.max_connections)
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept_loop, name="enclave-accept", daemon=True
        )
        self._acceptor.start()
        log.warning("enclave %s listening on %s", self.core.module_id, self.socket_path)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, end every connection (a call in progress finishes first, its
        answer may not be delivered), remove the socket file."""
        with self._lock:
            self._closing = True
            connections = dict(self._connections)
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout_s)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading
        deadline = time.monotonic() + timeout_s
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                self.socket_path.unlink()

    # -- connections ---------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                busy = len(self._connections) >= self.max_connections
                if not busy:
                    thread = threading.Thread(
                        target=self._serve, args=(conn,), name="enclave-conn", daemon=True
                    )
                    self._connections[conn] = thread
            if busy:
                log.warning("refusing a connection: %d open already", self.max_connections)
                with contextlib.suppress(OSError):
                    conn.settimeout(1.0)
                    conn.sendall(
                        protocol.encode_frame(
                            protocol.error(
                                None, "busy", f"{self.max_connections} connections are open"
                            )
                        )
                    )
                conn.close()
                continue
            thread.start()

    def _read_frame(self, conn: socket.socket) -> dict[str, Any]:
        """One frame: the header may take as long as the client likes (an idle pooled
        connection), the body must follow within ``body_timeout_s``."""
        conn.settimeout(None)
        header = _recv_exact(conn, protocol.HEADER.size, None)
        (length,) = protocol.HEADER.unpack(header)
        if length > self.max_frame_bytes:
            raise FrameTooLarge(
                f"frame of {length} bytes exceeds the maximum of {self.max_frame_bytes}"
            )
        if length == 0:
            raise MalformedFrame("empty frame")
        data = _recv_exact(conn, length, time.monotonic() + self.body_timeout_s)
        return protocol.decode_body(data)

    def _send(self, conn: socket.socket, body: dict[str, Any]) -> None:
        try:
            frame = protocol.encode_frame(body, self.max_frame_bytes)
        except FrameTooLarge as exc:
            frame = protocol.encode_frame(
                protocol.error(body.get("id"), "response_too_large", str(exc))
            )
        conn.settimeout(self.body_timeout_s)  # a client that stops reading is dropped
        conn.sendall(frame)

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                try:
                    body = self._read_frame(conn)
                except _Closed:
                    return
                except (_Dropped, TimeoutError, ConnectionError):
                    log.info("connection dropped mid-frame (truncated or stalled)")
                    return
                except FrameTooLarge as exc:
                    # the body is unread, so the stream is out of step: answer, then close
                    self._send(conn, protocol.error(None, exc.code, str(exc)))
                    return
                except ProtocolError as exc:
                    self._send(conn, protocol.error(exc.request_id, exc.code, str(exc)))
                    continue
                self._send(conn, self._dispatch(body))
        except OSError:
            return  # the peer went away (or close() shut the connection down)
        finally:
            with self._lock:
                self._connections.pop(conn, None)
            conn.close()

    def _dispatch(self, body: dict[str, Any]) -> dict[str, Any]:
        request_id = body.get("id")
        op = body.get("op")
        try:
            if op == "ping":
                result: dict[str, Any] = {"pong": True, "module_id": self.core.module_id}
            elif op == "info":
                result = self.core.info()
            elif op == "attest":
                nonce, user_data = body.get("nonce"), body.get("user_data")
                session_key = body.get("session_key")
                if not isinstance(nonce, bytes) or not all(
                    isinstance(x, bytes | None) for x in (user_data, session_key)
                ):
                    raise InvalidRequest(
                        "attest needs a byte-string nonce (and optional user_data, session_key)"
                    )
                result = {"evidence": self.core.attest(nonce, user_data, session_key)}
            elif op == "verify":
                result = self._verify(body)
            else:
                raise UnknownOperation(f"unknown operation {op!r}; known: {protocol.OPS}")
        except EnclaveFailure as exc:
            return protocol.error(request_id, exc.code, str(exc))
        except Exception as exc:  # never crash the server on one request; never claim success
            log.exception("internal error serving %r", op)
            return protocol.error(request_id, "internal", f"{type(exc).__name__}: {exc}")
        return protocol.answer(request_id, result)

    def _verify(self, body: dict[str, Any]) -> dict[str, Any]:
        session = body.get("session")
        if session is not None and not isinstance(session, bytes):
            raise InvalidRequest("session must be a byte string (the id from attest)")
        out = self.core.verify(parse_requests(body.get("requests")))
        answer: dict[str, Any] = {
            "seq": out.seq,
            "items": [
                {"id": item.id, "error": {"code": item.code, "message": item.message}}
                if isinstance(item, RejectedItem)
                else {
                    "id": item.id,
                    "outputs": {n: encode_tensor(np.asarray(v)) for n, v in item.outputs.items()},
                    "evidence": item.evidence,
                }
                for item in out.items
            ],
        }
        if session is not None and out.result:
            mac = self.core.session_mac(session, out.result)
            if mac is not None:  # an unknown session: no MAC, the signature is checked
                answer["mac"] = mac
        return answer


def serve(
    core: EnclaveCore,
    socket_path: Path,
    *,
    max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES,
    exit_with_parent: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT; the socket file is removed on the way out.

    ``exit_with_parent``: also stop when the process that started us goes away (a gateway
    killed with SIGKILL cannot stop its enclave, which would otherwise live on as an orphan).
    """
    server = EnclaveServer(core, socket_path, max_frame_bytes=max_frame_bytes)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    parent = os.getppid()
    server.start()
    try:
        while not stop.wait(0.5):
            if exit_with_parent and os.getppid() != parent:
                log.warning("the process that started the enclave (pid %d) is gone", parent)
                break
        log.warning("enclave %s stopping", core.module_id)
    finally:
        server.close()

"""The enclave process's server: an asyncio Unix-socket server in front of an EnclaveCore.

Only a Unix socket, mode 0600, no network listener. Each connection is served one frame at a
time; connections are independent, so a client that sends garbage or hangs up mid-frame only
loses its own connection. Model runs and signing go to a small thread pool (onnxruntime
releases the GIL), so one slow batch does not stop other connections from being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
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
    ProtocolError,
    UnknownOperation,
)
from fides_core.tensors import encode_tensor
from fides_core.verify import RejectedItem, VerifiedItem, parse_requests

log = logging.getLogger(__name__)

ITEM_OVERHEAD_BYTES = 64  # an answer item's map, keys and heads, beyond its strings and data


class ResponseTooLarge(EnclaveFailure):
    """The answer would not fit in a frame; refused before it is encoded."""

    code = "response_too_large"


def answer_size(items: list[VerifiedItem | RejectedItem]) -> int:
    """A lower bound on a verify answer's encoded size, from its items' strings and data."""
    total = 0
    for item in items:
        total += ITEM_OVERHEAD_BYTES + len(item.id or "")
        if isinstance(item, RejectedItem):
            total += len(item.code) + len(item.message)
        else:
            total += len(item.evidence) + sum(
                len(name) + ITEM_OVERHEAD_BYTES + np.asarray(v).nbytes
                for name, v in item.outputs.items()
            )
    return total


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
    def __init__(
        self,
        core: EnclaveCore,
        socket_path: Path,
        *,
        max_frame_bytes: int = protocol.DEFAULT_MAX_FRAME_BYTES,
        body_timeout_s: float = 30.0,
        workers: int = 2,
    ) -> None:
        self.core = core
        self.socket_path = socket_path
        self.max_frame_bytes = max_frame_bytes
        self.body_timeout_s = body_timeout_s
        # a request is about 17 CBOR items, plus 9 per further input (fides_core.enclave_wire)
        self.max_frame_items = max(
            protocol.DEFAULT_MAX_FRAME_ITEMS, 64 * core.config.max_batch_size
        )
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="enclave")
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        claim_socket_path(self.socket_path)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.socket_path))
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        log.warning("enclave %s listening on %s", self.core.module_id, self.socket_path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.socket_path.lstat().st_mode):
                self.socket_path.unlink()

    async def _send(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
        try:
            frame = protocol.encode_frame(body, self.max_frame_bytes)
        except FrameTooLarge as exc:
            frame = protocol.encode_frame(
                protocol.error(body.get("id"), "response_too_large", str(exc))
            )
        writer.write(frame)
        await writer.drain()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            while True:
                try:
                    body = await protocol.read_frame(
                        reader, self.max_frame_bytes, self.body_timeout_s, self.max_frame_items
                    )
                except protocol.ConnectionClosed:
                    return
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    log.info("connection dropped mid-frame (truncated or stalled)")
                    return
                except FrameTooLarge as exc:
                    # the body is unread, so the stream is out of step: answer, then close
                    await self._send(writer, protocol.error(None, exc.code, str(exc)))
                    return
                except ProtocolError as exc:
                    await self._send(writer, protocol.error(exc.request_id, exc.code, str(exc)))
                    continue
                await self._send(writer, await self._dispatch(body))
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, body: dict[str, Any]) -> dict[str, Any]:
        request_id = body.get("id")
        op = body.get("op")
        loop = asyncio.get_running_loop()
        try:
            if op == "ping":
                result: dict[str, Any] = {"pong": True, "module_id": self.core.module_id}
            elif op == "info":
                result = self.core.info()
            elif op == "attest":
                nonce, user_data = body.get("nonce"), body.get("user_data")
                session_key = body.get("session_key")
                if not all(isinstance(x, bytes | None) for x in (nonce, user_data, session_key)):
                    raise InvalidRequest(
                        "attest needs a byte-string nonce (and optional user_data, session_key)"
                    )
                if nonce is None:
                    raise InvalidRequest("attest needs a byte-string nonce")
                evidence = await loop.run_in_executor(
                    self._pool, self.core.attest, nonce, user_data, session_key
                )
                result = {"evidence": evidence}
            elif op == "verify":
                result = await loop.run_in_executor(self._pool, self._verify, body)
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
        out = self.core.verify(
            parse_requests(body.get("requests"), self.core.config.max_batch_size)
        )
        size = answer_size(out.items)
        if size > self.max_frame_bytes:  # refused before encoding; _send checks the exact size
            raise ResponseTooLarge(
                f"the answer holds at least {size} bytes; frames are at most {self.max_frame_bytes}"
            )
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


async def serve(
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    if exit_with_parent:
        parent = os.getppid()

        async def watch_parent() -> None:
            while os.getppid() == parent:
                await asyncio.sleep(0.5)
            log.warning("the process that started the enclave (pid %d) is gone", parent)
            stop.set()

        watcher = asyncio.create_task(watch_parent())
    await server.start()
    try:
        await stop.wait()
        log.warning("enclave %s stopping", core.module_id)
    finally:
        if watcher is not None:
            watcher.cancel()
        await server.close()

"""The enclave server's connection handling, in process: a connection limit that answers
``busy``, a body that trickles in slower than its deadline, a client that never reads, and a
close() that ends idle and busy connections alike."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from enclave_sim.core import EnclaveCore
from enclave_sim.pki import create_identity
from enclave_sim.server import EnclaveServer
from fides_core import enclave_wire as protocol
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.measurement import measure
from fides_core.tensors import encode_tensor
from tests.enclave_sim.helpers import call, connect, recv_frame, short_tmpdir
from tests.model_factory import tiny_classifier


@pytest.fixture(scope="module")
def core(tmp_path_factory: pytest.TempPathFactory) -> EnclaveCore:
    path = tmp_path_factory.mktemp("server") / "verifier.onnx"
    tiny_classifier(path)
    model = path.read_bytes()
    config = EnclaveModelConfig(max_batch_size=8)
    return EnclaveCore(model, config, measure(model, config), create_identity()[1])


@pytest.fixture
def server(core: EnclaveCore) -> Iterator[EnclaveServer]:
    with short_tmpdir() as d:
        srv = EnclaveServer(core, d / "e.sock", body_timeout_s=0.5, max_connections=2)
        srv.start()
        try:
            yield srv
        finally:
            srv.close()


def _ping(path: Path, request_id: int = 1) -> bool:
    with connect(path) as s:
        return call(s, protocol.request(request_id, "ping"))["result"]["pong"] is True


def test_connections_beyond_the_limit_are_told_busy(server: EnclaveServer) -> None:
    with connect(server.socket_path) as a, connect(server.socket_path) as b:
        assert call(a, protocol.request(1, "ping"))["result"]["pong"]
        assert call(b, protocol.request(2, "ping"))["result"]["pong"]
        with connect(server.socket_path) as c:
            answer = recv_frame(c)
            assert answer["error"]["code"] == "busy"
            assert c.recv(1) == b""  # and closed
        assert call(a, protocol.request(3, "ping"))["result"]["pong"]  # the others go on
    deadline = time.monotonic() + 10
    while True:  # the two closed connections free their places
        try:
            if _ping(server.socket_path):
                break
        except (KeyError, OSError):
            pass
        assert time.monotonic() < deadline, "the server never freed a connection"
        time.sleep(0.05)


def test_a_body_that_trickles_past_its_deadline_is_dropped(server: EnclaveServer) -> None:
    """One byte every 0.2 s: each read is quick, the whole body is not (deadline 0.5 s)."""
    body = protocol.encode_frame(protocol.request(9, "ping"))
    with connect(server.socket_path) as s:
        s.sendall(body[:5])
        dropped = False
        for byte in body[5:]:
            time.sleep(0.2)
            try:
                s.sendall(bytes([byte]))
            except OSError:
                dropped = True
                break
        if not dropped:
            s.settimeout(5)
            assert s.recv(1) == b""  # closed without an answer
    assert _ping(server.socket_path)


def test_a_client_that_never_reads_does_not_hold_the_server(server: EnclaveServer) -> None:
    """Large answers to a client that reads nothing: its connection is dropped once a send
    stalls for the deadline; other clients are served meanwhile."""
    x = np.ones((8, 4), np.float32)
    req = {"id": "r", "nonce": b"n" * 16, "inputs": {"input": encode_tensor(x)}}
    frame = protocol.encode_frame(protocol.request(1, "verify", requests=[req]))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(str(server.socket_path))
    try:
        s.settimeout(0.05)
        for _ in range(2000):  # fill both directions: the server blocks writing answers
            try:
                s.sendall(frame)
            except (TimeoutError, OSError):
                break
        assert _ping(server.socket_path)
        deadline = time.monotonic() + 10
        while server.open_connections:  # its stalled send times out: the connection goes
            assert time.monotonic() < deadline, "a client that never reads held its thread"
            time.sleep(0.05)
    finally:
        s.close()
    assert _ping(server.socket_path)


def test_close_ends_idle_connections_and_removes_the_socket(core: EnclaveCore) -> None:
    with short_tmpdir() as d:
        srv = EnclaveServer(core, d / "e.sock")
        srv.start()
        idle = connect(srv.socket_path)
        try:
            assert call(idle, protocol.request(1, "ping"))["result"]["pong"]
            t0 = time.monotonic()
            srv.close()
            assert time.monotonic() - t0 < 5
            idle.settimeout(5)
            assert idle.recv(1) == b""  # the server ended it
        finally:
            idle.close()
        assert not (d / "e.sock").exists()
        with pytest.raises(OSError):
            connect(d / "e.sock")


def test_a_truncated_header_then_eof_is_not_an_answer(server: EnclaveServer) -> None:
    with connect(server.socket_path) as s:
        s.sendall(struct.pack(">I", 10)[:2])
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        assert s.recv(1) == b""
    assert _ping(server.socket_path)

"""The enclave process and its socket: hostile frames fail closed, other connections go on."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket as socketlib
import stat
import struct
import threading
from dataclasses import replace
from pathlib import Path

import cbor2
import numpy as np
import pytest

from enclave_sim.sealing import seal
from fides_core import enclave_wire as protocol
from fides_core.attestation import (
    MeasurementMismatch,
    Policy,
    check_verification,
    verify_attestation,
)
from fides_core.tensors import encode_tensor
from tests.enclave_sim.helpers import (
    EnclaveFiles,
    RunningEnclave,
    call,
    connect,
    copy_enclave_code,
    recv_frame,
    run_cli,
    running_enclave,
    short_tmpdir,
)
from tests.model_factory import tiny_expected


def _verify_body(request_id: int, x: np.ndarray, rid: str = "r1") -> dict[str, object]:
    return protocol.request(
        request_id,
        "verify",
        requests=[{"id": rid, "nonce": b"n" * 16, "inputs": {"input": encode_tensor(x)}}],
    )


def _still_serves(enclave: RunningEnclave) -> None:
    with connect(enclave.socket_path) as s:
        assert call(s, protocol.request(99, "ping"))["result"]["pong"] is True


def test_socket_is_private_and_process_has_no_network_listener(enclave: RunningEnclave) -> None:
    st = enclave.socket_path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    inodes = set()
    for fd in os.listdir(f"/proc/{enclave.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{enclave.pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing (a file being read): not a socket
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{table}") as f:
            rows = [line.split() for line in f.readlines()[1:]]
        assert not inodes & {row[9] for row in rows}, f"enclave has a {table} socket"


def test_attest_and_verify_over_the_socket(
    enclave: RunningEnclave, module_files: EnclaveFiles
) -> None:
    nonce = os.urandom(32)
    with connect(enclave.socket_path) as s:
        evidence = call(s, protocol.request(1, "attest", nonce=nonce))["result"]["evidence"]
        attested = verify_attestation(
            evidence,
            root=module_files.root_pem,
            policy=Policy.of(module_files.measurement.pcr0, allow_simulated=True),
            nonce=nonce,
        )
        x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
        answer = call(s, _verify_body(2, x))
    assert answer["id"] == 2
    item = answer["result"]["items"][0]
    check_verification(item["evidence"], attested=attested, inputs={"input": x}, nonce=b"n" * 16)
    probs = np.frombuffer(item["outputs"]["probabilities"]["data"], np.float32).reshape(3, 3)
    np.testing.assert_allclose(probs, tiny_expected(x)[1], rtol=1e-5)


def test_malformed_frame_gets_an_error_and_the_connection_goes_on(enclave: RunningEnclave) -> None:
    with connect(enclave.socket_path) as s:
        s.sendall(struct.pack(">I", 3) + b"\xff\xfe\xfd")
        assert recv_frame(s)["error"]["code"] == "malformed_frame"
        s.sendall(protocol.encode_frame({"not": "an envelope"}))  # no version
        assert recv_frame(s)["error"]["code"] == "unsupported_version"
        body = cbor2.dumps([1, 2])
        s.sendall(struct.pack(">I", len(body)) + body)
        assert recv_frame(s)["error"]["code"] == "malformed_frame"
        deep = b"\x81" * 100_000 + b"\x00"  # nesting bomb
        s.sendall(struct.pack(">I", len(deep)) + deep)
        assert recv_frame(s)["error"]["code"] == "malformed_frame"
        assert call(s, protocol.request(5, "ping"))["result"]["pong"] is True


def test_wrong_version_is_answered(enclave: RunningEnclave) -> None:
    with connect(enclave.socket_path) as s:
        answer = call(s, {"v": 2, "id": 7, "op": "ping"})
        assert answer["id"] == 7
        assert answer["error"]["code"] == "unsupported_version"
        assert "version 2" in answer["error"]["message"]


def test_unknown_op_and_bad_arguments(enclave: RunningEnclave) -> None:
    with connect(enclave.socket_path) as s:
        assert call(s, protocol.request(1, "shell", cmd="id"))["error"]["code"] == "unknown_op"
        assert call(s, protocol.request(2, "attest", nonce="text"))["error"]["code"] == (
            "bad_request"
        )
        bad = protocol.request(
            3,
            "verify",
            requests=[
                {
                    "id": "r",
                    "nonce": b"n" * 16,
                    "inputs": {"input": {"datatype": "FP32", "shape": [1, 4], "data": b"\0" * 3}},
                }
            ],
        )
        (item,) = call(s, bad)["result"]["items"]  # refused alone, the call answered
        assert item["id"] == "r"
        assert item["error"]["code"] == "bad_request"
        assert "evidence" not in item
        big = _verify_body(4, np.zeros((65, 4), np.float32))
        assert call(s, big)["error"]["code"] == "batch_too_large"
    _still_serves(enclave)


def test_oversized_frame_is_refused_and_closed(enclave: RunningEnclave) -> None:
    with connect(enclave.socket_path) as s:
        s.sendall(struct.pack(">I", protocol.DEFAULT_MAX_FRAME_BYTES + 1))
        assert recv_frame(s)["error"]["code"] == "frame_too_large"
        assert s.recv(1) == b""  # closed
    _still_serves(enclave)


def test_truncated_frame_drops_only_that_connection(enclave: RunningEnclave) -> None:
    with connect(enclave.socket_path) as other:
        with connect(enclave.socket_path) as s:
            s.sendall(struct.pack(">I", 100) + b"\xa1")  # promises 100 bytes, sends 1
        # the truncated connection is gone; the other one still works
        assert call(other, protocol.request(1, "ping"))["result"]["pong"] is True
        with connect(enclave.socket_path) as s:
            s.sendall(b"\x00\x00")  # half a header
        assert call(other, protocol.request(2, "ping"))["result"]["pong"] is True
        with connect(enclave.socket_path) as s:
            s.sendall(struct.pack(">I", 0))
            assert recv_frame(s)["error"]["code"] == "malformed_frame"
    _still_serves(enclave)


async def test_a_frame_that_stalls_after_its_first_byte_times_out() -> None:
    """An idle connection may wait for its next frame for ever; a frame that has begun (even
    one byte of its header) must be complete within the body deadline, or the connection is
    dropped (a stalled partial header once held its connection open for good)."""
    idle = asyncio.StreamReader()
    waiting = asyncio.ensure_future(protocol.read_frame(idle, body_timeout_s=0.2))
    await asyncio.sleep(0.4)
    assert not waiting.done()  # idle: no deadline yet
    waiting.cancel()
    for sent in (b"\x00", b"\x00\x00\x00", struct.pack(">I", 10) + b"\xa1"):
        reader = asyncio.StreamReader()
        reader.feed_data(sent)
        with pytest.raises(TimeoutError):
            await protocol.read_frame(reader, body_timeout_s=0.2)
    closed = asyncio.StreamReader()
    closed.feed_data(b"\x00\x00")
    closed.feed_eof()
    with pytest.raises(asyncio.IncompleteReadError):  # truncated, not a clean close
        await protocol.read_frame(closed, body_timeout_s=0.2)


def test_concurrent_connections(enclave: RunningEnclave) -> None:
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with connect(enclave.socket_path) as s:
                for i in range(5):
                    x = np.full((2, 4), k + i, np.float32)
                    answer = call(s, _verify_body(i, x, rid=f"w{k}-{i}"))
                    assert answer["result"]["items"][0]["id"] == f"w{k}-{i}"
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors


def test_a_second_enclave_cannot_take_a_live_socket(
    enclave: RunningEnclave, module_files: EnclaveFiles
) -> None:
    done = run_cli(
        "run",
        "--socket",
        str(enclave.socket_path),
        "--sealed-model",
        str(module_files.sealed_path),
        "--platform-dir",
        str(module_files.platform_dir),
    )
    assert done.returncode == 2
    assert "already serves" in done.stderr
    _still_serves(enclave)


def test_modified_and_resealed_enclave_is_caught_by_the_policy(
    module_files: EnclaveFiles, tmp_path: Path
) -> None:
    """The host changes an enclave code file and re-seals the model for the new measurement
    (in simulation the platform secret is on the host): the enclave boots, but its evidence
    carries another measurement, and the client's pinned policy rejects it."""
    root = tmp_path / "evil"
    code = copy_enclave_code(root)
    (code / "enclave_sim" / "core.py").write_text(
        (code / "enclave_sim" / "core.py").read_text() + "\n# exfiltrate inputs\n"
    )
    # a copy of the same platform, so that its rollback counter moves apart from the module's
    platform = tmp_path / "platform"
    shutil.copytree(module_files.platform_dir, platform)
    data, evil_measurement, _ = seal(
        module_files.model_bytes, module_files.config, platform, code_root=code
    )
    assert evil_measurement.pcr0 != module_files.measurement.pcr0
    evil_files = replace(module_files, sealed_path=tmp_path / "evil.sealed", platform_dir=platform)
    evil_files.sealed_path.write_bytes(data)
    nonce = os.urandom(32)
    with (
        short_tmpdir() as d,
        running_enclave(evil_files, d / "evil.sock", pythonpath=root) as evil,
        connect(evil.socket_path) as s,
    ):
        evidence = call(s, protocol.request(1, "attest", nonce=nonce))["result"]["evidence"]
    with pytest.raises(MeasurementMismatch):
        verify_attestation(
            evidence,
            root=module_files.root_pem,
            policy=Policy.of(module_files.measurement.pcr0, allow_simulated=True),
            nonce=nonce,
        )


def test_stale_socket_file_is_replaced(module_files: EnclaveFiles) -> None:
    with short_tmpdir() as d:
        path = d / "stale.sock"
        leftover = socketlib.socket(socketlib.AF_UNIX)
        leftover.bind(str(path))  # bound, never listening: like a crashed enclave's file
        leftover.close()
        with running_enclave(module_files, path) as running:
            _still_serves(running)
        assert not path.exists()  # removed on SIGTERM

"""Property tests of the enclave's socket protocol (enclave_sim/protocol.py) and of its server.

- ``decode_body`` and ``read_frame`` on arbitrary bytes raise only the protocol's own errors
  (or the documented end-of-stream ones); any frame that encodes decodes to itself.
- The server (an in-process ``EnclaveServer`` in front of a real ``EnclaveCore`` running the
  tiny verifier, on a Unix socket) answers every generated frame, hostile or not, with one
  frame carrying the same id and either a result or an error code; never ``internal`` (a
  hostile request is the sender's fault, and says so), and it keeps answering pings.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from enclave_sim.core import EnclaveCore
from enclave_sim.pki import create_identity
from enclave_sim.server import EnclaveServer
from fides_core import enclave_wire as protocol
from fides_core.enclave_config import EnclaveModelConfig
from fides_core.enclave_errors import FrameTooLarge, ProtocolError
from fides_core.measurement import measure
from fides_core.tensors import DATATYPES, encode_tensor
from tests.enclave_sim.helpers import connect, recv_frame, short_tmpdir
from tests.model_factory import tiny_classifier
from tests.reliability.conftest import fuzz_settings, record

MAX_FRAME = 64 * 1024

# integers CBOR holds without a tag (major types 0 and 1): beyond them a bignum tag, refused
cbor_ints = st.integers(-(2**64), 2**64 - 1)
cbor_scalars = (
    st.none()
    | st.booleans()
    | cbor_ints
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16)
)
cbor_keys = st.text(max_size=6) | cbor_ints | st.binary(max_size=4)
cbor_values = st.recursive(
    cbor_scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=6) | cbor_ints, inner, max_size=4)
    ),
    max_leaves=20,
)


# -- the parser ---------------------------------------------------------------------------------


@fuzz_settings(500)
@given(data=st.binary(max_size=300))
def test_decode_body_of_arbitrary_bytes(data: bytes) -> None:
    record("enclave: decode_body arbitrary bytes")
    try:
        body = protocol.decode_body(data)
    except ProtocolError as exc:
        rejected = exc
        assert rejected.code, "every protocol error has a wire code"
        return
    assert isinstance(body, dict)
    assert body["v"] == protocol.PROTOCOL_VERSION


async def _read_all(stream: bytes, max_frame: int) -> list[Any]:
    reader = asyncio.StreamReader()
    reader.feed_data(stream)
    reader.feed_eof()
    out: list[Any] = []
    for _ in range(64):  # bounded: every frame consumes at least its 4-byte header
        try:
            out.append(await protocol.read_frame(reader, max_frame, body_timeout_s=1.0))
        except protocol.ConnectionClosed:
            return out
        except (asyncio.IncompleteReadError, FrameTooLarge):
            return out  # the server closes the connection on these
        except ProtocolError as exc:
            out.append(exc)  # answered with an error frame; the connection goes on
    return out


@fuzz_settings(400)
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=40).map(lambda b: struct.pack(">I", len(b)) + b),
            st.dictionaries(st.sampled_from(["v", "id", "op"]), cbor_values).map(
                lambda d: protocol.HEADER.pack(len(cbor2.dumps(d))) + cbor2.dumps(d)
            ),
            st.binary(max_size=12),  # torn or lying headers
        ),
        max_size=6,
    )
)
def test_read_frame_on_arbitrary_streams(frames: list[bytes]) -> None:
    record("enclave: read_frame arbitrary streams")
    results = asyncio.run(_read_all(b"".join(frames), max_frame=1024))
    for r in results:
        assert isinstance(r, dict | ProtocolError)


@fuzz_settings(300)
@given(
    body=st.fixed_dictionaries(
        {"v": st.just(1), "id": st.integers(0, 2**63)},
        optional={"op": st.text(max_size=6), "x": cbor_values},
    )
)
def test_frames_round_trip(body: dict[str, Any]) -> None:
    record("enclave: frame round trips")
    frame = protocol.encode_frame(body)

    async def read() -> dict[str, Any]:
        reader = asyncio.StreamReader()
        reader.feed_data(frame)
        reader.feed_eof()
        return await protocol.read_frame(reader)

    got = asyncio.run(read())
    assert cbor2.dumps(got) == cbor2.dumps(body)  # NaN-safe equality


# -- the server ---------------------------------------------------------------------------------


@dataclass
class InProcessEnclave:
    socket_path: Path
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def enclave_server() -> Iterator[InProcessEnclave]:
    """A real EnclaveCore (tiny verifier, fresh in-memory root) behind EnclaveServer, served
    by an event loop in a thread; closed in teardown."""
    with short_tmpdir() as d:
        model_path = d / "verifier.onnx"
        tiny_classifier(model_path)
        model = model_path.read_bytes()
        config = EnclaveModelConfig(max_batch_size=8)
        _, identity = create_identity()
        core = EnclaveCore(model, config, measure(model, config), identity)
        server = EnclaveServer(core, d / "e.sock", max_frame_bytes=MAX_FRAME, body_timeout_s=2)
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="enclave-fuzz", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(server.start(), loop).result(timeout=30)
            yield InProcessEnclave(d / "e.sock", loop)
        finally:
            asyncio.run_coroutine_threadsafe(server.close(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()


tensor_maps = st.one_of(
    st.builds(
        lambda x: encode_tensor(x),
        hnp.arrays(
            st.sampled_from([DATATYPES["FP32"], DATATYPES["INT32"], DATATYPES["FP64"]]),
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
        ),
    ),
    st.fixed_dictionaries(
        {
            "datatype": st.sampled_from([*DATATYPES, "BYTES", "x"]) | cbor_values,
            "shape": st.lists(st.integers(-1, 5) | st.sampled_from([2**31, 2**62]), max_size=9)
            | cbor_values,
            "data": st.binary(max_size=80) | cbor_values,
        }
    ),
    cbor_values,
)
verify_requests = st.lists(
    st.fixed_dictionaries(
        {
            "id": st.text(max_size=6) | cbor_values,
            "nonce": st.binary(min_size=0, max_size=20) | cbor_values,
            "inputs": st.dictionaries(
                st.sampled_from(["input", "x"]) | cbor_keys, tensor_maps, max_size=2
            )
            | cbor_values,
        }
    ),
    max_size=3,
)
ops = st.one_of(
    st.builds(lambda r: {"op": "verify", "requests": r}, verify_requests | cbor_values),
    st.builds(
        lambda n, u: {"op": "attest", "nonce": n, "user_data": u},
        st.binary(max_size=40) | cbor_values,
        st.none() | st.binary(max_size=8) | cbor_values,
    ),
    st.builds(  # a MAC session offer: any 32 bytes (low-order points too), or not a key at all
        lambda k: {"op": "attest", "nonce": b"n" * 32, "session_key": k},
        st.binary(min_size=32, max_size=32) | st.binary(max_size=40) | cbor_values,
    ),
    st.builds(
        lambda s: {"op": "verify", "requests": [], "session": s},
        st.binary(max_size=20) | cbor_values,
    ),
    st.sampled_from([{"op": "ping"}, {"op": "info"}]),
    st.dictionaries(st.text(max_size=5), cbor_values, max_size=3),
)


@fuzz_settings(400)
@given(op=ops, request_id=st.integers(0, 2**31))
def test_the_server_answers_every_frame_with_a_result_or_a_clear_error(
    enclave_server: InProcessEnclave, op: dict[Any, Any], request_id: int
) -> None:
    record("enclave: server frames")
    body = {**op, "v": 1, "id": request_id}
    data = cbor2.dumps(body)
    with connect(enclave_server.socket_path, timeout_s=20) as s:
        if len(data) > MAX_FRAME:
            return
        s.sendall(protocol.HEADER.pack(len(data)) + data)
        answer = recv_frame(s)
        assert answer["id"] == request_id
        assert ("result" in answer) != ("error" in answer)
        if "error" in answer:
            assert answer["error"]["code"] != "internal", f"{op!r} -> {answer}"
            assert answer["error"]["message"]
        # the same connection goes on
        s.sendall(protocol.encode_frame(protocol.request(request_id + 1, "ping")))
        assert recv_frame(s)["result"]["pong"] is True


def test_a_valid_verify_is_answered_with_signed_outputs(enclave_server: InProcessEnclave) -> None:
    """The fuzzed server is a working one: a real request gets the verifier's answer."""
    x = np.ones((2, 4), np.float32)
    req = {"id": "r", "nonce": b"n" * 16, "inputs": {"input": encode_tensor(x)}}
    with connect(enclave_server.socket_path) as s:
        s.sendall(protocol.encode_frame(protocol.request(1, "verify", requests=[req])))
        answer = recv_frame(s)
    (item,) = answer["result"]["items"]
    assert item["id"] == "r"
    assert item["evidence"]
    probs = np.frombuffer(item["outputs"]["probabilities"]["data"], np.float32).reshape(2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_a_dropped_connection_leaves_the_server_serving(enclave_server: InProcessEnclave) -> None:
    with connect(enclave_server.socket_path) as s:
        s.sendall(struct.pack(">I", 1000) + b"half a frame")
        s.shutdown(socket.SHUT_WR)
    with connect(enclave_server.socket_path) as s:
        s.sendall(protocol.encode_frame(protocol.request(7, "ping")))
        assert recv_frame(s)["result"]["pong"] is True

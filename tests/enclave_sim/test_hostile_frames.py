"""Frames built to stall the enclave's event loop are refused before any work is done on them:
CBOR semantic tags (cbor2 evaluates its built-in ones inside its decoder, a rational of two
bignums in quadratic time), and verify calls of more requests than the verifier takes."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import fractions
import ipaddress
import re
import struct
import uuid
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from cbor2 import CBORTag

from enclave_sim.core import EnclaveCore
from enclave_sim.server import EnclaveServer
from fides_core import enclave_wire as protocol
from fides_core.enclave_errors import BatchTooLarge, MalformedFrame
from fides_core.tensors import encode_tensor
from fides_core.verify import parse_requests
from tests.enclave_sim.helpers import RunningEnclave, call, connect, recv_frame

# Every tag the installed cbor2 decodes by itself (before any tag_hook), with a payload it
# accepts, and one it does not know (which it would hand back as a CBORTag).
TAGGED = {
    "0 datetime string": cbor2.dumps(
        dt.datetime(2020, 1, 1, tzinfo=dt.UTC), datetime_as_timestamp=False
    ),
    "1 epoch datetime": cbor2.dumps(CBORTag(1, 1.5)),
    "2 positive bignum": cbor2.dumps(2**70),
    "3 negative bignum": cbor2.dumps(-(2**70)),
    "4 decimal fraction": cbor2.dumps(decimal.Decimal("1.5")),
    "5 bigfloat": cbor2.dumps(CBORTag(5, [-1, 3])),
    "256 and 25 string references": cbor2.dumps(CBORTag(256, ["hello", CBORTag(25, 0)])),
    "28 shareable": cbor2.dumps(CBORTag(28, [1])),
    "29 shared reference": cbor2.dumps([CBORTag(28, "x"), CBORTag(29, 0)]),
    "30 rational": cbor2.dumps(fractions.Fraction(3, 7)),
    "35 regular expression": cbor2.dumps(re.compile("a+")),
    "36 MIME message": cbor2.dumps(CBORTag(36, "Content-Type: text/plain\n\nhi")),
    "37 UUID": cbor2.dumps(uuid.UUID(int=1)),
    "100 epoch date": cbor2.dumps(CBORTag(100, 1)),
    "1004 date string": cbor2.dumps(CBORTag(1004, "2020-01-01")),
    "258 set": cbor2.dumps({1, 2}),
    "260 IP address": cbor2.dumps(ipaddress.ip_address("10.0.0.1")),
    "261 IP network": cbor2.dumps(ipaddress.ip_network("10.0.0.0/8")),
    "43000 complex": cbor2.dumps(complex(1, 2)),
    "55799 self-described CBOR": cbor2.dumps(CBORTag(55799, 1)),
    "99 unknown tag": cbor2.dumps(CBORTag(99, 1)),
}


def _big_rational(size: int) -> bytes:
    """Tag 30 over two bignums of ``size`` bytes: a Fraction's gcd, quadratic in size."""
    num = cbor2.dumps(CBORTag(2, b"\xfd" + bytes(range(256)) * (size // 256)))
    den = cbor2.dumps(CBORTag(2, b"\xe7" + bytes(range(255, -1, -1)) * (size // 256)))
    return b"\xd8\x1e\x82" + num + den


def _with_field(fields: dict[str, Any], key: str, raw_value: bytes) -> bytes:
    """The map of ``fields`` plus ``key``: ``raw_value`` (a raw CBOR item), as the last field."""
    head = cbor2.dumps(fields)
    assert len(fields) < 23  # a map of at most 22 pairs has a one-byte head
    assert head[0] == 0xA0 + len(fields)
    return bytes([head[0] + 1]) + head[1:] + cbor2.dumps(key) + raw_value


def _ping_with(request_id: int, raw_value: bytes) -> bytes:
    return _with_field({"v": 1, "id": request_id, "op": "ping"}, "x", raw_value)


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("raw", TAGGED.values(), ids=TAGGED.keys())
def test_every_cbor_tag_is_refused_before_cbor2_decodes_it(
    raw: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    cbor2.loads(raw)  # the installed cbor2 does decode this payload
    body = _ping_with(7, raw)
    seen: list[bytes] = []
    loads = cbor2.loads

    def spy(data: bytes, **kwargs: Any) -> Any:
        seen.append(data)
        return loads(data, **kwargs)

    monkeypatch.setattr(protocol.cbor2, "loads", spy)
    with pytest.raises(MalformedFrame, match="CBOR tag") as refused:
        protocol.decode_body(body)
    assert refused.value.request_id == 7  # the error answer still names the request
    assert not any(raw in data for data in seen), "the tagged value reached cbor2"


def test_a_rational_of_bignums_is_answered_with_an_error_and_the_connection_goes_on(
    enclave: RunningEnclave,
) -> None:
    with connect(enclave.socket_path) as s:
        s.sendall(_frame(_ping_with(3, _big_rational(8 * 1024))))
        answer = recv_frame(s)
        assert answer["id"] == 3
        assert answer["error"]["code"] == "malformed_frame"
        assert "CBOR tag 30" in answer["error"]["message"]
        assert call(s, protocol.request(4, "ping"))["result"]["pong"] is True


def test_the_gateway_reads_enclave_answers_with_the_same_refusal() -> None:
    hostile = _with_field({"v": 1, "id": 9}, "result", _big_rational(1024))

    async def read() -> dict[str, Any]:
        reader = asyncio.StreamReader()
        reader.feed_data(_frame(hostile))
        reader.feed_eof()
        return await protocol.read_frame(reader, body_timeout_s=None)

    with pytest.raises(MalformedFrame, match="CBOR tag 30") as refused:
        asyncio.run(read())
    assert refused.value.request_id == 9


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xbf" + cbor2.dumps({"v": 1, "id": 1, "op": "ping"})[1:] + b"\xff", "indefinite"),
        (cbor2.dumps({"v": 1, "id": 1, "op": "ping"}) + b"\x00", "bytes after its first item"),
    ],
    ids=["indefinite length", "trailing bytes"],
)
def test_frames_outside_plain_cbor_are_refused(body: bytes, reason: str) -> None:
    with pytest.raises(MalformedFrame, match=reason):
        protocol.decode_body(body)


def test_a_frame_of_too_many_items_is_refused() -> None:
    body = cbor2.dumps({"v": 1, "id": 1, "op": "ping", "x": [0] * 100})
    with pytest.raises(MalformedFrame, match="more than 50 CBOR items"):
        protocol.decode_body(body, max_items=50)
    assert protocol.decode_body(body)["x"] == [0] * 100


def test_plain_frames_still_decode() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    body = protocol.request(
        1,
        "verify",
        requests=[{"id": "r", "nonce": b"n" * 16, "inputs": {"input": encode_tensor(x)}}],
        session=b"s" * 16,
        big=2**64 - 1,
        small=-(2**64),
        f=1.5,
        flags=[True, False, None],
    )
    assert protocol.decode_body(cbor2.dumps(body)) == body


def test_a_list_longer_than_the_batch_is_refused_before_its_items_are_read() -> None:
    with pytest.raises(BatchTooLarge, match="65 requests in one call"):
        parse_requests([0] * 65, max_requests=64)
    assert parse_requests([0] * 64, max_requests=64)[0].code == "bad_request"  # type: ignore[union-attr]


def test_a_verify_of_more_requests_than_the_batch_is_refused_whole(
    enclave: RunningEnclave,
) -> None:
    with connect(enclave.socket_path) as s:
        answer = call(s, protocol.request(5, "verify", requests=[0] * 20_000))
        assert answer["id"] == 5
        assert answer["error"]["code"] == "batch_too_large"
        assert "20000 requests in one call" in answer["error"]["message"]
        assert call(s, protocol.request(6, "ping"))["result"]["pong"] is True


def test_an_answer_over_the_frame_size_is_refused_before_it_is_encoded(
    core: EnclaveCore,
) -> None:
    server = EnclaveServer(core, Path("/nonexistent/e.sock"), max_frame_bytes=512)
    x = np.zeros((8, 4), np.float32)
    request = {"id": "r", "nonce": b"n" * 16, "inputs": {"input": encode_tensor(x)}}
    try:
        answer = asyncio.run(server._dispatch(protocol.request(1, "verify", requests=[request])))
    finally:
        server._pool.shutdown()
    assert answer["id"] == 1
    assert answer["error"]["code"] == "response_too_large"

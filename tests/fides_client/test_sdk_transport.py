"""The SDK's HTTP transport against a hostile server: a gateway the client does not trust may
trickle its answer, send a compression bomb, nest JSON too deeply, redirect elsewhere or answer
with a huge error page. Each must end in a clear :class:`FidesClientError` within the client's
``timeout_s`` and ``max_response_bytes``, never a hang, an exhausted memory or a bare
``RecursionError`` / ``httpx`` error.

The server is a stdlib ``ThreadingHTTPServer`` in this process, shut down after each test; the
handshake (the first request ``infer`` makes) is where it answers, so no enclave is needed."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import brotli
import numpy as np
import onnx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from onnx import TensorProto, helper

from fides_client import (
    AsyncFidesClient,
    FidesClient,
    FidesClientError,
    FidesHTTPError,
    FidesTransportError,
    IntegrityModels,
)
from fides_client.transport import DEFAULT_MAX_RESPONSE_BYTES, MESSAGE_CHARS

ATTESTATION = "/v2/models/digits/attestation"
Handler = Callable[[BaseHTTPRequestHandler], None]


# -- what a client needs to exist: a pinned root and the integrity models -------------------


def _root_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _onnx(path: Path, node: onnx.NodeProto, output: str, shape: list[str | int]) -> Path:
    graph = helper.make_graph(
        [node],
        "m",
        [
            helper.make_tensor_value_info("service_probs", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("verifier_probs", TensorProto.FLOAT, ["N", 3]),
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph)
    model.opset_import[0].version = 17
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> IntegrityModels:
    base = tmp_path_factory.mktemp("sdk-models")
    detector = _onnx(
        base / "detector" / "model.onnx",
        helper.make_node("Sub", ["service_probs", "verifier_probs"], ["attack_probability"]),
        "attack_probability",
        ["N", 3],
    )
    reclassifier = _onnx(
        base / "reclassifier" / "model.onnx",
        helper.make_node("Identity", ["verifier_probs"], ["probabilities"]),
        "probabilities",
        ["N", 3],
    )
    return IntegrityModels(detector=detector, reclassifier=reclassifier, threshold=0.5)


# -- the hostile server ---------------------------------------------------------------------


@dataclass
class Hostile:
    url: str
    stop: threading.Event
    handle: dict[str, Handler] = field(default_factory=dict)
    seen: list[dict[str, str]] = field(default_factory=list)


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    state = Hostile("", threading.Event())

    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            state.seen.append(dict(self.headers))
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                state.handle["GET"](self)  # broken: the client gave up, as it should

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        state.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


def send(h: BaseHTTPRequestHandler, status: int, body: bytes, **headers: str) -> None:
    h.send_response(status)
    h.send_header("Content-Length", str(len(body)))
    for name, value in headers.items():
        h.send_header(name.replace("_", "-"), value)
    h.end_headers()
    h.wfile.write(body)


def client(url: str, models: IntegrityModels, **kw: object) -> FidesClient:
    args: dict[str, object] = {
        "root": _root_pem(),
        "measurements": ["00" * 48],
        "allow_simulated": True,
        "models": models,
        "api_key": "user-secret",
        **kw,
    }
    return FidesClient(url, "digits", **args)  # type: ignore[arg-type]


def async_client(url: str, models: IntegrityModels, **kw: object) -> AsyncFidesClient:
    args: dict[str, object] = {
        "root": _root_pem(),
        "measurements": ["00" * 48],
        "allow_simulated": True,
        "models": models,
        **kw,
    }
    return AsyncFidesClient(url, "digits", **args)  # type: ignore[arg-type]


X = {"input": np.zeros((1, 4), np.float32)}


def gzip_bomb(decoded: int) -> bytes:
    """JSON that is ``decoded`` bytes of whitespace before a (bad) handshake answer, gzipped:
    about a thousandth of that on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    chunk = b" " * (1 << 20)
    parts = [packer.compress(chunk) for _ in range(decoded >> 20)]
    parts.append(packer.compress(b'{"attestation": 5}'))
    parts.append(packer.flush())
    return b"".join(parts)


# -- size -----------------------------------------------------------------------------------


def test_a_gzip_bomb_is_refused_at_the_size_limit_not_decoded_whole(
    hostile: Hostile, models: IntegrityModels
) -> None:
    bomb = gzip_bomb(2 * DEFAULT_MAX_RESPONSE_BYTES)  # 128 MB decoded from ~130 kB
    assert len(bomb) < DEFAULT_MAX_RESPONSE_BYTES // 100
    hostile.handle["GET"] = lambda h: send(h, 200, bomb, Content_Encoding="gzip")
    with client(hostile.url, models) as c, pytest.raises(FidesClientError, match="larger than"):
        c.infer(X)


def test_a_plain_answer_past_max_response_bytes_is_refused(
    hostile: Hostile, models: IntegrityModels
) -> None:
    body = b" " * (2 << 20) + b'{"attestation": 5}'
    hostile.handle["GET"] = lambda h: send(h, 200, body)
    with (
        client(hostile.url, models, max_response_bytes=1 << 20) as c,
        pytest.raises(FidesClientError, match=r"larger than 1048576 bytes \(max_response_bytes"),
    ):
        c.infer(X)


def test_an_encoding_the_client_did_not_ask_for_is_refused(
    hostile: Hostile, models: IntegrityModels
) -> None:
    """brotli expands far more than gzip in one step; the client asks for gzip and deflate."""
    body = brotli.compress(b'{"attestation": 5}')
    hostile.handle["GET"] = lambda h: send(h, 200, body, Content_Encoding="br")
    with client(hostile.url, models) as c, pytest.raises(FidesClientError, match="'br'-encoded"):
        c.infer(X)
    assert hostile.seen[0]["Accept-Encoding"] == "gzip, deflate"


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b, wbits=-zlib.MAX_WBITS)),  # raw, as some send it
    ],
)
def test_an_honest_compressed_answer_is_still_read(
    hostile: Hostile, models: IntegrityModels, encoding: str, encode: Callable[[bytes], bytes]
) -> None:
    body = encode(b'{"error": "model digits is not ready"}')
    hostile.handle["GET"] = lambda h: send(h, 503, body, Content_Encoding=encoding)
    with client(hostile.url, models) as c, pytest.raises(FidesHTTPError) as caught:
        c.infer(X)
    assert caught.value.status_code == 503
    assert caught.value.message == "model digits is not ready"


def test_a_huge_error_page_is_quoted_shortly(hostile: Hostile, models: IntegrityModels) -> None:
    page = b"<html>" + b"x" * (4 << 20)
    hostile.handle["GET"] = lambda h: send(h, 502, page)
    with client(hostile.url, models) as c, pytest.raises(FidesHTTPError) as caught:
        c.infer(X)
    assert len(str(caught.value)) < MESSAGE_CHARS + 100
    assert str(caught.value).endswith(f"({len(page)} characters)")


# -- time -----------------------------------------------------------------------------------


def trickle(stop: threading.Event, seconds: float) -> Handler:
    """Headers at once, then one byte every 0.1 s for ``seconds``: no single read ever waits
    long enough to time out."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        body = b" " * int(seconds * 10) + b"{}"
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        for byte in body:
            if stop.is_set():
                return
            h.wfile.write(bytes([byte]))
            h.wfile.flush()
            time.sleep(0.1)

    return handle


def test_a_trickling_server_cannot_hold_the_client_past_its_timeout(
    hostile: Hostile, models: IntegrityModels
) -> None:
    hostile.handle["GET"] = trickle(hostile.stop, seconds=8.0)
    start = time.monotonic()
    with (
        client(hostile.url, models, timeout_s=1.0) as c,
        pytest.raises(
            FidesTransportError, match=rf"GET {ATTESTATION}: no whole answer within 1.0 s"
        ),
    ):
        c.infer(X)
    assert time.monotonic() - start < 3.0


async def test_the_async_client_keeps_its_timeout_and_size_limit_too(
    hostile: Hostile, models: IntegrityModels
) -> None:
    hostile.handle["GET"] = trickle(hostile.stop, seconds=8.0)
    start = time.monotonic()
    async with async_client(hostile.url, models, timeout_s=1.0) as c:
        with pytest.raises(FidesTransportError, match="no whole answer within 1.0 s"):
            await c.infer(X)
    assert time.monotonic() - start < 3.0

    bomb = gzip_bomb(2 << 20)
    hostile.handle["GET"] = lambda h: send(h, 200, bomb, Content_Encoding="gzip")
    async with async_client(hostile.url, models, max_response_bytes=1 << 20) as c:
        with pytest.raises(FidesClientError, match="larger than"):
            await c.infer(X)


# -- what a bad server answers --------------------------------------------------------------


def test_json_nested_too_deeply_is_a_client_error(
    hostile: Hostile, models: IntegrityModels
) -> None:
    hostile.handle["GET"] = lambda h: send(h, 200, b"[" * 100_000)
    with client(hostile.url, models) as c, pytest.raises(FidesClientError, match="not JSON"):
        c.infer(X)


def test_a_redirect_is_not_followed_and_says_where_it_pointed(
    hostile: Hostile, models: IntegrityModels
) -> None:
    hostile.handle["GET"] = lambda h: send(
        h, 307, b'{"attestation": "AAAA"}', Location="http://elsewhere.example/steal"
    )
    with client(hostile.url, models) as c, pytest.raises(FidesHTTPError) as caught:
        c.infer(X)
    assert caught.value.status_code == 307
    assert "redirect to 'http://elsewhere.example/steal', not followed" in caught.value.message
    assert len(hostile.seen) == 1


def test_a_connection_failure_is_a_client_error_naming_the_request(
    models: IntegrityModels,
) -> None:
    # a port nobody listens on: held bound (never listening) for the whole test, so that no
    # other process can take it meanwhile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with (
            client(f"http://127.0.0.1:{port}", models) as c,
            pytest.raises(FidesTransportError, match=rf"GET {ATTESTATION}: ConnectError"),
        ):
            c.infer(X)


@pytest.mark.parametrize(
    ("timeout_s", "max_response_bytes"),
    [(0, 1024), (float("nan"), 1024), (-1.0, 1024), (1.0, 0)],
)
def test_limits_that_would_disable_themselves_are_refused(
    models: IntegrityModels, timeout_s: float, max_response_bytes: int
) -> None:
    with pytest.raises(ValueError, match="must be (a )?positive"):
        client(
            "http://127.0.0.1:9", models, timeout_s=timeout_s, max_response_bytes=max_response_bytes
        )


# -- what a user passes -----------------------------------------------------------------------


def test_a_model_name_stays_one_path_segment(hostile: Hostile, models: IntegrityModels) -> None:
    """'digits?x=' used to send the handshake to /v2/models/digits (the model's metadata),
    and the user read that the answer had no attestation."""
    paths: list[str] = []

    def record(h: BaseHTTPRequestHandler) -> None:
        paths.append(h.path)
        send(h, 404, b'{"error": "unknown model"}')

    hostile.handle["GET"] = record
    with (
        FidesClient(
            hostile.url,
            "digits?x=",
            root=_root_pem(),
            measurements=["00" * 48],
            allow_simulated=True,
            models=models,
        ) as c,
        pytest.raises(FidesHTTPError, match="unknown model"),
    ):
        c.infer(X)
    assert paths[0].startswith("/v2/models/digits%3Fx%3D/attestation?nonce=")
    with pytest.raises(ValueError, match="model must be a name"):
        FidesClient(
            hostile.url,
            "..",
            root=_root_pem(),
            measurements=["00" * 48],
            allow_simulated=True,
            models=models,
        )


def test_an_input_json_cannot_carry_is_refused_naming_it(
    hostile: Hostile, models: IntegrityModels
) -> None:
    hostile.handle["GET"] = lambda h: send(h, 503, b'{"error": "not ready"}')
    x = np.zeros((1, 4), np.float32)
    x[0, 2] = np.nan
    with (
        client(hostile.url, models) as c,
        pytest.raises(ValueError, match="input 'pixels' holds NaN or infinity"),
    ):
        c.infer({"pixels": x})
    assert hostile.seen == []  # refused before any request


def test_an_api_key_sent_in_cleartext_to_another_machine_is_warned_of(
    models: IntegrityModels,
) -> None:
    with pytest.warns(UserWarning, match="API key goes to gateway.example over plain http"):
        client("http://gateway.example:8000", models).close()
    for quiet in ("https://gateway.example", "http://127.0.0.1:8000", "http://[::1]:8000"):
        client(quiet, models).close()  # warnings are errors in this suite
    client("http://gateway.example:8000", models, api_key=None).close()

"""Security checks against the REAL gateway process (one server for the module), with raw
sockets where a client library would tidy the request up.

Evidence replay and forged signatures against the client SDK are in
tests/gateway/integrity/test_client.py (forged signature, forged verifier output, replayed evidence
for a new nonce, replayed attestation document, stripped evidence, wrong root / measurement /
simulation); the API fuzzing in test_fuzz_api.py checks every operation without a key and
every admin operation with a user key. Here: keys (missing, wrong, malformed, and the time a
wrong key takes whatever it shares with the right one), admin routes with a user key, path
traversal and odd Unicode in model names, huge headers, slow headers, slow, oversized and
aborted bodies (on /v2 and on /v1, whose bodies FastAPI parses).
"""

from __future__ import annotations

import gzip
import http.client
import json
import random
import socket
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import ADMIN_KEY, USER_KEY
from tests.e2e.conftest import GatewayProcess, running_gateway
from tests.model_factory import make_repository

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

USER = {"Authorization": f"Bearer {USER_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
# short deadlines, so that the slow-client tests wait seconds, not the defaults (10, 30, 30 s)
HEADER_TIMEOUT_S, BODY_TIMEOUT_S, SEND_TIMEOUT_S = 2.0, 5.0, 2.0
TIMEOUTS = {
    "FIDES_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    "FIDES_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    "FIDES_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
}
BODY = {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    base = tmp_path_factory.mktemp("security")
    with running_gateway(make_repository(base / "repo"), base / "logs", env=TIMEOUTS) as gw:
        yield gw


def raw_request(gw: GatewayProcess, data: bytes, timeout_s: float = 10.0) -> bytes:
    """Send bytes as they are; return what came back until the server closed (or timeout)."""
    with socket.create_connection((gw.host, gw.port), timeout=timeout_s) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return out


def still_serving(gw: GatewayProcess) -> None:
    r = httpx.post(f"{gw.base_url}/v2/models/tiny/infer", json=BODY, headers=USER, timeout=10)
    assert r.status_code == 200, r.text


# -- keys ---------------------------------------------------------------------------------------


WRONG_KEYS: dict[str, dict[str, str]] = {
    "no key": {},
    "bearer without a token": {"Authorization": "Bearer"},
    "other scheme": {"Authorization": f"Basic {USER_KEY}"},
    "random, same length": {"Authorization": f"Bearer {'x' * len(USER_KEY)}"},
    "all but the last char": {"Authorization": f"Bearer {USER_KEY[:-1]}#"},
    "the key plus one char": {"Authorization": f"Bearer {USER_KEY}0"},
    "upper case": {"Authorization": f"Bearer {USER_KEY.upper()}"},
    "a 4 KB key": {"Authorization": "Bearer " + "k" * 4096},
    "wrong X-API-Key": {"X-API-Key": "wrong"},
    "admin key with a space": {"X-API-Key": f"{ADMIN_KEY} x"},
}


@pytest.mark.parametrize("headers", list(WRONG_KEYS.values()), ids=list(WRONG_KEYS))
def test_a_missing_or_wrong_key_is_401_and_reveals_nothing(
    gw: GatewayProcess, headers: dict[str, str]
) -> None:
    for method, path in (("GET", "/v2/models/tiny"), ("POST", "/v2/models/tiny/infer")):
        r = httpx.request(method, gw.base_url + path, json=BODY, headers=headers, timeout=10)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert set(r.json()) == {"error"}
        assert "API key" in r.json()["error"]
        assert "tiny" not in r.text


def test_a_latin1_key_is_401_not_500(gw: GatewayProcess) -> None:
    out = raw_request(
        gw,
        b"GET /v2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer caf\xe9\xff\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 401"), out[:200]


def test_a_wrong_key_takes_the_same_time_whatever_it_shares_with_the_right_one(
    gw: GatewayProcess,
) -> None:
    """Keys are compared as SHA-256 digests with hmac.compare_digest over every key: how long
    a refusal takes must not depend on how much of the key a guess got right. Guesses of the
    key's length that share nothing, the first character or all but the last one go in
    shuffled rounds on one keep-alive connection; the median of the per-round differences must
    be under half a millisecond (the machine is noisy; an early exit per matching byte would be
    nanoseconds, so this guards against gross leaks, such as a lookup that skips the hashing).
    Guesses of other lengths are timed too, and reported: their length is the guesser's own."""
    n = len(USER_KEY)
    guesses = {
        "nothing right": "x" * n,
        "first char right": USER_KEY[0] + "#" * (n - 1),
        "all but the last right": USER_KEY[:-1] + "#",
        "one char long": "x",
        "4 KB long": "k" * 4096,
    }
    rounds: list[dict[str, float]] = []
    rng = random.Random(0)
    with httpx.Client(base_url=gw.base_url, timeout=10) as c:
        for _ in range(10):  # warm the connection and the path
            c.get("/v2", headers=USER)
        for _ in range(200):
            order = list(guesses.items())
            rng.shuffle(order)  # no guess always first, or always after the same one
            times: dict[str, float] = {}
            for name, key in order:
                t0 = time.perf_counter()
                r = c.get("/v2", headers={"Authorization": f"Bearer {key}"})
                times[name] = time.perf_counter() - t0
                assert r.status_code == 401
            rounds.append(times)
    medians = {k: round(statistics.median(r[k] for r in rounds) * 1000, 3) for k in guesses}
    diffs = {
        k: round(statistics.median(r[k] - r["nothing right"] for r in rounds) * 1000, 3)
        for k in ("first char right", "all but the last right")
    }
    print(json.dumps({"median_ms": medians, "paired_difference_ms": diffs}))
    for name, d in diffs.items():
        assert abs(d) < 0.5, f"'{name}' refusals take {d:+.3f} ms longer: {medians}"


# -- admin routes -------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/v2/repository/models/tiny/load"),
    ("POST", "/v2/repository/models/tiny/unload"),
    ("PUT", "/v2/admin/models/tiny/drill"),
    ("DELETE", "/v2/admin/models/tiny/drill"),
]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_admin_routes_refuse_a_user_key(gw: GatewayProcess, method: str, path: str) -> None:
    drill = {"attack": "switch", "rate": 1.0}
    r = httpx.request(method, gw.base_url + path, json=drill, headers=USER, timeout=10)
    assert r.status_code == 403, r.text
    assert "admin" in r.json()["error"]
    r = httpx.request(method, gw.base_url + path, json=drill, timeout=10)
    assert r.status_code == 401, r.text
    still_serving(gw)  # the refused unload did not happen


# -- model names: traversal, odd Unicode ------------------------------------------------------

HOSTILE_NAMES = [
    "..",
    "%2e%2e",
    "..%2f..%2f..%2fetc%2fpasswd",
    "..%5c..%5cwindows",
    "tiny%2f..%2ftiny",
    "%2fetc%2fpasswd",
    "tiny%00",
    "%c0%ae%c0%ae",  # overlong UTF-8 dots
    "%ef%bc%8e%ef%bc%8e",  # fullwidth dots
    "%e2%80%aeyn%69t",  # right-to-left override
    "t%d1%96ny",  # Cyrillic i
    "tiny%20",
    "~root",
    ".tiny",
    "a" * 200,
    "%ff%fe",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_model_names_are_refused(gw: GatewayProcess, name: str) -> None:
    conn = http.client.HTTPConnection(gw.host, gw.port, timeout=10)
    try:
        for method, path, headers in (
            ("POST", f"/v2/models/{name}/infer", USER),
            ("GET", f"/v2/models/{name}", USER),
            ("GET", f"/v2/models/{name}/versions/1/ready", USER),
            ("POST", f"/v2/repository/models/{name}/load", ADMIN),
            ("POST", f"/v2/repository/models/{name}/unload", ADMIN),
        ):
            conn.request(method, path, body=json.dumps(BODY), headers=headers)
            r = conn.getresponse()
            text = r.read().decode("utf-8", "replace")
            assert r.status in (400, 404), f"{method} {path} -> {r.status} {text}"
            assert json.loads(text)["error"], text
            assert "root:" not in text
            assert "platform" not in text  # no config.yaml content either
    finally:
        conn.close()
    index = httpx.get(f"{gw.base_url}/v2/repository/index", headers=USER, timeout=10).json()
    assert {row["name"] for row in index} == {
        "tiny",
        "identity_fp32",
        "identity_int32",
        "identity_bytes",
    }
    still_serving(gw)


# -- huge headers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 200_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(20_000)),
        b"Authorization: Bearer " + b"k" * 1_000_000 + b"\r\n",
    ],
    ids=["one 200 KB header", "20,000 headers", "a 1 MB key"],
)
def test_huge_headers_are_refused_before_the_app(gw: GatewayProcess, headers: bytes) -> None:
    """`fides serve` caps the request head at 64 KiB (gateway/http_protocol.py; uvicorn's
    httptools protocol alone took a 20 MB header): 431, and the connection is closed."""
    out = raw_request(gw, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    status, body = http_status_and_body(out)
    assert status == 431
    assert body == {"error": "request head exceeds 65536 bytes"}
    still_serving(gw)


def test_heads_under_the_cap_and_large_pipelined_bodies_are_served(gw: GatewayProcess) -> None:
    """No false refusals: a 60 KB head is served, and so are two pipelined requests in one
    write, the first with a 600 KB body (the second head then starts inside a read that
    mostly holds the first one's body)."""
    big_head = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"v" * 100) for i in range(500))
    out = raw_request(
        gw, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + big_head + b"\r\n"
    )
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    body = json.dumps(BODY).encode() + b" " * 600_000
    first = (
        f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    second = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_request(gw, first + second)
    assert out.count(b"HTTP/1.1 200 OK") == 2, out[:400]


# -- slow and aborted bodies --------------------------------------------------------------------


def test_slow_and_aborted_bodies_do_not_hold_up_others(gw: GatewayProcess) -> None:
    """30 clients send a body a few bytes at a time, then hang up; meanwhile other requests
    are answered as usual, and the hang-ups are 499s (client gone), not server errors."""
    head = (
        f"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
    ).encode()
    slow = [socket.create_connection((gw.host, gw.port), timeout=10) for _ in range(30)]
    latencies: list[float] = []
    try:
        for s in slow:
            s.sendall(head + b'{"inputs": [')

        def normal() -> None:
            t0 = time.perf_counter()
            still_serving(gw)
            latencies.append(time.perf_counter() - t0)

        with ThreadPoolExecutor(4) as pool:
            for _ in range(6):  # 3 s of trickling while 40 normal requests go through
                for s in slow:
                    s.sendall(b"0, ")
                list(pool.map(lambda _: normal(), range(7)))
                time.sleep(0.5)
    finally:
        for s in slow:
            s.close()
    assert len(latencies) == 42
    assert max(latencies) < 3.0, f"a normal request waited {max(latencies):.2f}s"
    deadline = time.monotonic() + 10
    while True:
        metrics = httpx.get(f"{gw.base_url}/metrics", timeout=10).text
        closed = [
            line
            for line in metrics.splitlines()
            if line.startswith("fides_http_requests_total") and 'status="499"' in line
        ]
        if closed and sum(float(line.split()[-1]) for line in closed) >= 30:
            break
        assert time.monotonic() < deadline, f"no 499s counted: {closed}"
        time.sleep(0.2)
    assert 'status="500"' not in metrics
    assert "unhandled error" not in gw.log()


def http_status_and_body(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def status_count(gw: GatewayProcess, status: int, route: str) -> float:
    metrics = httpx.get(f"{gw.base_url}/metrics", timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("fides_http_requests_total")
        and f'status="{status}"' in line
        and f'route="{route}"' in line
    )


def wait_for_count(gw: GatewayProcess, status: int, route: str, at_least: float) -> None:
    deadline = time.monotonic() + 10
    while status_count(gw, status, route) < at_least:
        assert time.monotonic() < deadline, f"{status} on {route} not counted"
        time.sleep(0.2)


# -- slow headers -------------------------------------------------------------------------------


def trickle(gw: GatewayProcess, first: bytes, drip: bytes | None) -> tuple[bytes, float]:
    """Send ``first``, then ``drip`` every second (nothing if None) until the server closes
    the connection (at most 15 s); what came back, and after how long."""
    with socket.create_connection((gw.host, gw.port), timeout=1.0) as s:
        t0 = time.monotonic()
        s.sendall(first)
        out = b""
        while time.monotonic() - t0 < 15:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if drip is not None:
                    s.sendall(drip)
                continue
            if not chunk:
                break  # closed by the server
            out += chunk
        return out, time.monotonic() - t0


@pytest.mark.parametrize(
    "dripping", [False, True], ids=["silent connection", "one header a second"]
)
def test_slow_headers_get_408_and_the_connection_is_closed(
    gw: GatewayProcess, dripping: bool
) -> None:
    """uvicorn has no deadline for request headers (slowloris); `fides serve` answers 408 and
    closes the connection when they are not complete FIDES_HEADER_TIMEOUT_S after it opened,
    however steadily the client trickles."""
    if dripping:  # never the blank line that ends the head
        out, waited = trickle(gw, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n", b"X-Slow: 1\r\n")
    else:
        out, waited = trickle(gw, b"", None)
    status, body = http_status_and_body(out)
    assert status == 408
    assert "request headers not complete within 2 s" in str(body["error"])
    assert HEADER_TIMEOUT_S - 0.1 < waited < HEADER_TIMEOUT_S + 3, waited
    still_serving(gw)


def test_a_keep_alive_connection_gets_a_fresh_header_deadline_per_request(
    gw: GatewayProcess,
) -> None:
    """The deadline is per request head, not per connection: a keep-alive connection that
    sends complete requests for longer than the header timeout is served throughout."""
    conn = http.client.HTTPConnection(gw.host, gw.port, timeout=10)
    try:
        conn.connect()
        local = conn.sock.getsockname()
        t0 = time.monotonic()
        while time.monotonic() - t0 < HEADER_TIMEOUT_S * 2:
            conn.request("GET", "/v2/health/live")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            assert conn.sock.getsockname() == local  # the same connection throughout
            time.sleep(0.5)
    finally:
        conn.close()


def test_a_client_that_never_reads_its_response_is_cut_off(gw: GatewayProcess) -> None:
    """A client that sends a request for a 16 MB answer and never reads it (a small receive
    buffer, nothing read) would hold that answer in the server's memory for as long as it kept
    the connection open; the server aborts the connection FIDES_SEND_TIMEOUT_S after its
    writing stalled, dropping what it had not sent. Read afterwards, the socket gives a part of
    the answer and then ends."""
    elements = 4 * 1024 * 1024  # FP32: a 16 MiB answer
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [elements],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": elements * 4},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = gzip.compress(header + bytes(elements * 4), compresslevel=9)  # about 16 KB
    head = (
        "POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {USER_KEY}\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Encoding: gzip\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.settimeout(30)
        s.connect((gw.host, gw.port))
        s.sendall(head + body)
        time.sleep(SEND_TIMEOUT_S + 8)  # the answer is ready well within this, then stalls
        received = 0
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    finally:
        s.close()
    assert received < elements * 4, received  # at most a part of it: the connection ended
    still_serving(gw)


# -- slow, oversized and aborted bodies on /v2 and /v1 -----------------------------------------


@pytest.mark.parametrize(
    ("path", "error_key"),
    [("/v2/models/tiny/infer", "error"), ("/v1/completions", "error")],
    ids=["v2", "v1"],
)
def test_a_body_slower_than_the_deadline_gets_408(
    gw: GatewayProcess, path: str, error_key: str
) -> None:
    """A client that trickles its body gets 408 FIDES_BODY_TIMEOUT_S after its headers, in the
    route's error format (the gateway's on /v2, OpenAI's on /v1), and the connection is
    closed (the rest of the body is never read)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 10000\r\n\r\n"
    ).encode()
    out, waited = trickle(gw, head + b"{", b" ")
    status, body = http_status_and_body(out)
    assert status == 408
    message = body[error_key]
    if path.startswith("/v1"):
        assert isinstance(message, dict)
        message = message["message"]
    assert "request body not complete within 5 s" in str(message)
    assert BODY_TIMEOUT_S - 0.1 < waited < BODY_TIMEOUT_S + 3, waited
    still_serving(gw)


@pytest.mark.parametrize("path", ["/v2/models/tiny/infer", "/v1/completions"], ids=["v2", "v1"])
def test_an_oversized_body_is_413_before_it_is_read(gw: GatewayProcess, path: str) -> None:
    """A declared length over FIDES_MAX_BODY_BYTES (64 MiB) is refused without reading the
    body, on /v1 too (FastAPI reads it whole otherwise)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {USER_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {1 << 30}\r\n\r\n"
    ).encode()
    status, body = http_status_and_body(raw_request(gw, head + b"{"))
    assert status == 413
    assert "exceeds the limit" in json.dumps(body)
    still_serving(gw)


def test_a_v1_client_gone_mid_body_is_499_not_400(gw: GatewayProcess) -> None:
    """FastAPI's body parser turned a hang-up into "400 There was an error parsing the body";
    now it is a 499 like on /v2, and nothing is logged as an error of the server's."""
    before = status_count(gw, 499, "/v1/completions")
    bad_before = status_count(gw, 400, "/v1/completions")
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {USER_KEY}\r\nContent-Type: application/json\r\n"
        "Content-Length: 1000\r\n\r\n"
    ).encode()
    for _ in range(3):
        with socket.create_connection((gw.host, gw.port), timeout=10) as s:
            s.sendall(head + b'{"model": "x", "prompt": "')
            time.sleep(0.2)
    wait_for_count(gw, 499, "/v1/completions", before + 3)
    assert status_count(gw, 400, "/v1/completions") == bad_before
    assert "unhandled error" not in gw.log()

"""The SDK's HTTP exchanges with a gateway it does not trust: each answer whole within the
client's ``timeout_s`` and ``max_response_bytes``, or a :class:`FidesClientError` that says why.

httpx's timeout bounds each connect, read and write, not an answer that trickles in a byte at
a time; httpx decodes gzip, deflate, brotli and zstd whole, however far they expand. Here the
answer is read chunk by chunk against a deadline and a size limit, and decoded (gzip and
deflate, the encodings asked for) within that limit. Redirects are not followed.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
import warnings
import zlib
from typing import Any

import httpx

__all__ = [
    "ACCEPT_ENCODING",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "MESSAGE_CHARS",
    "FidesClientError",
    "FidesHTTPError",
    "FidesTransportError",
]

#: The most bytes an answer may hold once decoded (gzip can expand a thousandfold): a larger
#: one is refused, never read into memory whole. A batch of 10-class answers is a few kB.
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: The encodings asked for, and the only ones read (each decoded within the size limit).
ACCEPT_ENCODING = "gzip, deflate"
#: An error message quotes at most this much of the gateway's error body.
MESSAGE_CHARS = 500


class FidesClientError(Exception):
    """The gateway's answer could not be used (malformed, or not what was asked for)."""


class FidesHTTPError(FidesClientError):
    """The gateway answered with an HTTP error (or a redirect, which is never followed)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message


class FidesTransportError(FidesClientError):
    """No whole answer arrived: the connection failed or broke, or the gateway took longer than
    the client's ``timeout_s`` (the cause is chained)."""


def _shorten(text: str) -> str:
    if len(text) <= MESSAGE_CHARS:
        return text
    return f"{text[:MESSAGE_CHARS]}... ({len(text)} characters)"


class _Body:
    """An answer's body read chunk by chunk within ``limit`` bytes, decoded here (gzip and
    deflate) so that no chunk expands past the limit either: a compression bomb is refused
    after ``limit`` bytes, not held in memory whole."""

    def __init__(self, headers: httpx.Headers, limit: int, what: str) -> None:
        self.limit = limit
        self.what = what
        self.size = 0  # decoded bytes so far
        self.raw = 0  # bytes received
        self.chunks: list[bytes] = []
        encoding = headers.get("content-encoding", "identity").strip().lower()
        self.encoding = encoding
        self.decoder: Any = None
        if encoding == "gzip":
            self.decoder = zlib.decompressobj(zlib.MAX_WBITS | 16)
        elif encoding == "deflate":  # zlib-wrapped as the RFC says, or raw (see feed)
            self.decoder = zlib.decompressobj()
        elif encoding not in ("identity", ""):
            raise FidesClientError(
                f"{what}: the answer is {encoding!r}-encoded; the client asked for "
                f"{ACCEPT_ENCODING} only"
            )
        self.started = False

    def _too_large(self) -> FidesClientError:
        return FidesClientError(
            f"{self.what}: the answer is larger than {self.limit} bytes (max_response_bytes); "
            "refused"
        )

    def _keep(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise self._too_large()
        if data:
            self.chunks.append(data)

    def feed(self, data: bytes) -> None:
        self.raw += len(data)
        if self.raw > self.limit:
            raise self._too_large()
        if self.decoder is None:
            self._keep(data)
            return
        try:
            if not self.started and self.encoding == "deflate":
                try:
                    self.decoder.copy().decompress(data, 1)
                except zlib.error:  # raw deflate, as some servers send it
                    self.decoder = zlib.decompressobj(-zlib.MAX_WBITS)
            self.started = True
            while data:
                # at most one byte past the limit per step: expansion is bounded as it happens
                self._keep(self.decoder.decompress(data, self.limit + 1 - self.size))
                data = self.decoder.unconsumed_tail
        except zlib.error as exc:
            raise FidesClientError(
                f"{self.what}: the {self.encoding} answer is broken ({exc})"
            ) from None

    def finish(self) -> bytes:
        if self.decoder is not None:
            try:
                self._keep(self.decoder.flush(self.limit + 1 - self.size))
            except zlib.error as exc:
                raise FidesClientError(
                    f"{self.what}: the {self.encoding} answer is broken ({exc})"
                ) from None
        return b"".join(self.chunks)


def _answer(status: int, headers: httpx.Headers, body: bytes, what: str) -> Any:
    """The JSON of a whole answer, or the error it stands for."""
    if 300 <= status < 400:
        raise FidesHTTPError(
            status,
            f"{what}: a redirect to {_shorten(headers.get('location', '?'))!r}, not followed "
            "(is base_url right?)",
        )
    if not 200 <= status < 300:
        text = body.decode("utf-8", "replace")
        try:
            error = json.loads(body)
            message = error.get("error", error.get("detail", text))
        except (ValueError, RecursionError, AttributeError):
            message = text
        raise FidesHTTPError(status, _shorten(str(message)))
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to parse
        raise FidesClientError(f"{what}: the gateway's answer is not JSON") from None


class Exchange:
    """One request and its whole answer within ``timeout_s`` and ``max_response_bytes``.

    httpx's timeout bounds each connect, read and write; a server that trickles a byte at a
    time never trips it, so the answer as a whole must also arrive within ``timeout_s`` of
    the request (checked as each chunk arrives: at most one more read timeout past it)."""

    def __init__(self, method: str, path: str, timeout_s: float, max_response_bytes: int):
        self.what = f"{method} {path}"
        self.timeout_s = timeout_s
        self.limit = max_response_bytes
        self.deadline = time.monotonic() + timeout_s
        self.body: _Body | None = None

    def start(self, response: httpx.Response) -> bool:
        """False when the answer was read whole already (a transport that built it so, as
        test doubles do): httpx has decoded it, and only its size is left to check."""
        if response.is_stream_consumed:
            self.body = _Body(httpx.Headers(), self.limit, self.what)
            self.body.feed(response.content)
            return False
        self.body = _Body(response.headers, self.limit, self.what)
        return True

    def feed(self, chunk: bytes) -> None:
        assert self.body is not None
        self.body.feed(chunk)
        if time.monotonic() > self.deadline:
            raise self.late(None)

    def late(self, exc: Exception | None) -> FidesTransportError:
        cause = "" if exc is None else f" ({type(exc).__name__}: {exc})"
        return FidesTransportError(f"{self.what}: no whole answer within {self.timeout_s} s{cause}")

    def failed(self, exc: httpx.TransportError) -> FidesTransportError:
        if isinstance(exc, httpx.TimeoutException):
            return self.late(exc)
        return FidesTransportError(f"{self.what}: {type(exc).__name__}: {exc}")

    def result(self, response: httpx.Response) -> Any:
        assert self.body is not None
        return _answer(response.status_code, response.headers, self.body.finish(), self.what)


def check_limits(timeout_s: float, max_response_bytes: int) -> None:
    if not (isinstance(timeout_s, int | float) and math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
    if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int):
        raise TypeError("max_response_bytes must be an int")
    if max_response_bytes <= 0:
        raise ValueError(f"max_response_bytes must be positive, not {max_response_bytes}")


def warn_cleartext(base_url: str) -> None:
    """An API key sent over plain http to another machine can be read on the way: say so."""
    url = httpx.URL(base_url)
    if url.scheme != "http":
        return
    host = url.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name
        loopback = False
    if not loopback:
        warnings.warn(
            f"the API key goes to {host} over plain http, readable on the way: use https",
            UserWarning,
            stacklevel=3,
        )

"""uvicorn's httptools protocol with the limits it lacks: header size, header time and the
time a client may leave its response unread.

- **Size.** uvicorn's httptools protocol has no limit on a request's head (a 20 MB header was
  accepted; tests/reliability/test_security.py). Here the request line plus headers may hold
  ``max_head_bytes``; beyond it the server answers 431 and closes the connection. Complete
  headers are counted as the parser hands them over; a head still arriving is counted from
  the raw bytes, so one huge header is refused while it streams in, not after it is buffered.
- **Time.** uvicorn times out idle keep-alive connections, but not a connection that is sending
  its request head: a client that trickles a header byte every few seconds (slowloris) holds it
  for ever. Here the head must be complete ``header_timeout_s`` after the connection opened or
  the request's first byte; otherwise 408 and the connection is closed, as nginx's
  ``client_header_timeout`` does. The body has its own deadline in :mod:`gateway.api.body`.
- **Unread responses.** uvicorn writes a response into the transport and waits while the
  client's receive buffer is full, for ever: a client that sends requests and never reads the
  answers holds each one in the server's memory (16 such connections with 60 MB answers took
  RSS from 506 to 1,483 MiB and kept it). Here a connection whose writing stays paused (the
  transport's buffer above its high-water mark) for ``send_timeout_s`` is aborted: its buffer
  dropped, the connection closed, the request's task told the client is gone, as nginx's
  ``send_timeout`` does.

The h11 protocol enforces a head size limit of its own, but it cost 20% of a small request's
throughput (measured side by side, docs/reliability.md), so the limits live here instead.

This subclasses an internal of uvicorn, which a minor release may change. pyproject.toml pins
the range of uvicorn releases it was checked against; :func:`internals_problems` lists what
it relies on that a release no longer has, and :func:`limited_http_protocol` refuses to start
the server on such a release, naming what changed (tests/gateway/test_http_protocol.py runs
the same check).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging

from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["LimitedHttpToolsProtocol", "internals_problems", "limited_http_protocol"]

log = logging.getLogger(__name__)

# What this module relies on in uvicorn's HttpToolsProtocol: the methods it overrides or calls,
# with their parameters (after self), and the attributes it reads.
_METHODS = {
    "connection_made": ["transport"],
    "connection_lost": ["exc"],
    "data_received": ["data"],
    "on_message_begin": [],
    "on_url": ["url"],
    "on_header": ["name", "value"],
    "on_headers_complete": [],
    "send_400_response": ["msg"],
    "pause_writing": [],
    "resume_writing": [],
}
_ATTRIBUTES = ("transport", "loop", "cycle")  # set in __init__ / connection_made
_CYCLE_ATTRIBUTES = ("response_complete",)  # RequestResponseCycle


def internals_problems() -> list[str]:
    """What :class:`LimitedHttpToolsProtocol` needs from uvicorn and the installed release
    lacks (empty when all is there)."""
    problems = []
    for name, params in _METHODS.items():
        method = getattr(HttpToolsProtocol, name, None)
        if method is None:
            problems.append(f"HttpToolsProtocol.{name} is gone")
            continue
        got = list(inspect.signature(method).parameters)[1:]
        if got != params:
            problems.append(f"HttpToolsProtocol.{name} takes {got}, not {params}")
    init = inspect.getsource(HttpToolsProtocol.__init__) + inspect.getsource(
        HttpToolsProtocol.connection_made
    )
    problems += [
        f"HttpToolsProtocol no longer sets self.{a}"
        for a in _ATTRIBUTES
        if f"self.{a} " not in init and f"self.{a}:" not in init
    ]
    cycle_init = inspect.getsource(httptools_impl.RequestResponseCycle.__init__)
    problems += [
        f"RequestResponseCycle no longer sets self.{a}"
        for a in _CYCLE_ATTRIBUTES
        if f"self.{a} " not in cycle_init
    ]
    # a parser callback that raises must still end in send_400_response (how 431 is sent)
    if "send_400_response" not in inspect.getsource(HttpToolsProtocol.data_received):
        problems.append(
            "HttpToolsProtocol.data_received no longer answers parser errors with send_400_response"
        )
    return problems


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools stops parsing and uvicorn answers 400, which
    :meth:`LimitedHttpToolsProtocol.send_400_response` turns into the 431 it is."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_head_bytes: int = 64 * 1024
    send_timeout_s: float = 30.0

    _send_timer: asyncio.TimerHandle | None = None  # armed while writing is paused

    _header_timer: asyncio.TimerHandle | None = None
    _in_head = True  # waiting for (the rest of) a request head
    _head_bytes = 0  # head bytes the parser handed over (request line, complete headers)
    _raw_head_bytes = 0  # raw bytes of a head still incomplete after whole reads
    _begun_in_read = False
    _refused: tuple[int, str] | None = None

    # -- connection -----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that opens and sends nothing counts too

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_send_timer()
        super().connection_lost(exc)

    # -- flow control: the client must read what it is sent --------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timeout)

    def resume_writing(self) -> None:
        self._cancel_send_timer()
        super().resume_writing()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timeout(self) -> None:
        self._send_timer = None
        if self.transport.is_closing() and not self.transport.get_write_buffer_size():
            return
        log.warning(
            "a client left its response unread for %g s: connection aborted", self.send_timeout_s
        )
        # abort, not close: close() waits for the buffer to drain, which this client never lets
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self._begun_in_read = False
        super().data_received(data)
        if not self._in_head or self.transport.is_closing():
            return
        # the head is still incomplete: every byte of this read belongs to it, unless the
        # request began inside this read (then the split is unknown and the read not counted:
        # the bound is one read above the limit, never a false refusal)
        if self._begun_in_read:
            self._raw_head_bytes = 0
        else:
            self._raw_head_bytes += len(data)
        if self._raw_head_bytes > self.max_head_bytes:
            self._refuse(431, f"request head exceeds {self.max_head_bytes} bytes")

    # -- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._begun_in_read = True, True
        self._head_bytes = self._raw_head_bytes = 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count(len(name) + len(value) + 4)  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_header_timer()
        super().on_headers_complete()

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.max_head_bytes:
            self._refused = (431, f"request head exceeds {self.max_head_bytes} bytes")
            raise _HeadTooLarge

    def send_400_response(self, msg: str) -> None:
        if self._refused is not None:  # our own callback stopped the parser
            self._refuse(*self._refused)
        else:
            super().send_400_response(msg)

    # -- refusing -------------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._responding():  # a pipelined head behind a response still being sent
            self._arm_header_timer()
            return
        self._refuse(408, f"request headers not complete within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        self._cancel_header_timer()
        if self._responding():  # no answer can go between the bytes of another
            self.transport.close()
            return
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        body = json.dumps({"error": message}).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, reason, len(body), body)
        )
        self.transport.close()


def limited_http_protocol(
    header_timeout_s: float, max_head_bytes: int = 64 * 1024, send_timeout_s: float = 30.0
) -> type[LimitedHttpToolsProtocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with these limits; refuses (with what
    changed) a uvicorn release whose internals this module does not fit."""
    problems = internals_problems()
    if problems:
        import uvicorn

        raise RuntimeError(
            f"uvicorn {uvicorn.__version__} is not supported by gateway/http_protocol.py "
            f"(install the range pyproject.toml pins): {'; '.join(problems)}"
        )
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {
            "header_timeout_s": header_timeout_s,
            "max_head_bytes": max_head_bytes,
            "send_timeout_s": send_timeout_s,
        },
    )

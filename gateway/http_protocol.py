"""uvicorn's h11 protocol with a deadline for a request's headers (slow-header clients).

uvicorn times out idle keep-alive connections, but not a connection that is sending its
request headers: a client that opens a socket and trickles a header byte every few seconds
(slowloris) holds it forever, and enough of them exhaust ``limit_concurrency``. Here the
headers of a request must be complete within ``header_timeout_s`` of the connection opening
or of the request's first byte; otherwise the server answers 408 and closes the connection,
as nginx's ``client_header_timeout`` and Apache's ``RequestReadTimeout`` do. The body has its
own deadline in :mod:`gateway.api.body`.

h11, not httptools: only h11 enforces a size limit on the header block
(``h11_max_incomplete_event_size``; httptools accepted a 20 MB header, see
tests/reliability/test_security.py).
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeaderTimeoutH11Protocol", "h11_with_header_timeout"]


class HeaderTimeoutH11Protocol(H11Protocol):
    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()  # a connection that opens and sends nothing counts too

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            # bytes of the next request's head, but not all of it yet
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        # written by hand: h11 has no request to answer yet, so it would refuse a Response
        body = json.dumps(
            {"error": f"request headers not complete within {self.header_timeout_s:g} s"}
        ).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.transport.close()


def h11_with_header_timeout(timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for ``uvicorn.run(http=...)`` with this header deadline."""
    return type(
        "HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": timeout_s}
    )

"""Request-body limits for every route, in one place: size, read deadline, client hang-up.

uvicorn has no timeout for reading a request body, so a client that trickles bytes holds a
request task (and its connection) for as long as it likes; FastAPI's own body parsing (the
OpenAI routes) turns a client hang-up or any read error into "400 There was an error parsing
the body". This pure ASGI middleware wraps ``receive`` while the body is incomplete:

- a body larger than ``max_bytes`` (declared or streamed) is a 413;
- a body not complete within ``timeout_s`` of the request's start is a 408 (nginx's
  ``client_body_timeout``, Go's ``ReadTimeout``); the connection is closed after the answer;
- a client that hangs up mid-body is a 499 (nginx's "client closed request"), not a 400 or a
  500.

It raises them as FastAPI ``HTTPException`` from inside ``receive``: FastAPI's body parser
re-raises those (and only those) unchanged, so the app's one HTTP-error handler answers them
in the route's own error format (``{"error"}`` on /v2, OpenAI's body on /v1), under the
route's metrics label. Once the body is complete, ``receive`` passes through untouched: the
OpenAI routes wait on it for a later disconnect while they generate.
"""

from __future__ import annotations

import asyncio

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimitMiddleware"]

_CLOSE = {"Connection": "close"}  # the rest of the body is never read: do not reuse the socket


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, _GuardedReceive(scope, receive, self.max_bytes, self.timeout_s), send)


class _GuardedReceive:
    """``receive`` with the limits above, until the body's last chunk has arrived."""

    __slots__ = ("_complete", "_deadline", "_declared", "_max", "_receive", "_size", "_timeout")

    def __init__(self, scope: Scope, receive: Receive, max_bytes: int, timeout_s: float) -> None:
        self._receive = receive
        self._max = max_bytes
        self._timeout = timeout_s
        # the deadline counts from the request's start (its headers are in), not from the
        # first read: a client cannot reset it by sending a byte at a time
        self._deadline = asyncio.get_running_loop().time() + timeout_s
        self._size = 0
        self._complete = False
        self._declared: int | None = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                # ASCII digits only (headers are latin-1: "²".isdigit() is True, int() fails)
                text = value.decode("latin-1")
                self._declared = int(text) if text.isascii() and text.isdigit() else None
                break

    async def __call__(self) -> Message:
        if self._complete:
            return await self._receive()
        if self._declared is not None and self._declared > self._max and self._size == 0:
            raise HTTPException(
                413,
                f"request body of {self._declared} bytes exceeds the limit of {self._max}",
                headers=_CLOSE,
            )
        remaining = self._deadline - asyncio.get_running_loop().time()
        try:
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                message = await self._receive()
        except TimeoutError:
            raise HTTPException(
                408,
                f"request body not complete within {self._timeout:g} s "
                f"({self._size} bytes received)",
                headers=_CLOSE,
            ) from None
        if message["type"] == "http.disconnect":
            # nobody reads this answer; it is logged and counted as the client's doing
            raise HTTPException(499, f"client disconnected after {self._size} body bytes")
        self._size += len(message.get("body", b""))
        if self._size > self._max:
            raise HTTPException(
                413, f"request body exceeds the limit of {self._max} bytes", headers=_CLOSE
            )
        if not message.get("more_body", False):
            self._complete = True
        return message

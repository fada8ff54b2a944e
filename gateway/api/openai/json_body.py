"""The /v1 request body, parsed strictly, with a 400 that names what is wrong with it.

FastAPI parses a body with Python's ``json``, which accepts JavaScript's ``NaN``, ``Infinity``
and ``-Infinity`` (and turns ``1e999`` into infinity), so they reached the request validation
as non-finite floats: ``"timeout": Infinity`` was served, ``"temperature": NaN`` was refused
as "less than or equal to 2". Its other refusals were generic ("There was an error parsing the
body" for a deep nesting or bytes that are not UTF-8; "Input should be a valid dictionary" for
an array, an empty body or a wrong Content-Type), and a lone surrogate escape (``"\\ud800"``)
got through to the tokenizer, a 500.

:class:`JSONBodyRoute` reads and parses the body before FastAPI does, with orjson, the /v2
routes' parser (RFC 8259: finite numbers, valid Unicode, at most 1024 levels), and refuses it
with an :class:`InvalidGeneration` (a 400 in OpenAI's error body) that says why. A body that
parses is handed to FastAPI as before, so the request models, their messages and the OpenAPI
schema are unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Coroutine
from email.message import Message
from typing import Any

import orjson
from fastapi import Request, Response
from fastapi.routing import APIRoute

from gateway.generation.service import InvalidGeneration

__all__ = ["JSONBodyRoute", "parse_json_object"]

_NOT_JSON = "the request body is not valid JSON"
# a number or a JavaScript-only literal where orjson stopped (after the sign, for "-Infinity")
_LITERAL = re.compile(r"-?(?:nan|infinity|inf|[0-9][0-9.e+-]*)", re.IGNORECASE)
_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number"}
# orjson reads an integer it cannot hold (below -2**63, above 2**64 - 1) as a float at least
# this far from 0
_WIDE = 2.0**63


def _non_finite_literal(text: str, pos: int) -> str | None:
    """The NaN, Infinity, -Infinity or overflowing number at ``pos``, if that is what is there."""
    start = pos - 1 if 0 < pos <= len(text) and text[pos - 1] == "-" else pos
    match = _LITERAL.match(text, start)
    if match is None:
        return None
    try:
        return None if math.isfinite(float(match.group())) else match.group()
    except ValueError:
        return None


def _has_wide_float(doc: Any) -> bool:
    """Whether orjson's ``doc`` holds a float of magnitude 2**63 or more: where an integer
    past 64 bits was (or a float literal that large, which Python's ``json`` reads the same).
    Digits inside strings never count, however long their runs.

    A few microseconds for a body of a few fields, whatever its strings' length; a list of
    numbers or strings (token ids, stop strings) is passed over by its element types, in C.
    A text search for long digit runs cost more than orjson's whole parse (Python's ``re``
    scans a character class at every position: about 2.8 ms for 100 KB)."""
    stack = [doc]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is float:
            if abs(node) >= _WIDE:
                return True
        elif kind is dict:
            stack.extend(node.values())
        elif kind is list:
            kinds = set(map(type, node))
            if float in kinds or dict in kinds or list in kinds:
                stack.extend(node)
    return False


class _Marker:
    """Stands for a non-finite number in a lenient re-parse, to find where it is."""


def _path_of_non_finite(text: str) -> str | None:
    """The dotted path (``temperature``, ``prompt.1``) of the first non-finite number, found
    with Python's lenient parser; None where that cannot parse the body either."""
    marker = _Marker()

    def number(literal: str) -> float | _Marker:
        value = float(literal)
        return value if math.isfinite(value) else marker

    try:
        doc = json.loads(
            text, parse_constant=lambda _: marker, parse_float=number, parse_int=number
        )
    except (ValueError, RecursionError):
        return None
    stack: list[tuple[str, Any]] = [("", doc)]  # depth first, in document order
    while stack:
        path, node = stack.pop()
        if node is marker:
            return path or None
        if isinstance(node, list):
            node = dict(enumerate(node))
        if isinstance(node, dict):
            children = [(f"{path}.{k}" if path else str(k), v) for k, v in node.items()]
            stack.extend(reversed(children))
    return None


def _content_type_error(content_type: str | None) -> str | None:
    """Why the Content-Type is not JSON's (FastAPI's own rule: application/json or
    application/*+json), or None."""
    if not content_type:
        return "the request has no Content-Type; send the JSON body as application/json"
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    if message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    ):
        return None
    return f"the request body must be JSON sent as application/json, not {content_type!r}"


def _parse_error(text: str, exc: orjson.JSONDecodeError) -> InvalidGeneration:
    """The 400 for a body orjson refused: the non-finite number and its field where that is
    the reason, orjson's own words otherwise."""
    where = f"line {exc.lineno} column {exc.colno}"
    literal = _non_finite_literal(text, exc.pos)
    if literal is None:
        if exc.msg == "depth limit exceeded":
            return InvalidGeneration(f"the request body nests deeper than 1024 levels (at {where})")
        return InvalidGeneration(f"{_NOT_JSON}: {exc.msg} at {where}")
    param = _path_of_non_finite(text)
    field = f"{param!r} is " if param else ""
    if not literal[-1].isdigit():  # NaN, Infinity: JavaScript, not JSON
        return InvalidGeneration(
            f"{_NOT_JSON}: {field}{literal} at {where}; JSON numbers must be finite "
            "(NaN, Infinity and -Infinity are not JSON)",
            param=param,
        )
    if len(literal) > 24:  # a 5,000-digit number is not repeated back whole
        literal = f"{literal[:12]}... ({len(literal)} characters)"
    return InvalidGeneration(
        f"the request body has a number out of range: {field}{literal} at {where} "
        "(beyond a 64-bit float)",
        param=param,
    )


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The body's JSON object, or an :class:`InvalidGeneration` naming why it is not one.

    The text encoding is found as Python's ``json`` finds it (UTF-8 with or without a byte
    order mark, UTF-16, UTF-32), so every body FastAPI accepted before still parses."""
    if not raw.strip():
        raise InvalidGeneration("the request body is empty; it must be a JSON object")
    encoding = json.detect_encoding(raw)
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise InvalidGeneration(f"{_NOT_JSON}: it is not {exc.encoding} text ({exc})") from None
    try:
        doc = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _parse_error(text, exc) from None
    if _has_wide_float(doc):
        # orjson reads integers past 64 bits as floats: keep them exact, so that a seed of 2**64
        # is still refused as "at most 2**64 - 1" (Python's json gives up past 4300 digits, or
        # nested too deep for its recursion; orjson's floats stay then). Found in orjson's
        # document, not the text: digits in a string (a prompt) do not cost a second parse.
        with contextlib.suppress(ValueError, RecursionError):
            doc = json.loads(text)
    if not isinstance(doc, dict):
        kind = "null" if doc is None else _JSON_TYPES.get(type(doc), "a boolean")
        raise InvalidGeneration(f"the request body must be a JSON object, not {kind}")
    return doc


class _JSONBodyRequest(Request):
    """A request whose ``json()`` is :func:`parse_json_object` of its body."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            problem = _content_type_error(self.headers.get("content-type"))
            if problem is not None:
                raise InvalidGeneration(problem)
            self._json = parse_json_object(body)
        return self._json


class JSONBodyRoute(APIRoute):
    """An APIRoute that refuses a bad JSON body with a 400 naming why, before FastAPI parses it
    (FastAPI's parser would accept NaN and give generic messages). Routes without a body are
    unchanged."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def strict(request: Request) -> Response:
            request = _JSONBodyRequest(request.scope, request.receive)
            await request.json()  # refused here, outside FastAPI's catch-all for parse errors
            return await handler(request)  # FastAPI's own json() call gets the cached object

        return strict

"""Structured JSON logs carrying the request id of the request being served."""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import orjson

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# uvicorn adds `color_message` (ANSI-coloured copy of msg): useless in JSON
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid is not None:
            doc["request_id"] = rid
        doc.update(_extras(record))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


def _extras(record: logging.LogRecord) -> dict[str, object]:
    """The record's structured fields (``extra=``), beyond the standard ones."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and key != "request_id" and not key.startswith("_")
    }


class TextFormatter(logging.Formatter):
    """One readable line per record, with the structured fields as ``key=value`` after the
    message: an access line reads ``... gateway.access request method=POST path=/v2/...
    status=200 duration_s=0.0021 request_id=...``, not just ``request``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _extras(record)
        rid = getattr(record, "request_id", None) or request_id.get()
        if rid is not None:
            fields["request_id"] = rid
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        pairs = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return f"{head} {pairs}{sep}{tail}"


def _text(value: object) -> str:
    if not isinstance(value, str):
        return orjson.dumps(value, default=str).decode()  # compact JSON: no spaces
    plain = value and not any(c in value for c in ' "=')
    return value if plain else orjson.dumps(value).decode()


class RequestIdFilter(logging.Filter):
    """Stamps the current request id on the record when it is created (same task)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


def configure_logging(level: str = "INFO", json: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own loggers propagate to ours, so they are JSON too
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)

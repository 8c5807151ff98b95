"""Logging to stderr, as text or one JSON object per line.

stdout belongs to the statistics reports; nothing here writes to it.
Structured fields are passed with ``event(level, msg, **fields)`` (that is,
``extra={"fields": {...}}``) and rendered as ``key=value`` pairs (text) or as
keys of the JSON object; a field whose value
is None is left out. Both formats carry the same fields, with the same
timestamp (ISO-8601 UTC, milliseconds); JSON adds ``pid``. ``setup`` may add
fields to every line of the process, such as a worker's number.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

__all__ = ["escape", "event", "setup", "RateLimit"]

LOGGER = "geventproxy"
_EXCERPT = 64
_log = logging.getLogger(LOGGER)


def event(level: int, msg: str, **fields: Any) -> None:
    """One log line of the project's logger: a message and its structured fields."""
    if _log.isEnabledFor(level):
        _log.log(level, msg, extra={"fields": fields}, stacklevel=2)


def escape(data: bytes, limit: int = _EXCERPT) -> str:
    """Peer-supplied bytes made safe for a log line: printable ASCII, bounded."""
    text = repr(bytes(data[:limit]))[2:-1]
    return text + "..." if len(data) > limit else text


def _value(v: Any) -> str:
    text = str(v)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)
    return text


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class _Formatter(logging.Formatter):
    def __init__(self, context: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.context = {k: v for k, v in (context or {}).items() if v is not None}

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        own = getattr(record, "fields", None) or {}
        return {**self.context, **{k: v for k, v in own.items() if v is not None}}


class _TextFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname.lower()} {record.getMessage()}"
        fields = self.fields(record)
        if fields:
            line += " " + " ".join(f"{k}={_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


class _JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "pid": record.process,
        }
        obj.update(self.fields(record))
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str)


def setup(
    level: str = "info", fmt: str = "text", context: dict[str, Any] | None = None
) -> logging.Logger:
    """Route the project's logger to stderr; idempotent. ``context``: fields for every line."""
    logger = logging.getLogger(LOGGER)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter((_JsonFormatter if fmt == "json" else _TextFormatter)(context))
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


class RateLimit:
    """Lets an event through at most once per ``interval`` seconds; counts the rest."""

    def __init__(self, interval: float = 5.0, clock: Any = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._next = float("-inf")
        self.suppressed = 0

    def allow(self) -> int | None:
        """Return how many were suppressed since the last allowed event, or None to stay quiet."""
        now = self.clock()
        if now < self._next:
            self.suppressed += 1
            return None
        self._next = now + self.interval
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed

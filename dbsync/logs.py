"""Structured logs: one JSON object per line on stdout, for journald and monitoring.

A log call's message is a stable snake_case event name and its data go in
``extra=``; the formatter turns both into ``{"ts", "level", "event", ...fields}``.
Nothing is interpolated into the message, so an alert can match on ``event`` and
compare fields. The text format (``key=value``) is for a terminal, and shows values
as a person reads them (:func:`text_value`): an enum as its value, a mapping as
``key:value`` pairs, a list comma-separated, never a Python repr such as
``{<LossCause.DROPPED: 'dropped'>: 5}``. ``dbsync ctl`` and ``dbsync demo`` print
structured values through the same function.

When stdout is journald (``$JOURNAL_STREAM`` is set), each line starts with the
syslog priority prefix ``<N>`` so ``journalctl -p err`` works.

Event names are listed in ``docs/monitoring.md`` with example alert queries; keep
that file in step when adding one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

import msgspec

__all__ = [
    "LIBRARY_EVENT",
    "AudienceLogger",
    "JsonFormatter",
    "TextFormatter",
    "configure",
    "text_value",
]

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
_encode = msgspec.json.Encoder(enc_hook=str).encode
# The event of a line that a library (aiohttp, asyncio, ...) logged; its text is in
# ``message``.
LIBRARY_EVENT = "library_log"


def _event(record: logging.LogRecord) -> str:
    # A library's message is text, not one of our event names: it gets a name of its
    # own, so that every line has an event an alert can match.
    if record.name == "dbsync" or record.name.startswith("dbsync."):
        return record.getMessage()
    return LIBRARY_EVENT


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}


def _timestamp(record: logging.LogRecord) -> str:
    return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    def __init__(self, *, journal: bool = False) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "event": _event(record),
            "logger": record.name,
        }
        if doc["event"] == LIBRARY_EVENT:
            doc["message"] = record.getMessage()
        doc.update(_fields(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        line = _encode(doc).decode()
        if self._journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def text_value(value: object) -> str:
    """``value`` as a person reads it: ``dropped:5,unmatched:2``, ``a,b``, ``active``.

    Mappings and sequences nested in another are bracketed (``{...}``, ``[...]``) so
    that their pairs do not run into their parent's.
    """
    return _text(value, nested=False)


def _text(value: object, *, nested: bool) -> str:
    match value:
        case enum.Enum():
            return _text(value.value, nested=nested)
        case str():
            return value
        case bool() | int() | float() | None:
            return str(value)
        case msgspec.Struct():
            return _text(msgspec.structs.asdict(value), nested=nested)
        case _ if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return _text(dataclasses.asdict(value), nested=nested)
        case Mapping():
            pairs = ",".join(
                f"{_text(k, nested=True)}:{_text(v, nested=True)}" for k, v in value.items()
            )
            return f"{{{pairs}}}" if nested or not pairs else pairs
        case list() | tuple() | set() | frozenset():
            items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
            joined = ",".join(_text(item, nested=True) for item in items)
            return f"[{joined}]" if nested or not joined else joined
        case bytes():
            return f"{len(value)} bytes"
    return str(value)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={text_value(v)}" for k, v in _fields(record).items())
        line = f"{_timestamp(record)} {record.levelname.lower():7} {record.getMessage()} {pairs}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line.rstrip()


class AudienceLogger(logging.LoggerAdapter[logging.Logger]):
    """Adds ``audience`` (and the destination) to every event of one actor."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


def configure(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Route every dbsync log record to ``stream`` (stdout) in the chosen format."""
    handler = logging.StreamHandler(stream or sys.stdout)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # ``level`` is dbsync's own; libraries speak from warnings up only. At debug level
    # aiosqlite would log every statement and aiohttp every request, and journald
    # rate-limits a service that floods it.
    root.setLevel(logging.WARNING)
    logging.getLogger("dbsync").setLevel(level.upper())

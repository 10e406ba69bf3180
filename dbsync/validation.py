"""msgspec's decoding errors, split into what went wrong and where.

msgspec reports an invalid document as one line of text: ``<message> - at `$.a[0].b```
(no suffix for the document as a whole). Its exception carries no structured path, so
that text is the only source, and its exact shape belongs to msgspec's version. It is
read here and nowhere else: the config loader, the ingest bodies and the emulator's
flags all take their key paths from :func:`split`, and their tests pin the messages
that the locked msgspec writes (``requirements/``), so a version that words them
otherwise fails CI instead of a user's error message.
"""

from __future__ import annotations

import re

import msgspec

__all__ = ["missing_field", "split", "unknown_field"]

_AT = re.compile(r"(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<name>[^`]+)`")
_MISSING_FIELD = re.compile(r"Object missing required field `(?P<name>[^`]+)`")


def split(exc: msgspec.DecodeError) -> tuple[str, str]:
    """The message without its location, and the location as a dotted path without its
    leading ``$.``: ``("Expected `int`, got `str`", "ingest.port")``; ``""`` for the
    document as a whole."""
    match = _AT.fullmatch(str(exc))
    assert match is not None  # the pattern matches any text
    return match["message"], (match["path"] or "").removeprefix(".")


def unknown_field(message: str) -> str | None:
    """The field that ``message`` (from :func:`split`) calls unknown, if that is what it says."""
    found = _UNKNOWN_FIELD.fullmatch(message)
    return found["name"] if found else None


def missing_field(message: str) -> str | None:
    """The field that ``message`` (from :func:`split`) calls missing, if that is what it says."""
    found = _MISSING_FIELD.fullmatch(message)
    return found["name"] if found else None

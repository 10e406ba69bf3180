"""The cells of ``dbsync ctl``'s tables: values as people read them, never a repr.

Numbers right-aligned, ``None`` as ``-``, booleans as yes/no, durations and UTC
timestamps spelled out, and text stripped of control characters (a name from a CDP
cannot move the cursor of the operator's terminal).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from dbsync.logs import text_value

__all__ = ["cell", "duration", "safe", "table", "timestamp", "yes"]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned."""
    cells = [[cell(value) for value in row] for row in rows]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if right else v.ljust(w)
            for v, w, right in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in cells)])


def cell(value: object) -> str:
    match value:
        case None:
            return "-"
        case bool():
            return yes(value)
        case float() if value.is_integer():
            return str(int(value))
        case float():
            return f"{value:.1f}"
        case str():
            return safe(value)
    return text_value(value)


# A reason may quote an exception or Demandbase's own text: one line, no control
# characters (a terminal would obey them), and not so long that it buries the table.
_REASON_MAX_CHARS = 300


def safe(text: str) -> str:
    printable = "".join(c if c.isprintable() else " " for c in text)
    line = " ".join(printable.split())
    return line if len(line) <= _REASON_MAX_CHARS else line[: _REASON_MAX_CHARS - 1] + "…"


def yes(value: bool) -> str:
    return "yes" if value else "no"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(epoch))

"""Every event dbsync logs is listed in docs/monitoring.md, where operators look it up."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def logged_events() -> dict[str, str]:
    """Event name -> a file that logs it: every log call whose message is a literal name."""
    events: dict[str, str] = {}
    for path in sorted((REPOSITORY / "dbsync").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method = node.func.attr
            args = node.args[1:] if method == "log" else node.args
            if not (method in _LOG_METHODS or method == "log") or not args:
                continue
            first = args[0]
            if (
                isinstance(first, ast.Constant)
                and isinstance(first.value, str)
                and re.fullmatch(r"[a-z][a-z0-9_]*", first.value)
            ):
                events.setdefault(first.value, str(path.relative_to(REPOSITORY)))
    return events


def test_every_logged_event_is_documented() -> None:
    doc = (REPOSITORY / "docs" / "monitoring.md").read_text()
    events = logged_events()
    assert len(events) > 50, "the scan found too few events: is it still reading log calls?"
    missing = {name: path for name, path in events.items() if f"`{name}`" not in doc}
    assert not missing, f"log events missing from docs/monitoring.md: {missing}"

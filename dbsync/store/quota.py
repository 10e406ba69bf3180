"""Quota use and pace per destination: what :class:`~dbsync.budget.DestinationBudget`
persists so that a restart loop cannot overspend a daily quota (invariant 5).

Calls are charged per destination, endpoint and daily window; only the last few
windows are kept. The pace is the learned request rate, one row per destination.
The export volume a destination's reconciler downloaded in a window (bytes of results
files, which Demandbase limits per day) is a row of its own beside the calls, under
the pseudo-endpoint :data:`EXPORT_VOLUME`: charged by its estimate before the export
job, corrected by the file's size after, read back at a start.
"""

from __future__ import annotations

import sqlite3

from dbsync.store.engine import Engine

__all__ = [
    "EXPORT_VOLUME",
    "export_volume",
    "load_pace",
    "quota_usage",
    "save_pace",
    "spend_export_volume",
    "spend_quota",
]

_QUOTA_WINDOWS_KEPT = 8
# The quota_usage row of the export volume, in bytes: no Demandbase endpoint has this name.
EXPORT_VOLUME = "export.volume_bytes"


async def quota_usage(engine: Engine, destination: str, window: int) -> dict[str, int]:
    rows = await engine.read(
        "SELECT endpoint, used FROM quota_usage WHERE destination = ? AND day_window = ?",
        (destination, window),
    )
    return {str(endpoint): int(used) for endpoint, used in rows}


async def spend_quota(
    engine: Engine, destination: str, endpoint: str, window: int, count: int = 1
) -> None:
    def work(db: sqlite3.Connection) -> None:
        db.execute(
            "INSERT INTO quota_usage (destination, endpoint, day_window, used)"
            " VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET used = used + excluded.used",
            (destination, endpoint, window, count),
        )
        db.execute(
            "DELETE FROM quota_usage WHERE destination = ? AND day_window < ?",
            (destination, window - _QUOTA_WINDOWS_KEPT),
        )

    await engine.transaction(work)


async def export_volume(engine: Engine, destination: str, window: int) -> int:
    """Bytes of export results charged to ``destination`` in quota window ``window``."""
    return (await quota_usage(engine, destination, window)).get(EXPORT_VOLUME, 0)


async def spend_export_volume(engine: Engine, destination: str, window: int, size: int) -> None:
    """Charge ``size`` bytes of export results (negative: a correction of an estimate)."""
    await spend_quota(engine, destination, EXPORT_VOLUME, window, size)


async def load_pace(engine: Engine, destination: str) -> float | None:
    rows = await engine.read(
        "SELECT requests_per_minute FROM pace WHERE destination = ?", (destination,)
    )
    return float(rows[0][0]) if rows else None


async def save_pace(engine: Engine, destination: str, requests_per_minute: float) -> None:
    now = engine.now()
    await engine.transaction(
        lambda db: db.execute(
            "INSERT INTO pace (destination, requests_per_minute, updated_at) VALUES (?, ?, ?)"
            " ON CONFLICT DO UPDATE SET requests_per_minute = excluded.requests_per_minute,"
            " updated_at = excluded.updated_at",
            (destination, requests_per_minute, now),
        )
    )

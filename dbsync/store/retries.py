"""Accounts set aside as ``unmatched``, tried again on a slow schedule.

A read-back sets an account aside as unmatched when it is still missing after the
repair limit. Demandbase's account database grows, and a row it dropped at every
repair looks the same, so the set is not final: each such account is sent again after
the delays of its destination's ``retry_unmatched_days`` (one per try, the last
repeating), counted from when it was last set aside.

A retry puts the account back in its audience's queue (``rejected = 0``) and keeps its
row in ``rejected`` (``retries`` + 1) and its repairs: the next read-back finds it
listed (verified: its ``rejected`` row goes, see :mod:`dbsync.store.readback`) or
missing (set aside again at once, with the next delay). The ledger counts ``retried``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from dbsync.store import ledger, queue
from dbsync.store.audiences import KEY, key_of
from dbsync.store.engine import Engine

__all__ = ["next_retry_at", "release_retries", "retry_due_in"]

# Set aside as unmatched, still wanted as a member, not delivered, nothing in flight.
_WAITING = (
    "SELECT r.external_id, r.rejected_at, r.retries FROM rejected r"
    f" JOIN membership m ON m.audience_key = {key_of('?1')} AND m.external_id = r.external_id"
    " WHERE r.audience_id = ?1 AND r.reason LIKE 'unmatched:%' AND m.rejected = 1"
    " AND m.desired = 1 AND m.delivered = 0 AND m.in_flight IS NULL"
)


def next_retry_at(rejected_at: float, retries: int, delays: Sequence[float]) -> float | None:
    """When an account set aside at ``rejected_at``, tried ``retries`` times, is tried
    again (``delays`` in seconds, the last repeating); None: never."""
    if not delays:
        return None
    return rejected_at + delays[min(retries, len(delays) - 1)]


async def retry_due_in(engine: Engine, audience_id: str, delays: Sequence[float]) -> float:
    """Seconds until the audience's next unmatched account is due (0: now; inf: none)."""
    if not delays:
        return float("inf")
    rows = await engine.read(_WAITING, (audience_id,))
    now = engine.now()
    due = [next_retry_at(row[1], row[2], delays) for row in rows]
    return max(0.0, min((at - now for at in due if at is not None), default=float("inf")))


async def release_retries(
    engine: Engine, audience_id: str, delays: Sequence[float], max_rows: int
) -> int:
    """Put up to ``max_rows`` due unmatched accounts back in the queue; returns how many."""
    if not delays:
        return 0

    def work(db: sqlite3.Connection) -> int:
        now = engine.now()
        due = [
            row[0]
            for row in db.execute(_WAITING + " ORDER BY r.rejected_at", (audience_id,))
            if (at := next_retry_at(row[1], row[2], delays)) is not None and at <= now
        ][:max_rows]
        keys = [(audience_id, key) for key in due]
        db.executemany(
            f"UPDATE membership SET rejected = 0 WHERE audience_key = {KEY} AND external_id = ?",
            keys,
        )
        db.executemany(
            "UPDATE rejected SET retries = retries + 1 WHERE audience_id = ? AND external_id = ?",
            keys,
        )
        queue.move(db, audience_id, inserts=len(due))
        ledger.count(db, audience_id, retried=len(due))
        return len(due)

    return await engine.transaction(work)

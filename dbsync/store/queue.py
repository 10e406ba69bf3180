"""The dirty set: an actor's queue, its counters and the checkpoint.

The queue is the difference between desired and delivered state (invariant 3), not a
log: pending = ``desired <> delivered``, not in flight, not set aside. Its size per
audience and direction is a counter (``backlog_counts``) that every transaction
moving an account in or out of the queue moves with :func:`move`, because counting
hundreds of thousands of pending rows through an index at each question does not
scale. The checkpoint is the highest ``seq`` below which every folded change is
delivered (:func:`advance_checkpoint`).

:func:`peek_batches` reads what the actor would plan next without marking anything
(``dbsync ctl plan``). Here too are the operator's verbs on the queue: ``requeue``
(accounts set aside go back), ``resync`` (every member is sent again) and
``mark_undelivered``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from dbsync.model import (
    Account,
    Backlog,
    LedgerCheck,
    ListAction,
    LossCause,
    PeekedBatch,
    RejectedAccount,
)
from dbsync.store import ledger
from dbsync.store.audiences import KEY, key_of
from dbsync.store.engine import Engine
from dbsync.store.schema import OPEN_STATES_SQL

__all__ = [
    "advance_checkpoint",
    "backlog",
    "checkpoint",
    "desired_members",
    "mark_undelivered",
    "move",
    "peek_batches",
    "rejected",
    "requeue",
    "resync",
    "summaries",
]

# The columns of :func:`backlog`, for the audience ``{a}`` (a parameter or a column).
_BACKLOG_COLUMNS = (
    " (SELECT TOTAL(n) FROM backlog_counts WHERE audience_id = {a} AND desired = 1),"
    " (SELECT TOTAL(n) FROM backlog_counts WHERE audience_id = {a} AND desired = 0),"
    " (SELECT MIN(changed_at) FROM membership INDEXED BY membership_queue"
    f"  WHERE audience_key = {key_of('{a}')} AND desired = 1"
    "  AND desired <> delivered AND in_flight IS NULL AND rejected = 0),"
    " (SELECT MIN(changed_at) FROM membership INDEXED BY membership_queue"
    f"  WHERE audience_key = {key_of('{a}')} AND desired = 0"
    "  AND desired <> delivered AND in_flight IS NULL AND rejected = 0),"
    " (SELECT TOTAL(rows) FROM batches INDEXED BY batches_open"
    f"  WHERE audience_id = {{a}} AND state IN {OPEN_STATES_SQL}),"
    " (SELECT COUNT(*) FROM membership INDEXED BY membership_rejected"
    f"  WHERE audience_key = {key_of('{a}')} AND rejected = 1)"
)


# How many columns _BACKLOG_COLUMNS has (the values :func:`_backlog` unpacks).
_BACKLOG_WIDTH = 6


def move(db: sqlite3.Connection, audience_id: str, *, inserts: int = 0, deletes: int = 0) -> None:
    """Move the audience's pending counts; every change to the pending set calls this."""
    db.executemany(
        "INSERT INTO backlog_counts (audience_id, desired, n) VALUES (?, ?, ?)"
        " ON CONFLICT DO UPDATE SET n = n + excluded.n",
        [(audience_id, desired, n) for desired, n in ((1, inserts), (0, deletes)) if n],
    )


def advance_checkpoint(db: sqlite3.Connection, audience_id: str) -> None:
    """checkpoint = the highest seq below which every folded change is delivered."""
    (oldest_dirty,) = db.execute(
        "SELECT MIN(seq) FROM membership INDEXED BY membership_unsettled"
        f" WHERE audience_key = {KEY} AND desired <> delivered",
        (audience_id,),
    ).fetchone()
    db.execute(
        "UPDATE audiences SET checkpoint_seq = CASE WHEN ? IS NULL THEN folded_seq ELSE ? - 1 END"
        " WHERE audience_id = ?",
        (oldest_dirty, oldest_dirty, audience_id),
    )


def _backlog(row: Sequence[Any]) -> Backlog:
    inserts, deletes, oldest_insert, oldest_delete, in_flight, rejected_count = row
    oldest = [t for t in (oldest_insert, oldest_delete) if t is not None]
    return Backlog(
        inserts=int(inserts),
        deletes=int(deletes),
        oldest_changed_at=min(oldest) if oldest else None,
        in_flight=int(in_flight),
        rejected=int(rejected_count),
    )


async def backlog(engine: Engine, audience_id: str) -> Backlog:
    """The audience's queue. Each part is a counter or an index probe, so this costs
    the same for ten pending accounts as for a million; one statement, one snapshot."""
    rows = await engine.read(f"SELECT {_BACKLOG_COLUMNS.format(a='?1')}", (audience_id,))
    return _backlog(rows[0])


async def peek_batches(
    engine: Engine, audience_id: str, action: ListAction, max_rows: int, batches: int
) -> list[PeekedBatch]:
    """The next ``batches`` batches of ``action`` that ``plan_batch`` would take, in
    order, read only: the same rows (pending, not in flight, not set aside, oldest
    change first), cut every ``max_rows``; their accounts counted, nothing marked."""
    rows = await engine.read(
        "SELECT COUNT(*), MIN(changed_at), MAX(changed_at) FROM ("
        " SELECT (ROW_NUMBER() OVER (ORDER BY changed_at) - 1) / ?3 AS k, changed_at"
        " FROM membership INDEXED BY membership_queue"
        f" WHERE audience_key = {key_of('?1')} AND desired <> delivered AND desired = ?2"
        " AND in_flight IS NULL AND rejected = 0 ORDER BY changed_at LIMIT ?4"
        ") GROUP BY k ORDER BY k",
        (audience_id, action is ListAction.INSERT, max_rows, max_rows * batches),
    )
    return [
        PeekedBatch(action=action, accounts=n, oldest_changed_at=oldest, newest_changed_at=newest)
        for n, oldest, newest in rows
    ]


async def summaries(
    engine: Engine, audience_ids: Sequence[str]
) -> dict[str, tuple[Backlog, LedgerCheck]]:
    """:func:`backlog` and ``ledger_check(recount=False)`` of many audiences at once.

    One statement, so one read of the store for all of them: the summary lines of
    10,000 audiences cost one read, not 20,000 (each read is a hop to the reader's
    thread, which is most of a small read's price).
    """
    rows = await engine.read(
        f"SELECT j.value, {_BACKLOG_COLUMNS.format(a='j.value')},"
        f" {ledger.COLUMNS.format(a='j.value', recount='NULL')}"
        " FROM json_each(?1) j",
        (msgspec.json.encode(list(audience_ids)).decode(),),
    )
    width = _BACKLOG_WIDTH
    return {
        str(row[0]): (
            _backlog(row[1 : 1 + width]),
            ledger.check_from_row(row[1 + width :], recount=False),
        )
        for row in rows
    }


async def checkpoint(engine: Engine, audience_id: str) -> int:
    """Every change of the audience up to this sequence number is delivered."""
    rows = await engine.read(
        "SELECT checkpoint_seq FROM audiences WHERE audience_id = ?", (audience_id,)
    )
    return int(rows[0][0]) if rows else 0


async def rejected(engine: Engine, audience_id: str | None = None) -> list[RejectedAccount]:
    where, params = ("WHERE r.audience_id = ?", (audience_id,)) if audience_id else ("", ())
    rows = await engine.read(
        "SELECT r.audience_id, r.external_id, r.name, r.domain, r.member, r.reason,"
        " r.rejected_at, r.attempts, r.retries, COALESCE(m.rejected, 1) = 0"
        " FROM rejected r LEFT JOIN audience_keys k USING (audience_id)"
        " LEFT JOIN membership m"
        " ON m.audience_key = k.audience_key AND m.external_id = r.external_id"
        f" {where} ORDER BY r.audience_id, r.external_id",
        params,
    )
    return [
        RejectedAccount(
            audience_id=row[0],
            account=Account(external_id=row[1], name=row[2], domain=row[3]),
            member=bool(row[4]),
            reason=row[5],
            rejected_at=row[6],
            attempts=row[7],
            retries=row[8],
            retrying=bool(row[9]),
        )
        for row in rows
    ]


async def requeue(engine: Engine, audience_id: str) -> int:
    """Rejected accounts go back to the pending set; returns how many."""

    def work(db: sqlite3.Connection) -> int:
        pending = dict(
            db.execute(
                "SELECT desired, COUNT(*) FROM membership INDEXED BY membership_rejected"
                f" WHERE audience_key = {KEY} AND rejected = 1 AND desired <> delivered"
                " AND in_flight IS NULL GROUP BY desired",
                (audience_id,),
            ).fetchall()
        )
        move(db, audience_id, inserts=pending.get(1, 0), deletes=pending.get(0, 0))
        changed = db.execute(
            "UPDATE membership SET rejected = 0, repairs = 0"
            f" WHERE audience_key = {KEY} AND rejected = 1",
            (audience_id,),
        ).rowcount
        db.execute("DELETE FROM rejected WHERE audience_id = ?", (audience_id,))
        ledger.count(db, audience_id, requeued=changed)
        return changed

    return await engine.transaction(work)


async def resync(engine: Engine, audience_id: str) -> int:
    """Every desired member not in flight is sent again; returns how many.

    Rejected members stay with the operator (``requeue``); members already
    pending are not counted.
    """

    def work(db: sqlite3.Connection) -> int:
        changed = db.execute(
            f"UPDATE membership SET delivered = 0 WHERE audience_key = {KEY}"
            " AND desired = 1 AND delivered = 1 AND in_flight IS NULL AND rejected = 0",
            (audience_id,),
        ).rowcount
        move(db, audience_id, inserts=changed)
        return changed

    return await engine.transaction(work)


async def desired_members(engine: Engine, audience_id: str) -> set[str]:
    rows = await engine.read(
        f"SELECT external_id FROM membership WHERE audience_key = {KEY} AND desired = 1",
        (audience_id,),
    )
    return {row[0] for row in rows}


async def mark_undelivered(
    engine: Engine, audience_id: str, external_ids: Iterable[str], *, member: bool
) -> int:
    """These accounts were found wrong (by hand): sent again; returns how many.

    Counted as lost (cause ``reported``) and repaired. Their acknowledgment, if no
    read-back judged it yet, still waits for one: the next send overtakes it.
    """
    keys = list(external_ids)

    def work(db: sqlite3.Connection) -> int:
        changed = 0
        for key in keys:
            changed += db.execute(
                f"UPDATE membership SET delivered = ? WHERE audience_key = {KEY}"
                " AND external_id = ?"
                " AND desired = ? AND delivered = desired AND in_flight IS NULL"
                " AND rejected = 0",
                (not member, audience_id, key, member),
            ).rowcount
        if member:
            move(db, audience_id, inserts=changed)
        else:
            move(db, audience_id, deletes=changed)
        ledger.count(
            db,
            audience_id,
            lost=changed,
            repaired=changed,
            **{ledger.cause(LossCause.REPORTED): changed},
        )
        return changed

    return await engine.transaction(work)

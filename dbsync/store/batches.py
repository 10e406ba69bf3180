"""Batches: accounts in flight to Demandbase in one import job, and what its end does.

A batch is planned from the oldest pending accounts of one action (its accounts are
then *in flight*: out of the queue, their ``in_flight`` naming the batch),
moves through :class:`~dbsync.model.BatchState` as its job is created and uploaded,
and ends in one transaction each way:

* completed: ``delivered`` is written here and nowhere else (invariant 2), set to the
  batch's action, which is what Demandbase now holds even if the desired state moved
  while the job ran; if it did, ``desired <> delivered`` again and the account is sent
  again. The ledger and the checkpoint move in the same transaction;
* failed or abandoned: the accounts are pending again;
* split (bisection after a 400): two new batches with the halves, still in flight;
* rejected: the accounts are set aside with Demandbase's reason.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import msgspec

from dbsync.errors import StoreError
from dbsync.model import Account, Batch, BatchState, BatchSummary, ListAction, RejectReason
from dbsync.store import ledger, queue
from dbsync.store.audiences import KEY
from dbsync.store.engine import Engine
from dbsync.store.schema import OPEN_STATES_SQL

__all__ = [
    "abandon_batch",
    "complete_batch",
    "fail_batch",
    "last_batch",
    "mark_created",
    "mark_uploaded",
    "open_batches",
    "plan_batch",
    "reject_batch",
    "split_batch",
]


async def plan_batch(
    engine: Engine, audience_id: str, action: ListAction, max_rows: int
) -> Batch | None:
    """The oldest pending accounts of ``action``, now in flight in a new batch."""
    now = engine.now()

    def work(db: sqlite3.Connection) -> Batch | None:
        picked = db.execute(
            "SELECT external_id, name, domain, rowid FROM membership"
            " INDEXED BY membership_queue"
            f" WHERE audience_key = {KEY} AND desired <> delivered AND desired = ?"
            " AND in_flight IS NULL AND rejected = 0 ORDER BY changed_at LIMIT ?",
            (audience_id, action is ListAction.INSERT, max_rows),
        ).fetchall()
        if not picked:
            return None
        if action is ListAction.INSERT:
            queue.move(db, audience_id, inserts=-len(picked))
        else:
            queue.move(db, audience_id, deletes=-len(picked))
        return _open_batch(db, audience_id, action, picked, now)

    return await engine.transaction(work)


async def last_batch(engine: Engine, audience_id: str) -> BatchSummary | None:
    """The audience's newest batch whose job Demandbase completed or failed."""
    rows = await engine.read(
        "SELECT batch_id, action, state, rows, job_id, created_at, updated_at FROM batches"
        " INDEXED BY batches_finished WHERE audience_id = ?"
        " AND state IN ('completed', 'failed') ORDER BY batch_id DESC LIMIT 1",
        (audience_id,),
    )
    if not rows:
        return None
    batch_id, action, state, count, job_id, created_at, finished_at = rows[0]
    return BatchSummary(
        batch_id=batch_id,
        action=ListAction(action),
        state=BatchState(state),
        rows=count,
        job_id=job_id,
        created_at=created_at,
        finished_at=finished_at,
    )


async def open_batches(engine: Engine, audience_id: str) -> list[Batch]:
    batches = await engine.read(
        "SELECT batch_id, action, state, job_id, created_at, uploaded_at FROM batches"
        " INDEXED BY batches_open WHERE audience_id = ?"
        f" AND state IN {OPEN_STATES_SQL} ORDER BY batch_id",
        (audience_id,),
    )
    result = []
    for batch_id, action, state, job_id, created_at, uploaded_at in batches:
        accounts = await engine.read(
            "SELECT external_id, name, domain FROM membership INDEXED BY membership_in_flight"
            f" WHERE in_flight = ? AND audience_key = {KEY} ORDER BY external_id",
            (batch_id, audience_id),
        )
        result.append(
            Batch(
                batch_id=batch_id,
                audience_id=audience_id,
                action=ListAction(action),
                state=BatchState(state),
                accounts=tuple(Account(external_id=k, name=n, domain=d) for k, n, d in accounts),
                job_id=job_id,
                created_at=created_at,
                uploaded_at=uploaded_at,
            )
        )
    return result


async def mark_created(engine: Engine, batch_id: int, job_id: int) -> None:
    now = engine.now()
    await engine.transaction(
        lambda db: db.execute(
            "UPDATE batches SET state = ?, job_id = ?, updated_at = ? WHERE batch_id = ?",
            (BatchState.CREATED, job_id, now, batch_id),
        )
    )


async def mark_uploaded(engine: Engine, batch_id: int) -> None:
    now = engine.now()

    def work(db: sqlite3.Connection) -> None:
        audience_id, rows, state = _batch(db, batch_id)
        if state == BatchState.UPLOADED:
            return
        db.execute(
            "UPDATE batches SET state = ?, uploaded_at = ?, updated_at = ? WHERE batch_id = ?",
            (BatchState.UPLOADED, now, now, batch_id),
        )
        ledger.count(db, audience_id, exported=rows)

    await engine.transaction(work)


async def complete_batch(engine: Engine, batch_id: int, *, list_id: int | None) -> int:
    """Demandbase completed the job: its accounts are delivered. One transaction."""
    now = engine.now()

    def work(db: sqlite3.Connection) -> int:
        audience_id, rows, state = _batch(db, batch_id)
        if not BatchState(state).is_open:
            return 0
        (action,) = db.execute(
            "SELECT action FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        delivered = action == ListAction.INSERT
        # One pass over the batch's rows counts both: the accounts whose desired state
        # moved while the job ran (desired <> the action: back to the queue), and the
        # earlier acknowledgments no read-back judged, which this one replaces.
        moved, overtaken = db.execute(
            "SELECT TOTAL(desired <> ?), TOTAL(ack_batch IS NOT NULL) FROM membership"
            f" WHERE in_flight = ? AND audience_key = {KEY}",
            (delivered, batch_id, audience_id),
        ).fetchone()
        if delivered:
            queue.move(db, audience_id, deletes=int(moved))
        else:
            queue.move(db, audience_id, inserts=int(moved))
        # Checkpoint only here, after the acknowledgment: a crash before this line
        # leaves the accounts in flight, and they are sent again.
        db.execute(
            "UPDATE membership SET delivered = ?, in_flight = NULL, acked_at = ?,"
            f" ack_batch = ? WHERE in_flight = ? AND audience_key = {KEY}",
            (delivered, now, batch_id, batch_id, audience_id),
        )
        db.execute(
            "UPDATE batches SET state = ?, updated_at = ? WHERE batch_id = ?",
            (BatchState.COMPLETED, now, batch_id),
        )
        db.execute(
            "UPDATE audiences SET first_acked_at = COALESCE(first_acked_at, ?)"
            " WHERE audience_id = ?",
            (now, audience_id),
        )
        ledger.count(db, audience_id, acknowledged=rows, overtaken=int(overtaken))
        if list_id is not None:
            db.execute(
                "UPDATE audiences SET list_id = COALESCE(list_id, ?) WHERE audience_id = ?",
                (list_id, audience_id),
            )
        queue.advance_checkpoint(db, audience_id)
        return rows

    return await engine.transaction(work)


async def fail_batch(engine: Engine, batch_id: int, reason: str) -> None:
    """Demandbase failed the job: its accounts are pending again."""
    now = engine.now()
    await engine.transaction(
        lambda db: _release(db, batch_id, BatchState.FAILED, reason, now, "failed")
    )


async def renew_batch(engine: Engine, batch_id: int, reason: str) -> Batch:
    """Demandbase failed the job: a new planned batch of the same accounts, still in flight.

    The failed batch is closed as ``failed`` (its rows counted so), and its accounts go
    straight into the new batch rather than back to the queue, so that the caller
    decides how they are sent again (as they are, split, or set aside) and counts how
    many jobs they have cost. Accounts whose desired state moved meanwhile go with them:
    the new batch is planned with the same action, and a completion requeues them.
    """
    now = engine.now()

    def work(db: sqlite3.Connection) -> Batch:
        audience_id, rows, current = _batch(db, batch_id)
        (action,) = db.execute(
            "SELECT action FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        items = _in_flight(db, audience_id, batch_id)
        db.execute(
            "UPDATE batches SET state = ?, reason = ?, updated_at = ? WHERE batch_id = ?",
            (BatchState.FAILED, reason, now, batch_id),
        )
        if current == BatchState.UPLOADED:
            ledger.count(db, audience_id, failed=rows)
        return _open_batch(db, audience_id, ListAction(action), items, now)

    return await engine.transaction(work)


async def abandon_batch(engine: Engine, batch_id: int, reason: str) -> None:
    """Given up before an upload succeeded: its accounts are pending again."""
    now = engine.now()
    await engine.transaction(
        lambda db: _release(db, batch_id, BatchState.ABANDONED, reason, now, None)
    )


async def split_batch(engine: Engine, batch_id: int) -> tuple[Batch, Batch]:
    """Bisection after a 400: two new batches with the halves, still in flight."""
    now = engine.now()

    def work(db: sqlite3.Connection) -> tuple[Batch, Batch]:
        audience_id, rows, state = _batch(db, batch_id)
        if not BatchState(state).is_open:
            raise StoreError(f"batch {batch_id} is {state}: its accounts are no longer its own")
        if rows < 2:
            raise StoreError(f"batch {batch_id} has {rows} account(s): nothing to split")
        (action,) = db.execute(
            "SELECT action FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        items = _in_flight(db, audience_id, batch_id)
        db.execute(
            "UPDATE batches SET state = ?, reason = 'split', updated_at = ? WHERE batch_id = ?",
            (BatchState.ABANDONED, now, batch_id),
        )
        middle = len(items) // 2
        action = ListAction(action)
        return (
            _open_batch(db, audience_id, action, items[:middle], now),
            _open_batch(db, audience_id, action, items[middle:], now),
        )

    return await engine.transaction(work)


async def reject_batch(engine: Engine, batch_id: int, reason: str) -> None:
    """Demandbase refuses these accounts: set them aside with the reason."""
    now = engine.now()

    def work(db: sqlite3.Connection) -> None:
        audience_id, rows, _ = _batch(db, batch_id)
        db.execute(
            "INSERT INTO rejected (audience_id, external_id, name, domain, member, reason,"
            " rejected_at, attempts)"
            " SELECT ?, m.external_id, m.name, m.domain, m.desired, ?, ?, 1"
            f" FROM membership m WHERE m.in_flight = ? AND m.audience_key = {KEY}"
            " ON CONFLICT DO UPDATE SET reason = excluded.reason,"
            " rejected_at = excluded.rejected_at, name = excluded.name,"
            " domain = excluded.domain, member = excluded.member, attempts = attempts + 1",
            (audience_id, reason, now, batch_id, audience_id),
        )
        db.execute(
            "UPDATE membership SET rejected = 1, in_flight = NULL"
            f" WHERE in_flight = ? AND audience_key = {KEY}",
            (batch_id, audience_id),
        )
        db.execute(
            "UPDATE batches SET state = ?, reason = ?, updated_at = ? WHERE batch_id = ?",
            (BatchState.ABANDONED, reason, now, batch_id),
        )
        ledger.count(db, audience_id, rejected=rows, **{ledger.reason(RejectReason.REFUSED): rows})

    await engine.transaction(work)


# --- statements used inside writer transactions ----------------------------------------------


def _open_batch(
    db: sqlite3.Connection,
    audience_id: str,
    action: ListAction,
    accounts: Sequence[tuple[str, str, str, int]],
    now: float,
) -> Batch:
    """A new planned batch of ``accounts`` (external id, name, domain, membership
    rowid), in flight: their ``in_flight`` names it, and that is the batch's list."""
    batch_id = db.execute(
        "INSERT INTO batches (audience_id, action, state, rows, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (audience_id, action, BatchState.PLANNED, len(accounts), now, now),
    ).lastrowid
    assert batch_id is not None
    # One statement over the batch's rows, by rowid and in rowid order (the rows the
    # caller just read), not one per account nor a search of the text key per account.
    db.execute(
        "UPDATE membership SET in_flight = ? WHERE rowid IN (SELECT value FROM json_each(?))",
        (batch_id, msgspec.json.encode(sorted(row[3] for row in accounts))),
    )
    return Batch(
        batch_id=batch_id,
        audience_id=audience_id,
        action=action,
        state=BatchState.PLANNED,
        accounts=tuple(
            Account(external_id=key, name=name, domain=domain) for key, name, domain, _ in accounts
        ),
        created_at=now,
    )


def _in_flight(db: sqlite3.Connection, audience_id: str, batch_id: int) -> list[Any]:
    """The batch's accounts (external id, name, domain, rowid), by external id."""
    return db.execute(
        "SELECT external_id, name, domain, rowid FROM membership INDEXED BY membership_in_flight"
        f" WHERE in_flight = ? AND audience_key = {KEY} ORDER BY external_id",
        (batch_id, audience_id),
    ).fetchall()


def _batch(db: sqlite3.Connection, batch_id: int) -> tuple[str, int, str]:
    row = db.execute(
        "SELECT audience_id, rows, state FROM batches WHERE batch_id = ?", (batch_id,)
    ).fetchone()
    if row is None:
        raise StoreError(f"no batch {batch_id}")
    return row[0], row[1], row[2]


def _release(
    db: sqlite3.Connection,
    batch_id: int,
    state: BatchState,
    reason: str,
    now: float,
    counter: str | None,
) -> None:
    audience_id, rows, current = _batch(db, batch_id)
    if not BatchState(current).is_open:
        return
    _requeue_in_flight(db, audience_id, batch_id, "desired <> delivered")
    db.execute(
        f"UPDATE membership SET in_flight = NULL WHERE in_flight = ? AND audience_key = {KEY}",
        (batch_id, audience_id),
    )
    db.execute(
        "UPDATE batches SET state = ?, reason = ?, updated_at = ? WHERE batch_id = ?",
        (state, reason, now, batch_id),
    )
    if counter is not None:
        ledger.count(db, audience_id, **{counter: rows})


def _requeue_in_flight(
    db: sqlite3.Connection, audience_id: str, batch_id: int, pending_after: str
) -> None:
    """Count the batch's accounts that will be pending once it closes (``pending_after``)."""
    counts = dict(
        db.execute(
            "SELECT desired, COUNT(*) FROM membership"
            f" WHERE in_flight = ? AND audience_key = {KEY}"
            f" AND {pending_after} GROUP BY desired",
            (batch_id, audience_id),
        ).fetchall()
    )
    queue.move(db, audience_id, inserts=counts.get(1, 0), deletes=counts.get(0, 0))

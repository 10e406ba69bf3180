"""The ledger: per-audience counters, and the sums they must keep (invariant 4).

Counters are rows (audience, counter, value), moved inside the transaction that moves
the accounts they count, so a crash never leaves them apart. Keyed counters carry
their key in the name (``lost.dropped``, ``rejected.refused``). Checking reads the
counters and what they must add up to in one statement: one snapshot, so nothing
moving between counters can make a balanced ledger look unbalanced.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from dbsync.model import LedgerCheck, LedgerCounts, LossCause, RejectReason
from dbsync.store.audiences import key_of
from dbsync.store.engine import Engine
from dbsync.store.schema import OPEN_STATES_SQL

__all__ = [
    "COLUMNS",
    "add_to_ledger",
    "cause",
    "check_from_row",
    "count",
    "ledger",
    "ledger_check",
    "ledger_imbalance",
    "reason",
]

_CAUSE_PREFIX = "lost."
_REASON_PREFIX = "rejected."

# The columns of :func:`ledger_check`, for the audience ``{a}`` (a parameter or a
# column); ``{recount}`` is true to count the accounts awaiting a verdict (walking the
# audience's rows) and the pending ones (O(pending)) again, else NULL.
COLUMNS = (
    " (SELECT TOTAL(rows) FROM batches INDEXED BY batches_open"
    f"  WHERE audience_id = {{a}} AND state IN {OPEN_STATES_SQL} AND state = 'uploaded'),"
    " CASE WHEN {recount} THEN (SELECT COUNT(*) FROM membership"
    f"  WHERE audience_key = {key_of('{a}')} AND ack_batch IS NOT NULL) END,"
    " (SELECT TOTAL(n) FROM backlog_counts WHERE audience_id = {a}),"
    " CASE WHEN {recount} THEN (SELECT COUNT(*) FROM membership INDEXED BY membership_queue"
    f"  WHERE audience_key = {key_of('{a}')} AND desired <> delivered AND in_flight IS NULL"
    "  AND rejected = 0) END,"
    " (SELECT json_group_array(json_array(counter, value)) FROM ledger"
    "  WHERE audience_id = {a})"
)


def count(db: sqlite3.Connection, audience_id: str, **deltas: int) -> None:
    """Add ``deltas`` to the audience's counters, in the caller's transaction."""
    db.executemany(
        "INSERT INTO ledger (audience_id, counter, value) VALUES (?, ?, ?)"
        " ON CONFLICT DO UPDATE SET value = value + excluded.value",
        [(audience_id, counter, value) for counter, value in deltas.items() if value],
    )


def cause(loss: LossCause) -> str:
    """The counter of lost accounts of one cause."""
    return f"{_CAUSE_PREFIX}{loss}"


def reason(rejected: RejectReason) -> str:
    """The counter of accounts set aside for one reason."""
    return f"{_REASON_PREFIX}{rejected}"


def _counts(rows: Iterable[tuple[str, int]]) -> LedgerCounts:
    fields = set(LedgerCounts.__struct_fields__)
    plain: dict[str, Any] = {}
    causes: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for counter, value in rows:
        if counter.startswith(_CAUSE_PREFIX):
            causes[counter.removeprefix(_CAUSE_PREFIX)] = value
        elif counter.startswith(_REASON_PREFIX):
            reasons[counter.removeprefix(_REASON_PREFIX)] = value
        elif counter in fields:
            plain[counter] = value
    return LedgerCounts(**plain, lost_by_cause=causes, rejected_by_reason=reasons)


def check_from_row(row: Sequence[Any], *, recount: bool) -> LedgerCheck:
    """The :class:`LedgerCheck` of one row of :data:`COLUMNS`."""
    processing, counted_awaiting, pending, recounted, ledger_json = row
    counts = _counts(msgspec.json.decode(ledger_json, type=list[tuple[str, int]]))
    lost, rejected = counts.lost_by_cause, counts.rejected_by_reason
    # Acknowledgments no verdict has judged, by the counters; only a recount says
    # whether the rows agree.
    awaiting = counts.acknowledged - (
        counts.verified
        + lost.get(LossCause.DROPPED, 0)
        + lost.get(LossCause.NOT_REMOVED, 0)
        + counts.overtaken
    )
    sums = {
        "delivery": counts.exported - (counts.acknowledged + counts.failed + int(processing)),
        "verdicts": awaiting - int(counted_awaiting) if recount else 0,
        "repairs": counts.lost
        - (
            counts.repaired
            + rejected.get(RejectReason.UNMATCHED, 0)
            + rejected.get(RejectReason.NOT_REMOVABLE, 0)
        ),
        "causes": counts.lost - sum(lost.values()),
        "reasons": counts.rejected - sum(rejected.values()),
        "pending": int(pending) - int(recounted) if recount else 0,
    }
    return LedgerCheck(
        counts=counts,
        processing=int(processing),
        awaiting=int(counted_awaiting) if recount else awaiting,
        pending=int(pending),
        imbalances={name: diff for name, diff in sums.items() if diff},
    )


async def ledger(engine: Engine, audience_id: str) -> LedgerCounts:
    rows = await engine.read(
        "SELECT counter, value FROM ledger WHERE audience_id = ?", (audience_id,)
    )
    return _counts((str(counter), int(value)) for counter, value in rows)


async def ledger_imbalance(engine: Engine, audience_id: str) -> int:
    """exported - (acknowledged + failed + rows of jobs still processing); 0 balances.

    One statement, so one snapshot: a batch moving between states cannot make a
    balanced ledger look unbalanced.
    """
    rows = await engine.read(
        "SELECT"
        " (SELECT TOTAL(value) FROM ledger WHERE audience_id = ?1 AND counter = 'exported')"
        " - (SELECT TOTAL(value) FROM ledger WHERE audience_id = ?1"
        "    AND counter IN ('acknowledged', 'failed'))"
        " - (SELECT TOTAL(rows) FROM batches WHERE audience_id = ?1 AND state = 'uploaded')",
        (audience_id,),
    )
    return int(rows[0][0])


async def add_to_ledger(engine: Engine, audience_id: str, **deltas: int) -> None:
    """Add to the audience's counters.

    ``throttled`` (a 429 met while delivering) also marks every open batch of the
    audience's destination as sent while the destination was throttled: the loss
    estimate compares those batches' losses with the others'.
    """

    def work(db: sqlite3.Connection) -> None:
        count(db, audience_id, **deltas)
        if deltas.get("throttled"):
            db.execute(
                "UPDATE batches INDEXED BY batches_open SET throttled = 1"
                f" WHERE state IN {OPEN_STATES_SQL} AND audience_id IN"
                " (SELECT audience_id FROM audiences WHERE destination ="
                "  (SELECT destination FROM audiences WHERE audience_id = ?))",
                (audience_id,),
            )

    await engine.transaction(work)


async def ledger_check(engine: Engine, audience_id: str, *, recount: bool = True) -> LedgerCheck:
    """The ledger and the sums it must keep (:class:`~dbsync.model.LedgerCheck`).

    Recounting walks the audience's rows for the accounts awaiting a verdict, and the
    queue's index for the pending ones: a reconciliation's price, not a summary's
    (``recount=False`` leaves those two sums out, and takes ``awaiting`` from the
    counters).
    """
    rows = await engine.read(
        f"SELECT {COLUMNS.format(a='?1', recount='?2')}", (audience_id, recount)
    )
    return check_from_row(rows[0], recount=recount)

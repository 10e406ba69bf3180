"""Read-back runs, and applying a judgment's decisions to the accounts.

One row in ``reconcile_runs`` per read-back (its Data Export job, state, progress and
report; states are :class:`~dbsync.states.ReconcileRunState`), recorded as soon as
Demandbase accepted the export, so that a restart resumes it instead of paying for
another. The judgment itself is :mod:`dbsync.judgment`, pure; this module walks
an audience's accounts in chunks of :data:`JUDGE_CHUNK_ROWS` (by external id) and, in
one transaction per chunk, counts and clears the plain ones in SQL against the
list's ids (staged in a scratch table first), asks the judge about the rest and
applies its decisions: marks to send again, sets aside, counts in the ledger and on
the batches judged. The run
keeps how far it got and the verdict so far, so a read-back resumed after a crash
judges only the rest, and ingest commits between two chunks.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Iterable, Sequence
from typing import cast

import msgspec

from dbsync.errors import StoreError
from dbsync.judgment import (
    Judgment,
    Listing,
    OurAccount,
    judge_chunk,
    match_listed,
    set_aside_reason,
)
from dbsync.model import (
    ListedAccount,
    LossCause,
    LossTally,
    ReadbackVerdict,
    ReconcileFacts,
    ReconcileRun,
    RejectReason,
)
from dbsync.states import ReconcileRunState
from dbsync.store import ledger, queue
from dbsync.store.audiences import KEY, give_key
from dbsync.store.engine import Engine

__all__ = [
    "JUDGE_CHUNK_ROWS",
    "apply_readback",
    "fail_reconcile_run",
    "finish_reconcile_run",
    "last_reconcile_reports",
    "loss_tallies",
    "open_reconcile_runs",
    "reconcile_facts",
    "start_reconcile_run",
]

# Accounts a read-back judges per transaction: about 0.2 s of the writer on two cores.
JUDGE_CHUNK_ROWS = 20_000
# Listed ids staged for the judging per transaction (a few tens of ms).
_STAGE_ROWS = 50_000
_RUNS_KEPT = 100  # per audience

# Literal in the SQL (not bound) where a partial index names them.
_EXPORTING = f"'{ReconcileRunState.EXPORTING}'"
_FINISHED = f"('{ReconcileRunState.APPLIED}', '{ReconcileRunState.COMPLETED}')"


async def reconcile_facts(engine: Engine, audience_ids: Iterable[str]) -> list[ReconcileFacts]:
    """What scheduling the read-backs of these audiences needs, one row each."""
    ids = sorted(set(audience_ids))
    if not ids:
        return []
    marks = ", ".join("?" * len(ids))
    rows = await engine.read(
        "SELECT a.audience_id, a.list_id, a.first_acked_at,"
        " (SELECT MAX(started_at) FROM reconcile_runs r WHERE r.audience_id = a.audience_id),"
        " (SELECT MAX(finished_at) FROM reconcile_runs r WHERE r.audience_id = a.audience_id"
        f"  AND r.state IN {_FINISHED})"
        f" FROM audiences a WHERE a.audience_id IN ({marks}) ORDER BY a.audience_id",
        ids,
    )
    return [
        ReconcileFacts(
            audience_id=row[0],
            list_id=row[1],
            first_acked_at=row[2],
            last_started_at=row[3],
            last_completed_at=row[4],
        )
        for row in rows
    ]


async def start_reconcile_run(
    engine: Engine, audience_id: str, list_id: int, export_job_id: str, started_at: float
) -> ReconcileRun:
    """Record a read-back whose export job Demandbase accepted."""

    def work(db: sqlite3.Connection) -> int:
        run_id = db.execute(
            "INSERT INTO reconcile_runs (audience_id, list_id, export_job_id, started_at,"
            " state) VALUES (?, ?, ?, ?, ?)",
            (audience_id, list_id, export_job_id, started_at, ReconcileRunState.EXPORTING),
        ).lastrowid
        assert run_id is not None
        return run_id

    run_id = await engine.transaction(work)
    return ReconcileRun(
        run_id=run_id,
        audience_id=audience_id,
        list_id=list_id,
        export_job_id=export_job_id,
        started_at=started_at,
    )


async def open_reconcile_runs(engine: Engine, audience_ids: Iterable[str]) -> list[ReconcileRun]:
    """Read-backs whose export was created and not judged (left by a stop or a crash)."""
    wanted = set(audience_ids)
    rows = await engine.read(
        "SELECT run_id, audience_id, list_id, export_job_id, started_at"
        f" FROM reconcile_runs INDEXED BY reconcile_runs_open WHERE state = {_EXPORTING}"
        " ORDER BY run_id"
    )
    return [
        ReconcileRun(
            run_id=row[0],
            audience_id=row[1],
            list_id=row[2],
            export_job_id=row[3],
            started_at=row[4],
        )
        for row in rows
        if row[1] in wanted
    ]


async def fail_reconcile_run(engine: Engine, run_id: int, reason: str) -> None:
    now = engine.now()
    await engine.transaction(
        lambda db: db.execute(
            "UPDATE reconcile_runs SET state = ?, reason = ?, finished_at = ?"
            f" WHERE run_id = ? AND state = {_EXPORTING}",
            (ReconcileRunState.FAILED, reason, now, run_id),
        )
    )


async def finish_reconcile_run(engine: Engine, run_id: int, report: bytes) -> None:
    """Keep the report of a judged read-back; older runs of its audience are pruned."""

    def work(db: sqlite3.Connection) -> None:
        db.execute(
            "UPDATE reconcile_runs SET state = ?, report = ? WHERE run_id = ?",
            (ReconcileRunState.COMPLETED, report, run_id),
        )
        (audience_id,) = db.execute(
            "SELECT audience_id FROM reconcile_runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        db.execute(
            "DELETE FROM reconcile_runs WHERE audience_id = ?1 AND run_id <"
            " (SELECT MIN(run_id) FROM (SELECT run_id FROM reconcile_runs"
            "  WHERE audience_id = ?1 ORDER BY run_id DESC LIMIT ?2))",
            (audience_id, _RUNS_KEPT),
        )

    await engine.transaction(work)


async def last_reconcile_reports(engine: Engine, audience_ids: Iterable[str]) -> dict[str, bytes]:
    """The report of each audience's last completed read-back, as it was kept."""
    wanted = set(audience_ids)
    completed = f"'{ReconcileRunState.COMPLETED}'"
    rows = await engine.read(
        f"SELECT audience_id, report FROM reconcile_runs r WHERE state = {completed}"
        " AND run_id = (SELECT MAX(run_id) FROM reconcile_runs s"
        f"  WHERE s.audience_id = r.audience_id AND s.state = {completed})"
    )
    return {str(row[0]): bytes(row[1]) for row in rows if row[0] in wanted and row[1]}


async def loss_tallies(engine: Engine, destination: str, since: float = 0.0) -> list[LossTally]:
    """Completed batches of ``destination`` updated since ``since``, throttled or not."""
    rows = await engine.read(
        "SELECT b.throttled, COUNT(*), TOTAL(b.rows), TOTAL(b.verified), TOTAL(b.lost)"
        " FROM batches b JOIN audiences a USING (audience_id)"
        " WHERE a.destination = ? AND b.state = 'completed' AND b.updated_at >= ?"
        " GROUP BY b.throttled ORDER BY b.throttled",
        (destination, since),
    )
    return [
        LossTally(
            throttled=bool(row[0]),
            batches=int(row[1]),
            acknowledged=int(row[2]),
            verified=int(row[3]),
            lost=int(row[4]),
        )
        for row in rows
    ]


async def apply_readback(
    engine: Engine,
    run_id: int,
    listed: Sequence[ListedAccount],
    *,
    judged_before: float,
    repair_limit: int,
) -> ReadbackVerdict | None:
    """Judge the audience's accounts against ``listed``, its list's members, and repair.

    Only settled accounts (nothing pending, in flight or set aside) acknowledged
    (else changed) before ``judged_before`` are judged (:mod:`dbsync.judgment`
    has the rule). The accounts are judged in chunks of :data:`JUDGE_CHUNK_ROWS`, one
    transaction each, so that ingest commits between them. The run keeps its
    progress: a read-back resumed after a crash judges only the rest, and one judged
    to its end is never judged again (None).
    """
    audience = await engine.read(
        "SELECT audience_id FROM reconcile_runs WHERE run_id = ?", (run_id,)
    )
    if not audience:
        raise StoreError(f"no reconcile run {run_id}")
    audience_id = audience[0][0]
    # Which listed ids are not ours, on the reader: none (the common case), and the
    # list's ids are what the chunks' SQL probes; else matching needs our names and
    # domains (a snapshot read off the writer: only settled accounts acknowledged long
    # ago are judged, and no new change makes one of those), and probes the matches.
    # Sorted, so that index probes walk in order; in a thread, as a list may hold
    # millions and the event loop serves ingest meanwhile.
    ids, encoded = await asyncio.to_thread(_sorted_ids, (a.external_id for a in listed))
    not_ours = await engine.read(
        "SELECT COUNT(*) FROM json_each(?) j WHERE NOT EXISTS (SELECT 1 FROM membership m"
        f" WHERE m.audience_key = {KEY} AND m.external_id = j.value)",
        (encoded, audience_id),
    )
    strangers: dict[str, ListedAccount] = {}
    nameless = 0
    if not_ours[0][0]:
        ours = cast(
            list[OurAccount],
            await engine.read(
                f"SELECT external_id, name, domain FROM membership WHERE audience_key = {KEY}",
                (audience_id,),
            ),
        )
        present, strangers, nameless = await asyncio.to_thread(match_listed, ours, listed)
        ids, encoded = await asyncio.to_thread(_sorted_ids, present)
    # A piece per transaction, so that ingest commits between them.
    for start in range(0, max(len(ids), 1), _STAGE_ROWS):
        piece = (
            encoded
            if len(ids) <= _STAGE_ROWS
            else msgspec.json.encode(ids[start : start + _STAGE_ROWS])
        )
        await engine.transaction(
            functools.partial(_stage_listed, run_id=run_id, ids=piece, first=start == 0)
        )
    listing = Listing(
        listed=len(listed),
        strangers=strangers,
        nameless=nameless,
        judged_before=judged_before,
        repair_limit=repair_limit,
        now=engine.now(),
    )
    while True:
        finished, verdict = await engine.transaction(
            lambda db: _apply_chunk(db, run_id, listing, JUDGE_CHUNK_ROWS)
        )
        if finished:
            return verdict


def _sorted_ids(ids: Iterable[str]) -> tuple[list[str], bytes]:
    """``ids`` sorted, and as a JSON array."""
    ordered = sorted(ids)
    return ordered, msgspec.json.encode(ordered)


def _stage_listed(db: sqlite3.Connection, *, run_id: int, ids: bytes, first: bool) -> None:
    """Add ``ids`` (a JSON array of external ids) to the run's scratch rows; the first
    piece also drops what earlier attempts left (of this run, or of runs no longer
    judged: a read-back that failed half-way)."""
    if first:
        db.execute(
            "DELETE FROM temp.readback_listed WHERE run_id = ? OR run_id NOT IN"
            " (SELECT run_id FROM reconcile_runs INDEXED BY reconcile_runs_open"
            f"  WHERE state = {_EXPORTING})",
            (run_id,),
        )
    db.execute(
        "INSERT OR IGNORE INTO temp.readback_listed (run_id, external_id)"
        " SELECT ?, value FROM json_each(?)",
        (run_id, ids),
    )


# An account of the chunk (``m``) in the list: a probe of the run's scratch rows.
_IN_LIST = (
    "EXISTS (SELECT 1 FROM temp.readback_listed l"
    " WHERE l.run_id = :run AND l.external_id = m.external_id)"
)
# The plain accounts (the module docstring of :mod:`dbsync.judgment` says which):
# settled, acknowledged (else changed) by the cutoff, and where the list says they
# should be. An account set aside and tried again (:mod:`dbsync.store.retries`) is
# judged in Python, which says whether the list now holds it (``_NOT_RETRYING``).
_PLAIN = (
    "m.desired = m.delivered AND m.in_flight IS NULL AND m.rejected = 0"
    " AND coalesce(m.acked_at, m.changed_at) <= :before"
    f" AND iif(m.desired = 1, {_IN_LIST}, NOT {_IN_LIST})"
)
_NOT_RETRYING = " AND m.external_id NOT IN (SELECT value FROM json_each(:retrying))"


def _apply_chunk(
    db: sqlite3.Connection, run_id: int, listing: Listing, chunk_rows: int
) -> tuple[bool, ReadbackVerdict | None]:
    """Judge the run's next ``chunk_rows`` accounts (by external id) and apply the decision.

    Returns (finished, verdict): not finished while accounts remain; finished with no
    verdict when the run was judged already. The last chunk also marks the strangers
    for removal, closes the run and advances the checkpoint.

    The plain accounts, most of any list, are counted and cleared by SQL without
    leaving SQLite; the others are read and judged by :func:`judge_chunk`.
    """
    run = db.execute(
        "SELECT audience_id, state, judged_through, judgment FROM reconcile_runs WHERE run_id = ?",
        (run_id,),
    ).fetchone()
    if run is None:
        raise StoreError(f"no reconcile run {run_id}")
    audience_id, state, judged_through, kept = run
    if state != ReconcileRunState.EXPORTING:
        db.execute("DELETE FROM temp.readback_listed WHERE run_id = ?", (run_id,))
        return True, None
    judgment = msgspec.msgpack.decode(kept, type=Judgment) if kept else Judgment()
    after = judged_through or ""
    key = give_key(db, audience_id)
    # The chunk: the next chunk_rows accounts; the last chunk has no upper bound.
    last = db.execute(
        "SELECT external_id FROM membership WHERE audience_key = ? AND external_id > ?"
        " ORDER BY external_id LIMIT 1 OFFSET ?",
        (key, after, chunk_rows - 1),
    ).fetchone()
    finished = last is None
    through = None if last is None else last[0]
    chunk = "m.audience_key = :key AND m.external_id > :after" + (
        "" if finished else " AND m.external_id <= :through"
    )
    retrying = [
        row[0]
        for row in db.execute(
            "SELECT m.external_id FROM rejected r"
            " JOIN membership m ON m.audience_key = :key AND m.external_id = r.external_id"
            f" WHERE r.audience_id = :audience AND m.rejected = 0 AND {chunk}",
            {"audience": audience_id, "key": key, "after": after, "through": through},
        )
    ]
    params = {
        "key": key,
        "after": after,
        "through": through,
        "run": run_id,
        "before": listing.judged_before,
        "retrying": msgspec.json.encode(retrying),
        "limit": listing.repair_limit,
    }
    # The plain accounts, found once: their rowids, to count and clear them.
    db.execute("DELETE FROM temp.readback_plain")
    db.execute(
        "INSERT INTO temp.readback_plain (desired, batch, row, repairs)"
        " SELECT m.desired, coalesce(m.ack_batch, -1), m.rowid, m.repairs FROM membership m"
        f" WHERE {chunk} AND {_PLAIN}" + (_NOT_RETRYING if retrying else ""),
        params,
    )
    plain = db.execute(
        "SELECT desired, batch, COUNT(*) FROM temp.readback_plain GROUP BY desired, batch"
    ).fetchall()
    # The rest, with whether the list holds each (none when every account of the chunk
    # is plain, the common case). Names and domains are read only for the accounts that
    # may be set aside (those repaired repair_limit times): strings are most of what
    # reading a row costs.
    in_chunk = chunk_rows
    if finished:
        (in_chunk,) = db.execute(
            "SELECT COUNT(*) FROM membership WHERE audience_key = ? AND external_id > ?",
            (key, after),
        ).fetchone()
    rows = []
    if in_chunk > sum(n for _, _, n in plain):
        rows = db.execute(
            "SELECT m.external_id, iif(m.repairs >= :limit, m.name, ''),"
            " iif(m.repairs >= :limit, m.domain, ''), m.desired, m.delivered, m.in_flight,"
            " m.rejected, m.acked_at, m.ack_batch, m.changed_at, m.repairs,"
            f" {_IN_LIST} FROM membership m WHERE {chunk}"
            " AND m.rowid NOT IN (SELECT row FROM temp.readback_plain)",
            params,
        ).fetchall()
    decision = judge_chunk(
        [row[:11] for row in rows],
        {row[0] for row in rows if row[11]},
        judged_before=listing.judged_before,
        repair_limit=listing.repair_limit,
    )
    for desired, batch, n in plain:
        decision.add_plain(
            desired=bool(desired), ack_batch=None if batch < 0 else batch, accounts=n
        )

    def each(accounts: Iterable[str]) -> list[tuple[int, str]]:
        return [(key, account) for account in accounts]

    where = " WHERE audience_key = ? AND external_id = ?"
    # Most of a read-back's writes, in one statement: the plain accounts with an
    # acknowledgment to clear (and members with repairs), then those judged in Python.
    db.execute(
        "UPDATE membership SET ack_batch = NULL, repairs = 0 WHERE rowid IN"
        " (SELECT row FROM temp.readback_plain"
        "  WHERE batch >= 0 OR (desired = 1 AND repairs <> 0))"
    )
    if decision.cleared:
        db.execute(
            "UPDATE membership SET ack_batch = NULL, repairs = 0 WHERE audience_key = ?"
            " AND external_id IN (SELECT value FROM json_each(?))",
            (key, msgspec.json.encode(decision.cleared)),
        )
    # Accounts set aside as unmatched and tried again that the list now holds leave
    # the set.
    if retrying:
        found = set(retrying).intersection(decision.cleared)
        db.executemany(
            "DELETE FROM rejected WHERE audience_id = ? AND external_id = ?",
            [(audience_id, account) for account in sorted(found)],
        )
    db.executemany(
        "UPDATE membership SET delivered = 0, ack_batch = NULL, repairs = repairs + 1" + where,
        each(decision.resend_inserts),
    )
    db.executemany(
        "UPDATE membership SET delivered = 1, ack_batch = NULL, repairs = repairs + 1" + where,
        each(decision.resend_deletes),
    )
    db.executemany("UPDATE membership SET delivered = 1" + where, each(decision.extras))
    strangers = 0
    if finished:
        (folded_seq,) = db.execute(
            "SELECT folded_seq FROM audiences WHERE audience_id = ?", (audience_id,)
        ).fetchone()
        # An account folded since the matching may hold a stranger's external id: then
        # it is ours and stays (the insert does nothing), and only the rest are counted.
        strangers = db.executemany(
            "INSERT INTO membership (audience_key, external_id, name, domain, desired, seq,"
            " changed_at, delivered) VALUES (?, ?, ?, ?, 0, ?, ?, 1) ON CONFLICT DO NOTHING",
            [
                (key, a.external_id, a.name, a.domain, folded_seq, listing.now)
                for a in listing.strangers.values()
            ],
        ).rowcount
    queue.move(
        db,
        audience_id,
        inserts=len(decision.resend_inserts),
        deletes=len(decision.resend_deletes) + len(decision.extras) + strangers,
    )
    # Set aside: out of the queue (rejected = 1) and recorded with the reason; delivered
    # says what the list holds, so that a requeue sends them again.
    for accounts, reason, delivered_now in (
        (decision.unmatched, RejectReason.UNMATCHED, 0),
        (decision.not_removable, RejectReason.NOT_REMOVABLE, 1),
    ):
        db.executemany(
            "UPDATE membership SET delivered = ?, rejected = 1, ack_batch = NULL" + where,
            [(delivered_now, key, a.external_id) for a, _ in accounts],
        )
        db.executemany(
            "INSERT INTO rejected (audience_id, external_id, name, domain, member, reason,"
            " rejected_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT DO UPDATE SET name = excluded.name, domain = excluded.domain,"
            " member = excluded.member, reason = excluded.reason,"
            " rejected_at = excluded.rejected_at, attempts = excluded.attempts",
            [
                (
                    audience_id,
                    a.external_id,
                    a.name,
                    a.domain,
                    int(not delivered_now),
                    set_aside_reason(reason, repairs),
                    listing.now,
                    repairs + 1,
                )
                for a, repairs in accounts
            ],
        )
    db.executemany(
        "UPDATE batches SET verified = verified + ? WHERE batch_id = ?",
        [(n, batch) for batch, n in decision.batch_verified.items()],
    )
    db.executemany(
        "UPDATE batches SET lost = lost + ? WHERE batch_id = ?",
        [(n, batch) for batch, n in decision.batch_lost.items()],
    )
    ledger.count(
        db,
        audience_id,
        verified=decision.verified_acks,
        lost=sum(decision.lost.values()),
        repaired=decision.repaired,
        extra=len(decision.extras) + strangers,
        rejected=len(decision.unmatched) + len(decision.not_removable),
        **{ledger.cause(LossCause(cause)): n for cause, n in decision.lost.items()},
        **{ledger.reason(RejectReason.UNMATCHED): len(decision.unmatched)},
        **{ledger.reason(RejectReason.NOT_REMOVABLE): len(decision.not_removable)},
    )
    judgment.add(decision, strangers_removed=strangers)
    queue.advance_checkpoint(db, audience_id)
    # The chunk's staged ids are not probed again (the last chunk: none is).
    db.execute(
        "DELETE FROM temp.readback_listed WHERE run_id = ?"
        + ("" if finished else " AND external_id <= ?"),
        (run_id,) if finished else (run_id, through),
    )
    if not finished:
        db.execute(
            "UPDATE reconcile_runs SET judged_through = ?, judgment = ? WHERE run_id = ?",
            (through, msgspec.msgpack.encode(judgment), run_id),
        )
        return False, None
    db.execute(
        "UPDATE reconcile_runs SET state = ?, finished_at = ?, judgment = NULL WHERE run_id = ?",
        (ReconcileRunState.APPLIED, listing.now, run_id),
    )
    return True, judgment.verdict(listing)

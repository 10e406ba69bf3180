"""Snapshots: complete memberships and AEP file runs, staged, judged and applied in SQL.

A PUT snapshot or a run of AEP files can hold millions of accounts. Neither its parse
nor its difference from desired state may hold the whole membership in Python (a
1,000,000-account PUT peaked at 562 MB when it did), so a snapshot goes through the
store in three steps:

1. :func:`begin` opens one (state ``staging``);
2. :func:`stage` writes a chunk of rows into ``snapshot_rows``, one transaction each, so
   that ingest's commits interleave. The table is keyed by account: a repeated row is
   counted (``n``) and a row that contradicts an earlier one (member, then exited) is a
   *conflict*, resolved by the later qualification time when both rows carry one, else
   in favour of membership (a full file never holds exits);
3. :func:`finish` judges and applies it in one transaction: it folds the journal (so
   that "current" includes changes not folded yet), counts with set-based SQL what it
   would add and remove, and either appends the difference to the journal or, for a
   complete membership that would remove more than ``max_removal_percent`` of the
   audience's members (or empty a non-empty audience), *holds* it. A held snapshot
   keeps its rows until :func:`approve` applies it or :func:`discard` drops it; a newer
   snapshot of the audience replaces it and is judged afresh.

A run of AEP files is recorded in ``file_runs`` in the transaction that applies (or
holds) it, with its content hash, so that a kill -9 anywhere leaves it either applied
whole, once, or not at all (a run still ``staging`` at start is dropped and read again).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from dbsync.model import FileRun, FileRunInfo, HeldSnapshot, SnapshotOutcome
from dbsync.store.audiences import KEY
from dbsync.store.engine import Engine

__all__ = [
    "SnapshotRow",
    "approve",
    "begin",
    "discard",
    "drop",
    "drop_unfinished",
    "file_run_decided",
    "file_runs",
    "finish",
    "held",
    "mark_files_deleted",
    "record_file_run",
    "runs_to_clean",
    "stage",
]

# (external_id, name, domain, member 1/0, qualified_at or None)
SnapshotRow = tuple[str, str, str, int, float | None]

# Folds the whole journal in the caller's transaction; returns the audiences folded.
Fold = Callable[[sqlite3.Connection], set[str]]

_encode = msgspec.json.Encoder().encode
_decode_files = msgspec.json.Decoder(tuple[str, ...]).decode

_STAGE = (
    "INSERT INTO snapshot_rows"
    " (snapshot_id, external_id, name, domain, member, qualified_at, n, conflict)"
    " VALUES (?, ?, ?, ?, ?, ?, 1, 0)"
    " ON CONFLICT DO UPDATE SET n = n + 1,"
    " conflict = MAX(conflict, member <> excluded.member),"
    # The later qualification wins when both rows carry one; otherwise membership does.
    " member = CASE WHEN qualified_at IS NOT NULL AND excluded.qualified_at IS NOT NULL"
    "   THEN CASE WHEN excluded.qualified_at >= qualified_at THEN excluded.member"
    "   ELSE member END ELSE MAX(member, excluded.member) END,"
    " name = CASE WHEN excluded.member = 1 OR member = 0 THEN excluded.name ELSE name END,"
    " domain = CASE WHEN excluded.member = 1 OR member = 0 THEN excluded.domain"
    "   ELSE domain END,"
    " qualified_at = MAX(COALESCE(qualified_at, excluded.qualified_at),"
    "   COALESCE(excluded.qualified_at, qualified_at))"
)


async def drop_unfinished(engine: Engine) -> int:
    """At open: drop snapshots a previous process was staging (their sender retries)."""

    def work(db: sqlite3.Connection) -> int:
        ids = [
            r[0] for r in db.execute("SELECT snapshot_id FROM snapshots WHERE state = 'staging'")
        ]
        for snapshot_id in ids:
            _drop_rows(db, snapshot_id, "dropped", 0.0)
        return len(ids)

    return await engine.transaction(work)


async def begin(
    engine: Engine,
    audience_id: str,
    rows: Sequence[SnapshotRow],
    *,
    source: str,
    mode: str,
    ts: float,
) -> int:
    """Open a snapshot of ``audience_id`` with its first ``rows``, in one transaction; its id.

    One transaction, so that a store refusing writes (a full disk) is left untouched by
    a snapshot it cannot take, not with an empty one to drop.
    """

    def work(db: sqlite3.Connection) -> int:
        cursor = db.execute(
            "INSERT INTO snapshots (audience_id, source, mode, state, received_at)"
            " VALUES (?, ?, ?, 'staging', ?)",
            (audience_id, source, mode, ts),
        )
        snapshot_id = int(cursor.lastrowid or 0)
        db.executemany(_STAGE, [(snapshot_id, *row) for row in rows])
        return snapshot_id

    return await engine.transaction(work)


async def stage(engine: Engine, snapshot_id: int, rows: Sequence[SnapshotRow]) -> None:
    """Add ``rows`` to a staging snapshot, in one transaction."""

    def work(db: sqlite3.Connection) -> None:
        db.executemany(_STAGE, [(snapshot_id, *row) for row in rows])

    await engine.transaction(work)


async def drop(engine: Engine, snapshot_id: int) -> None:
    """Forget a staging snapshot whose input turned out invalid."""
    await engine.transaction(lambda db: _drop_rows(db, snapshot_id, "dropped", engine.now()))


async def finish(
    engine: Engine,
    snapshot_id: int,
    *,
    max_removal_percent: float | None,
    fold: Fold,
    run: FileRunInfo | None = None,
) -> tuple[SnapshotOutcome, set[str]]:
    """Judge and apply (or hold) a staged snapshot, in one transaction; and what it folded."""
    now = engine.now()

    def work(db: sqlite3.Connection) -> tuple[SnapshotOutcome, set[str]]:
        folded = fold(db)
        audience_id, mode = db.execute(
            "SELECT audience_id, mode FROM snapshots WHERE snapshot_id = ?", (snapshot_id,)
        ).fetchone()
        # A newer complete membership makes a held one moot: it is judged instead.
        for (older,) in db.execute(
            "SELECT snapshot_id FROM snapshots WHERE audience_id = ? AND state = 'held'",
            (audience_id,),
        ).fetchall():
            _drop_rows(db, older, "replaced", now)
        outcome = _judge(db, snapshot_id, audience_id, mode, max_removal_percent)
        if outcome.state == "applied":
            _apply(db, outcome, now)
        else:
            db.execute(
                "UPDATE snapshots SET state = 'held', reason = ?, members = ?, current = ?,"
                " added = ?, removed = ? WHERE snapshot_id = ?",
                (
                    outcome.reason,
                    outcome.members,
                    outcome.current,
                    outcome.added,
                    outcome.removed,
                    snapshot_id,
                ),
            )
        if run is not None:
            _insert_run(db, run, outcome.state, outcome.reason, now, outcome)
        return outcome, folded

    return await engine.transaction(work)


async def approve(
    engine: Engine, audience_id: str, *, fold: Fold
) -> tuple[SnapshotOutcome | None, set[str]]:
    """Apply the snapshot the guard holds for ``audience_id``; None if none is held."""
    now = engine.now()

    def work(db: sqlite3.Connection) -> tuple[SnapshotOutcome | None, set[str]]:
        row = db.execute(
            "SELECT snapshot_id, mode FROM snapshots WHERE audience_id = ? AND state = 'held'"
            " ORDER BY snapshot_id DESC LIMIT 1",
            (audience_id,),
        ).fetchone()
        if row is None:
            return None, set()
        folded = fold(db)
        judged = _judge(db, row[0], audience_id, row[1], None)
        _apply(db, judged, now)
        return judged, folded

    return await engine.transaction(work)


async def discard(engine: Engine, audience_id: str) -> HeldSnapshot | None:
    """Drop the snapshot the guard holds for ``audience_id``; None if none is held."""
    now = engine.now()

    def work(db: sqlite3.Connection) -> HeldSnapshot | None:
        found = _held(db, audience_id)
        for snapshot in found:
            _drop_rows(db, snapshot.snapshot_id, "discarded", now)
        return found[-1] if found else None

    return await engine.transaction(work)


async def held(engine: Engine, audience_id: str | None = None) -> list[HeldSnapshot]:
    """Snapshots the removal guard holds, oldest first."""
    sql, params = _held_query(audience_id)
    return [_held_row(r) for r in await engine.read(sql, params)]


def _held(db: sqlite3.Connection, audience_id: str | None) -> list[HeldSnapshot]:
    sql, params = _held_query(audience_id)
    return [_held_row(r) for r in db.execute(sql, params)]


def _held_query(audience_id: str | None) -> tuple[str, tuple[Any, ...]]:
    sql = (
        "SELECT snapshot_id, audience_id, source, received_at, members, current, removed,"
        " reason FROM snapshots WHERE state = 'held'"
    )
    params: tuple[Any, ...] = ()
    if audience_id is not None:
        sql += " AND audience_id = ?"
        params = (audience_id,)
    return sql + " ORDER BY snapshot_id", params


def _held_row(r: Any) -> HeldSnapshot:
    return HeldSnapshot(
        snapshot_id=r[0],
        audience_id=r[1],
        source=r[2],
        received_at=r[3],
        members=r[4],
        current=r[5],
        removed=r[6],
        reason=r[7],
    )


def _judge(
    db: sqlite3.Connection,
    snapshot_id: int,
    audience_id: str,
    mode: str,
    max_removal_percent: float | None,
) -> SnapshotOutcome:
    """Count what the snapshot changes; hold it if the guard says so (None: no guard)."""
    (current,) = db.execute(
        f"SELECT COUNT(*) FROM membership WHERE audience_key = {KEY} AND desired = 1",
        (audience_id,),
    ).fetchone()
    accounts, members, rows, conflicts, kept, leaving = db.execute(
        "SELECT COUNT(*), TOTAL(s.member), TOTAL(s.n), TOTAL(s.conflict),"
        " TOTAL(s.member = 1 AND m.desired = 1), TOTAL(s.member = 0 AND m.desired = 1)"
        " FROM snapshot_rows s LEFT JOIN membership m"
        f" ON m.audience_key = {KEY} AND m.external_id = s.external_id WHERE s.snapshot_id = ?",
        (audience_id, snapshot_id),
    ).fetchone()
    members, kept, leaving = int(members), int(kept), int(leaving)
    if mode == "full":
        removed, added, unchanged = current - kept, members - kept, kept
    else:
        removed, added, unchanged = leaving, members - kept, kept
    state, reason = "applied", ""
    # 100 turns the guard off: no snapshot removes more than all, and emptying is "all".
    limit = max_removal_percent if mode == "full" and current > 0 else None
    if limit is not None and limit < 100:
        if members == 0:
            state, reason = "held", f"empty while the audience has {current} members"
        elif removed * 100 > limit * current:
            state = "held"
            reason = (
                f"would remove {removed} of {current} members"
                f" ({removed * 100 / current:.1f}% > max_removal_percent {limit:g})"
            )
    return SnapshotOutcome(
        snapshot_id=snapshot_id,
        audience_id=audience_id,
        state=state,
        mode=mode,
        rows=int(rows),
        members=members,
        exited=accounts - members,
        duplicates=int(rows) - accounts,
        conflicts=int(conflicts),
        current=current,
        added=added,
        removed=removed,
        unchanged=unchanged,
        reason=reason,
    )


def _apply(db: sqlite3.Connection, outcome: SnapshotOutcome, now: float) -> None:
    """Append the snapshot's difference from desired state to the journal, then drop it.

    Only the difference: an account already a member under the same name and domain
    needs no change, so a daily file that changes little costs a join, not a fold of
    every row.
    """
    audience_id, snapshot_id = outcome.audience_id, outcome.snapshot_id
    joins = (
        "INSERT INTO changes (audience_id, external_id, name, domain, member, ts)"
        " SELECT ?, s.external_id, s.name, s.domain, 1, ? FROM snapshot_rows s"
        f" LEFT JOIN membership m ON m.audience_key = {KEY} AND m.external_id = s.external_id"
        " WHERE s.snapshot_id = ? AND s.member = 1 AND (m.external_id IS NULL"
        " OR m.desired = 0 OR m.name <> s.name OR m.domain <> s.domain)"
    )
    db.execute(joins, (audience_id, now, audience_id, snapshot_id))
    if outcome.mode == "full":
        leaves = (
            "INSERT INTO changes (audience_id, external_id, name, domain, member, ts)"
            " SELECT ?, m.external_id, m.name, m.domain, 0, ? FROM membership m"
            f" WHERE m.audience_key = {KEY} AND m.desired = 1 AND NOT EXISTS (SELECT 1"
            " FROM snapshot_rows s WHERE s.snapshot_id = ? AND s.external_id = m.external_id"
            " AND s.member = 1)"
        )
        db.execute(leaves, (audience_id, now, audience_id, snapshot_id))
    else:
        leaves = (
            "INSERT INTO changes (audience_id, external_id, name, domain, member, ts)"
            " SELECT ?, m.external_id, m.name, m.domain, 0, ? FROM snapshot_rows s"
            f" JOIN membership m ON m.audience_key = {KEY} AND m.external_id = s.external_id"
            " WHERE s.snapshot_id = ? AND s.member = 0 AND m.desired = 1"
        )
        db.execute(leaves, (audience_id, now, audience_id, snapshot_id))
    db.execute(
        "UPDATE snapshots SET members = ?, current = ?, added = ?, removed = ?"
        " WHERE snapshot_id = ?",
        (outcome.members, outcome.current, outcome.added, outcome.removed, snapshot_id),
    )
    _drop_rows(db, snapshot_id, "applied", now)
    db.execute(
        "UPDATE file_runs SET outcome = 'applied', reason = '', added = ?, removed = ?,"
        " decided_at = ? WHERE snapshot_id = ?",
        (outcome.added, outcome.removed, now, snapshot_id),
    )


def _drop_rows(db: sqlite3.Connection, snapshot_id: int, state: str, now: float) -> None:
    db.execute("DELETE FROM snapshot_rows WHERE snapshot_id = ?", (snapshot_id,))
    db.execute(
        "UPDATE snapshots SET state = ?, decided_at = ? WHERE snapshot_id = ?",
        (state, now, snapshot_id),
    )
    if state in ("replaced", "discarded"):
        db.execute(
            "UPDATE file_runs SET outcome = ?, decided_at = ? WHERE snapshot_id = ?",
            (state, now, snapshot_id),
        )


# --- AEP file runs ---------------------------------------------------------------------


def _insert_run(
    db: sqlite3.Connection,
    run: FileRunInfo,
    outcome: str,
    reason: str,
    now: float,
    counts: SnapshotOutcome | None,
) -> None:
    db.execute(
        "INSERT INTO file_runs (audience_id, run_key, run_time, content_hash, files, outcome,"
        " reason, snapshot_id, rows, invalid, duplicates, conflicts, added, removed,"
        " decided_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run.audience_id,
            run.run_key,
            run.run_time,
            run.content_hash,
            _encode(list(run.files)).decode(),
            outcome,
            reason,
            counts.snapshot_id if counts else None,
            counts.rows if counts else 0,
            run.invalid,
            counts.duplicates if counts else 0,
            counts.conflicts if counts else 0,
            counts.added if counts else 0,
            counts.removed if counts else 0,
            now,
        ),
    )


async def record_file_run(engine: Engine, run: FileRunInfo, outcome: str, reason: str) -> None:
    """Record a run that was not applied: skipped (late, duplicate) or refused."""
    now = engine.now()
    await engine.transaction(lambda db: _insert_run(db, run, outcome, reason, now, None))


async def file_run_decided(engine: Engine, run: FileRunInfo) -> str | None:
    """What to do with ``run`` given the runs decided before it.

    ``seen``: this very run (same name, same content) was decided already, say before a
    restart: nothing to do nor record. ``skipped_duplicate``: its content was applied
    (or is held) under another name. ``skipped_late``: a newer run of its audience was
    applied. None: read it.
    """
    rows = await engine.read(
        "SELECT run_key, outcome FROM file_runs WHERE audience_id = ? AND content_hash = ?",
        (run.audience_id, run.content_hash),
    )
    if any(r[0] == run.run_key for r in rows):
        return "seen"
    if any(r[1] in ("applied", "held") for r in rows):
        return "skipped_duplicate"
    newest = await engine.read(
        "SELECT MAX(run_time) FROM file_runs WHERE audience_id = ? AND outcome = 'applied'",
        (run.audience_id,),
    )
    if newest[0][0] is not None and run.run_time < newest[0][0]:
        return "skipped_late"
    return None


def _file_run(r: sqlite3.Row) -> FileRun:
    return FileRun(
        run_id=r[0],
        audience_id=r[1],
        run_key=r[2],
        run_time=r[3],
        content_hash=r[4],
        files=_decode_files(r[5]),
        outcome=r[6],
        reason=r[7],
        rows=r[8],
        invalid=r[9],
        duplicates=r[10],
        conflicts=r[11],
        added=r[12],
        removed=r[13],
        decided_at=r[14],
        files_deleted=bool(r[15]),
    )


_RUN_COLUMNS = (
    "run_id, audience_id, run_key, run_time, content_hash, files, outcome, reason, rows,"
    " invalid, duplicates, conflicts, added, removed, decided_at, files_deleted"
)


async def file_runs(engine: Engine, limit: int) -> list[FileRun]:
    """The ``limit`` runs decided last, newest first."""
    rows = await engine.read(
        f"SELECT {_RUN_COLUMNS} FROM file_runs ORDER BY run_id DESC LIMIT ?", (limit,)
    )
    return [_file_run(r) for r in rows]


async def runs_to_clean(engine: Engine, decided_before: float) -> list[FileRun]:
    """Runs decided (not held) before ``decided_before`` whose files are still there."""
    rows = await engine.read(
        f"SELECT {_RUN_COLUMNS} FROM file_runs WHERE files_deleted = 0"
        " AND outcome <> 'held' AND decided_at < ? ORDER BY run_id",
        (decided_before,),
    )
    return [_file_run(r) for r in rows]


async def mark_files_deleted(engine: Engine, run_ids: Sequence[int]) -> None:
    def work(db: sqlite3.Connection) -> None:
        db.executemany(
            "UPDATE file_runs SET files_deleted = 1 WHERE run_id = ?", [(i,) for i in run_ids]
        )

    await engine.transaction(work)

"""The journal: ingest's appends, their group commit, snapshots, and the fold.

Ingest answers 202 once its changes are appended to ``changes`` (invariant 1):
appending is the fast path, several times a keyed upsert's rate, so the answer never
waits for desired state. Concurrent appends are written together by the
:class:`GroupCommitter`, a service whose :meth:`~GroupCommitter.run` the daemon
awaits in its TaskGroup: callers that arrive while a commit runs are written by the
next one, in one transaction. A failed transaction fails every caller in it, and
writes none. Without the service running (a tool or a test using the store alone),
each append commits in its own transaction.

*Folding* moves journal rows into ``membership`` behind ingest (the service that
drives it is :class:`dbsync.folder.Folder`): :func:`fold_chunk` keeps the last change
per account of a chunk, moves the dirty set's counters and the ledger, upserts, and
deletes the chunk from the journal, in one transaction. A snapshot
(:func:`replace_members`) folds everything first, so that "current members" includes
changes not folded yet.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from dbsync.errors import StoreError
from dbsync.model import Account, Change, SnapshotResult
from dbsync.store import ledger, queue
from dbsync.store.audiences import KEY
from dbsync.store.engine import Engine

__all__ = [
    "FOLD_CHUNK_ROWS",
    "GATHER_CHUNK",
    "UPSERT_CHUNK",
    "GroupCommitter",
    "Journal",
    "fold_all",
    "fold_chunk",
    "insert_changes",
]

# Journal rows per fold transaction. Large, because a sorted fold pays per page as
# much as per row: a chunk rewrites (and commits) each page of membership it touches
# once, however many of its rows land there. Not larger, because one transaction
# holds the store's one writer, and ingest's commits wait behind it (~1 s here).
FOLD_CHUNK_ROWS = 100_000

# The fold's two statements that move rows (bench/fold_floor.py runs them too, into
# other shapes of membership). GATHER_CHUNK keeps, of the journal rows whose seq is
# between its two parameters, the last change per account, in seq order so that a
# later change overwrites an earlier one; ``n`` counts the account's changes, for the
# ledger (upserting into the chunk's B-tree costs less than a GROUP BY's sort). It maps
# each row's audience id to its key on the way (a row whose id has no key yet is left
# out: :func:`fold_chunk` gives the key and gathers again).
# UPSERT_CHUNK writes the chunk into membership in key order: a new state, name or
# domain clears a rejection; a new name or domain, the repairs; a new state stamps
# changed_at.
GATHER_CHUNK = (
    "INSERT INTO temp.fold_chunk"
    " (audience_key, external_id, name, domain, member, seq, ts, n)"
    " SELECT k.audience_key, c.external_id, c.name, c.domain, c.member, c.seq, c.ts, 1"
    " FROM changes c CROSS JOIN audience_keys k ON k.audience_id = c.audience_id"
    " WHERE c.seq BETWEEN ? AND ? ORDER BY c.seq"
    " ON CONFLICT DO UPDATE SET name = excluded.name, domain = excluded.domain,"
    " member = excluded.member, seq = excluded.seq, ts = excluded.ts, n = n + 1"
)
UPSERT_CHUNK = (
    "INSERT INTO membership (audience_key, external_id, name, domain, desired, seq, changed_at)"
    " SELECT audience_key, external_id, name, domain, member, seq, ts FROM temp.fold_chunk"
    " ORDER BY audience_key, external_id"
    " ON CONFLICT DO UPDATE SET"
    " rejected = CASE WHEN desired <> excluded.desired OR name <> excluded.name"
    "   OR domain <> excluded.domain THEN 0 ELSE rejected END,"
    " repairs = CASE WHEN name <> excluded.name OR domain <> excluded.domain"
    "   THEN 0 ELSE repairs END,"
    " changed_at = CASE WHEN desired <> excluded.desired"
    "   THEN excluded.changed_at ELSE changed_at END,"
    " name = excluded.name, domain = excluded.domain,"
    " desired = excluded.desired, seq = excluded.seq"
)

# Journal rows: (audience_id, external_id, name, domain, member, ts).
_Rows = list[tuple[Any, ...]]


def insert_changes(group: Sequence[tuple[_Rows, object]], db: sqlite3.Connection) -> None:
    """Append every caller's rows of ``group`` to the journal, in the caller's transaction."""
    insert = (
        "INSERT INTO changes (audience_id, external_id, name, domain, member, ts)"
        " VALUES (?, ?, ?, ?, ?, ?)"
    )
    for rows, _ in group:
        db.executemany(insert, rows)


class GroupCommitter:
    """Commits the appends of concurrent callers together; a service (:meth:`run`)."""

    def __init__(self, engine: Engine, on_committed: Callable[[], None]) -> None:
        self._engine = engine
        self._on_committed = on_committed
        self._queue: list[tuple[_Rows, asyncio.Future[int]]] = []
        self._committing: list[tuple[_Rows, asyncio.Future[int]]] = []
        self._wakeup = asyncio.Event()
        self._running = False
        self._stopping = False

    async def append(self, rows: _Rows) -> int:
        """Append ``rows``; durable when this returns."""
        if not self._running:
            await self._engine.transaction(functools.partial(insert_changes, [(rows, None)]))
            self._on_committed()
            return len(rows)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((rows, future))
        self._wakeup.set()
        # Shielded: a caller that goes away (client disconnect) must not leave the
        # group's result unread; the commit itself happens regardless.
        return await asyncio.shield(future)

    async def run(self) -> None:
        """Commit appends a group at a time until :meth:`stop`, then what is queued."""
        self._running = True
        try:
            while self._queue or not self._stopping:
                if not self._queue:
                    await self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                self._committing, self._queue = self._queue, []
                await self._commit(self._committing)
                self._committing = []
        finally:
            self._running = self._stopping = False
            # Cancelled with callers waiting: they learn it rather than wait forever (a
            # group whose transaction did commit is then sent again: harmless, a set).
            stopped = StoreError("the store's group commit stopped")
            for _, future in [*self._committing, *self._queue]:
                if not future.done():
                    future.set_exception(stopped)
            self._committing, self._queue = [], []

    def stop(self) -> None:
        """Let :meth:`run` return once the queue is empty; later appends commit alone."""
        self._stopping = True
        self._wakeup.set()

    async def _commit(self, group: list[tuple[_Rows, asyncio.Future[int]]]) -> None:
        try:
            await self._engine.transaction(functools.partial(insert_changes, group))
        except Exception as exc:
            error = exc if isinstance(exc, StoreError) else StoreError(str(exc))
            for _, future in group:
                if not future.done():
                    future.set_exception(error)
            return
        for rows, future in group:
            if not future.done():
                future.set_result(len(rows))
        self._on_committed()


class Journal:
    """The journal of one store: appends, snapshots, and what the folder waits on."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._appended = asyncio.Event()
        # Audiences whose journal rows a snapshot folded: the folder wakes them.
        self._folded_elsewhere: set[str] = set()
        self.committer = GroupCommitter(engine, self._appended.set)

    async def open(self) -> None:
        if await self.pending_rows():
            self._appended.set()  # changes accepted before a restart still need folding

    async def append(self, changes: Sequence[Change]) -> int:
        if not changes:
            return 0
        rows = [
            (c.audience_id, c.account.external_id, c.account.name, c.account.domain, c.member, c.ts)
            for c in changes
        ]
        return await self.committer.append(rows)

    async def pending_rows(self) -> int:
        rows = await self._engine.read("SELECT COUNT(*) FROM changes")
        return int(rows[0][0])

    async def wait_appended(self) -> None:
        """Until something was appended (or left to fold) since the last call."""
        await self._appended.wait()
        self._appended.clear()

    def take_folded_elsewhere(self) -> set[str]:
        """Audiences a snapshot folded since the last call: their actors need waking."""
        elsewhere, self._folded_elsewhere = self._folded_elsewhere, set()
        return elsewhere

    def note_folded(self, folded: set[str]) -> None:
        """A transaction outside the journal folded ``folded`` and may have appended."""
        self._folded_elsewhere |= folded
        self._appended.set()

    async def fold(self, max_rows: int = FOLD_CHUNK_ROWS) -> dict[str, int]:
        """Fold up to ``max_rows`` journal rows into desired state; {audience: rows}."""
        return await self._engine.transaction(lambda db: fold_chunk(db, max_rows))

    async def replace_members(
        self, audience_id: str, accounts: Sequence[Account], *, ts: float
    ) -> SnapshotResult:
        """Apply a full snapshot: its difference from desired state becomes changes.

        Every snapshot account is appended as a member (which also refreshes names and
        domains); every current member missing from it is appended as a removal. The
        journal is folded first, so that "current" includes changes not folded yet.
        """
        folded: set[str] = set()

        def work(db: sqlite3.Connection) -> SnapshotResult:
            while chunk := fold_chunk(db, FOLD_CHUNK_ROWS):
                folded.update(chunk)
            current = {
                row[0]: row
                for row in db.execute(
                    "SELECT external_id, name, domain FROM membership"
                    f" WHERE audience_key = {KEY} AND desired = 1",
                    (audience_id,),
                )
            }
            wanted = {a.external_id: a for a in accounts}
            removed = [row for key, row in current.items() if key not in wanted]
            rows = [
                (audience_id, a.external_id, a.name, a.domain, True, ts) for a in wanted.values()
            ]
            rows += [(audience_id, key, name, domain, False, ts) for key, name, domain in removed]
            insert_changes([(rows, None)], db)
            unchanged = sum(1 for key in wanted if key in current)
            return SnapshotResult(
                members=len(wanted),
                added=len(wanted) - unchanged,
                removed=len(removed),
                unchanged=unchanged,
            )

        result = await self._engine.transaction(work)
        # Changes of other audiences folded here never reach the folder's fold: it must
        # still wake their actors, or an idle one would not see them until its next change.
        self._folded_elsewhere |= folded
        self._appended.set()
        return result


def fold_all(db: sqlite3.Connection) -> set[str]:
    """Fold the whole journal in the caller's transaction; the audiences it touched."""
    folded: set[str] = set()
    while chunk := fold_chunk(db, FOLD_CHUNK_ROWS):
        folded.update(chunk)
    return folded


def fold_chunk(db: sqlite3.Connection, max_rows: int) -> dict[str, int]:
    """Fold the oldest ``max_rows`` journal rows into ``membership``; {audience: rows}.

    In this order, all in the caller's transaction: keep the last change per account
    of the chunk; from the rows as they were, count the queue's change and clear the
    rejections that a new state, name or domain makes worth another try; upsert;
    delete the chunk from the journal; count it in the ledger; move the checkpoint.

    Set-based statements, one pass each, and sorted: the chunk is gathered in a
    temporary table keyed like ``membership``, so that the join and the upsert walk
    its B-tree from left to right, touching each page once while it is in the
    writer's cache, instead of a random page per row (bench/store_upsert.py).
    """
    (first_seq,) = db.execute("SELECT MIN(seq) FROM changes").fetchone()
    if first_seq is None:
        return {}
    # seq only grows, and a fold deletes from the front: the chunk is a range of seq.
    last_seq, rows = db.execute(
        "SELECT MAX(seq), COUNT(*) FROM (SELECT seq FROM changes ORDER BY seq LIMIT ?)",
        (max_rows,),
    ).fetchone()
    # Pending = desired <> delivered, not in flight, not rejected. A new account is
    # pending once folded if it is a member (delivered 0, never in flight or set aside):
    # the chunk alone counts that (_gather), as if every account were new.
    chunk = _gather(db, first_seq, last_seq)
    if sum(row[2] for row in chunk) != rows:
        # Changes of an audience id the store meets for the first time (an audience
        # configured a moment ago, or none): it gets its key, and the chunk is gathered
        # again. Nothing is deleted from the journal that was not gathered.
        db.execute(
            "INSERT INTO audience_keys (audience_id) SELECT DISTINCT audience_id FROM changes"
            " WHERE seq BETWEEN ? AND ? ORDER BY 1 ON CONFLICT DO NOTHING",
            (first_seq, last_seq),
        )
        chunk = _gather(db, first_seq, last_seq)
        gathered = int(sum(row[2] for row in chunk))
        if gathered != rows:  # rolled back: the journal keeps every row
            raise StoreError(f"the fold gathered {gathered} of {rows} journal rows")
    # Accounts already known correct it, from their row as it is (before) and as it will
    # be (after: desired := member and, if the rejection is cleared, rejected := 0). An
    # inner join, the chunk first: an account not found costs a probe of the key index,
    # and none of the arithmetic (half of the statement when it was a LEFT JOIN).
    known = {
        row[0]: row[1:]
        for row in db.execute(
            "SELECT f.audience_key,"
            " TOTAL(m.desired <> m.delivered AND m.in_flight IS NULL AND m.rejected = 0"
            "       AND m.desired = 1),"
            " TOTAL(m.desired <> m.delivered AND m.in_flight IS NULL AND m.rejected = 0"
            "       AND m.desired = 0),"
            " TOTAL(f.member <> m.delivered AND m.in_flight IS NULL"
            "       AND (m.rejected = 0 OR m.desired <> f.member"
            "            OR m.name <> f.name OR m.domain <> f.domain) AND f.member = 1)"
            " - TOTAL(f.member = 1),"
            " TOTAL(f.member <> m.delivered AND m.in_flight IS NULL"
            "       AND (m.rejected = 0 OR m.desired <> f.member"
            "            OR m.name <> f.name OR m.domain <> f.domain) AND f.member = 0)"
            " FROM temp.fold_chunk f CROSS JOIN membership m USING (audience_key, external_id)"
            " GROUP BY f.audience_key"
        )
    }
    db.execute(
        "DELETE FROM rejected WHERE (audience_id, external_id) IN ("
        " SELECT k.audience_id, m.external_id FROM membership m INDEXED BY membership_rejected"
        " JOIN temp.fold_chunk f USING (audience_key, external_id)"
        " JOIN audience_keys k ON k.audience_key = m.audience_key WHERE m.rejected = 1"
        " AND (m.desired <> f.member OR m.name <> f.name OR m.domain <> f.domain))"
    )
    db.execute(UPSERT_CHUNK)
    db.execute("DELETE FROM changes WHERE seq BETWEEN ? AND ?", (first_seq, last_seq))
    folded: dict[str, int] = {}
    for audience_key, audience_id, received_total, max_seq, accounts, members in chunk:
        received = int(received_total)
        old_inserts, old_deletes, known_inserts, new_deletes = known.get(audience_key, (0, 0, 0, 0))
        new_inserts = members + known_inserts
        folded[audience_id] = received
        ledger.count(db, audience_id, received=received, superseded=received - accounts)
        queue.move(
            db,
            audience_id,
            inserts=int(new_inserts - old_inserts),
            deletes=int(new_deletes - old_deletes),
        )
        db.execute(
            "UPDATE audiences SET folded_seq = MAX(folded_seq, ?) WHERE audience_id = ?",
            (max_seq, audience_id),
        )
        queue.advance_checkpoint(db, audience_id)
    return folded


def _gather(db: sqlite3.Connection, first_seq: int, last_seq: int) -> list[Any]:
    """Gather the chunk (GATHER_CHUNK); per audience in it: key, id, changes, last seq,
    accounts, and accounts that are members now."""
    db.execute("DELETE FROM temp.fold_chunk")
    db.execute(GATHER_CHUNK, (first_seq, last_seq))
    return db.execute(
        "SELECT f.audience_key, k.audience_id, TOTAL(f.n), MAX(f.seq), COUNT(*),"
        " TOTAL(f.member = 1) FROM temp.fold_chunk f"
        " CROSS JOIN audience_keys k USING (audience_key) GROUP BY f.audience_key"
    ).fetchall()

"""The store: every durable fact dbsync keeps, in one SQLite file. The only module with SQL.

Tables, and the invariant each one keeps::

    changes      the ingest journal: one row per accepted change, ``seq`` = the global
                 change sequence number. Appending is the fast path (ARCHITECTURE
                 measured ~865k rows/s appends against ~100k rows/s upserts), so ingest
                 answers 202 once its rows are here; nothing accepted is ever lost.
    membership   per (audience, account): ``desired`` (the CDP's word, last change
                 wins), ``delivered`` (what Demandbase acknowledged; 0 also for never
                 sent), ``seq`` of the last folded change, ``changed_at`` (when desired
                 last changed: the flush age), ``in_flight`` (the open batch carrying it)
                 and ``rejected``. The *dirty set* is ``desired <> delivered``: that, not
                 the journal, is an actor's queue, so many changes to one account cost
                 one row (invariant 3). Partial indexes cover the queue (pending: dirty,
                 not in flight, not rejected; by ``changed_at``, to plan oldest first),
                 the unsettled rows (by ``seq``, for the checkpoint) and the rejected
                 ones, so each question costs an index probe, whatever the backlog.
    backlog_counts  pending accounts per audience and direction, moved by every
                 transaction that moves an account in or out of the queue (the fold
                 from its chunk joined to the rows as they were). Counting 681k
                 pending rows through an index took 1.9 s; triggers keeping the
                 counts cost a third of the fold's rate; a test recounts after each
                 of several hundred random operations.
    batches      one import job each, with its accounts in ``batch_items`` (and the
    batch_items  ``seq`` each had when planned) and the Demandbase job id once created,
                 so that a restart resumes or re-sends what was open.
    audiences    the configured audiences, the list each feeds (fixed at first
                 activation: the public API cannot rename a list), state, checkpoint.
    ledger       per-audience counters (received, superseded, exported, acknowledged...).
    rejected     accounts set aside with the reason Demandbase refused them.
    quota_usage  calls charged per destination, endpoint and daily window; pace the
    pace         learned request rate. Both survive restarts (invariant 5).

*Folding* moves journal rows into ``membership`` behind ingest, in chunks, keeping the
last change per account of each chunk, then deletes them, in one transaction. It
runs as set-based statements over a temporary table, at about the rate of a raw
keyed upsert (bench/store_upsert.py: 63k rows/s against 61k, 1M rows over 3M keys).
``seq`` is AUTOINCREMENT: it never restarts when a fold empties the journal.

``delivered`` is written in one place only, :meth:`Store.complete_batch`, when
Demandbase completed the job that carried the account (invariant 2); the batch, the
ledger and the checkpoint move in the same transaction. It is set to the batch's
action: that is what Demandbase now holds, even if the desired state moved while the
job ran; if it did, ``desired <> delivered`` again and the account is sent again.

Concurrency: one writer. Every write runs as one Python function inside a dedicated
thread that owns the write connection, so a transaction whose statements depend on
each other (fold, plan) costs one hop off the event loop rather than one await per
statement. Reads go through aiosqlite on a second connection (WAL lets them run
beside the writer). Durability: WAL with ``synchronous=NORMAL``: a committed
transaction survives a crash of the process (kill -9); after a power loss the last
commits may roll back, which re-sends, never skips, since ``delivered`` only moves
forward on an acknowledgment that would then be lost too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import msgspec

from dbsync.clock import Clock
from dbsync.errors import StoreError
from dbsync.model import (
    Account,
    AudienceState,
    Backlog,
    Batch,
    BatchState,
    Change,
    LedgerCounts,
    ListAction,
)

__all__ = [
    "AudienceRecord",
    "AudienceSpec",
    "RejectedAccount",
    "SnapshotResult",
    "Store",
    "SyncResult",
]

T = TypeVar("T")

FOLD_CHUNK_ROWS = 50_000
_QUOTA_WINDOWS_KEPT = 8

_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE audiences (
        audience_id    TEXT PRIMARY KEY,
        destination    TEXT NOT NULL,
        name           TEXT NOT NULL,
        list_name      TEXT NOT NULL,
        list_id        INTEGER,
        state          TEXT NOT NULL,
        state_reason   TEXT NOT NULL DEFAULT '',
        checkpoint_seq INTEGER NOT NULL DEFAULT 0,
        folded_seq     INTEGER NOT NULL DEFAULT 0,
        updated_at     REAL NOT NULL
    );
    CREATE TABLE changes (
        seq         INTEGER PRIMARY KEY,
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        member      INTEGER NOT NULL,
        ts          REAL NOT NULL
    );
    CREATE TABLE membership (
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        desired     INTEGER NOT NULL,
        seq         INTEGER NOT NULL,
        changed_at  REAL NOT NULL,
        delivered   INTEGER NOT NULL DEFAULT 0,
        in_flight   INTEGER,
        rejected    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (audience_id, external_id)
    ) WITHOUT ROWID;
    CREATE INDEX membership_dirty
        ON membership (audience_id, desired, changed_at, in_flight, rejected, seq)
        WHERE desired <> delivered;
    CREATE INDEX membership_in_flight ON membership (in_flight) WHERE in_flight IS NOT NULL;
    CREATE TABLE batches (
        batch_id    INTEGER PRIMARY KEY,
        audience_id TEXT NOT NULL,
        action      TEXT NOT NULL,
        state       TEXT NOT NULL,
        job_id      INTEGER,
        rows        INTEGER NOT NULL,
        reason      TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL,
        uploaded_at REAL,
        updated_at  REAL NOT NULL
    );
    CREATE INDEX batches_open ON batches (audience_id, batch_id)
        WHERE state IN ('planned', 'created', 'uploaded');
    CREATE TABLE batch_items (
        batch_id    INTEGER NOT NULL,
        external_id TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        PRIMARY KEY (batch_id, external_id)
    ) WITHOUT ROWID;
    CREATE TABLE ledger (
        audience_id TEXT NOT NULL,
        counter     TEXT NOT NULL,
        value       INTEGER NOT NULL,
        PRIMARY KEY (audience_id, counter)
    ) WITHOUT ROWID;
    CREATE TABLE rejected (
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        member      INTEGER NOT NULL,
        reason      TEXT NOT NULL,
        rejected_at REAL NOT NULL,
        attempts    INTEGER NOT NULL,
        PRIMARY KEY (audience_id, external_id)
    ) WITHOUT ROWID;
    CREATE TABLE quota_usage (
        destination TEXT NOT NULL,
        endpoint    TEXT NOT NULL,
        day_window  INTEGER NOT NULL,
        used        INTEGER NOT NULL,
        PRIMARY KEY (destination, day_window, endpoint)
    ) WITHOUT ROWID;
    CREATE TABLE pace (
        destination         TEXT PRIMARY KEY,
        requests_per_minute REAL NOT NULL,
        updated_at          REAL NOT NULL
    );
    """,
    # 2: the dirty set answers in O(log n). Version 1 counted and searched it through
    # one wide index: a backlog over 681k pending accounts took 1.9 s and every
    # checkpoint scanned it whole. Now the queue, the checkpoint and the rejected
    # accounts have an index each, the queue's size is a counter, and the journal's
    # seq can no longer restart at 1 when a fold empties it.
    """
    DROP INDEX membership_dirty;
    CREATE INDEX membership_queue ON membership (audience_id, desired, changed_at)
        WHERE desired <> delivered AND in_flight IS NULL AND rejected = 0;
    CREATE INDEX membership_unsettled ON membership (audience_id, seq)
        WHERE desired <> delivered;
    CREATE INDEX membership_rejected ON membership (audience_id, rejected)
        WHERE rejected = 1;
    CREATE TABLE backlog_counts (
        audience_id TEXT NOT NULL,
        desired     INTEGER NOT NULL,
        n           INTEGER NOT NULL,
        PRIMARY KEY (audience_id, desired)
    ) WITHOUT ROWID;
    INSERT INTO backlog_counts (audience_id, desired, n)
        SELECT audience_id, desired, COUNT(*) FROM membership
        WHERE desired <> delivered AND in_flight IS NULL AND rejected = 0
        GROUP BY audience_id, desired;
    CREATE TABLE changes_v2 (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        audience_id TEXT NOT NULL,
        external_id TEXT NOT NULL,
        name        TEXT NOT NULL,
        domain      TEXT NOT NULL,
        member      INTEGER NOT NULL,
        ts          REAL NOT NULL
    );
    INSERT INTO changes_v2 SELECT seq, audience_id, external_id, name, domain, member, ts
        FROM changes ORDER BY seq;
    DROP TABLE changes;
    ALTER TABLE changes_v2 RENAME TO changes;
    DELETE FROM sqlite_sequence WHERE name IN ('changes', 'changes_v2');
    INSERT INTO sqlite_sequence (name, seq) SELECT 'changes', MAX(
        COALESCE((SELECT MAX(seq) FROM changes), 0),
        COALESCE((SELECT MAX(seq) FROM membership), 0),
        COALESCE((SELECT MAX(folded_seq) FROM audiences), 0),
        COALESCE((SELECT MAX(seq) FROM batch_items), 0))
    """,
)

# Where fold gathers a chunk, the last change per account (writer connection only).
_FOLD_CHUNK_TABLE = (
    "CREATE TEMP TABLE fold_chunk ("
    " audience_id TEXT NOT NULL, external_id TEXT NOT NULL, name TEXT NOT NULL,"
    " domain TEXT NOT NULL, member INTEGER NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL,"
    " PRIMARY KEY (audience_id, external_id)) WITHOUT ROWID"
)


class AudienceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A configured audience, as :meth:`Store.sync_audiences` takes it."""

    audience_id: str
    destination: str
    name: str
    list_name: str
    list_id: int | None = None


class AudienceRecord(msgspec.Struct, frozen=True, kw_only=True):
    audience_id: str
    destination: str
    name: str
    list_name: str
    list_id: int | None
    state: AudienceState
    state_reason: str
    checkpoint_seq: int
    updated_at: float


class SyncResult(msgspec.Struct, frozen=True, kw_only=True):
    added: list[str]
    renamed: list[tuple[str, str, str]]  # (audience id, old name, new name)
    deactivated: list[str]
    reactivated: list[str]


class SnapshotResult(msgspec.Struct, frozen=True, kw_only=True):
    members: int
    added: int
    removed: int
    unchanged: int


class RejectedAccount(msgspec.Struct, frozen=True, kw_only=True):
    audience_id: str
    account: Account
    member: bool
    reason: str
    rejected_at: float
    attempts: int


# Literal in the SQL (not bound) so that SQLite can use the partial index on them.
_OPEN_STATES_SQL = "(" + ", ".join(f"'{s.value}'" for s in BatchState if s.is_open) + ")"


class Store:
    """The SQLite store. Open with ``async with Store.open(path, clock=clock) as store``."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._clock = clock
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbsync-store")
        self._write_db: sqlite3.Connection | None = None
        self._read_db: aiosqlite.Connection | None = None
        self._appended = asyncio.Event()
        # Audiences whose journal rows a snapshot folded: the folder wakes them.
        self._folded_elsewhere: set[str] = set()
        self._commit_queue: list[tuple[list[tuple[Any, ...]], asyncio.Future[int]]] = []
        self._committer: asyncio.Task[None] | None = None
        self.transactions = 0  # write transactions committed, for tests and stats

    # --- opening and closing ---------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, *, clock: Clock) -> AsyncIterator[Store]:
        store = cls(path, clock)
        await store._open()
        try:
            yield store
        finally:
            await store._close()

    async def _open(self) -> None:
        try:
            await asyncio.to_thread(self.path.parent.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path.parent}: {exc.strerror}") from exc
        await self._write(self._connect_writer)
        try:
            self._read_db = await aiosqlite.connect(self.path, timeout=30.0)
            await self._read_db.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        if await self.pending_journal_rows():
            self._appended.set()  # changes accepted before a restart still need folding

    def _connect_writer(self) -> None:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_MIGRATIONS):
            db.close()
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this dbsync "
                f"knows ({len(_MIGRATIONS)}); run a newer dbsync"
            )
        for target, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        db.execute("PRAGMA temp_store = MEMORY")
        db.execute(_FOLD_CHUNK_TABLE)
        self._write_db = db

    async def _close(self) -> None:
        if self._committer is not None:
            await asyncio.gather(self._committer, return_exceptions=True)
        if self._read_db is not None:
            await self._read_db.close()
            self._read_db = None

        def close_writer() -> None:
            if self._write_db is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._write_db.execute("PRAGMA optimize")
                    self._write_db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._write_db.close()
                self._write_db = None

        try:
            await self._write(close_writer)
        finally:
            self._writer.shutdown(wait=True)

    # --- the two doors: writes in the writer thread, reads on aiosqlite --------------------

    async def _write(self, work: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            # The writer thread finishes a transaction even if this caller is cancelled:
            # the transaction is atomic either way.
            return await loop.run_in_executor(self._writer, functools.partial(work, *args))
        except sqlite3.Error as exc:
            raise StoreError(f"{getattr(work, '__name__', 'write')}: {exc}") from exc

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one IMMEDIATE transaction on the writer thread's connection."""
        db = self._write_db
        assert db is not None, "the store is closed"
        assert threading.current_thread().name.startswith("dbsync-store")
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self.transactions += 1
        return result

    async def _in_transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await self._write(self._transaction, work)

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        db = self._read_db
        assert db is not None, "the store is closed"
        try:
            # One hop to the connection's thread: the statement runs to its end before
            # another read starts. Executing and fetching in two hops would let other
            # reads run while it is open, and they would all share its old snapshot.
            return list(await db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc

    def _now(self) -> float:
        return self._clock.time()

    # --- audiences ---------------------------------------------------------------------

    async def sync_audiences(self, audiences: Sequence[AudienceSpec]) -> SyncResult:
        """Make the stored audiences match the configuration; nothing is ever deleted."""
        now = self._now()

        def work(db: sqlite3.Connection) -> SyncResult:
            known = {
                row[0]: row for row in db.execute("SELECT audience_id, name, state FROM audiences")
            }
            added, renamed, reactivated = [], [], []
            for spec in audiences:
                row = known.get(spec.audience_id)
                if row is None:
                    db.execute(
                        "INSERT INTO audiences (audience_id, destination, name, list_name,"
                        " list_id, state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            spec.audience_id,
                            spec.destination,
                            spec.name,
                            spec.list_name,
                            spec.list_id,
                            AudienceState.ACTIVE,
                            now,
                        ),
                    )
                    added.append(spec.audience_id)
                    continue
                _, old_name, state = row
                if old_name != spec.name:
                    renamed.append((spec.audience_id, old_name, spec.name))
                if state == AudienceState.DEACTIVATED:
                    reactivated.append(spec.audience_id)
                    state = AudienceState.ACTIVE
                db.execute(
                    "UPDATE audiences SET destination = ?, name = ?, state = ?,"
                    " list_id = COALESCE(list_id, ?), updated_at = ? WHERE audience_id = ?",
                    (spec.destination, spec.name, state, spec.list_id, now, spec.audience_id),
                )
            wanted = {spec.audience_id for spec in audiences}
            deactivated = [
                audience_id
                for audience_id, row in known.items()
                if audience_id not in wanted and row[2] != AudienceState.DEACTIVATED
            ]
            db.executemany(
                "UPDATE audiences SET state = ?, updated_at = ? WHERE audience_id = ?",
                [(AudienceState.DEACTIVATED, now, a) for a in deactivated],
            )
            return SyncResult(
                added=added, renamed=renamed, deactivated=deactivated, reactivated=reactivated
            )

        return await self._in_transaction(work)

    async def audiences(self) -> dict[str, AudienceRecord]:
        rows = await self._read(
            "SELECT audience_id, destination, name, list_name, list_id, state, state_reason,"
            " checkpoint_seq, updated_at FROM audiences ORDER BY audience_id"
        )
        return {
            row[0]: AudienceRecord(
                audience_id=row[0],
                destination=row[1],
                name=row[2],
                list_name=row[3],
                list_id=row[4],
                state=AudienceState(row[5]),
                state_reason=row[6],
                checkpoint_seq=row[7],
                updated_at=row[8],
            )
            for row in rows
        }

    async def set_audience_state(
        self, audience_id: str, state: AudienceState, reason: str = ""
    ) -> None:
        now = self._now()
        await self._in_transaction(
            lambda db: db.execute(
                "UPDATE audiences SET state = ?, state_reason = ?, updated_at = ?"
                " WHERE audience_id = ?",
                (state, reason, now, audience_id),
            )
        )

    async def set_list_id(self, audience_id: str, list_id: int) -> None:
        await self._in_transaction(
            lambda db: db.execute(
                "UPDATE audiences SET list_id = ? WHERE audience_id = ?", (list_id, audience_id)
            )
        )

    # --- ingest: the journal and its group commit -----------------------------------------

    async def append_changes(self, changes: Sequence[Change]) -> int:
        """Append ``changes`` to the journal; durable when this returns.

        Callers that arrive while a commit runs are written together by the next one
        (group commit). A failed transaction fails every caller in it, and writes none.
        """
        if not changes:
            return 0
        rows = [
            (c.audience_id, c.account.external_id, c.account.name, c.account.domain, c.member, c.ts)
            for c in changes
        ]
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._commit_queue.append((rows, future))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(
                self._commit_loop(), name="store:group-commit"
            )
        # Shielded: a caller that goes away (client disconnect) must not leave the
        # group's result unread; the commit itself happens regardless.
        return await asyncio.shield(future)

    async def _commit_loop(self) -> None:
        while self._commit_queue:
            group, self._commit_queue = self._commit_queue, []
            try:
                await self._in_transaction(functools.partial(_insert_changes, group))
            except Exception as exc:
                error = exc if isinstance(exc, StoreError) else StoreError(str(exc))
                for _, future in group:
                    if not future.done():
                        future.set_exception(error)
                continue
            for rows, future in group:
                if not future.done():
                    future.set_result(len(rows))
            self._appended.set()

    async def pending_journal_rows(self) -> int:
        rows = await self._read("SELECT COUNT(*) FROM changes")
        return int(rows[0][0])

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
            while chunk := _fold_chunk(db, FOLD_CHUNK_ROWS):
                folded.update(chunk)
            current = {
                row[0]: row
                for row in db.execute(
                    "SELECT external_id, name, domain FROM membership"
                    " WHERE audience_id = ? AND desired = 1",
                    (audience_id,),
                )
            }
            wanted = {a.external_id: a for a in accounts}
            removed = [row for key, row in current.items() if key not in wanted]
            rows = [
                (audience_id, a.external_id, a.name, a.domain, True, ts) for a in wanted.values()
            ]
            rows += [(audience_id, key, name, domain, False, ts) for key, name, domain in removed]
            _insert_changes([(rows, None)], db)
            unchanged = sum(1 for key in wanted if key in current)
            return SnapshotResult(
                members=len(wanted),
                added=len(wanted) - unchanged,
                removed=len(removed),
                unchanged=unchanged,
            )

        result = await self._in_transaction(work)
        # Changes of other audiences folded here never reach the folder's fold: it must
        # still wake their actors, or an idle one would not see them until its next change.
        self._folded_elsewhere |= folded
        self._appended.set()
        return result

    async def fold_pending(self, *, max_rows: int = FOLD_CHUNK_ROWS) -> dict[str, int]:
        """Fold up to ``max_rows`` journal rows into desired state; {audience: rows}."""
        return await self._in_transaction(lambda db: _fold_chunk(db, max_rows))

    async def run_folder(self, on_folded: Callable[[set[str]], None]) -> None:
        """Fold whatever ingest appends, forever, waking the audiences it touched."""
        while True:
            await self._appended.wait()
            self._appended.clear()
            while folded := await self.fold_pending():
                on_folded(set(folded))
            if self._folded_elsewhere:
                elsewhere, self._folded_elsewhere = self._folded_elsewhere, set()
                on_folded(elsewhere)

    # --- delivery ------------------------------------------------------------------------

    async def backlog(self, audience_id: str) -> Backlog:
        """The audience's queue. Each part is a counter or an index probe, so this costs
        the same for ten pending accounts as for a million; one statement, one snapshot."""
        rows = await self._read(
            "SELECT"
            " (SELECT TOTAL(n) FROM backlog_counts WHERE audience_id = ?1 AND desired = 1),"
            " (SELECT TOTAL(n) FROM backlog_counts WHERE audience_id = ?1 AND desired = 0),"
            " (SELECT MIN(changed_at) FROM membership INDEXED BY membership_queue"
            "  WHERE audience_id = ?1 AND desired = 1"
            "  AND desired <> delivered AND in_flight IS NULL AND rejected = 0),"
            " (SELECT MIN(changed_at) FROM membership INDEXED BY membership_queue"
            "  WHERE audience_id = ?1 AND desired = 0"
            "  AND desired <> delivered AND in_flight IS NULL AND rejected = 0),"
            " (SELECT TOTAL(rows) FROM batches INDEXED BY batches_open"
            f"  WHERE audience_id = ?1 AND state IN {_OPEN_STATES_SQL}),"
            " (SELECT COUNT(*) FROM membership INDEXED BY membership_rejected"
            "  WHERE audience_id = ?1 AND rejected = 1)",
            (audience_id,),
        )
        inserts, deletes, oldest_insert, oldest_delete, in_flight, rejected = rows[0]
        oldest = [t for t in (oldest_insert, oldest_delete) if t is not None]
        return Backlog(
            inserts=int(inserts),
            deletes=int(deletes),
            oldest_changed_at=min(oldest) if oldest else None,
            in_flight=int(in_flight),
            rejected=int(rejected),
        )

    async def plan_batch(self, audience_id: str, action: ListAction, max_rows: int) -> Batch | None:
        """The oldest pending accounts of ``action``, now in flight in a new batch."""
        now = self._now()

        def work(db: sqlite3.Connection) -> Batch | None:
            picked = db.execute(
                "SELECT external_id, name, domain, seq FROM membership INDEXED BY membership_queue"
                " WHERE audience_id = ? AND desired <> delivered AND desired = ?"
                " AND in_flight IS NULL AND rejected = 0 ORDER BY changed_at LIMIT ?",
                (audience_id, action is ListAction.INSERT, max_rows),
            ).fetchall()
            if not picked:
                return None
            if action is ListAction.INSERT:
                _queue(db, audience_id, inserts=-len(picked))
            else:
                _queue(db, audience_id, deletes=-len(picked))
            return _open_batch(db, audience_id, action, picked, now)

        return await self._in_transaction(work)

    async def open_batches(self, audience_id: str) -> list[Batch]:
        batches = await self._read(
            "SELECT batch_id, action, state, job_id, created_at, uploaded_at FROM batches"
            " INDEXED BY batches_open WHERE audience_id = ?"
            f" AND state IN {_OPEN_STATES_SQL} ORDER BY batch_id",
            (audience_id,),
        )
        result = []
        for batch_id, action, state, job_id, created_at, uploaded_at in batches:
            accounts = await self._read(
                "SELECT m.external_id, m.name, m.domain FROM batch_items i JOIN membership m"
                " ON m.audience_id = ? AND m.external_id = i.external_id"
                " WHERE i.batch_id = ? ORDER BY i.external_id",
                (audience_id, batch_id),
            )
            result.append(
                Batch(
                    batch_id=batch_id,
                    audience_id=audience_id,
                    action=ListAction(action),
                    state=BatchState(state),
                    accounts=tuple(
                        Account(external_id=k, name=n, domain=d) for k, n, d in accounts
                    ),
                    job_id=job_id,
                    created_at=created_at,
                    uploaded_at=uploaded_at,
                )
            )
        return result

    async def mark_created(self, batch_id: int, job_id: int) -> None:
        now = self._now()
        await self._in_transaction(
            lambda db: db.execute(
                "UPDATE batches SET state = ?, job_id = ?, updated_at = ? WHERE batch_id = ?",
                (BatchState.CREATED, job_id, now, batch_id),
            )
        )

    async def mark_uploaded(self, batch_id: int) -> None:
        now = self._now()

        def work(db: sqlite3.Connection) -> None:
            audience_id, rows, state = _batch(db, batch_id)
            if state == BatchState.UPLOADED:
                return
            db.execute(
                "UPDATE batches SET state = ?, uploaded_at = ?, updated_at = ? WHERE batch_id = ?",
                (BatchState.UPLOADED, now, now, batch_id),
            )
            _count(db, audience_id, exported=rows)

        await self._in_transaction(work)

    async def complete_batch(self, batch_id: int, *, list_id: int | None) -> int:
        """Demandbase completed the job: its accounts are delivered. One transaction."""
        now = self._now()

        def work(db: sqlite3.Connection) -> int:
            audience_id, rows, state = _batch(db, batch_id)
            if not BatchState(state).is_open:
                return 0
            (action,) = db.execute(
                "SELECT action FROM batches WHERE batch_id = ?", (batch_id,)
            ).fetchone()
            delivered = action == ListAction.INSERT
            # Accounts whose desired state moved while the job ran go back to the queue.
            _requeue_in_flight(db, audience_id, batch_id, f"desired <> {int(delivered)}")
            # Checkpoint only here, after the acknowledgment: a crash before this line
            # leaves the accounts in flight, and they are sent again.
            db.execute(
                "UPDATE membership SET delivered = ?, in_flight = NULL"
                " WHERE in_flight = ? AND audience_id = ?",
                (delivered, batch_id, audience_id),
            )
            db.execute(
                "UPDATE batches SET state = ?, updated_at = ? WHERE batch_id = ?",
                (BatchState.COMPLETED, now, batch_id),
            )
            _count(db, audience_id, acknowledged=rows)
            if list_id is not None:
                db.execute(
                    "UPDATE audiences SET list_id = COALESCE(list_id, ?) WHERE audience_id = ?",
                    (list_id, audience_id),
                )
            _advance_checkpoint(db, audience_id)
            return rows

        return await self._in_transaction(work)

    async def fail_batch(self, batch_id: int, reason: str) -> None:
        """Demandbase failed the job: its accounts are pending again."""
        await self._in_transaction(
            lambda db: _release(db, batch_id, BatchState.FAILED, reason, self._now(), "failed")
        )

    async def abandon_batch(self, batch_id: int, reason: str) -> None:
        """Given up before an upload succeeded: its accounts are pending again."""
        await self._in_transaction(
            lambda db: _release(db, batch_id, BatchState.ABANDONED, reason, self._now(), None)
        )

    async def split_batch(self, batch_id: int) -> tuple[Batch, Batch]:
        """Bisection after a 400: two new batches with the halves, still in flight."""
        now = self._now()

        def work(db: sqlite3.Connection) -> tuple[Batch, Batch]:
            audience_id, rows, _ = _batch(db, batch_id)
            if rows < 2:
                raise StoreError(f"batch {batch_id} has {rows} account(s): nothing to split")
            (action,) = db.execute(
                "SELECT action FROM batches WHERE batch_id = ?", (batch_id,)
            ).fetchone()
            items = db.execute(
                "SELECT i.external_id, m.name, m.domain, i.seq FROM batch_items i"
                " JOIN membership m ON m.audience_id = ? AND m.external_id = i.external_id"
                " WHERE i.batch_id = ? ORDER BY i.external_id",
                (audience_id, batch_id),
            ).fetchall()
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

        return await self._in_transaction(work)

    async def reject_batch(self, batch_id: int, reason: str) -> None:
        """Demandbase refuses these accounts: set them aside with the reason."""
        now = self._now()

        def work(db: sqlite3.Connection) -> None:
            audience_id, rows, _ = _batch(db, batch_id)
            db.execute(
                "INSERT INTO rejected (audience_id, external_id, name, domain, member, reason,"
                " rejected_at, attempts)"
                " SELECT m.audience_id, m.external_id, m.name, m.domain, m.desired, ?, ?, 1"
                " FROM membership m WHERE m.in_flight = ? AND m.audience_id = ?"
                " ON CONFLICT DO UPDATE SET reason = excluded.reason,"
                " rejected_at = excluded.rejected_at, name = excluded.name,"
                " domain = excluded.domain, member = excluded.member, attempts = attempts + 1",
                (reason, now, batch_id, audience_id),
            )
            db.execute(
                "UPDATE membership SET rejected = 1, in_flight = NULL"
                " WHERE in_flight = ? AND audience_id = ?",
                (batch_id, audience_id),
            )
            db.execute(
                "UPDATE batches SET state = ?, reason = ?, updated_at = ? WHERE batch_id = ?",
                (BatchState.ABANDONED, reason, now, batch_id),
            )
            _count(db, audience_id, rejected=rows)

        await self._in_transaction(work)

    async def rejected(self, audience_id: str | None = None) -> list[RejectedAccount]:
        where, params = ("WHERE audience_id = ?", (audience_id,)) if audience_id else ("", ())
        rows = await self._read(
            "SELECT audience_id, external_id, name, domain, member, reason, rejected_at, attempts"
            f" FROM rejected {where} ORDER BY audience_id, external_id",
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
            )
            for row in rows
        ]

    async def requeue(self, audience_id: str) -> int:
        """Rejected accounts go back to the pending set; returns how many."""

        def work(db: sqlite3.Connection) -> int:
            pending = dict(
                db.execute(
                    "SELECT desired, COUNT(*) FROM membership INDEXED BY membership_rejected"
                    " WHERE audience_id = ? AND rejected = 1 AND desired <> delivered"
                    " AND in_flight IS NULL GROUP BY desired",
                    (audience_id,),
                ).fetchall()
            )
            _queue(db, audience_id, inserts=pending.get(1, 0), deletes=pending.get(0, 0))
            count = db.execute(
                "UPDATE membership SET rejected = 0 WHERE audience_id = ? AND rejected = 1",
                (audience_id,),
            ).rowcount
            db.execute("DELETE FROM rejected WHERE audience_id = ?", (audience_id,))
            _count(db, audience_id, requeued=count)
            return count

        return await self._in_transaction(work)

    async def resync(self, audience_id: str) -> int:
        """Every desired member not in flight is sent again; returns how many.

        Rejected members stay with the operator (``requeue``); members already
        pending are not counted.
        """

        def work(db: sqlite3.Connection) -> int:
            count = db.execute(
                "UPDATE membership SET delivered = 0 WHERE audience_id = ?"
                " AND desired = 1 AND delivered = 1 AND in_flight IS NULL AND rejected = 0",
                (audience_id,),
            ).rowcount
            _queue(db, audience_id, inserts=count)
            return count

        return await self._in_transaction(work)

    async def desired_members(self, audience_id: str) -> set[str]:
        rows = await self._read(
            "SELECT external_id FROM membership WHERE audience_id = ? AND desired = 1",
            (audience_id,),
        )
        return {row[0] for row in rows}

    async def mark_undelivered(
        self, audience_id: str, external_ids: Iterable[str], *, member: bool
    ) -> int:
        """A read-back found these accounts wrong: they are sent again; returns how many."""
        keys = list(external_ids)

        def work(db: sqlite3.Connection) -> int:
            changed = 0
            for key in keys:
                changed += db.execute(
                    "UPDATE membership SET delivered = ? WHERE audience_id = ? AND external_id = ?"
                    " AND desired = ? AND delivered = desired AND in_flight IS NULL"
                    " AND rejected = 0",
                    (not member, audience_id, key, member),
                ).rowcount
            if member:
                _queue(db, audience_id, inserts=changed)
            else:
                _queue(db, audience_id, deletes=changed)
            _count(db, audience_id, repaired=changed)
            return changed

        return await self._in_transaction(work)

    async def ledger(self, audience_id: str) -> LedgerCounts:
        rows = await self._read(
            "SELECT counter, value FROM ledger WHERE audience_id = ?", (audience_id,)
        )
        fields = set(LedgerCounts.__struct_fields__)
        return LedgerCounts(**{counter: value for counter, value in rows if counter in fields})

    async def ledger_imbalance(self, audience_id: str) -> int:
        """exported - (acknowledged + failed + rows of jobs still processing); 0 balances.

        One statement, so one snapshot: a batch moving between states cannot make a
        balanced ledger look unbalanced.
        """
        rows = await self._read(
            "SELECT"
            " (SELECT TOTAL(value) FROM ledger WHERE audience_id = ?1 AND counter = 'exported')"
            " - (SELECT TOTAL(value) FROM ledger WHERE audience_id = ?1"
            "    AND counter IN ('acknowledged', 'failed'))"
            " - (SELECT TOTAL(rows) FROM batches WHERE audience_id = ?1 AND state = 'uploaded')",
            (audience_id,),
        )
        return int(rows[0][0])

    async def add_to_ledger(self, audience_id: str, **deltas: int) -> None:
        await self._in_transaction(lambda db: _count(db, audience_id, **deltas))

    async def checkpoint(self, audience_id: str) -> int:
        """Every change of the audience up to this sequence number is delivered."""
        rows = await self._read(
            "SELECT checkpoint_seq FROM audiences WHERE audience_id = ?", (audience_id,)
        )
        return int(rows[0][0]) if rows else 0

    # --- destination budget ----------------------------------------------------------------

    async def quota_usage(self, destination: str, window: int) -> dict[str, int]:
        rows = await self._read(
            "SELECT endpoint, used FROM quota_usage WHERE destination = ? AND day_window = ?",
            (destination, window),
        )
        return {str(endpoint): int(used) for endpoint, used in rows}

    async def spend_quota(
        self, destination: str, endpoint: str, window: int, count: int = 1
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

        await self._in_transaction(work)

    async def load_pace(self, destination: str) -> float | None:
        rows = await self._read(
            "SELECT requests_per_minute FROM pace WHERE destination = ?", (destination,)
        )
        return float(rows[0][0]) if rows else None

    async def save_pace(self, destination: str, requests_per_minute: float) -> None:
        now = self._now()
        await self._in_transaction(
            lambda db: db.execute(
                "INSERT INTO pace (destination, requests_per_minute, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET requests_per_minute = excluded.requests_per_minute,"
                " updated_at = excluded.updated_at",
                (destination, requests_per_minute, now),
            )
        )


# --- statements used inside writer transactions ----------------------------------------------


def _open_batch(
    db: sqlite3.Connection,
    audience_id: str,
    action: ListAction,
    accounts: Sequence[tuple[str, str, str, int]],
    now: float,
) -> Batch:
    """A new planned batch of ``accounts`` (external id, name, domain, seq), in flight."""
    batch_id = db.execute(
        "INSERT INTO batches (audience_id, action, state, rows, created_at, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (audience_id, action, BatchState.PLANNED, len(accounts), now, now),
    ).lastrowid
    assert batch_id is not None
    db.executemany(
        "INSERT INTO batch_items (batch_id, external_id, seq) VALUES (?, ?, ?)",
        [(batch_id, key, seq) for key, _, _, seq in accounts],
    )
    db.executemany(
        "UPDATE membership SET in_flight = ? WHERE audience_id = ? AND external_id = ?",
        [(batch_id, audience_id, key) for key, _, _, _ in accounts],
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


def _insert_changes(
    group: Sequence[tuple[list[tuple[Any, ...]], object]], db: sqlite3.Connection
) -> None:
    insert = (
        "INSERT INTO changes (audience_id, external_id, name, domain, member, ts)"
        " VALUES (?, ?, ?, ?, ?, ?)"
    )
    for rows, _ in group:
        db.executemany(insert, rows)


def _fold_chunk(db: sqlite3.Connection, max_rows: int) -> dict[str, int]:
    """Fold the oldest ``max_rows`` journal rows into ``membership``; {audience: rows}.

    In this order, all in the caller's transaction: keep the last change per account
    of the chunk; from the rows as they were, count the queue's change and clear the
    rejections that a new state, name or domain makes worth another try; upsert;
    delete the chunk from the journal; count it in the ledger; move the checkpoint.
    Set-based statements over a temporary table: one pass per step, not per row.
    """
    (last_seq,) = db.execute(
        "SELECT MAX(seq) FROM (SELECT seq FROM changes ORDER BY seq LIMIT ?)", (max_rows,)
    ).fetchone()
    if last_seq is None:
        return {}
    received = {
        audience_id: (count, max_seq)
        for audience_id, count, max_seq in db.execute(
            "SELECT audience_id, COUNT(*), MAX(seq) FROM changes WHERE seq <= ?"
            " GROUP BY audience_id",
            (last_seq,),
        )
    }
    db.execute("DELETE FROM temp.fold_chunk")
    # In seq order, so that a later change to the same account overwrites an earlier one.
    db.execute(
        "INSERT INTO temp.fold_chunk (audience_id, external_id, name, domain, member, seq, ts)"
        " SELECT audience_id, external_id, name, domain, member, seq, ts FROM changes"
        " WHERE seq <= ? ORDER BY seq"
        " ON CONFLICT DO UPDATE SET name = excluded.name, domain = excluded.domain,"
        " member = excluded.member, seq = excluded.seq, ts = excluded.ts",
        (last_seq,),
    )
    # Pending = desired <> delivered, not in flight, not rejected. Before: the row as it
    # is; after: desired := member and, if the rejection is cleared, rejected := 0.
    deltas = db.execute(
        "SELECT f.audience_id, COUNT(*),"
        " TOTAL(m.desired <> m.delivered AND m.in_flight IS NULL AND m.rejected = 0"
        "       AND m.desired = 1),"
        " TOTAL(m.desired <> m.delivered AND m.in_flight IS NULL AND m.rejected = 0"
        "       AND m.desired = 0),"
        " TOTAL(f.member <> COALESCE(m.delivered, 0) AND m.in_flight IS NULL"
        "       AND (COALESCE(m.rejected, 0) = 0 OR m.desired <> f.member"
        "            OR m.name <> f.name OR m.domain <> f.domain) AND f.member = 1),"
        " TOTAL(f.member <> COALESCE(m.delivered, 0) AND m.in_flight IS NULL"
        "       AND (COALESCE(m.rejected, 0) = 0 OR m.desired <> f.member"
        "            OR m.name <> f.name OR m.domain <> f.domain) AND f.member = 0)"
        " FROM temp.fold_chunk f LEFT JOIN membership m USING (audience_id, external_id)"
        " GROUP BY f.audience_id"
    ).fetchall()
    db.execute(
        "DELETE FROM rejected WHERE (audience_id, external_id) IN ("
        " SELECT m.audience_id, m.external_id FROM membership m INDEXED BY membership_rejected"
        " JOIN temp.fold_chunk f USING (audience_id, external_id) WHERE m.rejected = 1"
        " AND (m.desired <> f.member OR m.name <> f.name OR m.domain <> f.domain))"
    )
    db.execute(
        "INSERT INTO membership (audience_id, external_id, name, domain, desired, seq, changed_at)"
        " SELECT audience_id, external_id, name, domain, member, seq, ts FROM temp.fold_chunk"
        " WHERE true"
        " ON CONFLICT DO UPDATE SET"
        " rejected = CASE WHEN desired <> excluded.desired OR name <> excluded.name"
        "   OR domain <> excluded.domain THEN 0 ELSE rejected END,"
        " changed_at = CASE WHEN desired <> excluded.desired"
        "   THEN excluded.changed_at ELSE changed_at END,"
        " name = excluded.name, domain = excluded.domain,"
        " desired = excluded.desired, seq = excluded.seq"
    )
    db.execute("DELETE FROM changes WHERE seq <= ?", (last_seq,))
    for audience_id, accounts, old_inserts, old_deletes, new_inserts, new_deletes in deltas:
        count, max_seq = received[audience_id]
        _count(db, audience_id, received=count, superseded=count - accounts)
        _queue(
            db,
            audience_id,
            inserts=int(new_inserts - old_inserts),
            deletes=int(new_deletes - old_deletes),
        )
        db.execute(
            "UPDATE audiences SET folded_seq = MAX(folded_seq, ?) WHERE audience_id = ?",
            (max_seq, audience_id),
        )
        _advance_checkpoint(db, audience_id)
    return {audience_id: count for audience_id, (count, _) in received.items()}


def _queue(db: sqlite3.Connection, audience_id: str, *, inserts: int = 0, deletes: int = 0) -> None:
    """Move the audience's pending counts; every change to the pending set calls this."""
    db.executemany(
        "INSERT INTO backlog_counts (audience_id, desired, n) VALUES (?, ?, ?)"
        " ON CONFLICT DO UPDATE SET n = n + excluded.n",
        [(audience_id, desired, n) for desired, n in ((1, inserts), (0, deletes)) if n],
    )


def _advance_checkpoint(db: sqlite3.Connection, audience_id: str) -> None:
    """checkpoint = the highest seq below which every folded change is delivered."""
    (oldest_dirty,) = db.execute(
        "SELECT MIN(seq) FROM membership INDEXED BY membership_unsettled"
        " WHERE audience_id = ? AND desired <> delivered",
        (audience_id,),
    ).fetchone()
    db.execute(
        "UPDATE audiences SET checkpoint_seq = CASE WHEN ? IS NULL THEN folded_seq ELSE ? - 1 END"
        " WHERE audience_id = ?",
        (oldest_dirty, oldest_dirty, audience_id),
    )


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
        "UPDATE membership SET in_flight = NULL WHERE in_flight = ? AND audience_id = ?",
        (batch_id, audience_id),
    )
    db.execute(
        "UPDATE batches SET state = ?, reason = ?, updated_at = ? WHERE batch_id = ?",
        (state, reason, now, batch_id),
    )
    if counter is not None:
        _count(db, audience_id, **{counter: rows})


def _requeue_in_flight(
    db: sqlite3.Connection, audience_id: str, batch_id: int, pending_after: str
) -> None:
    """Count the batch's accounts that will be pending once it closes (``pending_after``)."""
    counts = dict(
        db.execute(
            "SELECT desired, COUNT(*) FROM membership WHERE in_flight = ? AND audience_id = ?"
            f" AND {pending_after} GROUP BY desired",
            (batch_id, audience_id),
        ).fetchall()
    )
    _queue(db, audience_id, inserts=counts.get(1, 0), deletes=counts.get(0, 0))


def _count(db: sqlite3.Connection, audience_id: str, **deltas: int) -> None:
    db.executemany(
        "INSERT INTO ledger (audience_id, counter, value) VALUES (?, ?, ?)"
        " ON CONFLICT DO UPDATE SET value = value + excluded.value",
        [(audience_id, counter, value) for counter, value in deltas.items() if value],
    )

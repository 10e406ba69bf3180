"""The store's two doors: writes on one writer thread, reads on aiosqlite.

Concurrency: one writer. Every write runs as one Python function inside a dedicated
thread that owns the write connection, so a transaction whose statements depend on
each other (fold, plan) costs one hop off the event loop rather than one await per
statement. Reads go through aiosqlite on a second connection (WAL lets them run
beside the writer). Durability: WAL with ``synchronous=NORMAL``: a committed
transaction survives a crash of the process (kill -9); after a power loss the last
commits may roll back, which re-sends, never skips, since ``delivered`` only moves
forward on an acknowledgment that would then be lost too.

Writability: a write that fails because the disk is full, the file system read-only
or the device failing (SQLITE_FULL, SQLITE_READONLY, SQLITE_IOERR) makes the store
*unwritable*: ``store_unwritable`` is logged once, :attr:`Engine.writable` is false,
and callers wait (:meth:`Engine.wait_writable`) or answer 503 instead of ending the
daemon. The next write transaction that changes rows ends it (``store_writable``):
every attempt is a probe, and nothing else declares the disk usable again. A failed
transaction is rolled back whole, so nothing is half-applied meanwhile.

Nothing here leaves the store package: the noun modules take an :class:`Engine` and
hand back model Structs, and the :class:`~dbsync.store.Store` facade holds the one
engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from dbsync.clock import Clock
from dbsync.errors import StoreError
from dbsync.store import schema

__all__ = ["Engine", "Transaction"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# The primary result codes of a write the file system refused: the disk is full, the
# file system is read-only, or the device failed. Each may pass; the daemon waits.
_UNWRITABLE_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR})
# The same, as the file system says it when the store creates its files.
_UNWRITABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})

# The writer's page cache, KiB. The fold walks ``membership`` in key order a chunk at
# a time; with its pages cached, each chunk reads from memory what the previous ones
# brought in, instead of the default 2 MiB cache evicting them between two rows. A
# ceiling, not an allocation: SQLite grows the cache only as pages are read, and then
# keeps them, so the ceiling is also most of the daemon's resident memory once a large
# snapshot or AEP run went through: 128 MiB keeps a 5,000,000-row run under 300 MB
# (256 MiB peaked at 364 MB, and folded it no faster: bench/README.md, files).
WRITER_CACHE_KIB = 131_072

# The page size of a store file created new. The fold rewrites, a chunk at a time,
# every page of membership's B-trees its sorted keys touch, and a commit writes each
# to the WAL with a header: 16 KiB pages fold about 15% faster than SQLite's 4 KiB
# (bench/README.md, store_upsert) and plan a batch in half the time; 32 and 64 KiB
# gained no more, and make every small commit write bigger pages. A file keeps the
# size it was created with (changing it takes a VACUUM of the whole file).
PAGE_BYTES = 16_384

# The state directory, when the store creates it, and the SQLite files: the daemon's.
_DIRECTORY_MODE = 0o700
_FILE_MODE = 0o600

# A unit of work on the writer's connection, run inside one transaction.
Transaction = Callable[[sqlite3.Connection], T]


class Engine:
    """The SQLite file: a writer thread with its connection, and a reader connection."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self.clock = clock
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbsync-store")
        self._write_db: sqlite3.Connection | None = None
        self._read_db: aiosqlite.Connection | None = None
        self.transactions = 0  # write transactions committed, for tests and stats
        self._writable = asyncio.Event()
        self._writable.set()
        self._unwritable_since: float | None = None
        # Until open() is done, a refused write is its caller's to report (the daemon
        # waits for the disk and says so once), not one event per try.
        self._opened = False

    @property
    def writable(self) -> bool:
        """False from a write the file system refused until a write succeeds again."""
        return self._writable.is_set()

    async def wait_writable(self) -> None:
        """Until the store is writable (at once if it is)."""
        await self._writable.wait()

    def _refused(self, error: StoreError) -> None:
        if not error.unwritable:
            return
        if self._unwritable_since is None:
            self._unwritable_since = self.clock.monotonic()
            self._writable.clear()
            if not self._opened:
                return
            log.error("store_unwritable", extra={"path": str(self.path), "error": str(error)})

    def _wrote(self) -> None:
        if self._unwritable_since is not None:
            seconds = self.clock.monotonic() - self._unwritable_since
            self._unwritable_since = None
            self._writable.set()
            log.warning(
                "store_writable",
                extra={"path": str(self.path), "unwritable_seconds": round(seconds, 3)},
            )

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._make_private_files)
        except OSError as exc:
            error = StoreError(
                f"cannot create {exc.filename}: {exc.strerror}",
                unwritable=exc.errno in _UNWRITABLE_ERRNOS,
            )
            self._refused(error)
            raise error from exc
        await self.write(self._connect_writer)
        try:
            self._read_db = await aiosqlite.connect(self.path, timeout=30.0)
            await self._read_db.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from exc
        self._opened = True

    def _make_private_files(self) -> None:
        """The state directory 0700 if it is new, the database and its WAL and shared
        memory files 0600, whatever the umask.

        The store holds every account of every audience. Under the unit,
        StateDirectoryMode= and UMask= see to it; run by hand with umask 022 they came
        out 0755 and 0644. A directory that exists keeps its mode: systemd's, the
        operator's, or the admin server's when the socket lives in it (its group must
        reach the socket). SQLite creates the -wal and -shm files with the database
        file's mode, so the database is created 0600 before SQLite opens it; files
        left by an older version are narrowed too.
        """
        directory = self.path.parent
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True, mode=_DIRECTORY_MODE)
            os.chmod(directory, _DIRECTORY_MODE)  # mkdir's mode went through the umask
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
        try:
            os.fchmod(fd, _FILE_MODE)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self.path}{suffix}", _FILE_MODE)

    def _connect_writer(self) -> None:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute(f"PRAGMA page_size = {PAGE_BYTES}")  # a new file only
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        try:
            schema.migrate(db, self.path)
        except BaseException:
            db.close()
            raise
        db.execute("PRAGMA temp_store = MEMORY")
        db.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        schema.create_temp_tables(db)
        self._write_db = db

    async def close(self) -> None:
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
            await self.write(close_writer)
        finally:
            self._writer.shutdown(wait=True)

    async def write(self, work: Callable[..., T], *args: Any) -> T:
        """Run ``work(*args)`` on the writer thread (outside any transaction)."""
        loop = asyncio.get_running_loop()
        try:
            # The writer thread finishes a transaction even if this caller is cancelled:
            # the transaction is atomic either way.
            return await loop.run_in_executor(self._writer, functools.partial(work, *args))
        except sqlite3.Error as exc:
            error = StoreError(
                f"{getattr(work, '__name__', 'write')}: {exc}",
                unwritable=(getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _UNWRITABLE_CODES,
            )
            self._refused(error)
            raise error from exc

    def in_writer(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one IMMEDIATE transaction; on the writer thread only."""
        db = self._write_db
        assert db is not None, "the store is closed"
        assert threading.current_thread().name.startswith("dbsync-store")
        db.execute("BEGIN IMMEDIATE")
        changes = db.total_changes
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            # SQLite has already rolled back after some errors (SQLITE_FULL, SQLITE_IOERR):
            # a second ROLLBACK would raise and hide the cause ("database or disk is full").
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.transactions += 1
        if db.total_changes != changes and self._unwritable_since is not None:
            # Rows were written: the disk takes writes again. Told on the loop's thread.
            self._loop.call_soon_threadsafe(self._wrote)
        return result

    async def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one write transaction, off the event loop."""
        return await self.write(self.in_writer, work)

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        db = self._read_db
        assert db is not None, "the store is closed"
        try:
            # One hop to the connection's thread: the statement runs to its end before
            # another read starts. Executing and fetching in two hops would let other
            # reads run while it is open, and they would all share its old snapshot.
            return list(await db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise StoreError(f"read failed: {exc}") from exc

    def now(self) -> float:
        return self.clock.time()

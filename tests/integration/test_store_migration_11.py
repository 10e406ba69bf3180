"""Migration 11 on a real file: a version 10 store with batches in flight loses nothing.

The file is built by migrations 1-10 and filled by hand: members pending, delivered
and set aside, two open batches (one created, one uploaded) with their items, a
completed batch whose items are history, rejected rows. After :class:`Store` opens
it, every other table holds the same rows, ``batch_items`` is gone, each open batch
lists the accounts its items listed, and the store carries on: a split, a completion
and a failure of those batches move the same rows and counters as before.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from dbsync.clock import FakeClock
from dbsync.model import ListAction
from dbsync.store import Store
from dbsync.store.schema import MIGRATIONS
from tests.support.migrations import schema_at

AUDIENCE = "aud-1"
VERSION = 10

# (key, desired, seq, changed_at, delivered, in_flight, rejected, acked_at, ack_batch)
MEMBERS = [
    ("pending-1", 1, 20, 5.0, 0, None, 0, None, None),
    ("pending-0", 0, 21, 6.0, 1, None, 0, 2.0, 1),
    ("flight-a", 1, 10, 1.0, 0, 2, 0, None, None),
    ("flight-b", 1, 11, 1.0, 0, 2, 0, None, None),
    ("flight-c", 1, 12, 1.0, 0, 2, 0, None, None),
    ("flight-d", 0, 13, 1.0, 1, 3, 0, 2.0, 1),
    ("set-aside", 1, 14, 1.0, 0, None, 1, None, None),
    ("clean", 1, 4, 1.0, 1, None, 0, 2.0, 1),
]


def build_version_10(path: Path) -> None:
    db = schema_at(path, VERSION)
    try:
        db.execute(
            "INSERT INTO audiences (audience_id, destination, name, list_name, list_id, state,"
            " checkpoint_seq, folded_seq, updated_at, first_acked_at, operator_paused)"
            " VALUES (?, 'd', 'A', 'List A', 7, 'active', 3, 21, 1.0, 2.0, 0)",
            (AUDIENCE,),
        )
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('changes', 21)")
        db.executemany(
            "INSERT INTO membership (audience_id, external_id, name, domain, desired, seq,"
            " changed_at, delivered, in_flight, rejected, acked_at, ack_batch)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(AUDIENCE, key, f"{key} Inc.", f"{key}.example", *rest) for key, *rest in MEMBERS],
        )
        db.executemany(
            "INSERT INTO backlog_counts (audience_id, desired, n) VALUES (?, ?, ?)",
            [(AUDIENCE, 1, 1), (AUDIENCE, 0, 1)],
        )
        db.executemany(
            "INSERT INTO batches (batch_id, audience_id, action, state, job_id, rows, reason,"
            " created_at, uploaded_at, updated_at, throttled, verified, lost)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (1, AUDIENCE, "insert", "completed", 100, 2, "", 1.0, 1.5, 2.0, 0, 0, 0),
                (2, AUDIENCE, "insert", "uploaded", 101, 3, "", 3.0, 3.5, 3.5, 0, 0, 0),
                (3, AUDIENCE, "delete", "created", 102, 1, "", 4.0, None, 4.0, 0, 0, 0),
            ],
        )
        db.executemany(
            "INSERT INTO batch_items (batch_id, external_id, seq) VALUES (?, ?, ?)",
            [
                (1, "clean", 4),
                (1, "pending-0", 2),
                (2, "flight-c", 12),
                (2, "flight-a", 10),
                (2, "flight-b", 11),
                (3, "flight-d", 13),
            ],
        )
        db.executemany(
            "INSERT INTO ledger (audience_id, counter, value) VALUES (?, ?, ?)",
            [(AUDIENCE, "received", 9), (AUDIENCE, "exported", 5), (AUDIENCE, "acknowledged", 2)],
        )
        db.execute(
            "INSERT INTO rejected (audience_id, external_id, name, domain, member, reason,"
            " rejected_at, attempts, retries) VALUES (?, 'set-aside', 'set-aside Inc.',"
            " 'set-aside.example', 1, 'refused: bad domain', 4.0, 2, 1)",
            (AUDIENCE,),
        )
    finally:
        db.close()


def contents(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (rowids included for membership), sorted, by table name."""
    db = sqlite3.connect(path)
    try:
        tables = [
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name"
            )
        ]
        result = {
            table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
            for table in tables
            if table != "sqlite_stat1"  # PRAGMA optimize at close may add statistics
        }
        result["membership"] = db.execute(
            "SELECT rowid, * FROM membership ORDER BY rowid"
        ).fetchall()
        return result
    finally:
        db.close()


def items(path: Path) -> dict[int, list[str]]:
    """batch_items of the open batches, as open_batches lists them (by external id)."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT i.batch_id, i.external_id FROM batch_items i JOIN batches b USING (batch_id)"
            " WHERE b.state IN ('planned', 'created', 'uploaded')"
            " ORDER BY i.batch_id, i.external_id"
        ).fetchall()
    db.close()
    listed: dict[int, list[str]] = {}
    for batch_id, key in rows:
        listed.setdefault(batch_id, []).append(key)
    return listed


def counters(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        found = dict(db.execute("SELECT counter, value FROM ledger").fetchall())
    db.close()
    return found


async def test_a_version_10_file_keeps_its_batches_in_flight(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    build_version_10(path)
    before = contents(path)
    listed = items(path)
    assert listed == {2: ["flight-a", "flight-b", "flight-c"], 3: ["flight-d"]}

    async with Store.open(path, clock=FakeClock(start=10.0)) as store:
        # A file keeps the page size it was made with (SQLite's 4 KiB, here).
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA page_size").fetchone()[0] == 4_096
        opened = {
            batch.batch_id: [a.external_id for a in batch.accounts]
            for batch in await store.open_batches(AUDIENCE)
        }
        assert opened == listed
        [batch_2, batch_3] = await store.open_batches(AUDIENCE)
        assert (batch_2.action, batch_2.job_id, batch_3.action) == (
            ListAction.INSERT,
            101,
            ListAction.DELETE,
        )
        assert batch_2.accounts[0].name == "flight-a Inc."
        backlog = await store.backlog(AUDIENCE)
        assert (backlog.inserts, backlog.deletes, backlog.in_flight, backlog.rejected) == (
            1,
            1,
            4,
            1,
        )

    after = contents(path)
    assert after.pop("batch_items", None) is None
    before.pop("batch_items")
    # Migration 13 keys membership by an integer audience key (test_store_migration_13.py).
    keys = dict(after.pop("audience_keys"))
    after["membership"] = [(rowid, keys[key], *rest) for rowid, key, *rest in after["membership"]]
    assert after == before
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    db.close()

    # The store carries on with the batches it found: a split keeps the accounts in
    # flight in two new batches, completing one half delivers it, failing the other and
    # batch 3 puts their accounts back in the queue.
    async with Store.open(path, clock=FakeClock(start=20.0)) as store:
        left, right = await store.split_batch(2)
        assert [a.external_id for a in left.accounts] == ["flight-a"]
        assert [a.external_id for a in right.accounts] == ["flight-b", "flight-c"]
        assert {b.batch_id: len(b.accounts) for b in await store.open_batches(AUDIENCE)} == {
            3: 1,
            left.batch_id: 1,
            right.batch_id: 2,
        }
        assert await store.complete_batch(left.batch_id, list_id=7) == 1
        await store.fail_batch(right.batch_id, "job failed")
        await store.fail_batch(3, "job failed")
        assert await store.open_batches(AUDIENCE) == []
        backlog = await store.backlog(AUDIENCE)
        # flight-b and flight-c pending again (inserts), flight-d too (a delete).
        assert (backlog.inserts, backlog.deletes, backlog.in_flight) == (3, 2, 0)
        planned = await store.plan_batch(AUDIENCE, ListAction.INSERT, 10)
        assert planned is not None
        assert sorted(a.external_id for a in planned.accounts) == [
            "flight-b",
            "flight-c",
            "pending-1",
        ]
        assert [b.batch_id for b in await store.open_batches(AUDIENCE)] == [planned.batch_id]
    with sqlite3.connect(path) as db:
        delivered = dict(
            db.execute(
                "SELECT external_id, delivered FROM membership WHERE in_flight IS NULL"
            ).fetchall()
        )
    db.close()
    assert delivered["flight-a"] == 1
    assert counters(path)["acknowledged"] == 3

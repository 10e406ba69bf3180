"""Migration 13 on a real file: a version 12 store, keyed by text audience ids, loses nothing.

The file is built by migrations 1-12 (SQLite's 4 KiB pages, as an old file has) and
filled by hand for three audiences: members pending, delivered, set aside and
awaiting a read-back's verdict, open batches in flight, rejected rows, ledger
counters, and journal rows not folded yet, one of them of an audience id the store
has never configured. After :class:`Store` opens it, ``membership`` is keyed by an
integer audience key, every row is the same row (rowid included) under its key,
each audience's queue, checkpoint, open batches, rejected accounts and ledger check
are what they were, and the store carries on: it folds the journal, completes and
fails the batches it found, plans new ones; a VACUUM keeps every key.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from dbsync.clock import FakeClock
from dbsync.model import Account, Change, ListAction
from dbsync.store import Store
from dbsync.store.schema import MIGRATIONS
from tests.support.migrations import schema_at

VERSION = 12
AUDIENCES = ("aud-b", "aud-a", "aud-c")  # not in key order: keys follow the ids' order
STRANGER = "aud-unconfigured"  # only in the journal

# (audience, key, desired, seq, changed_at, delivered, in_flight, rejected, acked_at,
#  ack_batch, repairs)
MEMBERS = [
    ("aud-a", "pending-1", 1, 20, 5.0, 0, None, 0, None, None, 0),
    ("aud-a", "pending-0", 0, 21, 6.0, 1, None, 0, 2.0, 1, 0),
    ("aud-a", "flight-a", 1, 10, 1.0, 0, 2, 0, None, None, 0),
    ("aud-a", "flight-b", 1, 11, 1.0, 0, 2, 0, None, None, 0),
    ("aud-a", "set-aside", 1, 14, 1.0, 0, None, 1, None, None, 2),
    ("aud-a", "awaiting", 1, 4, 1.0, 1, None, 0, 2.0, 1, 1),
    ("aud-b", "flight-d", 0, 13, 1.0, 1, 3, 0, 2.0, 1, 0),
    ("aud-b", "pending-1", 1, 22, 7.0, 0, None, 0, None, None, 0),
    ("aud-b", "clean", 1, 3, 1.0, 1, None, 0, None, None, 0),
    ("aud-c", "refused", 0, 15, 1.0, 1, None, 1, 2.0, 4, 0),
    ("aud-c", "awaiting", 0, 5, 1.0, 0, None, 0, 2.5, 4, 0),
]
# (batch_id, audience, action, state, job_id, rows)
BATCHES = [
    (1, "aud-a", "insert", "completed", 100, 2),
    (2, "aud-a", "insert", "uploaded", 101, 2),
    (3, "aud-b", "delete", "created", 102, 1),
    (4, "aud-c", "delete", "completed", 103, 2),
]
# (audience, key, member): the journal, in seq order (23, 24, 25).
JOURNAL = [("aud-a", "late", 1), ("aud-b", "clean", 0), (STRANGER, "someone", 1)]


def build_version_12(path: Path) -> None:
    db = schema_at(path, VERSION)
    try:
        db.executemany(
            "INSERT INTO audiences (audience_id, destination, name, list_name, list_id, state,"
            " checkpoint_seq, folded_seq, updated_at, first_acked_at, operator_paused)"
            " VALUES (?, 'd', ?, ?, ?, 'active', ?, 22, 1.0, 2.0, 0)",
            [(a, a, f"List {a}", 7 + i, 2 + i) for i, a in enumerate(AUDIENCES)],
        )
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('changes', 22)")
        db.executemany(
            "INSERT INTO membership (audience_id, external_id, name, domain, desired, seq,"
            " changed_at, delivered, in_flight, rejected, acked_at, ack_batch, repairs)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(a, key, f"{key} Inc.", f"{key}.example", *rest) for a, key, *rest in MEMBERS],
        )
        db.execute(
            "INSERT INTO backlog_counts (audience_id, desired, n)"
            " SELECT audience_id, desired, COUNT(*) FROM membership"
            " WHERE desired <> delivered AND in_flight IS NULL AND rejected = 0"
            " GROUP BY audience_id, desired"
        )
        db.executemany(
            "INSERT INTO batches (batch_id, audience_id, action, state, job_id, rows,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, 1.0, 1.0)",
            BATCHES,
        )
        db.executemany(
            "INSERT INTO ledger (audience_id, counter, value) VALUES (?, ?, ?)",
            [
                ("aud-a", "received", 9),
                ("aud-a", "exported", 4),
                ("aud-a", "acknowledged", 2),
                ("aud-b", "received", 3),
                ("aud-c", "received", 2),
                ("aud-c", "exported", 2),
                ("aud-c", "acknowledged", 2),
            ],
        )
        db.executemany(
            "INSERT INTO rejected (audience_id, external_id, name, domain, member, reason,"
            " rejected_at, attempts, retries) VALUES (?, ?, ?, ?, ?, ?, 4.0, 2, 1)",
            [
                ("aud-a", "set-aside", "set-aside Inc.", "x.example", 1, "unmatched: gone"),
                ("aud-c", "refused", "refused Inc.", "refused.example", 0, "refused: 400"),
            ],
        )
        db.executemany(
            "INSERT INTO changes (audience_id, external_id, name, domain, member, ts)"
            " VALUES (?, ?, ?, ?, ?, 9.0)",
            [(a, key, f"{key} Inc.", f"{key}.example", member) for a, key, member in JOURNAL],
        )
    finally:
        db.close()


def tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, sorted; membership with rowids and its audience by id."""
    with sqlite3.connect(path) as db:
        names = [
            row[0]
            for row in db.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")
            if row[0] not in ("sqlite_stat1", "audience_keys")
        ]
        found = {name: sorted(db.execute(f"SELECT * FROM {name}"), key=repr) for name in names}
        columns = [row[1] for row in db.execute("PRAGMA table_info(membership)")]
        if "audience_key" in columns:
            found["membership"] = db.execute(
                "SELECT m.rowid, k.audience_id, m.external_id, m.name, m.domain, m.desired,"
                " m.seq, m.changed_at, m.delivered, m.in_flight, m.rejected, m.acked_at,"
                " m.ack_batch, m.repairs FROM membership m JOIN audience_keys k"
                " USING (audience_key) ORDER BY m.rowid"
            ).fetchall()
        else:
            found["membership"] = db.execute(
                "SELECT rowid, * FROM membership ORDER BY rowid"
            ).fetchall()
    db.close()
    return found


def keys(path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(path) as db:
        found = db.execute("SELECT audience_key, audience_id FROM audience_keys").fetchall()
    db.close()
    return sorted(found)


async def facts(store: Store) -> dict[str, Any]:
    """What the actors and the operator see of each audience."""
    return {
        a: (
            await store.backlog(a),
            await store.checkpoint(a),
            [
                (b.batch_id, b.action, [x.external_id for x in b.accounts])
                for b in await store.open_batches(a)
            ],
            await store.rejected(a),
            await store.ledger_check(a),
            sorted(await store.desired_members(a)),
        )
        for a in AUDIENCES
    }


async def test_a_version_12_file_keeps_every_row_under_an_integer_key(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    build_version_12(path)
    before = tables(path)

    # What the store reads once migrated (it migrates on open): each fact is stated
    # below from the rows the file was built with.
    async with Store.open(path, clock=FakeClock(start=10.0)) as store:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA page_size").fetchone()[0] == 4_096  # kept
            assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
            (sql,) = db.execute(
                "SELECT sql FROM sqlite_schema WHERE name = 'membership'"
            ).fetchone()
            index_sql = [
                row[0]
                for row in db.execute(
                    "SELECT sql FROM sqlite_schema WHERE type = 'index'"
                    " AND tbl_name = 'membership' AND sql IS NOT NULL"
                )
            ]
        db.close()
        assert "audience_key INTEGER NOT NULL" in sql
        assert "audience_id" not in sql
        assert len(index_sql) == 4  # in flight, queue, unsettled, rejected
        assert not any("audience_id" in s for s in index_sql)
        migrated = await facts(store)

    # Keys in the order of the ids, for every id the file knew (the journal's too).
    assert keys(path) == [(1, "aud-a"), (2, "aud-b"), (3, "aud-c"), (4, STRANGER)]
    after = tables(path)
    assert after == before

    a, b, c = (migrated[x] for x in ("aud-a", "aud-b", "aud-c"))
    # Queue counts: (inserts, deletes, oldest, in flight, rejected).
    assert (a[0].inserts, a[0].deletes, a[0].oldest_changed_at) == (1, 1, 5.0)
    assert (a[0].in_flight, a[0].rejected) == (2, 1)
    assert (b[0].inserts, b[0].deletes, b[0].in_flight, b[0].rejected) == (1, 0, 1, 0)
    assert (c[0].inserts, c[0].deletes, c[0].in_flight, c[0].rejected) == (0, 0, 0, 1)
    assert (a[1], b[1], c[1]) == (3, 2, 4)  # checkpoints as they were
    assert a[2] == [(2, ListAction.INSERT, ["flight-a", "flight-b"])]
    assert b[2] == [(3, ListAction.DELETE, ["flight-d"])]
    assert c[2] == []
    assert [(r.account.external_id, r.retrying) for r in a[3]] == [("set-aside", False)]
    assert [r.account.external_id for r in c[3]] == ["refused"]
    # Ack state: awaiting a verdict (ack_batch) as before.
    assert (a[4].awaiting, c[4].awaiting, a[4].pending, b[4].pending) == (2, 2, 2, 1)
    assert a[5] == ["awaiting", "flight-a", "flight-b", "pending-1", "set-aside"]

    # The store carries on: the journal folds (the unconfigured id too), the batches
    # found in flight complete or fail, new ones are planned from the same queue.
    async with Store.open(path, clock=FakeClock(start=20.0)) as store:
        assert await store.fold_pending() == {"aud-a": 1, "aud-b": 1, STRANGER: 1}
        assert await store.desired_members(STRANGER) == {"someone"}
        assert await store.complete_batch(2, list_id=7) == 2
        await store.fail_batch(3, "job failed")
        backlog_a, backlog_b = await store.backlog("aud-a"), await store.backlog("aud-b")
        assert (backlog_a.inserts, backlog_a.in_flight) == (2, 0)  # pending-1, late
        assert (backlog_b.inserts, backlog_b.deletes) == (1, 2)  # flight-d, clean
        planned = await store.plan_batch("aud-b", ListAction.DELETE, 10)
        assert planned is not None
        assert sorted(x.external_id for x in planned.accounts) == ["clean", "flight-d"]
        await store.append_changes(
            [
                Change(
                    audience_id="aud-new",
                    account=Account(external_id="n", name="N", domain="n.example"),
                    member=True,
                    ts=21.0,
                )
            ]
        )
        assert await store.fold_pending() == {"aud-new": 1}
        assert (await store.backlog("aud-new")).inserts == 1
        assert (await store.ledger_check("aud-a")).pending == 3  # and pending-0
    assert keys(path)[-1] == (5, "aud-new")

    # VACUUM renumbers implicit rowids, never an INTEGER PRIMARY KEY: the keys stay.
    known = keys(path)
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("VACUUM")
    db.close()
    assert keys(path) == known
    async with Store.open(path, clock=FakeClock(start=30.0)) as store:
        assert await store.desired_members("aud-new") == {"n"}
        assert "pending-1" in await store.desired_members("aud-a")

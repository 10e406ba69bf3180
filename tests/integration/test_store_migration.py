"""Migration 7 on a real file: a version 6 store with rows in every table loses none.

(Migration 11 then drops ``batch_items``: test_store_migration_11.py; migration 13
keys membership by an integer audience key: test_store_migration_13.py.)

The file is built by the migrations before 7, then filled by hand, one or more rows
per table (an open batch with its items, a rejected account, a read-back run half
judged, quota use, the learned pace, changes not folded yet). After :class:`Store`
opens it, every table holds the same rows, ``membership`` is a rowid table, and the
store carries on from where the file was: its backlog, its next sequence number.
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

AUDIENCE = "aud-1"
VERSION = 6


def build_version_6(path: Path) -> None:
    db = schema_at(path, VERSION)
    try:
        db.execute(
            "INSERT INTO audiences (audience_id, destination, name, list_name, list_id, state,"
            " checkpoint_seq, folded_seq, updated_at, first_acked_at, operator_paused)"
            " VALUES (?, 'd', 'A', 'List A', 7, 'active', 3, 40, 1.0, 2.0, 1)",
            (AUDIENCE,),
        )
        db.executemany(
            "INSERT INTO changes (seq, audience_id, external_id, name, domain, member, ts)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(41, AUDIENCE, "late", "Late", "late.example", 1, 9.0)],
        )
        db.execute("UPDATE sqlite_sequence SET seq = 41 WHERE name = 'changes'")
        # (key, desired, seq, changed_at, delivered, in_flight, rejected, acked_at,
        # ack_batch, repairs)
        db.executemany(
            "INSERT INTO membership (audience_id, external_id, name, domain, desired, seq,"
            " changed_at, delivered, in_flight, rejected, acked_at, ack_batch, repairs)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (AUDIENCE, key, f"{key} Inc.", f"{key}.example", *rest)
                for key, *rest in [
                    ("pending-insert", 1, 10, 5.0, 0, None, 0, None, None, 0),
                    ("pending-delete", 0, 11, 3.0, 1, None, 0, 2.0, 1, 0),
                    ("in-flight", 1, 12, 1.0, 0, 2, 0, None, None, 1),
                    ("rejected", 1, 13, 1.0, 0, None, 1, None, None, 3),
                    ("clean", 1, 4, 1.0, 1, None, 0, 2.0, 1, 0),
                ]
            ],
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
                (1, AUDIENCE, "insert", "completed", 100, 2, "", 1.0, 1.5, 2.0, 1, 1, 0),
                (2, AUDIENCE, "insert", "uploaded", 101, 1, "", 3.0, 3.5, 3.5, 0, 0, 0),
            ],
        )
        db.executemany(
            "INSERT INTO batch_items (batch_id, external_id, seq) VALUES (?, ?, ?)",
            [(1, "clean", 4), (1, "pending-delete", 2), (2, "in-flight", 12)],
        )
        db.executemany(
            "INSERT INTO ledger (audience_id, counter, value) VALUES (?, ?, ?)",
            [(AUDIENCE, "received", 14), (AUDIENCE, "acknowledged", 2), (AUDIENCE, "lost", 1)],
        )
        db.execute(
            "INSERT INTO rejected (audience_id, external_id, name, domain, member, reason,"
            " rejected_at, attempts) VALUES (?, 'rejected', 'rejected Inc.',"
            " 'rejected.example', 1, 'refused: bad domain', 4.0, 2)",
            (AUDIENCE,),
        )
        db.execute(
            "INSERT INTO quota_usage (destination, endpoint, day_window, used)"
            " VALUES ('d', 'import_jobs', 20000, 12)"
        )
        db.execute(
            "INSERT INTO pace (destination, requests_per_minute, updated_at)"
            " VALUES ('d', 30.5, 6.0)"
        )
        db.execute(
            "INSERT INTO reconcile_runs (run_id, audience_id, list_id, export_job_id, started_at,"
            " state, reason, finished_at, report, judged_through, judgment)"
            " VALUES (1, ?, 7, 'exp-1', 5.0, 'exporting', '', NULL, NULL, 'clean', X'80')",
            (AUDIENCE,),
        )
    finally:
        db.close()


def contents(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (without rowids), sorted, by table name."""
    db = sqlite3.connect(path)
    try:
        tables = [
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name"
            )
        ]
        return {
            table: sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)
            for table in tables
        }
    finally:
        db.close()


async def test_a_version_6_file_keeps_every_row_and_carries_on(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    build_version_6(path)
    before = contents(path)
    assert all(before[table] for table in before if table != "sqlite_stat1"), before

    async with Store.open(path, clock=FakeClock(start=10.0)):
        pass

    after = contents(path)
    after.pop("sqlite_stat1", None)  # PRAGMA optimize at close may add statistics
    before.pop("sqlite_stat1", None)
    for table in ("snapshots", "snapshot_rows", "file_runs"):  # migration 8's, empty
        assert after.pop(table) == [], table
    assert after.pop("adoptions") == []  # migration 10's, empty
    # Migration 11 drops batch_items: the open batch's account is found by in_flight below.
    before.pop("batch_items")
    # Migration 9: each set-aside account has been retried 0 times.
    assert all(row[-1] == 0 for row in after["rejected"])
    after["rejected"] = [row[:-1] for row in after["rejected"]]
    # Migration 13: membership names its audience by key.
    keys = dict(after.pop("audience_keys"))
    assert list(keys.values()) == [AUDIENCE]
    after["membership"] = sorted(
        [(keys[row[0]], *row[1:]) for row in after["membership"]], key=repr
    )
    assert after == before
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        (sql,) = db.execute(
            "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'membership'"
        ).fetchone()
        assert "WITHOUT ROWID" not in sql
        indexes = {
            row[0]
            for row in db.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'membership'"
                " AND sql IS NOT NULL"
            )
        }
        assert indexes == {
            "membership_in_flight",
            "membership_queue",
            "membership_unsettled",
            "membership_rejected",
        }
    db.close()

    async with Store.open(path, clock=FakeClock(start=10.0)) as store:
        backlog = await store.backlog(AUDIENCE)
        assert (backlog.inserts, backlog.deletes, backlog.oldest_changed_at) == (1, 1, 3.0)
        assert (backlog.in_flight, backlog.rejected) == (1, 1)
        [open_batch] = await store.open_batches(AUDIENCE)
        assert [a.external_id for a in open_batch.accounts] == ["in-flight"]
        # The journal row left before the migration folds, and the sequence goes on.
        account = Account(external_id="new", name="New", domain="new.example")
        await store.append_changes(
            [Change(audience_id=AUDIENCE, account=account, member=True, ts=10.0)]
        )
        assert await store.fold_pending() == {AUDIENCE: 2}
        assert (await store.backlog(AUDIENCE)).inserts == 3
        batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 10)
        assert batch is not None
        assert {a.external_id for a in batch.accounts} == {"pending-insert", "late", "new"}
        await store.complete_batch(batch.batch_id, list_id=7)
    with sqlite3.connect(path) as db:
        seqs = dict(
            db.execute(
                "SELECT external_id, seq FROM membership WHERE external_id IN ('late', 'new')"
            ).fetchall()
        )
        assert seqs == {"late": 41, "new": 42}
    db.close()

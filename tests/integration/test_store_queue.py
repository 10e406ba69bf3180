"""The store's queue counters and sequence numbers, checked against the rows themselves.

``backlog`` reads counters that every transaction moves; these tests recount the
rows with plain SQL after each step, so a transaction that forgets its delta fails
here rather than showing an operator a wrong backlog.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dbsync.clock import FakeClock
from dbsync.model import Account, AudienceSpec, Backlog, Change, ListAction
from dbsync.store import Store
from dbsync.store.audiences import KEY
from dbsync.store.schema import MIGRATIONS

AUDIENCES = ("aud-1", "aud-2")


def change(key: str, member: bool, *, audience: str = "aud-1", name: str = "") -> Change:
    account = Account(external_id=key, name=name or f"{key} Inc.", domain=f"{key}.example")
    return Change(audience_id=audience, account=account, member=member, ts=1.0)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "dbsync.sqlite3"


@pytest.fixture
async def store(path: Path) -> AsyncIterator[Store]:
    async with Store.open(path, clock=FakeClock(start=1_000_000.0)) as store:
        await store.sync_audiences(
            [
                AudienceSpec(audience_id=a, destination="d", name=a, list_name=f"List {a}")
                for a in AUDIENCES
            ]
        )
        yield store


def recount(path: Path, audience_id: str) -> Backlog:
    """The backlog as the membership rows say it is, without counters or partial indexes."""
    with sqlite3.connect(path) as db:
        inserts, deletes, oldest = db.execute(
            "SELECT TOTAL(desired = 1), TOTAL(desired = 0), MIN(changed_at) FROM membership"
            f" NOT INDEXED WHERE audience_key = {KEY} AND desired <> delivered"
            " AND in_flight IS NULL AND rejected = 0",
            (audience_id,),
        ).fetchone()
        (in_flight,) = db.execute(
            "SELECT COUNT(*) FROM membership NOT INDEXED"
            f" WHERE audience_key = {KEY} AND in_flight IS NOT NULL",
            (audience_id,),
        ).fetchone()
        (rejected,) = db.execute(
            f"SELECT COUNT(*) FROM membership NOT INDEXED WHERE audience_key = {KEY}"
            " AND rejected = 1",
            (audience_id,),
        ).fetchone()
    db.close()
    return Backlog(
        inserts=int(inserts),
        deletes=int(deletes),
        oldest_changed_at=oldest,
        in_flight=in_flight,
        rejected=rejected,
    )


async def assert_counts(store: Store, path: Path) -> None:
    for audience_id in AUDIENCES:
        assert await store.backlog(audience_id) == recount(path, audience_id)


async def test_the_backlog_counters_match_the_rows_through_every_operation(
    store: Store, path: Path
) -> None:
    rng = random.Random(7)
    keys = [f"acct-{i:03d}" for i in range(60)]
    members: dict[str, set[str]] = {a: set() for a in AUDIENCES}
    for step in range(400):
        audience_id = rng.choice(AUDIENCES)
        operation = rng.randrange(12)
        if operation <= 3:
            changes = [
                change(k, rng.random() < 0.7, audience=audience_id, name=rng.choice("AB"))
                for k in rng.sample(keys, 8)
            ]
            await store.append_changes(changes)
            await store.fold_pending(max_rows=rng.choice((3, 50)))
        elif operation == 4:
            snapshot = [Account(external_id=k, name="A") for k in rng.sample(keys, 20)]
            await store.replace_members(audience_id, snapshot, ts=float(step))
            await store.fold_pending()
        elif operation <= 6:
            action = rng.choice(list(ListAction))
            await store.plan_batch(audience_id, action, rng.randrange(1, 6))
        elif operation <= 9:
            batches = await store.open_batches(audience_id)
            if not batches:
                continue
            batch = rng.choice(batches)
            outcome = rng.randrange(5)
            if outcome == 0:
                await store.complete_batch(batch.batch_id, list_id=1)
            elif outcome == 1:
                await store.fail_batch(batch.batch_id, "job failed")
            elif outcome == 2:
                await store.abandon_batch(batch.batch_id, "gave up")
            elif outcome == 3 and len(batch.accounts) >= 2:
                await store.split_batch(batch.batch_id)
            else:
                await store.reject_batch(batch.batch_id, "refused")
        elif operation == 10:
            await rng.choice((store.requeue, store.resync))(audience_id)
        else:
            member = rng.random() < 0.5
            await store.mark_undelivered(audience_id, rng.sample(keys, 5), member=member)
        members[audience_id] = await store.desired_members(audience_id)
        await assert_counts(store, path)
    assert any(members.values())  # the walk did build memberships


async def test_sequence_numbers_never_restart_when_the_journal_empties(
    store: Store, path: Path
) -> None:
    await store.append_changes([change("a", True), change("b", True)])
    assert await store.fold_pending() == {"aud-1": 2}
    assert await store.pending_journal_rows() == 0
    await store.append_changes([change("c", True)])
    await store.fold_pending()
    with sqlite3.connect(path) as db:
        seqs = dict(db.execute("SELECT external_id, seq FROM membership"))
    db.close()
    assert seqs["c"] > max(seqs["a"], seqs["b"])


async def test_a_version_1_file_is_migrated_with_its_queue_and_sequence(path: Path) -> None:
    with sqlite3.connect(path, isolation_level=None) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(MIGRATIONS[0])
        db.execute("PRAGMA user_version = 1")
        db.execute(
            "INSERT INTO audiences (audience_id, destination, name, list_name, state,"
            " folded_seq, updated_at) VALUES ('aud-1', 'd', 'A', 'List A', 'active', 40, 0)"
        )
        db.executemany(
            "INSERT INTO membership (audience_id, external_id, name, domain, desired, seq,"
            " changed_at, delivered, in_flight, rejected) VALUES ('aud-1', ?, '', '', ?, ?, ?, ?,"
            " ?, ?)",
            [
                ("pending-insert", 1, 10, 5.0, 0, None, 0),
                ("pending-delete", 0, 11, 3.0, 1, None, 0),
                ("in-flight", 1, 12, 1.0, 0, 9, 0),
                ("rejected", 1, 13, 1.0, 0, None, 1),
                ("clean", 1, 40, 1.0, 1, None, 0),
            ],
        )
    db.close()

    async with Store.open(path, clock=FakeClock()) as store:
        backlog = await store.backlog("aud-1")
        assert (backlog.inserts, backlog.deletes, backlog.oldest_changed_at) == (1, 1, 3.0)
        assert backlog.rejected == 1
        await store.append_changes([change("new", True)])
        await store.fold_pending()
        assert (await store.backlog("aud-1")).inserts == 2
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        (seq,) = db.execute("SELECT seq FROM membership WHERE external_id = 'new'").fetchone()
    db.close()
    assert seq > 40  # above every seq the version 1 file had handed out

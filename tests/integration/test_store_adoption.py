"""Adopting a list (the store's side): who is adopted, what is taken, how the ledger counts."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dbsync.clock import FakeClock
from dbsync.model import Account, AudienceSpec, Change, ListAction, ListedAccount
from dbsync.store import Store
from dbsync.store.schema import MIGRATIONS


def account(key: str) -> Account:
    return Account(external_id=key, name=f"{key} Inc.", domain=f"{key.lower()}.example")


def listed(key: str) -> ListedAccount:
    a = account(key)
    return ListedAccount(external_id=a.external_id, name=a.name, domain=a.domain)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "dbsync.sqlite3", clock=FakeClock(start=1_000.0)) as store:
        await store.sync_audiences(
            [
                AudienceSpec(audience_id=a, destination="d", name=a, list_name=a, list_id=7)
                for a in ("fresh", "fed")
            ]
        )
        yield store


async def members(store: Store, audience: str, keys: str) -> None:
    await store.append_changes(
        [Change(audience_id=audience, account=account(k), member=True, ts=1.0) for k in keys]
    )
    await store.fold_pending()


async def test_only_an_audience_never_fed_is_adopted_and_only_once(store: Store) -> None:
    await members(store, "fed", "AB")
    batch = await store.plan_batch("fed", ListAction.INSERT, 10)
    assert batch is not None
    await store.mark_created(batch.batch_id, 1)
    await store.mark_uploaded(batch.batch_id)
    await store.complete_batch(batch.batch_id, list_id=7)

    assert await store.request_first_adoptions(["fresh", "fed"]) == ["fresh"]
    assert await store.request_first_adoptions(["fresh", "fed"]) == [], "asked once"
    assert await store.adoptions_pending(["fresh", "fed"]) == ["fresh"]
    await store.request_adoption("fed")  # dbsync ctl adopt: whatever it holds
    assert await store.adoption_pending("fed")


async def test_pending_members_the_list_holds_are_taken_as_delivered(store: Store) -> None:
    """Desired A, B, C; the list holds B, C and Z. B and C leave the queue, unsent (ledger
    ``adopted`` 2, balanced); A stays pending; the adoption is closed."""
    await members(store, "fresh", "ABC")
    assert await store.request_first_adoptions(["fresh"]) == ["fresh"]
    assert await store.adopt_listed("fresh", [listed(k) for k in "BCZ"]) == 2
    backlog = await store.backlog("fresh")
    assert (backlog.inserts, backlog.deletes) == (1, 0)
    check = await store.ledger_check("fresh")
    assert check.balanced, check
    assert (check.counts.adopted, check.counts.exported) == (2, 0)
    assert not await store.adoption_pending("fresh")
    assert await store.adopt_listed("fresh", [listed("A")]) is None, "nothing pending"
    assert await store.abandon_adoption("fresh") is False


async def test_a_version_9_file_gains_the_adoptions_table(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        for script in MIGRATIONS[:9]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 9")
    async with Store.open(path, clock=FakeClock(start=1_000.0)) as store:
        await store.sync_audiences(
            [AudienceSpec(audience_id="a", destination="d", name="a", list_name="a", list_id=7)]
        )
        assert await store.request_first_adoptions(["a"]) == ["a"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)

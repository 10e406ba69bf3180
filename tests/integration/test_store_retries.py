"""Accounts set aside as unmatched are tried again on their schedule (the store's side).

A fake clock; repair limit 0, so an account missing at its first read-back is set aside
at once. Delays of 100 s, then 300 s (the last repeating).
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dbsync.clock import FakeClock
from dbsync.model import Account, AudienceSpec, Change, ListAction
from dbsync.store import Store, next_retry_at
from dbsync.store.schema import MIGRATIONS

AUDIENCE = "aud-1"
DELAYS = (100.0, 300.0)


def account(key: str) -> Account:
    return Account(external_id=key, name=f"{key} Inc.", domain=f"{key.lower()}.example")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_000.0)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "dbsync.sqlite3", clock=clock) as store:
        await store.sync_audiences(
            [AudienceSpec(audience_id=AUDIENCE, destination="d", name="A", list_name="A")]
        )
        yield store


async def deliver_and_read_back(store: Store, clock: FakeClock, listed: list[str]) -> None:
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 1000)
    assert batch is not None
    await store.mark_created(batch.batch_id, 1)
    await store.mark_uploaded(batch.batch_id)
    await store.complete_batch(batch.batch_id, list_id=7)
    await clock.advance(1.0)
    run = await store.start_reconcile_run(AUDIENCE, 7, "job", clock.time())
    await store.apply_readback(
        run.run_id, [account(k) for k in listed], judged_before=clock.time(), repair_limit=0
    )


def test_the_delays_are_one_per_try_and_the_last_repeats() -> None:
    assert next_retry_at(10.0, 0, DELAYS) == 110.0
    assert next_retry_at(10.0, 1, DELAYS) == 310.0
    assert next_retry_at(10.0, 7, DELAYS) == 310.0
    assert next_retry_at(10.0, 0, ()) is None


async def test_an_unmatched_account_is_released_when_due_and_leaves_the_set_once_listed(
    store: Store, clock: FakeClock
) -> None:
    """B is missing and set aside at t=1001. Not due before t=1101; then it goes back to
    the queue (retried once, still listed by ``rejected`` as retrying). Missing again, it
    is set aside with the next delay (300 s). Released again and found listed, it is
    verified and leaves the set; the ledger counts 2 retries and balances throughout."""
    await store.append_changes(
        [Change(audience_id=AUDIENCE, account=account(k), member=True, ts=1.0) for k in "AB"]
    )
    await store.fold_pending()
    await deliver_and_read_back(store, clock, ["A"])
    [set_aside] = await store.rejected(AUDIENCE)
    assert (set_aside.retries, set_aside.retrying, set_aside.rejected_at) == (0, False, 1001.0)
    assert await store.retry_due_in(AUDIENCE, DELAYS) == 100.0
    assert await store.retry_due_in(AUDIENCE, ()) == float("inf")
    assert await store.release_retries(AUDIENCE, DELAYS, 10) == 0, "not due yet"

    await clock.advance(100.0)
    assert await store.retry_due_in(AUDIENCE, DELAYS) == 0.0
    assert await store.release_retries(AUDIENCE, DELAYS, 10) == 1
    assert (await store.backlog(AUDIENCE)).inserts == 1
    [retrying] = await store.rejected(AUDIENCE)
    assert (retrying.retries, retrying.retrying) == (1, True)
    assert await store.retry_due_in(AUDIENCE, DELAYS) == float("inf"), "nothing waits"
    assert (await store.ledger_check(AUDIENCE)).balanced

    await deliver_and_read_back(store, clock, ["A"])  # still missing: set aside again
    [again] = await store.rejected(AUDIENCE)
    assert (again.retries, again.retrying) == (1, False)
    assert await store.retry_due_in(AUDIENCE, DELAYS) == 300.0

    await clock.advance(300.0)
    assert await store.release_retries(AUDIENCE, DELAYS, 10) == 1
    await deliver_and_read_back(store, clock, ["A", "B"])  # Demandbase matches it now
    assert await store.rejected(AUDIENCE) == []
    assert (await store.backlog(AUDIENCE)).rejected == 0
    check = await store.ledger_check(AUDIENCE)
    assert check.balanced, check
    assert (check.counts.retried, check.counts.verified) == (2, 2)


async def test_a_version_8_file_gains_the_retries_column(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        for script in MIGRATIONS[:8]:
            db.executescript(script)
        db.execute(
            "INSERT INTO rejected (audience_id, external_id, name, domain, member, reason,"
            " rejected_at, attempts) VALUES ('a', 'X', 'X Inc.', 'x.example', 1, 'unmatched: x',"
            " 5.0, 4)"
        )
        db.execute("PRAGMA user_version = 8")
    async with Store.open(path, clock=clock) as store:
        [row] = await store.rejected("a")
        assert (row.retries, row.retrying, row.attempts) == (0, False, 4)

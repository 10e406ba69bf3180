"""The store on real SQLite files: journal, folding, the dirty set, batches, ledger, quotas."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dbsync.clock import FakeClock, SystemClock
from dbsync.errors import StoreError
from dbsync.folder import Folder
from dbsync.model import Account, AudienceSpec, AudienceState, BatchState, Change, ListAction
from dbsync.store import Store
from dbsync.store.schema import MIGRATIONS

AUDIENCE = "aud-1"


def change(key: str, member: bool, *, ts: float = 1.0, audience: str = AUDIENCE) -> Change:
    account = Account(external_id=key, name=f"{key} Inc.", domain=f"{key.lower()}.example")
    return Change(audience_id=audience, account=account, member=member, ts=ts)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_000_000.0)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "state" / "dbsync.sqlite3", clock=clock) as store:
        await store.sync_audiences(
            [AudienceSpec(audience_id=AUDIENCE, destination="d", name="A", list_name="List A")]
        )
        yield store


async def deliver(store: Store, action: ListAction, max_rows: int = 1000) -> list[str]:
    """Plan, upload and complete one batch; the keys it carried."""
    batch = await store.plan_batch(AUDIENCE, action, max_rows)
    assert batch is not None
    await store.mark_created(batch.batch_id, 1)
    await store.mark_uploaded(batch.batch_id)
    await store.complete_batch(batch.batch_id, list_id=7)
    return [a.external_id for a in batch.accounts]


async def test_a_new_file_is_created_and_migrated(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "deep" / "dir" / "db.sqlite3"
    async with Store.open(path, clock=clock):
        pass
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA page_size").fetchone()[0] == 16_384  # a new file's
    async with Store.open(path, clock=clock):  # opening an existing v1 file works
        pass


async def test_a_newer_schema_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "db.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        async with Store.open(path, clock=clock):
            pass


async def test_concurrent_appends_share_transactions(store: Store) -> None:
    before = store.transactions
    async with asyncio.TaskGroup() as services:
        services.create_task(store.committer.run())  # as the daemon runs it
        counts = await asyncio.gather(
            *(store.append_changes([change(f"K{i}", True)]) for i in range(200))
        )
        store.committer.stop()
    assert sum(counts) == 200
    assert await store.pending_journal_rows() == 200
    # The first caller commits alone; everyone who arrived meanwhile shares the next.
    assert store.transactions - before <= 3


async def test_a_stopped_committer_commits_its_queue_and_later_appends_alone(
    store: Store,
) -> None:
    """The daemon stops the group commit after its drain: what is queued is written
    before run() returns, and an append arriving later still commits (alone)."""
    async with asyncio.TaskGroup() as services:
        committing = services.create_task(store.committer.run())
        queued = [
            asyncio.create_task(store.append_changes([change(f"Q{i}", True)])) for i in range(5)
        ]
        await asyncio.sleep(0)  # the appends are queued
        store.committer.stop()
        await committing
        assert await asyncio.gather(*queued) == [1] * 5
    before = store.transactions
    assert await store.append_changes([change("LATE", True)]) == 1
    assert store.transactions - before == 1
    assert await store.pending_journal_rows() == 6


async def test_a_cancelled_committer_fails_its_callers_instead_of_leaving_them_waiting(
    store: Store,
) -> None:
    committing = asyncio.create_task(store.committer.run())
    await asyncio.sleep(0)  # running
    waiting = [asyncio.create_task(store.append_changes([change(f"W{i}", True)])) for i in range(3)]
    await asyncio.sleep(0)  # queued behind a commit that never starts
    committing.cancel()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results), results
    with pytest.raises(asyncio.CancelledError):
        await committing


async def test_a_failed_group_commit_writes_nothing_and_fails_every_caller(
    store: Store,
) -> None:
    def broken(group: object, db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO changes (audience_id) VALUES ('half written')")
        raise sqlite3.OperationalError("disk I/O error")

    import dbsync.store.journal as module

    original = module.insert_changes
    module.insert_changes = broken  # type: ignore[assignment]
    try:
        async with asyncio.TaskGroup() as services:
            services.create_task(store.committer.run())
            results = await asyncio.gather(
                store.append_changes([change("A", True)]),
                store.append_changes([change("B", True)]),
                return_exceptions=True,
            )
            store.committer.stop()
    finally:
        module.insert_changes = original
    assert all(isinstance(r, StoreError) for r in results)
    assert await store.pending_journal_rows() == 0


async def test_accepted_changes_survive_a_reopen(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "db.sqlite3"
    async with Store.open(path, clock=clock) as store:
        await store.append_changes([change(f"K{i}", True) for i in range(50)])
    async with Store.open(path, clock=clock) as store:
        assert await store.pending_journal_rows() == 50
        await store.fold_pending()
        assert len(await store.desired_members(AUDIENCE)) == 50


async def test_a_read_sees_every_commit_before_it_while_other_reads_overlap(
    store: Store,
) -> None:
    """Every actor reads its backlog on the one read connection at once. A read that
    starts after a commit must see it, however the other reads interleave: were a
    read's statement left open between two hops to the connection's thread, the
    others would share its old snapshot, and an actor woken for new changes would
    find none and sleep on them."""
    stop = asyncio.Event()

    async def reader() -> None:
        while not stop.is_set():
            await store.backlog(AUDIENCE)

    readers = [asyncio.create_task(reader()) for _ in range(8)]
    try:
        for i in range(30):
            await store.append_changes([change(f"K{i}", True)])
            await store.fold_pending()
            assert (await store.backlog(AUDIENCE)).inserts == i + 1, f"stale after {i} commits"
    finally:
        stop.set()
        await asyncio.gather(*readers)


async def test_a_thousand_flips_fold_into_one_row(store: Store) -> None:
    flips = [change("FLIP", i % 2 == 1, ts=float(i)) for i in range(1000)]
    await store.append_changes(flips)
    assert await store.fold_pending() == {AUDIENCE: 1000}
    backlog = await store.backlog(AUDIENCE)
    assert (backlog.inserts, backlog.deletes) == (1, 0)
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 100)
    assert batch is not None
    assert [a.external_id for a in batch.accounts] == ["FLIP"]
    ledger = await store.ledger(AUDIENCE)
    assert (ledger.received, ledger.superseded) == (1000, 999)


async def test_removing_an_account_never_delivered_costs_nothing(store: Store) -> None:
    await store.append_changes([change("GHOST", False)])
    await store.fold_pending()
    assert (await store.backlog(AUDIENCE)).pending == 0


async def test_completion_marks_delivered_and_advances_the_checkpoint(store: Store) -> None:
    await store.append_changes([change("A", True), change("B", True)])
    await store.fold_pending()
    assert await store.checkpoint(AUDIENCE) == 0
    assert sorted(await deliver(store, ListAction.INSERT)) == ["A", "B"]
    assert (await store.backlog(AUDIENCE)).pending == 0
    assert await store.checkpoint(AUDIENCE) == 2
    ledger = await store.ledger(AUDIENCE)
    assert (ledger.exported, ledger.acknowledged) == (2, 2)
    assert (await store.audiences())[AUDIENCE].list_id == 7


async def test_nothing_is_delivered_before_the_acknowledgment(store: Store) -> None:
    await store.append_changes([change("A", True)])
    await store.fold_pending()
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 10)
    assert batch is not None
    await store.mark_created(batch.batch_id, 1)
    await store.mark_uploaded(batch.batch_id)
    backlog = await store.backlog(AUDIENCE)
    assert (backlog.pending, backlog.in_flight) == (0, 1)
    assert await store.checkpoint(AUDIENCE) == 0
    [open_batch] = await store.open_batches(AUDIENCE)
    assert (open_batch.state, open_batch.job_id) == (BatchState.UPLOADED, 1)
    # A second plan does not carry an account already in flight.
    assert await store.plan_batch(AUDIENCE, ListAction.INSERT, 10) is None


async def test_an_account_that_flipped_in_flight_is_sent_again(store: Store) -> None:
    """1. A is planned for insert  2. the CDP removes A  3. the insert job completes.
    Result: Demandbase holds A, the CDP does not want it: A is pending as a delete."""
    await store.append_changes([change("A", True)])
    await store.fold_pending()
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 10)
    assert batch is not None
    await store.append_changes([change("A", False, ts=2.0)])
    await store.fold_pending()
    await store.complete_batch(batch.batch_id, list_id=None)
    backlog = await store.backlog(AUDIENCE)
    assert (backlog.inserts, backlog.deletes) == (0, 1)
    assert await deliver(store, ListAction.DELETE) == ["A"]
    assert (await store.backlog(AUDIENCE)).pending == 0


async def test_completing_twice_counts_once(store: Store) -> None:
    await store.append_changes([change("A", True)])
    await store.fold_pending()
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 10)
    assert batch is not None
    assert await store.complete_batch(batch.batch_id, list_id=None) == 1
    assert await store.complete_batch(batch.batch_id, list_id=None) == 0
    assert (await store.ledger(AUDIENCE)).acknowledged == 1


async def test_a_failed_job_puts_its_accounts_back(store: Store) -> None:
    await store.append_changes([change("A", True), change("B", True)])
    await store.fold_pending()
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 10)
    assert batch is not None
    await store.fail_batch(batch.batch_id, "failed")
    assert (await store.backlog(AUDIENCE)).inserts == 2
    assert (await store.ledger(AUDIENCE)).failed == 2
    assert await store.open_batches(AUDIENCE) == []


async def test_bisection_splits_then_rejects_the_culprit(store: Store) -> None:
    await store.append_changes([change(k, True) for k in "ABCD"])
    await store.fold_pending()
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 10)
    assert batch is not None
    left, right = await store.split_batch(batch.batch_id)
    assert [a.external_id for a in left.accounts] == ["A", "B"]
    assert [a.external_id for a in right.accounts] == ["C", "D"]
    single, _ = await store.split_batch(left.batch_id)
    await store.reject_batch(single.batch_id, "Row 2: Account Domain is required")
    [rejected] = await store.rejected(AUDIENCE)
    assert rejected.account.external_id == "A"
    assert rejected.reason == "Row 2: Account Domain is required"
    backlog = await store.backlog(AUDIENCE)
    assert (backlog.rejected, backlog.in_flight, backlog.pending) == (1, 3, 0)
    # The same account sent again unchanged stays aside; changed, it gets another try.
    await store.append_changes([change("A", True)])
    await store.fold_pending()
    assert (await store.backlog(AUDIENCE)).rejected == 1
    fixed = Change(
        audience_id=AUDIENCE,
        account=Account(external_id="A", name="A Inc.", domain="a-fixed.example"),
        member=True,
        ts=3.0,
    )
    await store.append_changes([fixed])
    await store.fold_pending()
    backlog = await store.backlog(AUDIENCE)
    assert (backlog.rejected, backlog.inserts) == (0, 1)
    assert await store.rejected(AUDIENCE) == []


async def test_requeue_puts_rejected_accounts_back(store: Store) -> None:
    await store.append_changes([change("A", True)])
    await store.fold_pending()
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 10)
    assert batch is not None
    await store.reject_batch(batch.batch_id, "refused")
    assert await store.requeue(AUDIENCE) == 1
    backlog = await store.backlog(AUDIENCE)
    assert (backlog.rejected, backlog.inserts) == (0, 1)
    assert (await store.ledger(AUDIENCE)).requeued == 1


async def test_snapshot_applies_the_difference_including_unfolded_changes(
    store: Store,
) -> None:
    await store.append_changes([change(k, True) for k in "ABC"])
    await store.fold_pending()
    await store.append_changes([change("D", True)])  # not folded yet
    accounts = [Account(external_id=k) for k in ("B", "C", "E")]
    result = await store.replace_members(AUDIENCE, accounts, ts=5.0)
    assert (result.members, result.added, result.removed, result.unchanged) == (3, 1, 2, 2)
    await store.fold_pending()
    assert await store.desired_members(AUDIENCE) == {"B", "C", "E"}


async def test_resync_sends_every_member_again(store: Store) -> None:
    await store.append_changes([change(k, True) for k in "AB"])
    await store.fold_pending()
    await deliver(store, ListAction.INSERT)
    assert await store.resync(AUDIENCE) == 2
    assert (await store.backlog(AUDIENCE)).inserts == 2


async def test_read_back_repairs_are_counted(store: Store) -> None:
    await store.append_changes([change(k, True) for k in "AB"])
    await store.fold_pending()
    await deliver(store, ListAction.INSERT)
    assert await store.mark_undelivered(AUDIENCE, ["A", "NOT-THERE"], member=True) == 1
    assert (await store.backlog(AUDIENCE)).inserts == 1
    assert (await store.ledger(AUDIENCE)).repaired == 1


async def test_audiences_sync_renames_and_deactivates_without_deleting(store: Store) -> None:
    result = await store.sync_audiences(
        [
            AudienceSpec(audience_id=AUDIENCE, destination="d", name="A v2", list_name="other"),
            AudienceSpec(audience_id="aud-2", destination="d", name="B", list_name="List B"),
        ]
    )
    assert result.added == ["aud-2"]
    assert result.renamed == [(AUDIENCE, "A", "A v2")]
    records = await store.audiences()
    assert records[AUDIENCE].list_name == "List A"  # fixed at first activation
    result = await store.sync_audiences(
        [AudienceSpec(audience_id="aud-2", destination="d", name="B", list_name="List B")]
    )
    assert result.deactivated == [AUDIENCE]
    assert (await store.audiences())[AUDIENCE].state is AudienceState.DEACTIVATED
    result = await store.sync_audiences(
        [AudienceSpec(audience_id=AUDIENCE, destination="d", name="A v2", list_name="List A")]
    )
    assert result.reactivated == [AUDIENCE]


async def test_quota_spending_survives_a_reopen(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "db.sqlite3"
    async with Store.open(path, clock=clock) as store:
        for _ in range(3):
            await store.spend_quota("d", "import.upload", 100)
        await store.spend_quota("d", "import.upload", 101)
        await store.save_pace("d", 250.0)
    async with Store.open(path, clock=clock) as store:
        assert await store.quota_usage("d", 100) == {"import.upload": 3}
        assert await store.quota_usage("d", 101) == {"import.upload": 1}
        assert await store.load_pace("d") == 250.0
        assert await store.load_pace("other") is None


async def test_the_folder_wakes_the_audiences_it_touched(store: Store) -> None:
    woken: asyncio.Queue[set[str]] = asyncio.Queue()
    folder = asyncio.create_task(Folder(store, woken.put_nowait, SystemClock()).run())
    await store.append_changes([change("A", True), change("B", True, audience="aud-2")])
    assert await asyncio.wait_for(woken.get(), 5) == {AUDIENCE, "aud-2"}
    folder.cancel()
    await asyncio.gather(folder, return_exceptions=True)
    assert await store.pending_journal_rows() == 0


async def test_the_ledger_balances_through_a_batch_life(store: Store) -> None:
    await store.append_changes([change(k, True) for k in "ABC"])
    await store.fold_pending()
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 2)
    assert batch is not None
    await store.mark_created(batch.batch_id, 1)
    await store.mark_uploaded(batch.batch_id)
    assert await store.ledger_imbalance(AUDIENCE) == 0  # 2 exported, 2 processing
    await store.fail_batch(batch.batch_id, "failed")
    assert await store.ledger_imbalance(AUDIENCE) == 0  # 2 exported, 2 failed
    await deliver(store, ListAction.INSERT)
    assert await store.ledger_imbalance(AUDIENCE) == 0
    await store.add_to_ledger(AUDIENCE, exported=1)  # a row nobody accounts for
    assert await store.ledger_imbalance(AUDIENCE) == 1


async def test_the_last_batch_is_the_newest_finished_one(store: Store) -> None:
    """status shows it: the newest batch whose job completed or failed, not one in flight."""
    assert await store.last_batch(AUDIENCE) is None
    await store.append_changes([change(f"K{i}", True) for i in range(3)])
    await store.fold_pending()
    await deliver(store, ListAction.INSERT)
    await store.append_changes([change("K0", False)])
    await store.fold_pending()
    failing = await store.plan_batch(AUDIENCE, ListAction.DELETE, 10)
    assert failing is not None
    await store.mark_created(failing.batch_id, 2)
    await store.mark_uploaded(failing.batch_id)
    await store.fail_batch(failing.batch_id, "Demandbase failed the job")
    await store.plan_batch(AUDIENCE, ListAction.DELETE, 10)  # in flight: not finished

    last = await store.last_batch(AUDIENCE)
    assert last is not None
    assert (last.batch_id, last.action, last.state, last.rows, last.job_id) == (
        failing.batch_id,
        ListAction.DELETE,
        BatchState.FAILED,
        1,
        2,
    )


async def test_summaries_read_many_audiences_as_their_own_reads_do(store: Store) -> None:
    """The summary lines read every audience's backlog and ledger in one statement: the
    figures are those of backlog() and ledger_check(recount=False), audience by audience."""
    await store.sync_audiences(
        [
            AudienceSpec(audience_id=AUDIENCE, destination="d", name="A", list_name="List A"),
            AudienceSpec(audience_id="aud-2", destination="d", name="B", list_name="List B"),
            AudienceSpec(audience_id="aud-3", destination="d", name="C", list_name="List C"),
        ]
    )
    await store.append_changes(
        [change(f"K{i}", True) for i in range(5)]
        + [change(f"K{i}", True, audience="aud-2") for i in range(3)]
    )
    await store.fold_pending()
    await deliver(store, ListAction.INSERT)
    await store.append_changes([change("K0", False), change("K9", True)])
    await store.fold_pending()
    await store.plan_batch("aud-2", ListAction.INSERT, 2)  # two in flight, one pending

    ids = [AUDIENCE, "aud-2", "aud-3"]
    figures = await store.summaries(ids)
    assert list(figures) == ids
    for audience_id in ids:
        backlog, check = figures[audience_id]
        assert backlog == await store.backlog(audience_id)
        assert check == await store.ledger_check(audience_id, recount=False)
    assert (figures[AUDIENCE][0].inserts, figures[AUDIENCE][0].deletes) == (1, 1)
    assert (figures["aud-2"][0].pending, figures["aud-2"][0].in_flight) == (1, 2)
    assert figures[AUDIENCE][1].counts.acknowledged == 5

"""The store's side of read-back, on real SQLite files: judging a list, repairs, the ledger.

Time is a fake clock, so "acknowledged before the cutoff" is exact: accounts are
delivered at t=1000, the clock moves to 2000, more are delivered, and a read-back
judges what was acknowledged before 1500.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import dbsync.store.readback as readback_module
from dbsync.clock import FakeClock
from dbsync.errors import StoreError
from dbsync.model import Account, AudienceSpec, Change, ListAction, ListedAccount, ReadbackVerdict
from dbsync.store import JUDGE_CHUNK_ROWS, Store
from dbsync.store.schema import MIGRATIONS

AUDIENCE = "aud-1"
CUTOFF = 1500.0


def account(key: str) -> Account:
    return Account(external_id=key, name=f"{key} Inc.", domain=f"{key.lower()}.example")


def change(key: str, member: bool, *, ts: float = 1.0) -> Change:
    return Change(audience_id=AUDIENCE, account=account(key), member=member, ts=ts)


@pytest.fixture(autouse=True, params=[JUDGE_CHUNK_ROWS, 2], ids=["one-chunk", "chunks-of-2"])
def chunk_rows(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Every judgment here runs twice: in one transaction, and two accounts at a time."""
    rows: int = request.param
    monkeypatch.setattr("dbsync.store.readback.JUDGE_CHUNK_ROWS", rows)
    return rows


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_000.0)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "dbsync.sqlite3", clock=clock) as store:
        await store.sync_audiences(
            [
                AudienceSpec(audience_id=AUDIENCE, destination="d", name="A", list_name="A"),
                AudienceSpec(audience_id="aud-2", destination="d", name="B", list_name="B"),
            ]
        )
        yield store


async def apply(store: Store, changes: list[Change]) -> None:
    await store.append_changes(changes)
    await store.fold_pending()


async def deliver(store: Store, action: ListAction) -> list[str]:
    batch = await store.plan_batch(AUDIENCE, action, 1000)
    assert batch is not None
    await store.mark_created(batch.batch_id, 1)
    await store.mark_uploaded(batch.batch_id)
    await store.complete_batch(batch.batch_id, list_id=7)
    return [a.external_id for a in batch.accounts]


async def read_back(
    store: Store, listed: Sequence[Account | ListedAccount], repair_limit: int = 3
) -> ReadbackVerdict:
    run = await store.start_reconcile_run(AUDIENCE, 7, "job", CUTOFF)
    verdict = await store.apply_readback(
        run.run_id, listed, judged_before=CUTOFF, repair_limit=repair_limit
    )
    assert verdict is not None
    assert (
        await store.apply_readback(run.run_id, listed, judged_before=CUTOFF, repair_limit=3) is None
    )
    return verdict


async def test_a_list_is_judged_by_age_and_state_and_wrong_accounts_are_repaired(
    store: Store, clock: FakeClock
) -> None:
    """Acknowledged at t=1000: members A, B, G, and E (then removed, removal acknowledged);
    F was added and removed before any send. At t=2000: C acknowledged, D pending.
    The list holds A, E, F, a stranger, C (young) and G under another external id but
    the same domain and name in other case.
    Result: A and G verified; B lost (dropped) and queued again; E lost (not removed)
    and queued for removal; F and the stranger are extra, queued for removal; C too
    young, D unsettled; the ledger balances and the pending counters agree."""
    await apply(store, [change(k, True) for k in "ABEG"])
    await deliver(store, ListAction.INSERT)
    await apply(store, [change("E", False), change("F", True), change("F", False)])
    await deliver(store, ListAction.DELETE)  # E's removal
    await clock.advance(1000.0)  # later acknowledgments
    await apply(store, [change("C", True)])
    await deliver(store, ListAction.INSERT)
    await apply(store, [change("D", True)])

    g = account("G")
    listed = [
        account("A"),
        account("E"),
        account("F"),
        account("C"),
        Account(external_id="NOBODY", name="Nobody", domain="nobody.example"),
        Account(external_id="DB-G", name=g.name.upper(), domain=f"  {g.domain.upper()}"),
    ]
    verdict = await read_back(store, listed)
    assert (verdict.listed, verdict.expected, verdict.verified) == (6, 3, 2)
    assert verdict.lost == {"dropped": 1, "not_removed": 1}
    assert (verdict.repaired, verdict.extra_removed) == (2, 2)
    assert (verdict.too_young, verdict.unsettled) == (1, 1)
    assert verdict.unmatched == ()
    assert verdict.not_removable == ()

    backlog = await store.backlog(AUDIENCE)
    assert (backlog.inserts, backlog.deletes) == (2, 3)  # B and D; E, F and NOBODY
    check = await store.ledger_check(AUDIENCE)
    assert check.balanced, check
    counts = check.counts
    assert (counts.acknowledged, counts.verified, counts.lost, counts.extra) == (6, 2, 2, 2)
    # E's removal overtook its insertion's acknowledgment; C's awaits the next read-back.
    assert (counts.overtaken, check.awaiting, counts.repaired) == (1, 1, 2)


async def test_an_account_missing_past_the_repair_limit_is_set_aside_then_requeued(
    store: Store,
) -> None:
    """Repair limit 1: B is missing, repaired once; missing again, it is set aside as
    unmatched with its identifiers; a requeue sends it again with its repairs reset."""
    await apply(store, [change(k, True) for k in "AB"])
    for _ in range(2):
        await deliver(store, ListAction.INSERT)
        verdict = await read_back(store, [account("A")], repair_limit=1)
    assert verdict.unmatched == (account("B"),)
    assert verdict.lost == {"dropped": 1}
    assert verdict.repaired == 0
    [rejected] = await store.rejected(AUDIENCE)
    assert rejected.account == account("B")
    assert rejected.reason.startswith("unmatched: ")
    assert rejected.attempts == 2
    backlog = await store.backlog(AUDIENCE)
    assert (backlog.pending, backlog.rejected) == (0, 1)
    check = await store.ledger_check(AUDIENCE)
    assert check.balanced, check
    assert check.counts.rejected_by_reason == {"unmatched": 1}

    verdict = await read_back(store, [account("A")], repair_limit=1)
    assert (verdict.lost, verdict.unsettled) == ({}, 1), "set aside: not judged, not sent"

    assert await store.requeue(AUDIENCE) == 1
    assert (await store.backlog(AUDIENCE)).inserts == 1
    await deliver(store, ListAction.INSERT)
    verdict = await read_back(store, [account("A")], repair_limit=1)
    assert (verdict.repaired, verdict.unmatched) == (1, ()), "repairs start again"
    assert (await store.ledger_check(AUDIENCE)).balanced


async def test_a_429_marks_the_destinations_open_batches_and_the_tallies_split_on_it(
    store: Store,
) -> None:
    await apply(store, [change(k, True) for k in "ABCD"])
    batch = await store.plan_batch(AUDIENCE, ListAction.INSERT, 2)
    assert batch is not None
    await store.mark_created(batch.batch_id, 1)
    await store.mark_uploaded(batch.batch_id)
    await store.add_to_ledger("aud-2", throttled=1)  # another audience of the destination
    await store.complete_batch(batch.batch_id, list_id=7)
    await deliver(store, ListAction.INSERT)  # the other two, not throttled
    await read_back(store, [account("A"), account("C"), account("D")])
    tallies = {t.throttled: t for t in await store.loss_tallies("d")}
    assert (tallies[True].acknowledged, tallies[True].verified, tallies[True].lost) == (2, 1, 1)
    assert (tallies[False].acknowledged, tallies[False].verified, tallies[False].lost) == (2, 2, 0)
    assert await store.loss_tallies("other") == []


async def test_a_version_2_file_migrates_with_a_balanced_ledger(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A store written before read-back existed: 2 delivered members, 5 rows acknowledged
    over time, one earlier hand repair and one refused row. After the migration every
    sum holds, and the delivered members await their first verdict."""
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path, isolation_level=None) as db:
        for script in MIGRATIONS[:2]:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute("PRAGMA user_version = 2")
        db.execute(
            "INSERT INTO audiences (audience_id, destination, name, list_name, state,"
            " updated_at) VALUES (?, 'd', 'A', 'A', 'active', 1)",
            (AUDIENCE,),
        )
        db.executemany(
            "INSERT INTO membership (audience_id, external_id, name, domain, desired, seq,"
            " changed_at, delivered) VALUES (?, ?, ?, ?, 1, 1, 1, ?)",
            [(AUDIENCE, "A", "A", "a.example", 1), (AUDIENCE, "B", "B", "b.example", 1)],
        )
        db.executemany(
            "INSERT INTO ledger (audience_id, counter, value) VALUES (?, ?, ?)",
            [
                (AUDIENCE, "exported", 6),
                (AUDIENCE, "acknowledged", 5),
                (AUDIENCE, "failed", 1),
                (AUDIENCE, "repaired", 1),
                (AUDIENCE, "rejected", 1),
            ],
        )
    db.close()
    async with Store.open(path, clock=clock) as store:
        check = await store.ledger_check(AUDIENCE)
        assert check.balanced, check
        assert (check.awaiting, check.counts.overtaken) == (2, 3)
        assert check.counts.lost_by_cause == {"reported": 1}
        assert check.counts.rejected_by_reason == {"refused": 1}
        facts = await store.reconcile_facts([AUDIENCE])
        assert facts[0].first_acked_at is not None


async def test_members_without_an_external_id_are_matched_by_domain_and_name(
    store: Store, clock: FakeClock
) -> None:
    """Demandbase may hold a member with no External Account ID (it matched our row by
    domain and name). The list holds A by id, B without one, and a stranger without one.
    Result: A and B verified, nothing lost; the stranger, which no delete row could
    name, is left alone and counted as kept, not removed."""
    await apply(store, [change(k, True) for k in "AB"])
    await deliver(store, ListAction.INSERT)
    b = account("B")
    listed = [
        ListedAccount(external_id="A", name=account("A").name, domain=account("A").domain),
        ListedAccount(external_id="", name=b.name, domain=b.domain),
        ListedAccount(external_id="", name="Someone Else", domain="else.example"),
    ]
    verdict = await read_back(store, listed)
    assert (verdict.expected, verdict.verified, verdict.lost) == (2, 2, {})
    assert (verdict.extra_removed, verdict.extra_kept) == (0, 1)
    assert (await store.backlog(AUDIENCE)).pending == 0
    assert (await store.ledger_check(AUDIENCE)).balanced


@pytest.mark.parametrize("chunk_rows", [2], indirect=True, ids=["chunks-of-2"])
async def test_a_judgment_cut_by_a_crash_resumes_where_it_stopped(
    store: Store, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seven members acknowledged; the list lost B and F and holds a stranger. The
    judgment, two accounts a transaction, fails after its first chunk (the store's
    writer dies), and the read-back is applied again, as a resumed run is.
    Result: the second call judges only the rest, and its verdict and the ledger are
    those of one whole judgment: 5 verified, 2 lost, 1 extra; a third call finds the
    run judged."""
    await apply(store, [change(k, True) for k in "ABCDEFG"])
    await deliver(store, ListAction.INSERT)
    await clock.advance(1000.0)
    listed = [account(k) for k in "ACDEG"]
    listed.append(Account(external_id="NOBODY", name="Nobody", domain="nobody.example"))
    run = await store.start_reconcile_run(AUDIENCE, 7, "job", CUTOFF)

    apply_chunk = readback_module._apply_chunk
    calls = 0

    def dies_after_one(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise sqlite3.OperationalError("disk I/O error")
        return apply_chunk(*args)

    monkeypatch.setattr(readback_module, "_apply_chunk", dies_after_one)
    with pytest.raises(StoreError, match="disk I/O error"):
        await store.apply_readback(run.run_id, listed, judged_before=CUTOFF, repair_limit=3)
    cut = await store.ledger_check(AUDIENCE)
    assert cut.balanced, cut
    assert (cut.counts.verified, cut.counts.lost) == (1, 1)  # the first chunk: A, B

    verdict = await store.apply_readback(run.run_id, listed, judged_before=CUTOFF, repair_limit=3)
    assert verdict is not None
    assert (verdict.listed, verdict.expected, verdict.verified) == (6, 7, 5)
    assert verdict.lost == {"dropped": 2}
    assert (verdict.repaired, verdict.extra_removed) == (2, 1)
    check = await store.ledger_check(AUDIENCE)
    assert check.balanced, check
    assert (check.counts.verified, check.counts.lost, check.counts.extra) == (5, 2, 1)
    backlog = await store.backlog(AUDIENCE)
    assert (backlog.inserts, backlog.deletes) == (2, 1)  # B and F again; NOBODY out
    assert (
        await store.apply_readback(run.run_id, listed, judged_before=CUTOFF, repair_limit=3) is None
    )


async def test_an_unmatched_account_counts_as_lost_once_however_many_read_backs_miss_it(
    store: Store,
) -> None:
    """20 accounts, 10 of them never listed (Demandbase matches none of them); repair
    limit 3, so four read-backs miss each of the 10 before it is set aside. The loss
    estimate counts each of them lost once: the rate after the fourth read-back is the
    rate after the first (500 per thousand), not 10 + 30 losses over 20 + 30 judged."""
    keys = [f"K{i:02}" for i in range(20)]
    listed = [account(k) for k in keys[:10]]
    await apply(store, [change(k, True) for k in keys])
    rates = []
    for _ in range(4):
        await deliver(store, ListAction.INSERT)
        await read_back(store, listed, repair_limit=3)
        [tally] = await store.loss_tallies("d")
        rates.append(1000 * tally.lost / (tally.verified + tally.lost))
    assert rates == [500.0] * 4
    assert len(await store.rejected(AUDIENCE)) == 10
    check = await store.ledger_check(AUDIENCE)
    assert check.balanced, check
    assert check.counts.lost == 40, "the ledger still counts every verdict"

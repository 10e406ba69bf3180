"""What becomes an import job: the difference, not the log; adds and removes apart.

ARCHITECTURE invariant 3: an actor sends what differs between desired and delivered
state, so many changes to one account cost one row. And a batch is one ``listAction``,
``insert`` or ``delete``, never Demandbase's default ``replace``, which would empty
the list of everything the batch does not carry.
"""

from __future__ import annotations

from pathlib import Path

from dbsync.model import Backlog
from dbsync.testing import AudienceConfig, running_engine

TIMEOUT = 10.0


async def test_a_thousand_changes_to_one_account_become_one_row_of_one_job(
    tmp_path: Path,
) -> None:
    """1. An audience that never flushes by itself (max_age 3600 s, max_records 100,000).
    2. One request: 1,000 changes of one account, member true and false in turn, the
    last one true.
    3. Once folded, the backlog holds one pending insert and nothing went out.
    4. Flush the audience.
    Result: Demandbase received one import job for the list, carrying one row, and
    the list holds the account; the ledger received 1,000 changes, 999 superseded."""
    audience = AudienceConfig("compaction", max_records=100_000, max_age_seconds=3600)
    async with running_engine(tmp_path, [audience]) as engine:
        (account,) = await engine.tenant_accounts(1)
        await engine.cdp.changes((audience.id, account, i % 2 == 1) for i in range(1_000))
        await engine.wait_folded()

        backlog = await engine.store.backlog(audience.id)
        assert backlog == Backlog(inserts=1, deletes=0, oldest_changed_at=backlog.oldest_changed_at)
        ledger = await engine.store.ledger(audience.id)
        assert (ledger.received, ledger.superseded) == (1_000, 999)
        assert engine.emulator.emulator.tenant.import_jobs == []

        actor = engine.supervisor.actor(audience.id)
        assert actor is not None
        actor.flush()
        await engine.wait_settled(timeout=TIMEOUT)

        jobs = [
            job
            for job in engine.emulator.emulator.tenant.import_jobs
            if job.data_import_name == audience.list
        ]
        assert [(job.list_action, job.rows, job.matched) for job in jobs] == [
            ("insert", 1, [account.external_id])
        ]
        assert (await engine.lists())[audience.list] == {account.external_id}
        ledger = await engine.store.ledger(audience.id)
        assert (ledger.exported, ledger.acknowledged) == (1, 1)


async def test_adds_and_removes_travel_in_separate_insert_and_delete_jobs(
    tmp_path: Path,
) -> None:
    """1. Add 20 accounts; wait until the list holds them.
    2. One request removes 8 of them and adds 12 others.
    Result: every import job Demandbase saw says insert or delete (never replace);
    after step 2 the delete jobs carry exactly the 8 removed accounts and the insert
    jobs exactly the 12 added ones; the list ends equal to the desired state."""
    audience = AudienceConfig("separate", max_records=50)
    async with running_engine(tmp_path, [audience]) as engine:
        tenant = engine.emulator.emulator.tenant
        first, later = await engine.tenant_accounts(20), await engine.tenant_accounts(12, 20)
        await engine.cdp.changes((audience.id, a, True) for a in first)
        await engine.wait_settled(timeout=TIMEOUT)
        before = {job.id for job in tenant.import_jobs}

        removed = first[:8]
        await engine.cdp.changes(
            [(audience.id, a, False) for a in removed] + [(audience.id, a, True) for a in later]
        )
        await engine.wait_settled(timeout=TIMEOUT)

        jobs = tenant.import_jobs
        assert {job.list_action for job in jobs} == {"insert", "delete"}
        step_two = [job for job in jobs if job.id not in before]
        carried = {
            action: sorted(a for job in step_two if job.list_action == action for a in job.matched)
            for action in ("insert", "delete")
        }
        assert carried == {
            "insert": sorted(a.external_id for a in later),
            "delete": sorted(a.external_id for a in removed),
        }
        assert (await engine.lists())[audience.list] == {
            a.external_id for a in [*first[8:], *later]
        }

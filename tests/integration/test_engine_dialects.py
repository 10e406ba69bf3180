"""The daemon against each emulator dialect: it works, or it stops safely.

"Works": every list equals its desired state, a read-back verified every member,
the ledger balances. "Stops safely": the audience says why in its state and an
event, nothing is lost (what was not delivered is still pending), and the jobs it
spent are bounded. One test per dialect; a last one switches a dialect on mid-run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dbsync.demandbase.emulator import DIALECTS, Faults
from dbsync.model import AudienceState
from dbsync.testing import (
    AudienceConfig,
    Engine,
    fast_export_tenant,
    last_report,
    ledger_check,
    running_engine,
    running_reconcile_engine,
    wait_until,
)
from dbsync.triage import MAX_JOBS_PER_BATCH

AUDIENCE = AudienceConfig("dialect", max_records=10, max_age_seconds=0.05)
MEMBERS = 40
TIMEOUT = 30.0

# The daemon works in these: lists right, read back clean, ledger balanced.
WORKS = (
    None,
    "no-list-id",
    "results-need-bearer",
    "results-columns",
    "results-url-null",
    "states-upper",
    "state-unknown",
    "sparse-jobs",
    "multi-list-column",
)


async def verified(engine: Engine) -> bool:
    if not await engine.settled():
        return False
    report = last_report(engine, AUDIENCE.id)
    wanted = await engine.expected_members(AUDIENCE.id)
    return (
        report is not None
        and report.lost_total == 0
        and report.unsettled == 0
        and report.verified == len(wanted)
        and not (await ledger_check(engine, AUDIENCE.id)).awaiting
    )


def tenant(*dialects: str, **faults: object) -> object:
    return fast_export_tenant(faults=Faults(dialects=frozenset(dialects), **faults))  # type: ignore[arg-type]


def test_every_dialect_has_an_outcome() -> None:
    assert {*WORKS, "list-per-job", "skip-silently", "content-fails"} == {None, *DIALECTS}


@pytest.mark.parametrize("dialect", WORKS)
async def test_the_daemon_works_in(tmp_path: Path, dialect: str | None) -> None:
    dialects = (dialect,) if dialect else ()
    async with running_reconcile_engine(tmp_path, [AUDIENCE], tenant=tenant(*dialects)) as engine:
        accounts = await engine.tenant_accounts(MEMBERS)
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts])
        await engine.cdp.changes([(AUDIENCE.id, a, False) for a in accounts[:5]])
        if dialect == "no-list-id":
            # No list id is learned: read-back cannot run, delivery still works.
            await engine.wait_settled()
            assert last_report(engine, AUDIENCE.id) is None
        else:
            await wait_until(lambda: verified(engine), TIMEOUT, what="a clean read-back")
        check = await ledger_check(engine, AUDIENCE.id)
        assert check.balanced, check.imbalances
        assert len(engine.emulator.emulator.tenant.lists) == 1


async def test_the_daemon_stops_an_audience_whose_jobs_each_create_a_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_engine(tmp_path, [AUDIENCE], tenant=tenant("list-per-job")) as engine:
        accounts = await engine.tenant_accounts(MEMBERS)
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts])
        await stopped_by_the_contract(engine)
        # One list of the audience, one stray at most; nothing lost, nothing more sent.
        assert len(engine.emulator.emulator.tenant.lists) == 2
        jobs = len(engine.emulator.emulator.tenant.import_jobs)
        backlog = await engine.store.backlog(AUDIENCE.id)
        assert backlog.pending > 0
        assert backlog.in_flight == 0
        delivered = await engine.store.desired_members(AUDIENCE.id)
        assert len(delivered) == MEMBERS
        check = await ledger_check(engine, AUDIENCE.id)
        assert check.balanced, check.imbalances
        await engine.cdp.changes([(AUDIENCE.id, a, False) for a in accounts[:3]])
        engine.supervisor.actor(AUDIENCE.id).flush()  # type: ignore[union-attr]
        await engine.wait_folded()
        assert len(engine.emulator.emulator.tenant.import_jobs) == jobs
    assert "contract_broken" in [r.getMessage() for r in caplog.records]


async def stopped_by_the_contract(engine: Engine) -> None:
    def broken() -> bool:
        states = {s.audience_id: s.state for s in engine.supervisor.statuses()}
        return states[AUDIENCE.id] is AudienceState.CONTRACT_BROKEN

    await wait_until(broken, TIMEOUT, what=lambda: f"{engine.supervisor.statuses()}")

    async def nothing_in_flight() -> bool:
        return (await engine.store.backlog(AUDIENCE.id)).in_flight == 0

    await wait_until(nothing_in_flight, TIMEOUT, what="the jobs in flight to end")


async def test_rows_a_failed_job_holds_are_set_aside_within_the_bound(tmp_path: Path) -> None:
    async with running_engine(tmp_path, [AUDIENCE], tenant=tenant("content-fails")) as engine:
        accounts = await engine.tenant_accounts(MEMBERS)
        bad = accounts[7]
        engine.emulator.emulator.set_faults(
            Faults(
                dialects=frozenset({"content-fails"}),
                reject_external_ids=frozenset({bad.external_id}),
            )
        )
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts])

        async def set_aside() -> bool:
            backlog = await engine.store.backlog(AUDIENCE.id)
            return await engine.idle() and backlog.rejected >= 1

        await wait_until(set_aside, TIMEOUT, what="the refused rows to be set aside")
        lists = await engine.lists()
        members = lists[AUDIENCE.list]
        assert bad.external_id not in members
        rejected = await engine.store.rejected(AUDIENCE.id)
        assert bad.external_id in {r.account.external_id for r in rejected}
        assert all("failed" in r.reason for r in rejected)
        # Only the accounts of failing parts are aside; every other one is delivered.
        assert members | {r.account.external_id for r in rejected} == {
            a.external_id for a in accounts
        }
        failed = [j for j in engine.emulator.emulator.tenant.import_jobs if j.state == "failed"]
        assert len(failed) <= MAX_JOBS_PER_BATCH
        check = await ledger_check(engine, AUDIENCE.id)
        assert check.balanced, check.imbalances


async def test_rows_skipped_silently_are_found_by_read_back_and_set_aside(
    tmp_path: Path,
) -> None:
    async with running_reconcile_engine(
        tmp_path, [AUDIENCE], tenant=tenant("skip-silently")
    ) as engine:
        accounts = await engine.tenant_accounts(MEMBERS)
        bad = accounts[7]
        engine.emulator.emulator.set_faults(
            Faults(
                dialects=frozenset({"skip-silently"}),
                reject_external_ids=frozenset({bad.external_id}),
            )
        )
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts])

        async def set_aside() -> bool:
            backlog = await engine.store.backlog(AUDIENCE.id)
            return await engine.idle() and backlog.rejected == 1

        await wait_until(set_aside, TIMEOUT, what="read-back to set the skipped row aside")
        members = (await engine.lists())[AUDIENCE.list]
        assert members == {a.external_id for a in accounts} - {bad.external_id}
        check = await ledger_check(engine, AUDIENCE.id)
        assert check.balanced, check.imbalances


async def test_a_tenant_that_starts_creating_a_list_per_job_costs_at_most_one_stray_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The audience delivers to its list, which it learns from the first job.
    2. The emulator switches to "each insert job creates a new list".
    Result: the next completed job reports another list; the audience stops in
    contract_broken, so one stray list exists, and nothing more is sent."""
    caplog.set_level(logging.INFO)
    async with running_engine(
        tmp_path,
        [AUDIENCE],
        tenant=tenant(),
        delivery={"max_jobs_in_flight_per_audience": 1},
    ) as engine:
        accounts = await engine.tenant_accounts(MEMBERS * 2)
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts[:MEMBERS]])
        await engine.wait_settled()
        assert len(engine.emulator.emulator.tenant.lists) == 1
        engine.emulator.emulator.set_faults(Faults(dialects=frozenset({"list-per-job"})))
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts[MEMBERS:]])
        await stopped_by_the_contract(engine)
        lists = engine.emulator.emulator.tenant.lists
        assert len(lists) == 2  # the audience's, and one stray
        jobs = len(engine.emulator.emulator.tenant.import_jobs)
        # Later changes wait: nothing more is sent to any list.
        await engine.cdp.changes([(AUDIENCE.id, a, False) for a in accounts[:3]])
        await engine.wait_folded()
        backlog = await engine.store.backlog(AUDIENCE.id)
        assert backlog.pending >= MEMBERS
        assert len(engine.emulator.emulator.tenant.import_jobs) == jobs
        check = await ledger_check(engine, AUDIENCE.id)
        assert check.balanced, check.imbalances
        # After the operator's resume (the tenant fixed), sending goes on to the first list.
        engine.emulator.emulator.set_faults(Faults())
        actor = engine.supervisor.actor(AUDIENCE.id)
        assert actor is not None
        actor.resume()
        await engine.wait_settled()
    assert "contract_broken" in [r.getMessage() for r in caplog.records]

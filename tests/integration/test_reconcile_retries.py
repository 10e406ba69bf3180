"""Accounts set aside as unmatched are tried again: a throttling loss does not stay set aside.

Every account exists in the emulated tenant, but 10% of each completed job's rows are
dropped at random. With a repair limit of 0, an account missing at its first read-back
is set aside as ``unmatched`` at once: what a throttling loss looked like for good
before retries. Days are emulated (0.5 s) and each set-aside account is tried again
after one day, then every day.
"""

from __future__ import annotations

from pathlib import Path

from dbsync.testing import (
    FAST_RECONCILE,
    HIGH,
    AudienceConfig,
    Engine,
    fast_tenant,
    last_report,
    ledger_check,
    running_reconcile_engine,
    wait_until,
)

AUDIENCES = [AudienceConfig(f"retry-{i}", max_records=50, max_age_seconds=0.05) for i in range(2)]
MEMBERS = 200
DAY = 0.5
TIMEOUT = 60.0


async def all_verified(engine: Engine) -> bool:
    """Every list right, nothing set aside, and a read-back since verified every member."""
    if not await engine.settled():
        return False
    for audience in engine.audiences:
        if await engine.store.rejected(audience.id):
            return False
        report = last_report(engine, audience.id)
        wanted = await engine.store.desired_members(audience.id)
        if report is None or (report.lost_total, report.unsettled, report.too_young) != (0, 0, 0):
            return False
        if report.verified != len(wanted):
            return False
    return await engine.lists_match_desired()


async def test_with_random_drops_every_account_ends_verified_and_none_stays_set_aside(
    tmp_path: Path,
) -> None:
    """1. 200 tenant accounts for each of 2 audiences; 10% of rows dropped (seed 11);
    repair limit 0; retries after 1 emulated day, then every day.
    2. Wait until each list holds its members, nothing is set aside and a read-back
    verified them all.
    Result: accounts were set aside as unmatched along the way (the drops made them look
    so) and tried again; in the end every account is verified, none is set aside, every
    list equals desired state and every ledger balances."""
    async with running_reconcile_engine(
        tmp_path,
        AUDIENCES,
        tenant=fast_tenant(
            drop_ratio=0.1,
            visibility_lag_seconds=0.05,
            day_seconds=DAY,
            export_jobs_per_day=HIGH,
            export_status_per_day=HIGH,
        ),
        limits={"day_seconds": DAY},
        reconcile={**FAST_RECONCILE, "repair_limit": 0, "retry_unmatched_days": [1.0]},
    ) as engine:
        pool = await engine.tenant_accounts(MEMBERS * len(AUDIENCES))
        await engine.cdp.changes(
            (audience.id, account, True)
            for i, audience in enumerate(AUDIENCES)
            for account in pool[i * MEMBERS : (i + 1) * MEMBERS]
        )
        await wait_until(lambda: all_verified(engine), TIMEOUT, what="every account verified")

        set_aside = retried = 0
        for audience in AUDIENCES:
            check = await ledger_check(engine, audience.id)
            assert check.balanced, (audience.id, check)
            set_aside += check.counts.rejected_by_reason.get("unmatched", 0)
            retried += check.counts.retried
            assert (await engine.store.backlog(audience.id)).rejected == 0
        assert set_aside > 0, "the drops set accounts aside on the way"
        assert retried >= set_aside, "every account set aside was tried again"
        print(f"\nset aside {set_aside} times, retried {retried} times; all verified")

"""Accounts Demandbase cannot match end ``unmatched``: named, set aside, not sent before a retry.

Demandbase ignores import rows that match no account, and the job still completes.
Only a read-back shows it: the account is missing. It is sent again ``repair_limit``
times (a throttled row would make it the second time); missing once more, it is set
aside in the rejected table with its external id, name and domain. It is tried again
only a day later (``retry_unmatched_days``; see test_reconcile_retries.py).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from dbsync.model import Account
from dbsync.testing import (
    FAST_RECONCILE,
    AudienceConfig,
    Engine,
    last_report,
    ledger_check,
    running_reconcile_engine,
    strangers,
    wait_until,
)

AUDIENCE = AudienceConfig("unmatched", max_records=100, max_age_seconds=0.05)
REPAIR_LIMIT = 2
TIMEOUT = 15.0


def uploads(engine: Engine, keys: set[str]) -> Counter[str]:
    """How many import files carried each of ``keys`` (unmatched rows are kept per job)."""
    jobs = engine.emulator.emulator.tenant.import_jobs
    return Counter(
        row.external_id for job in jobs for row in job.unmatched if row.external_id in keys
    )


async def test_accounts_matching_nothing_end_unmatched_and_are_not_sent_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. 30 tenant accounts and 3 the tenant does not know go to one audience; the
    repair limit is 2; read-backs every 0.15 s.
    2. Wait until the 3 are set aside, then for two more read-backs.
    Result: each of the 3 was uploaded exactly 3 times (the first send and 2 repairs),
    never after; the rejected table names each with its external id, name and domain
    and reason ``unmatched``; one report lists them; an ``accounts_set_aside`` event
    names them; the ledger counts 9 losses (3 x 3, cause ``dropped``), 6 repairs and
    3 unmatched, and balances; the list holds exactly the 30."""
    unknown = strangers(3)
    unknown_ids = {a.external_id for a in unknown}
    async with running_reconcile_engine(
        tmp_path, [AUDIENCE], reconcile={**FAST_RECONCILE, "repair_limit": REPAIR_LIMIT}
    ) as engine:
        known = await engine.tenant_accounts(30)
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in [*known, *unknown]])

        async def set_aside() -> bool:
            return len(await engine.store.rejected(AUDIENCE.id)) == 3

        await wait_until(
            set_aside, TIMEOUT, what=lambda: f"rejected: {uploads(engine, unknown_ids)}"
        )

        def reported() -> bool:
            # The store sets them aside when the judgment commits; the report that names
            # them is kept a moment later (the ledger checked, the run closed).
            report = last_report(engine, AUDIENCE.id)
            return report is not None and bool(report.unmatched)

        await wait_until(reported, TIMEOUT, what="the report naming them")
        report = last_report(engine, AUDIENCE.id)
        assert report is not None
        assert {a.external_id for a in report.unmatched} == unknown_ids, report

        reports_then = report.finished_at

        def two_more_read_backs() -> bool:
            later = last_report(engine, AUDIENCE.id)
            return later is not None and later.started_at > reports_then + 0.15

        await wait_until(two_more_read_backs, TIMEOUT, what="two more read-backs")
        await engine.wait_settled()

        assert uploads(engine, unknown_ids) == dict.fromkeys(unknown_ids, REPAIR_LIMIT + 1)
        rejected = await engine.store.rejected(AUDIENCE.id)
        assert [r.account for r in rejected] == sorted(unknown, key=lambda a: a.external_id)
        assert all(r.reason.startswith("unmatched: ") and r.member for r in rejected)
        assert all(r.attempts == REPAIR_LIMIT + 1 for r in rejected)
        assert (await engine.store.backlog(AUDIENCE.id)).rejected == 3
        assert (await engine.lists())[AUDIENCE.list] == {a.external_id for a in known}

        latest = last_report(engine, AUDIENCE.id)
        assert latest is not None
        assert (latest.lost_total, latest.unmatched, latest.unsettled) == (0, (), 3), latest

        check = await ledger_check(engine, AUDIENCE.id)
        assert check.balanced, check
        counts = check.counts
        assert counts.lost_by_cause == {"dropped": 3 * (REPAIR_LIMIT + 1)}
        assert counts.repaired == 3 * REPAIR_LIMIT
        assert counts.rejected_by_reason == {"unmatched": 3}
        assert counts.verified == 30

    [event] = [r for r in caplog.records if r.getMessage() == "accounts_set_aside"]
    fields = event.__dict__
    assert (fields["reason"], fields["count"], fields["repair_limit"]) == ("unmatched", 3, 2)
    named = [Account(**a) for a in fields["accounts"]]
    assert sorted(named, key=lambda a: a.external_id) == sorted(
        unknown, key=lambda a: a.external_id
    )

"""Several lists per export job, when a multi-list export says which list each row is on (A5).

The emulator serves the ``multi-list-column`` dialect (an ``Account List ID`` column)
and the destination says ``multi_list_exports = "yes"``: one export job reads every
audience due by the next one. Against the emulator's own reading (no such column), the
first multi-list read-back fails, and the destination falls back to one list per job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dbsync.demandbase.emulator import Faults
from dbsync.testing import (
    FAST_RECONCILE,
    AudienceConfig,
    Engine,
    fast_export_tenant,
    last_report,
    running_reconcile_engine,
    wait_until,
)

AUDIENCES = [AudienceConfig(f"multi-{i}", max_records=100, max_age_seconds=0.05) for i in range(12)]
MEMBERS = 30
TIMEOUT = 30.0
# Read back a second after delivery, then a minute later: the first read-backs of the
# audiences, delivered together, fall due together.
MULTI = {
    **FAST_RECONCILE,
    "multi_list_exports": "yes",
    "interval_seconds": 60.0,
    "visibility_lag_seconds": 1.0,
}


async def feed(engine: Engine) -> None:
    pool = await engine.tenant_accounts(MEMBERS * len(AUDIENCES))
    await engine.cdp.changes(
        (audience.id, account, True)
        for i, audience in enumerate(AUDIENCES)
        for account in pool[i * MEMBERS : (i + 1) * MEMBERS]
    )


def all_verified(engine: Engine) -> bool:
    for audience in AUDIENCES:
        report = last_report(engine, audience.id)
        if report is None or report.verified != MEMBERS:
            return False
    return True


async def test_one_export_job_reads_many_lists_when_each_row_names_its_list(
    tmp_path: Path,
) -> None:
    """12 audiences of 30 members, delivered together; multi-list exports on.
    Result: every audience is verified (30 of 30), by fewer export jobs than audiences,
    at least one of them naming several lists; each list equals desired state."""
    async with running_reconcile_engine(
        tmp_path,
        AUDIENCES,
        tenant=fast_export_tenant(
            visibility_lag_seconds=0.1, faults=Faults(dialects=frozenset({"multi-list-column"}))
        ),
        reconcile=MULTI,
    ) as engine:
        await feed(engine)
        await wait_until(lambda: all_verified(engine), TIMEOUT, what="every audience verified")
        exports = engine.emulator.emulator.tenant.export_jobs
        assert len(exports) < len(AUDIENCES), [len(job.list_ids) for job in exports]
        assert max(len(job.list_ids) for job in exports) > 1
        assert await engine.lists_match_desired()
        print(f"\nexport jobs {len(exports)}, lists per job {[len(j.list_ids) for j in exports]}")


async def test_without_the_list_column_the_destination_reads_one_list_per_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, against a tenant whose multi-list exports do not say each row's list.
    Result: ``multi_list_export_unsupported`` once; then one list per export job, and
    every audience is verified all the same."""
    async with running_reconcile_engine(
        tmp_path,
        AUDIENCES,
        tenant=fast_export_tenant(visibility_lag_seconds=0.1),
        # A failed read-back waits its interval: a short one here.
        reconcile={**MULTI, "interval_seconds": FAST_RECONCILE["interval_seconds"]},
    ) as engine:
        await feed(engine)
        await wait_until(lambda: all_verified(engine), TIMEOUT, what="every audience verified")
        exports = engine.emulator.emulator.tenant.export_jobs
        several = [job for job in exports if len(job.list_ids) > 1]
        assert len(several) == 1, [len(job.list_ids) for job in exports]
        assert len(exports[-1].list_ids) == 1
    warnings = [r for r in caplog.records if r.getMessage() == "multi_list_export_unsupported"]
    assert len(warnings) == 1
    assert all(r.levelno == logging.WARNING for r in warnings)

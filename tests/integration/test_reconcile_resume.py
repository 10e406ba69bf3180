"""A stop during a read-back: the drain does not wait for it, the next start resumes it.

An export job costs one of 60 a day. The read-back records its job as soon as
Demandbase accepted it, so a daemon stopped while the export runs picks it up again
at the next start (polls it, judges the list) instead of creating another.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from dbsync.reconcile import ReconcileDeferred
from dbsync.testing import (
    FAST_RECONCILE,
    AudienceConfig,
    Engine,
    fast_export_tenant,
    last_report,
    running_daemon,
    running_emulator,
    wait_until,
    write_reconcile_config,
)

AUDIENCE = AudienceConfig("resume", max_records=100, max_age_seconds=0.05)
JOB_SECONDS = 0.5


async def test_a_read_back_cut_by_a_stop_is_resumed_without_a_second_export(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Demandbase takes 0.5 s per job. 10 accounts are delivered; a read-back is asked.
    2. While its export runs, the daemon is stopped; then started again.
    Result: the stop exits 0 without waiting for the export, and the caller is told
    the daemon is draining; after the restart the same export job is polled and judged
    (``reconcile_resumed``), the report verifies the 10 accounts, and Demandbase saw one
    export job in all."""
    caplog.set_level(logging.INFO, logger="dbsync")
    async with running_emulator(fast_export_tenant(job_delay_seconds=JOB_SECONDS)) as emulator:
        tenant = emulator.emulator.tenant
        config = write_reconcile_config(
            tmp_path,
            emulator.url,
            [AUDIENCE],
            reconcile={**FAST_RECONCILE, "scheduled": False, "visibility_lag_seconds": 0},
        )
        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, [AUDIENCE])
            accounts = await engine.tenant_accounts(10)
            await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts])
            await engine.wait_settled()
            asked = asyncio.create_task(engine.supervisor.reconcile_now(AUDIENCE.id))
            await wait_until(lambda: len(tenant.export_jobs) == 1, 5, what="an export job")
        with pytest.raises(ReconcileDeferred, match="draining"):
            await asked
        [job] = tenant.export_jobs
        assert job.state != "finished", "the stop did not wait for the export"

        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, [AUDIENCE])
            await wait_until(
                lambda: last_report(engine, AUDIENCE.id) is not None, 10, what="a report"
            )
            report = last_report(engine, AUDIENCE.id)
            assert report is not None
            assert report.export_job_id == job.job_id
            assert (report.expected, report.verified, report.lost_total) == (10, 10, 0)
        assert len(tenant.export_jobs) == 1
    resumed = [r for r in caplog.records if r.getMessage() == "reconcile_resumed"]
    assert [r.__dict__["export_job_id"] for r in resumed] == [job.job_id]

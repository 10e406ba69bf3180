"""Daily quotas over several emulated days: spent, never overdrawn (invariant 5).

Demandbase counts import jobs, uploads and status reads per day and sends no
rate-limit headers, so dbsync counts them itself. Here the emulator's day lasts
4 s and allows 8 jobs; the daemon knows the same limits and keeps a 10% margin
(7 jobs a day). Far more backlog than budget: over several days the daemon must meet
no daily-quota 429 and still use most of each day's budget rather than idle. Both
sides read the same system clock and align their windows to the epoch.

The days go by in real time (the daemon's per-minute pace and the emulator's job
processing run on it), so the day is long beside the work it holds: seven jobs of five
accounts take a few tenths of a second, and a day lasts 4 s. The assertions are
counts; none is a duration.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from pathlib import Path

import pytest

from dbsync.testing import DESTINATION, AudienceConfig, fast_tenant, running_engine

DAY_SECONDS = 4.0
JOBS_PER_DAY = 8
STATUS_READS_PER_DAY = 40
CONCURRENT_JOBS = 3
SAFETY_MARGIN = 0.1
ALLOWED_JOBS = math.floor(JOBS_PER_DAY * (1 - SAFETY_MARGIN))  # 7
AUDIENCES = [AudienceConfig(f"quota-{i}", max_records=5, max_age_seconds=0.05) for i in range(4)]
ACCOUNTS_PER_AUDIENCE = 100  # 20 batches each, 80 in all: eleven days of budget


@pytest.mark.parametrize(
    "days", [pytest.param(3, id="3-days"), pytest.param(6, id="6-days", marks=pytest.mark.slow)]
)
async def test_daily_quotas_are_spent_day_after_day_and_never_overdrawn(
    tmp_path: Path, days: int
) -> None:
    """1. Emulator and daemon: 8 import jobs, 8 uploads and 40 status reads a 4 s day,
    3 jobs at once; the daemon keeps 10% in reserve (7 jobs a day).
    2. Four audiences, 100 accounts each, batches of 5: 80 jobs' worth of backlog,
       arriving 0.1 s before a day ends, inside the daemon's edge of 0.2 s.
    3. Let ``days`` whole emulated days pass.
    Result: Demandbase answered no daily-quota 429 (and no 429 at all); in every whole
    day, the first included, the daemon created between 6 and 8 jobs (at least 75% of
    its 7); the backlog is still there, waiting for tomorrow's quota."""
    quotas = {
        "import_jobs_per_day": JOBS_PER_DAY,
        "import_uploads_per_day": JOBS_PER_DAY,
        "import_status_per_day": STATUS_READS_PER_DAY,
        "concurrent_import_jobs": CONCURRENT_JOBS,
    }
    async with running_engine(
        tmp_path,
        AUDIENCES,
        tenant=fast_tenant(day_seconds=DAY_SECONDS, **quotas),
        limits={**quotas, "day_seconds": DAY_SECONDS, "quota_safety_margin": SAFETY_MARGIN},
    ) as engine:
        accounts = await engine.tenant_accounts(ACCOUNTS_PER_AUDIENCE * len(AUDIENCES))
        # The backlog arrives in the last moments of a day, the hardest time to count.
        left_today = DAY_SECONDS - time.time() % DAY_SECONDS
        await asyncio.sleep((left_today - 0.1) % DAY_SECONDS)
        await engine.cdp.changes(
            (audience.id, account, True)
            for i, audience in enumerate(AUDIENCES)
            for account in accounts[i * ACCOUNTS_PER_AUDIENCE : (i + 1) * ACCOUNTS_PER_AUDIENCE]
        )
        first_day = math.floor(time.time() / DAY_SECONDS) + 1
        end_of_last_day = (first_day + days) * DAY_SECONDS
        # Not waiting for a condition: the scenario is days going by, in real time.
        await asyncio.sleep(end_of_last_day - time.time())

        emulator = engine.emulator.emulator
        stats = emulator.stats()
        assert stats["throttled_by_kind"]["daily"] == 0, stats["throttled_by_endpoint"]
        assert stats["throttled"] == 0, stats["throttled_by_kind"]
        jobs_per_day = Counter(
            math.floor(job.created_at / DAY_SECONDS) for job in emulator.tenant.import_jobs
        )
        whole_days = {day: jobs_per_day[day] for day in range(first_day, first_day + days)}
        assert all(0.75 * ALLOWED_JOBS <= jobs <= JOBS_PER_DAY for jobs in whole_days.values()), (
            whole_days
        )

        destination = engine.supervisor.destination(DESTINATION)
        assert destination is not None
        snapshot = destination.budget.snapshot()
        assert snapshot.allowed["import.create_job"] == ALLOWED_JOBS, snapshot
        assert all(snapshot.used[e] <= snapshot.allowed[e] for e in snapshot.used), snapshot
        backlogs = [await engine.store.backlog(a.id) for a in AUDIENCES]
        assert sum(b.pending + b.in_flight for b in backlogs) > 0, "the budget was binding"

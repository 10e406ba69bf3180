"""Read-backs over several emulated days: within the export limits, every audience in turn.

Demandbase allows 60 export jobs a day and one at a time. Here the day lasts 2 s and
allows 2 exports; six audiences want a read-back all the time (every 0.1 s). The
daemon must never ask for a third export in a day nor a second one at once, and the
audiences must take turns: each is read back within ``days_to_reconcile_all(6, 2)``
= 3 days of becoming due. Both sides read the same system clock and align their
windows to the epoch. The days go by in real time; a day is long beside the two
read-backs it holds (each a few hundredths of a second), and the assertions are counts
and order, never durations.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from pathlib import Path

import pytest

from dbsync.reconcile import days_to_reconcile_all
from dbsync.testing import (
    FAST_RECONCILE,
    HIGH,
    AudienceConfig,
    Engine,
    fast_tenant,
    running_reconcile_engine,
    wait_until,
)

DAY_SECONDS = 2.0
EXPORTS_PER_DAY = 2
STATUS_READS_PER_DAY = 12
AUDIENCES = [AudienceConfig(f"turns-{i}", max_records=10, max_age_seconds=0.05) for i in range(6)]


def completed_reports(engine: Engine) -> dict[str, list[float]]:
    """Start times of the read-backs each audience completed (from the emulator's jobs)."""
    jobs = engine.emulator.emulator.tenant.export_jobs
    names = {f"dbsync {a.id}": a.id for a in AUDIENCES}
    starts: dict[str, list[float]] = {a.id: [] for a in AUDIENCES}
    for job in jobs:
        if job.state == "finished":
            starts[names[job.job_name]].append(job.created_at)
    return starts


@pytest.mark.parametrize(
    "days", [pytest.param(4, id="4-days"), pytest.param(9, id="9-days", marks=pytest.mark.slow)]
)
async def test_read_backs_stay_within_the_export_limits_and_every_audience_takes_its_turn(
    tmp_path: Path, days: int
) -> None:
    """1. Emulator and daemon: 2 export jobs and 12 export status reads a 2 s day,
    one export at a time (Demandbase's own cap); no safety margin, so the daemon may
    spend all of it.
    2. Six audiences get 5 members each; read-backs are due every 0.1 s, judged without
    lag.
    3. Once every audience's list exists, ``days`` more days pass.
    Result: Demandbase answered no 429 at all (daily or concurrent); no day saw more
    than 2 exports, no export started before the previous one finished; each audience
    was read back within 3 days (and, over 9 days, 3 times, the turns never more than
    one apart); every list equals desired state and nothing was lost."""
    quotas = {"export_jobs_per_day": EXPORTS_PER_DAY, "export_status_per_day": STATUS_READS_PER_DAY}
    async with running_reconcile_engine(
        tmp_path,
        AUDIENCES,
        tenant=fast_tenant(day_seconds=DAY_SECONDS, export_list_per_day=HIGH, **quotas),
        limits={**quotas, "day_seconds": DAY_SECONDS, "quota_safety_margin": 0.0},
        reconcile={**FAST_RECONCILE, "visibility_lag_seconds": 0, "interval_seconds": 0.1},
    ) as engine:
        accounts = await engine.tenant_accounts(5 * len(AUDIENCES))
        await engine.cdp.changes(
            (audience.id, account, True)
            for i, audience in enumerate(AUDIENCES)
            for account in accounts[i * 5 : (i + 1) * 5]
        )
        await engine.wait_settled()

        async def all_lists_known() -> bool:
            records = await engine.store.audiences()
            return all(records[a.id].list_id is not None for a in AUDIENCES)

        await wait_until(all_lists_known, 10, what="every list id")
        due_since = time.time()
        predicted_days = days_to_reconcile_all(len(AUDIENCES), EXPORTS_PER_DAY)
        assert predicted_days == 3
        # Every audience due from now: within the rest of today and 3 whole days.
        deadline = (math.floor(due_since / DAY_SECONDS) + 1 + predicted_days) * DAY_SECONDS
        end = (math.floor(due_since / DAY_SECONDS) + 1 + days) * DAY_SECONDS
        # Not waiting for a condition: the scenario is days going by, in real time.
        await asyncio.sleep(end - time.time())

        emulator = engine.emulator.emulator
        stats = emulator.stats()
        assert stats["throttled"] == 0, stats["throttled_by_kind"]
        exports = sorted(emulator.tenant.export_jobs, key=lambda job: job.created_at)
        per_day = Counter(math.floor(job.created_at / DAY_SECONDS) for job in exports)
        assert max(per_day.values()) <= EXPORTS_PER_DAY, per_day
        for earlier, later in itertools.pairwise(exports):
            assert earlier.finished_at is not None
            assert later.created_at >= earlier.finished_at, (earlier, later)
        # The budget is binding, and was used: at least one export on most whole days.
        whole_days = range(math.floor(due_since / DAY_SECONDS) + 1, math.floor(end / DAY_SECONDS))
        assert sum(per_day[d] for d in whole_days) >= EXPORTS_PER_DAY * (len(whole_days) - 1)

        starts = completed_reports(engine)
        first_turns = {audience: min(times, default=math.inf) for audience, times in starts.items()}
        assert all(at <= deadline for at in first_turns.values()), (first_turns, deadline)
        if days >= 3 * predicted_days:
            turns = [len(times) for times in starts.values()]
            assert min(turns) >= 3, starts
            assert max(turns) - min(turns) <= 1, starts
        for audience in AUDIENCES:
            report, next_due = engine.supervisor.reconcile_state(audience.id)
            assert report is not None
            assert report.lost_total == 0, report
            assert next_due is not None
        assert await engine.lists_match_desired()
        print(f"\nexports per day {dict(sorted(per_day.items()))}; read-backs {starts}")

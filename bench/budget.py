"""Budget: the share of a daily import-job budget used under a backlog, day after day.

The emulator (in this process, so that its jobs can be counted per day) and a real
daemon share a shortened quota day of ``--day-seconds`` (``day_seconds`` on both sides,
windows aligned to the epoch) allowing ``--jobs-per-day`` import jobs and uploads.
The daemon keeps its default 2% safety margin. The backlog is far larger than the
budget (``--accounts`` joins over four audiences, ``--max-records`` a batch), so the
daemon is never short of work. Over ``--days`` whole emulated days it counts the jobs
Demandbase created per day: the share of the quota used (target >= 95%), the share
of what the daemon allows itself (quota less the margin), and the overdraw: jobs
beyond the quota in any day plus every 429 Demandbase answered (target 0).

    python bench/budget.py [--days 5] [--day-seconds 4] [--jobs-per-day 50]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from bench._common import add_check_flag, emit, say

SAFETY_MARGIN = 0.02  # the daemon's default
AUDIENCES = 4
SHARE_TARGET = 0.95


class Warnings(logging.Handler):
    """Counts the daemon's warning events by name (``api_retry``, ``pace_decreased``...)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.getMessage()] += 1


async def run(
    directory: Path, days: int, day_seconds: float, jobs_per_day: int, accounts: int, batch: int
) -> dict[str, Any]:
    from dbsync.testing import AudienceConfig, fast_tenant, running_engine

    quotas = {
        "import_jobs_per_day": jobs_per_day,
        "import_uploads_per_day": jobs_per_day,
        "import_status_per_day": jobs_per_day * 20,
        "concurrent_import_jobs": 10,
    }
    audiences = [
        AudienceConfig(f"budget-{i}", max_records=batch, max_age_seconds=0.05)
        for i in range(AUDIENCES)
    ]
    tenant = fast_tenant(accounts=accounts, day_seconds=day_seconds, **quotas)
    limits = {**quotas, "day_seconds": day_seconds, "quota_safety_margin": SAFETY_MARGIN}
    async with running_engine(directory, audiences, tenant=tenant, limits=limits) as engine:
        tenant_accounts = await engine.tenant_accounts(accounts)
        share = accounts // AUDIENCES
        await engine.cdp.changes(
            (audience.id, account, True)
            for i, audience in enumerate(audiences)
            for account in tenant_accounts[i * share : (i + 1) * share]
        )
        first_day = math.floor(time.time() / day_seconds) + 1
        end_of_last_day = (first_day + days) * day_seconds
        # Days going by, in real time: that is what is measured.
        await asyncio.sleep(end_of_last_day - time.time() + 0.05)
        emulator = engine.emulator.emulator
        stats = emulator.stats()
        per_day = Counter(
            math.floor(job.created_at / day_seconds) for job in emulator.tenant.import_jobs
        )
        pending = sum([(await engine.store.backlog(a.id)).pending for a in audiences])
    return {
        "jobs": [per_day[day] for day in range(first_day, first_day + days)],
        "throttled": stats["throttled"],
        "throttled_by_kind": {k: n for k, n in stats["throttled_by_kind"].items() if n},
        "throttled_by_endpoint": stats["throttled_by_endpoint"],
        "pending_after": pending,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=5)
    parser.add_argument("--day-seconds", type=float, default=4.0)
    parser.add_argument("--jobs-per-day", type=int, default=50)
    parser.add_argument("--accounts", type=int, default=8_000)
    parser.add_argument("--max-records", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 days of 2 s, 20 jobs a day")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.days, args.day_seconds, args.jobs_per_day, args.accounts = 2, 2.0, 20, 800

    warnings = Warnings()
    logging.getLogger("dbsync").addHandler(warnings)
    with tempfile.TemporaryDirectory(prefix="dbsync-bench-") as tmp:
        result = uvloop.run(
            run(
                Path(tmp),
                args.days,
                args.day_seconds,
                args.jobs_per_day,
                args.accounts,
                args.max_records,
            )
        )

    jobs = result["jobs"]
    allowed = math.floor(args.jobs_per_day * (1 - SAFETY_MARGIN))
    shares = [j / args.jobs_per_day for j in jobs]
    overdraw = sum(max(0, j - args.jobs_per_day) for j in jobs) + result["throttled"]
    say(
        f"jobs per whole day {jobs} of {args.jobs_per_day} ({allowed} after the margin);"
        f" min share {min(shares):.1%}; 429s {result['throttled']};"
        f" still pending {result['pending_after']:,}"
    )
    return emit(
        "budget",
        {
            "days": args.days,
            "day_seconds": args.day_seconds,
            "jobs_per_day_quota": args.jobs_per_day,
            "jobs_per_day_allowed": allowed,
            "jobs_per_day": jobs,
            "share_min": round(min(shares), 4),
            "share_mean": round(sum(shares) / len(shares), 4),
            "share_of_allowed_min": round(min(jobs) / allowed, 4),
            "overdraw": overdraw,
            "throttled_429": result["throttled"],
            "throttled_by_kind": result["throttled_by_kind"],
            "throttled_by_endpoint": result["throttled_by_endpoint"],
            "backlog_left": result["pending_after"],
            "daemon_warnings": dict(warnings.counts),
            "share_target_met": min(shares) >= SHARE_TARGET,
            "overdraw_target_met": overdraw == 0,
        },
        check=args.check,
    )


if __name__ == "__main__":
    raise SystemExit(main())

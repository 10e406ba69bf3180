"""Forecast: the price of one backlog forecast, and its depth cut against the full one.

Every summary round, every ``dbsync ctl status`` and every ``plan`` computes each
destination's forecast (:mod:`dbsync.forecast`) on the event loop. Here: ``--audiences``
audiences of ``--jobs`` import jobs each under Demandbase's real quotas (1,176 jobs a
day allowed, 10 job slots, 60 s jobs, 1,000 requests a minute), served by turns:
with the defaults 200,000 jobs, 170 days of backlog. The forecast as shipped
(simulated job by job up to ``MAX_SIMULATED_JOBS``, then the rest counted round by round) is
timed against the baseline of the same run: the whole backlog simulated job by job.
Figures: the milliseconds of each (the best of three), the ratio, and how far apart
their answers are (the destination's window, and the largest difference of an
audience's window). Targets: at most 250 ms for the shipped forecast, and every
audience's window within one of the full simulation's.

    python -m bench.forecast [--audiences 10000] [--jobs 20] [--quick]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench._common import add_check_flag, emit, say

DAY_SECONDS = 86_400.0
FORECAST_TARGET_MS = 250.0


def measure(audiences: int, jobs: int) -> dict[str, Any]:
    import dbsync.forecast as forecast_module
    from dbsync.forecast import Capacity, Load, forecast

    now = 20_000 * DAY_SECONDS + DAY_SECONDS / 2
    capacity = Capacity(
        now=now,
        day_seconds=DAY_SECONDS,
        jobs_left_today=1176,
        jobs_per_day=1176,
        pace_per_minute=1000.0,
        job_slots=10,
        edge_seconds=5.0,
    )
    loads = [
        Load(
            audience_id=f"a{i:05d}",
            inserts=jobs * 10_000,
            deletes=0,
            oldest_changed_at=now - audiences + i,
            job_seconds=60.0,
        )
        for i in range(audiences)
    ]

    def best_of_three() -> tuple[float, Any]:
        timings, result = [], None
        for _ in range(3):
            started = time.perf_counter()
            result = forecast(capacity, loads)
            timings.append(time.perf_counter() - started)
        return min(timings) * 1000, result

    shipped_depth = forecast_module.MAX_SIMULATED_JOBS
    shipped_ms, shipped = best_of_three()
    forecast_module.MAX_SIMULATED_JOBS = audiences * jobs + 1
    try:
        full_ms, full = best_of_three()
    finally:
        forecast_module.MAX_SIMULATED_JOBS = shipped_depth
    start_window = int(now // DAY_SECONDS)
    differences = [
        abs((a.window or 0) - (b.window or 0))
        for a, b in zip(shipped.audiences, full.audiences, strict=True)
    ]
    say(
        f"{audiences} audiences, {audiences * jobs} jobs: {shipped_ms:.1f} ms shipped,"
        f" {full_ms:.1f} ms simulated whole; last window +{shipped.window - start_window}"
        f" and +{full.window - start_window}; audiences at most {max(differences)} apart"
    )
    return {
        "audiences": audiences,
        "jobs": audiences * jobs,
        "simulated_jobs_max": shipped_depth,
        "forecast_ms": round(shipped_ms, 1),
        "full_simulation_ms": round(full_ms, 1),
        "speedup": round(full_ms / shipped_ms, 2),
        "destination_days": shipped.window - start_window,
        "full_simulation_days": full.window - start_window,
        "audience_window_difference_max": max(differences),
        "forecast_target_met": shipped_ms <= FORECAST_TARGET_MS,
        "agreement_target_met": max(differences) <= 1,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audiences", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=20, help="import jobs per audience")
    parser.add_argument("--quick", action="store_true", help="1,000 audiences")
    add_check_flag(parser)
    args = parser.parse_args()
    audiences = 1_000 if args.quick else args.audiences
    return emit("forecast", measure(audiences, args.jobs), check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())

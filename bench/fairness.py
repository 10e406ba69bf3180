"""Fairness: the longest wait of an audience for its turn, 1,000 audiences under one budget.

A real daemon (its own process) feeds ``--audiences`` audiences to the emulator (its own
process) under Demandbase's real limits: 1,200 import jobs and uploads and 3,600
status reads a day, 10 jobs at once, 1,000 requests a minute, the 2% safety margin.
Only the day is short (``--day-seconds``, on both sides). Every audience is given a
backlog at the start: one in twenty a large one (ten batches), whose changes are sent
first, so that its backlog is the oldest; the others half a batch. One in ten keeps
receiving a new account every ``--refresh-seconds`` for the whole run. Read-backs are
off: what is measured is the turns of import jobs. The emulator counts requests in
fixed minutes, and the daemon's pace (a bucket of 1,000 a minute, full when quiet) can
send up to twice that in one fixed minute at the start, so the emulator allows twice
the daemon's pace: otherwise its 429s halve the pace, and the bound below, which
assumes the configured pace, no longer holds. At 1,000 requests a minute, the pace,
not the day's 1,176 jobs, limits a short day; ``--requests-per-minute`` raises it (a
minute shortened with the day), so that the daily quota is what runs out.

Per audience, the wait is from its first change (the ``ts`` the CDP stamped on it) to
its first ``batch_acked`` event (the job that carried it completed). Printed: the
longest, the median and the 99th percentile, against the bound the settings give
(docs/architecture.md, "Fair turns")::

    bound = max_age + (ceil(N / k) + 1) * day + D

where D = 3 x job_poll_initial_seconds is the longest a job holds its slot (the job
is seen completed by its second status read at the latest), c = 4 requests a job
(creation, upload, two status reads), r = min(slots / D, requests_per_minute / 60 / c)
the jobs a second the slots and the pace allow, and k = min(jobs allowed a day,
r x (day - edge)) the jobs a day can grant. Target: the longest wait within the bound
(``bound_target_met``). The baseline of the same run is one round at the throughput
the run reached (N jobs at the jobs a second measured), to which the longest wait is
compared (``wait_to_round_ratio``, about 1 when turns are fair).

    python -m bench.fairness [--audiences 1000] [--day-seconds 60] [--job-seconds 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from bench._common import DaemonProcess, EmulatorProcess, add_check_flag, emit, say

# Demandbase's published limits (docs/demandbase-contract.md), the configuration's defaults.
JOBS_PER_DAY = 1_200
STATUS_PER_DAY = 3_600
CONCURRENT_JOBS = 10
REQUESTS_PER_MINUTE = 1_000
SAFETY_MARGIN = 0.02
MAX_RECORDS = 50
MAX_AGE_SECONDS = 1.0
REQUESTS_PER_JOB = 4  # creation, upload, at most two status reads (see the bound)
LARGE_EVERY = 20  # one audience in twenty holds ten batches
REFRESHED_EVERY = 10  # one in ten keeps receiving changes


def kind(index: int) -> str:
    if index % LARGE_EVERY == 0:
        return "large"
    if index % REFRESHED_EVERY == 5:
        return "refreshed"
    return "small"


def bound(audiences: int, day: float, job_seconds: float, pace: float) -> dict[str, float]:
    """The longest wait the settings allow an audience for its first job (see above)."""
    hold = 3 * job_seconds
    rate = min(CONCURRENT_JOBS / hold, pace / 60 / REQUESTS_PER_JOB)
    edge = min(5.0, day * 0.05)
    allowed = math.floor(JOBS_PER_DAY * (1 - SAFETY_MARGIN))
    per_day = min(allowed, math.floor(rate * (day - edge)))
    days = math.ceil(audiences / per_day)
    return {
        "bound_seconds": round(MAX_AGE_SECONDS + (days + 1) * day + hold, 3),
        "bound_jobs_per_second": round(rate, 3),
        "bound_jobs_per_day": per_day,
        "bound_days": days,
        "job_hold_seconds": hold,
    }


def account(audience: str, n: int) -> Any:
    from dbsync.model import Account

    return Account(external_id=f"{audience}-{n}", name=f"{audience} {n}", domain=f"{n}.example")


async def feed(
    ingest: str, names: list[str], refresh_seconds: float, done: asyncio.Event
) -> tuple[dict[str, float], int]:
    """Send every backlog (large ones first), then keep refreshing one in ten.

    The first change's ``ts`` per audience, and the changes sent in all.
    """
    import aiohttp

    from dbsync.testing import Cdp

    first: dict[str, float] = {}
    sent = 0
    order = sorted(range(len(names)), key=lambda i: kind(i) != "large")
    async with aiohttp.ClientSession() as http:
        cdp = Cdp(http, ingest)
        chunk: list[tuple[str, Any, bool]] = []
        for i in order:
            name = names[i]
            size = 10 * MAX_RECORDS if kind(i) == "large" else MAX_RECORDS // 2
            chunk += [(name, account(name, n), True) for n in range(size)]
            if len(chunk) >= 5_000 or i == order[-1]:
                stamp = time.time()
                for audience in {a for a, _, _ in chunk}:
                    first.setdefault(audience, stamp)
                await cdp.changes(chunk, ts=stamp)
                sent += len(chunk)
                chunk = []
        refreshed = [name for i, name in enumerate(names) if kind(i) == "refreshed"]
        tick = 0
        while not done.is_set():
            tick += 1
            await cdp.changes(
                [(name, account(name, 1_000_000 + tick), True) for name in refreshed],
                ts=time.time(),
            )
            sent += len(refreshed)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), refresh_seconds)
    return first, sent


async def measure(
    daemon: DaemonProcess, names: list[str], refresh_seconds: float, within: float
) -> dict[str, Any]:
    assert daemon.ready is not None
    done = asyncio.Event()
    feeder = asyncio.create_task(feed(daemon.ready["ingest"], names, refresh_seconds, done))
    started = time.time()
    waiting = set(names)
    acked: dict[str, float] = {}
    seen = 0
    while waiting and time.time() - started < within and not feeder.done():
        await asyncio.sleep(0.25)
        for event in daemon.kept[seen:]:
            at = dt.datetime.fromisoformat(event["ts"]).timestamp()
            acked.setdefault(event["audience"], at)
            waiting.discard(event["audience"])
        seen = len(daemon.kept)
    done.set()
    first, sent = await feeder
    return {"first": first, "acked": acked, "sent": sent, "events": daemon.kept[:seen]}


def main() -> int:
    from dbsync.testing import AudienceConfig, write_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audiences", type=int, default=1_000)
    parser.add_argument("--day-seconds", type=float, default=60.0)
    parser.add_argument("--job-seconds", type=float, default=0.5, help="the emulator's job time")
    parser.add_argument("--refresh-seconds", type=float, default=2.0)
    parser.add_argument(
        "--requests-per-minute",
        type=int,
        default=REQUESTS_PER_MINUTE,
        help="the daemon's pace (Demandbase's 1,000 by default); the emulator allows twice it",
    )
    parser.add_argument("--quick", action="store_true", help="100 audiences, 20 s days")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.audiences, args.day_seconds = 100, 20.0

    names = [f"fair-{i:04d}" for i in range(args.audiences)]
    expected = bound(args.audiences, args.day_seconds, args.job_seconds, args.requests_per_minute)
    emulator_args = [
        "--accounts",
        "100",
        "--day-seconds",
        str(args.day_seconds),
        "--job-delay-seconds",
        str(args.job_seconds),
        "--requests-per-minute",
        str(2 * args.requests_per_minute),
    ]
    with (
        tempfile.TemporaryDirectory(prefix="dbsync-bench-") as tmp,
        EmulatorProcess(*emulator_args) as emu,
    ):
        config = write_config(
            Path(tmp),
            emu.url,
            [
                AudienceConfig(
                    name,
                    max_records=MAX_RECORDS,
                    max_age_seconds=MAX_AGE_SECONDS,
                    requests_per_minute=60,
                )
                for name in names
            ],
            limits={
                "requests_per_minute": args.requests_per_minute,
                "import_jobs_per_day": JOBS_PER_DAY,
                "import_uploads_per_day": JOBS_PER_DAY,
                "import_status_per_day": STATUS_PER_DAY,
                "import_list_per_day": STATUS_PER_DAY,
                "concurrent_import_jobs": CONCURRENT_JOBS,
                "day_seconds": args.day_seconds,
                "quota_safety_margin": SAFETY_MARGIN,
            },
            delivery={
                "job_poll_initial_seconds": args.job_seconds,
                "job_poll_max_seconds": 30.0,
                "max_jobs_in_flight_per_audience": 2,
            },
            reconcile={"scheduled": False},
            daemon={"drain_seconds": 5.0, "summary_interval_seconds": 3600.0},
        )
        daemon = DaemonProcess(config, keep={"batch_acked"})
        daemon.start(timeout=300)
        say(f"{args.audiences} audiences ready in {daemon.ready_seconds:.1f} s; bound {expected}")
        try:
            result = uvloop.run(
                measure(daemon, names, args.refresh_seconds, 3 * expected["bound_seconds"] + 60)
            )
        finally:
            code = daemon.stop()

    first, acked = result["first"], result["acked"]
    missing = sorted(set(names) - set(acked))
    waits = {name: acked[name] - first[name] for name in acked}
    ordered = sorted(waits.values())
    longest = max(waits, key=waits.__getitem__) if waits else ""
    # Turn order: audiences that had a second job acknowledged before the last one's first.
    last_first = max(acked.values()) if acked else 0.0
    jobs = Counter(event["audience"] for event in result["events"])
    seconds_before = Counter(
        event["audience"]
        for event in result["events"]
        if dt.datetime.fromisoformat(event["ts"]).timestamp() < last_first
    )
    early_seconds = sum(1 for n in seconds_before.values() if n >= 2)
    # Jobs acknowledged per quota day (a day's quota allows 1,176 after the margin).
    per_day = Counter(
        int(dt.datetime.fromisoformat(event["ts"]).timestamp() // args.day_seconds)
        for event in result["events"]
    )
    acks = sorted(acked.values())
    span = acks[-1] - acks[0] if len(acks) > 1 else 0.0
    jobs_before_last = sum(seconds_before.values())
    rate = (jobs_before_last - 1) / span if span > 0 else 0.0
    round_seconds = MAX_AGE_SECONDS + args.audiences / rate if rate else 0.0
    worst = ordered[-1] if ordered else math.inf
    say(
        f"{len(acked)} of {args.audiences} audiences had a turn; wait longest {worst:.1f} s"
        f" ({longest}, {kind(names.index(longest)) if longest else '-'}), median"
        f" {statistics.median(ordered) if ordered else math.inf:.1f} s; bound"
        f" {expected['bound_seconds']:.1f} s; {rate:.2f} jobs/s; {early_seconds} audiences had"
        f" a second job before the last had its first; daemon exit {code}"
    )
    return emit(
        "fairness",
        {
            "audiences": args.audiences,
            "large": sum(1 for i in range(args.audiences) if kind(i) == "large"),
            "refreshed": sum(1 for i in range(args.audiences) if kind(i) == "refreshed"),
            "day_seconds": args.day_seconds,
            "job_seconds": args.job_seconds,
            "requests_per_minute": args.requests_per_minute,
            "changes_sent": result["sent"],
            "audiences_served": len(acked),
            "audiences_missing": len(missing),
            "wait_max_seconds": round(worst, 3),
            "wait_median_seconds": round(statistics.median(ordered), 3) if ordered else None,
            "wait_p99_seconds": round(
                ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))], 3
            )
            if ordered
            else None,
            "longest_wait_kind": kind(names.index(longest)) if longest else None,
            **expected,
            "jobs_acked": sum(jobs.values()),
            "jobs_per_second": round(rate, 3),
            "jobs_acked_per_day": [per_day[day] for day in sorted(per_day)],
            "round_seconds": round(round_seconds, 3),
            "wait_to_round_ratio": round(worst / round_seconds, 3) if round_seconds else None,
            "wait_to_bound_ratio": round(worst / expected["bound_seconds"], 3),
            "second_job_before_last_first": early_seconds,
            "exit_code": code,
            "daemon_warnings": dict(Counter(e.get("event", "") for e in daemon.events)),
            "bound_target_met": not missing and worst <= expected["bound_seconds"],
        },
        check=args.check,
    )


if __name__ == "__main__":
    raise SystemExit(main())

"""Proof at scale: every audience's list read back within one day, in a few export jobs.

``--audiences`` audiences of ``--members`` members each are delivered already: the
store holds them acknowledged (written through the Store's own API before the daemon
starts) and the emulator's lists hold them (its ``multi-list-column`` dialect: a
multi-list export says each row's list, A5). The daemon then starts with
``multi_list_exports = "yes"`` and Demandbase's real export limits (60 export jobs and
300 status reads a day, 10 GB of results, one export at a time), on emulated days of
``--day-seconds`` (60 by default: one minute), with ``verify_within_hours`` one such
day. The emulator runs in this process (its lists are filled in place); the daemon
runs in its own (``python -m dbsync run``), as it does in production, where
Demandbase's work of writing ten million result rows costs it nothing. The benchmark
reads each audience's last read-back report from outside, through the admin socket
(``dbsync ctl status``: ``last_reconcile``'s ``verified`` and ``finished_at``), once a
second, in a thread so that the emulator's event loop goes on serving.

Figures: the share of audiences verified (a read-back that found every member) within
one emulated day of the daemon's start, export jobs and export volume (bytes of
results files) used, and when the last audience was verified; beside them the
daemon's CPU seconds from its daemon_ready to the last audience verified (/proc/PID/stat),
this process's (the emulator and the polls) over the same span, and what the status
polls took: their wall time, and the daemon's CPU one poll costs (measured on the idle
daemon after the run) times their number, as a share of the daemon's CPU.
Targets: 100% verified within the day, in at most 60 export jobs and 10 GB.

    python -m bench.multi_readback [--audiences 1000] [--members 10000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import uvloop

from bench._common import DaemonProcess, add_check_flag, cpu_seconds, emit, say
from dbsync.model import Account

EXPORT_JOBS_PER_DAY = 60
EXPORT_BYTES_PER_DAY = 10 * 1000**3
FOLD_ROWS = 200_000
POLL_SECONDS = 1.0  # between two status polls: cheap for the daemon, fine enough a clock
COST_POLLS = 5  # polls of the idle daemon after the run, to price one


def verified_reports(socket: Path, members: int) -> dict[str, float]:
    """Each audience whose last read-back found all ``members``: when it finished.

    One ``status`` request over the admin socket (blocking: run it in a thread).
    """
    from dbsync.admin.client import exchange
    from dbsync.admin.protocol import Status, StatusReply

    reply = exchange(socket, Status())
    if not isinstance(reply, StatusReply):
        raise SystemExit(f"dbsync ctl status failed: {reply}")
    return {
        view.audience: view.last_reconcile.finished_at
        for view in reply.audiences
        if view.last_reconcile is not None and view.last_reconcile.verified == members
    }


async def seed_store(
    path: Path, audiences: list[str], accounts: list[Account], list_ids: dict[str, int]
) -> None:
    """Every member desired and acknowledged, as a day of delivery would have left it."""
    from dbsync.clock import SystemClock
    from dbsync.model import AudienceSpec, Change, ListAction
    from dbsync.store import Store

    async with Store.open(path, clock=SystemClock()) as store:
        await store.sync_audiences(
            [
                AudienceSpec(
                    audience_id=a,
                    destination="emulator",
                    name=f"List {a}",
                    list_name=a,
                    list_id=list_ids[a],
                )
                for a in audiences
            ]
        )
        pending: list[Change] = []
        for audience in audiences:
            pending += (
                Change(audience_id=audience, account=a, member=True, ts=1.0) for a in accounts
            )
            if len(pending) >= FOLD_ROWS:
                await store.append_changes(pending)
                pending = []
        await store.append_changes(pending)
        while await store.pending_journal_rows():
            await store.fold_pending()
        for n, audience in enumerate(audiences):
            while batch := await store.plan_batch(audience, ListAction.INSERT, 10_000):
                await store.mark_created(batch.batch_id, n + 1)
                await store.mark_uploaded(batch.batch_id)
                await store.complete_batch(batch.batch_id, list_id=list_ids[audience])


async def run(
    audiences: int, members: int, day_seconds: float, directory: Path
) -> dict[str, object]:
    from dbsync.demandbase.emulator import Emulator, EmulatorSettings, Faults
    from dbsync.testing import (
        FAST_RECONCILE,
        AudienceConfig,
        EmulatorApi,
        database,
        write_reconcile_config,
    )
    from dbsync.testing.emulator import running_emulator

    settings = EmulatorSettings(
        accounts=members,
        seed=11,
        day_seconds=day_seconds,
        job_delay_seconds=0.05,
        visibility_lag_seconds=0.0,
        export_jobs_per_day=EXPORT_JOBS_PER_DAY,
        export_bytes_per_day=EXPORT_BYTES_PER_DAY,
        faults=Faults(dialects=frozenset({"multi-list-column"})),
    )
    ids = [f"aud-{i:05d}" for i in range(audiences)]
    emulator_api: EmulatorApi
    async with running_emulator(settings) as emulator_api:
        emulator: Emulator = emulator_api.emulator
        tenant = emulator.tenant
        page = await emulator_api.control("accounts", limit=str(members), offset="0")
        accounts = [Account(**a) for a in page["accounts"]]
        external_ids = [a.external_id for a in accounts]
        now = time.time()
        list_ids = {}
        for audience in ids:
            account_list = tenant._create_list(audience, now - 1.0)
            account_list.change(now - 1.0, joined=external_ids)
            list_ids[audience] = account_list.id
        configs = [
            AudienceConfig(audience, list_name=audience, list_id=list_ids[audience])
            for audience in ids
        ]
        config = write_reconcile_config(
            directory,
            emulator_api.url,
            configs,
            reconcile={
                **FAST_RECONCILE,
                "multi_list_exports": "yes",
                "visibility_lag_seconds": 0.0,
                "interval_seconds": day_seconds,
                "verify_within_hours": day_seconds / 3600.0,
                "export_poll_initial_seconds": 0.05,
                "export_poll_max_seconds": 1.0,
            },
            limits={
                "day_seconds": day_seconds,
                "export_jobs_per_day": EXPORT_JOBS_PER_DAY,
                "export_status_per_day": 300,
                "export_bytes_per_day": EXPORT_BYTES_PER_DAY,
                "quota_safety_margin": 0.0,
            },
        )
        started = time.perf_counter()
        # The store through its own API, before the daemon opens it.
        await seed_store(database(config), ids, accounts, list_ids)
        say(f"seeded {audiences} x {members} in {time.perf_counter() - started:.1f} s")
        socket = config.parent / "state" / "admin.sock"
        daemon = DaemonProcess(config)
        # Blocking calls in threads: the emulator serves the daemon meanwhile.
        await asyncio.to_thread(daemon.start)
        try:
            # When it logged daemon_ready, on this clock (the reports' too: the same host).
            ready = time.time() - (time.perf_counter() - daemon.started_at - daemon.ready_seconds)
            daemon_cpu_before = cpu_seconds(daemon.pid)
            bench_cpu_before = time.process_time()
            verified_at: dict[str, float] = {}
            poll_seconds: list[float] = []
            deadline = ready + 2 * day_seconds
            while len(verified_at) < audiences and time.time() < deadline:
                asked = time.perf_counter()
                found = await asyncio.to_thread(verified_reports, socket, members)
                poll_seconds.append(time.perf_counter() - asked)
                for audience, finished_at in found.items():
                    verified_at.setdefault(audience, finished_at)
                await asyncio.sleep(POLL_SECONDS)
            daemon_cpu = cpu_seconds(daemon.pid) - daemon_cpu_before
            bench_cpu = time.process_time() - bench_cpu_before
            wall = time.time() - ready
            # What one poll costs the daemon, read-backs over: what the polls took of it.
            idle_before = cpu_seconds(daemon.pid)
            for _ in range(COST_POLLS):
                await asyncio.to_thread(verified_reports, socket, members)
            poll_cpu = (cpu_seconds(daemon.pid) - idle_before) / COST_POLLS
        finally:
            code = await asyncio.to_thread(daemon.stop)
        exports = tenant.export_jobs
        within = sum(1 for at in verified_at.values() if at - ready <= day_seconds)
        volume = sum(len(job.result or b"") for job in exports)
        return {
            "audiences": audiences,
            "members": members,
            "day_seconds": day_seconds,
            "verified_within_day_share": round(within / audiences, 4),
            "verified_total": len(verified_at),
            "last_verified_after_seconds": round(max(verified_at.values()) - ready, 2)
            if verified_at
            else None,
            "export_jobs": len(exports),
            "lists_per_export_max": max((len(job.list_ids) for job in exports), default=0),
            "export_bytes": volume,
            "verified_target_met": within == audiences,
            "exports_target_met": len(exports) <= EXPORT_JOBS_PER_DAY,
            "volume_target_met": volume <= EXPORT_BYTES_PER_DAY,
            "daemon_cpu_seconds": round(daemon_cpu, 2),
            "bench_cpu_seconds": round(bench_cpu, 2),
            "wall_seconds": round(wall, 2),
            "status_polls": len(poll_seconds),
            "status_poll_seconds_mean": round(sum(poll_seconds) / len(poll_seconds), 4),
            "status_poll_seconds_max": round(max(poll_seconds), 4),
            "status_poll_daemon_cpu_seconds": round(poll_cpu, 3),
            "status_polls_daemon_cpu_share": round(len(poll_seconds) * poll_cpu / daemon_cpu, 4)
            if daemon_cpu
            else None,
            "daemon_exit_code": code,
            "daemon_warnings": len(daemon.events),
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audiences", type=int, default=1_000)
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--day-seconds", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="20 audiences of 200 members")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.audiences, args.members = 20, 200
    with tempfile.TemporaryDirectory(prefix="dbsync-multi-") as directory:
        figures = uvloop.run(run(args.audiences, args.members, args.day_seconds, Path(directory)))
    say(
        f"{figures['verified_within_day_share']:.1%} verified within one day;"
        f" {figures['export_jobs']} export jobs, {figures['export_bytes']} bytes"
    )
    return emit("multi_readback", figures, check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())

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
Demandbase's work of writing ten million result rows costs it nothing.

When each audience was verified is read from outside the daemon, once a second: its
SQLite file, read-only (``reconcile_runs``: each completed read-back's report, with its
``verified`` count and ``finished_at``), in a thread so that the emulator goes on
serving. ``dbsync ctl status`` carries the same figures (``last_reconcile``), but it
reads every audience's backlog, ledger and batches through the daemon's store: at
1,000 audiences, polled once a second (each reply took about 2 s), it added about 27
CPU seconds to the daemon's 83-85 and cut the share verified within the day from
63-74% to 50%. So status is asked only after the run, as a cross-check
(``status_verified``) and to price it (``status_daemon_cpu_seconds``: the daemon's CPU
over one request; at full size the second day's read-backs run meanwhile, so it is an
upper bound).

Figures: the share of audiences verified (a read-back that found every member) within
one emulated day of the daemon's start, export jobs and export volume (bytes of
results files) used, and when the last audience was verified; beside them the
daemon's CPU seconds from its daemon_ready to the last audience verified
(/proc/PID/stat), and this process's (the emulator and the reads) over the same span.
Targets: 100% verified within the day, in at most 60 export jobs and 10 GB.

    python -m bench.multi_readback [--audiences 1000] [--members 10000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import tempfile
import time
from pathlib import Path

import uvloop

from bench._common import DaemonProcess, add_check_flag, cpu_seconds, emit, say
from dbsync.model import Account

EXPORT_JOBS_PER_DAY = 60
EXPORT_BYTES_PER_DAY = 10 * 1000**3
FOLD_ROWS = 200_000
POLL_SECONDS = 1.0  # between two reads of the store: fine enough, and cheap
COST_POLLS = 3  # ctl status requests after the run: the cross-check, and their price


class VerifiedReader:
    """Read-only reads of the daemon's SQLite file: each audience's completed read-back
    reports, newest run first seen, those that found all ``members``.

    WAL lets this reader run beside the daemon's writer without blocking it, and the
    work is this process's, not the daemon's (polling ``ctl status`` at 1,000 audiences
    took about a quarter of the daemon's CPU: see the module's docstring). Each read
    asks only for the runs completed since the last one. Blocking: run it in a thread.
    """

    def __init__(self, path: Path, members: int) -> None:
        self.path = path
        self.members = members
        self.after_run_id = 0
        self.verified_at: dict[str, float] = {}

    def read(self) -> None:
        from dbsync.reconcile.report import decode_report

        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT run_id, audience_id, report FROM reconcile_runs"
                " WHERE state = 'completed' AND report IS NOT NULL AND run_id > ?"
                " ORDER BY run_id",
                (self.after_run_id,),
            ).fetchall()
        for run_id, audience, body in rows:
            self.after_run_id = max(self.after_run_id, run_id)
            report = decode_report(body)
            if report.verified == self.members:
                self.verified_at.setdefault(audience, report.finished_at)


def status_verified(socket: Path, members: int) -> dict[str, float]:
    """What ``dbsync ctl status`` says: each audience whose last read-back found all
    ``members``, and when it finished. Blocking: run it in a thread."""
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
            reader = VerifiedReader(database(config), members)
            read_seconds: list[float] = []
            deadline = ready + 2 * day_seconds
            while len(reader.verified_at) < audiences and time.time() < deadline:
                asked = time.perf_counter()
                await asyncio.to_thread(reader.read)
                read_seconds.append(time.perf_counter() - asked)
                await asyncio.sleep(POLL_SECONDS)
            daemon_cpu = cpu_seconds(daemon.pid) - daemon_cpu_before
            bench_cpu = time.process_time() - bench_cpu_before
            wall = time.time() - ready
            verified_at = reader.verified_at
            # The public interface agrees? And what one status costs the daemon.
            status_before = cpu_seconds(daemon.pid)
            for _ in range(COST_POLLS):
                by_status = await asyncio.to_thread(status_verified, socket, members)
            status_cpu = (cpu_seconds(daemon.pid) - status_before) / COST_POLLS
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
            "store_reads": len(read_seconds),
            "store_read_seconds_max": round(max(read_seconds), 4),
            # ctl status after the run: audiences it shows verified (all of them, as the
            # store said), and the daemon's CPU over one request (an upper bound: the
            # second day's read-backs may run meanwhile).
            "status_verified": len(by_status),
            "status_daemon_cpu_seconds": round(status_cpu, 3),
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

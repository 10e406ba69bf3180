"""AEP files: a 5,000,000-row export applied from the watched folder: rate and peak memory.

A real daemon runs in its own process (so that VmHWM is its own) watching a folder,
with one audience fed by files, paused so that nothing is delivered meanwhile: what is
measured is applying the file, not sending it. The export is one split part of
``--rows`` rows (AEP splits at 5,000,000), CSV as AEP writes it with Adobe's headers,
and its manifest; it is written beside the folder and renamed into it (as a sync tool
does), so that the clock starts when the daemon can see it. Timed: until ``dbsync ctl
files`` shows the run applied (its difference committed to the journal in one
transaction), and until it is folded into desired state (``ctl status`` shows every
account pending). Then the daemon's VmHWM.
Targets: >= 100,000 rows/s to applied, and a peak RSS under 300 MB.

    python -m bench.files [--rows 5000000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench._common import (
    DaemonProcess,
    EmulatorProcess,
    add_check_flag,
    emit,
    pending_inserts,
    say,
    status_kib,
)

AUDIENCE = "aep-files"
AEP_ID = "7c1f0d3a-2b4e-4c6f-9a8b-1d2e3f4a5b6c"
RATE_TARGET = 100_000.0
PEAK_TARGET_MB = 300.0


def write_part(path: Path, rows: int) -> int:
    """One AEP part of ``rows`` accounts, written in blocks; its size."""
    with path.open("wb") as file:
        file.write(b"accountKey_sourceKey,accountName,accountOrganization_domain,status\n")
        for start in range(0, rows, 100_000):
            block = b"".join(
                b"%08d@src.marketo,Company %08d,c%08d.example,realized\n" % (i, i, i)
                for i in range(start, min(rows, start + 100_000))
            )
            file.write(block)
    return path.stat().st_size


def runs(socket: Path) -> list[str]:
    from dbsync.admin.client import exchange
    from dbsync.admin.protocol import Files, FilesReply

    reply = exchange(socket, Files())
    assert isinstance(reply, FilesReply), reply
    return [r.outcome for r in reply.runs]


def main() -> int:
    from dbsync.config.schema import FileIngestSettings
    from dbsync.testing import AudienceConfig, write_config
    from dbsync.testing.aepfiles import epoch, export_name, write_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--quick", action="store_true", help="20,000 rows")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.rows = 20_000

    with tempfile.TemporaryDirectory(prefix="dbsync-bench-") as tmp, EmulatorProcess() as emu:
        inbox, outside = Path(tmp) / "inbox", Path(tmp) / "upload"
        inbox.mkdir()
        outside.mkdir()
        name = export_name(AEP_ID, epoch(2026, 12, 3)) + ".csv"
        size = write_part(outside / name, args.rows)
        config = write_config(
            Path(tmp),
            emu.url,
            [AudienceConfig(AUDIENCE, paused=True, aep_audience_id=AEP_ID)],
            daemon={"drain_seconds": 5.0, "summary_interval_seconds": 60.0},
            ingest={"files": FileIngestSettings(directory=inbox, poll_seconds=0.1)},
        )
        daemon = DaemonProcess(config)
        daemon.start()
        before = status_kib(daemon.pid)
        socket = Path(tmp) / "state" / "admin.sock"
        started = time.perf_counter()
        os.replace(outside / name, inbox / name)
        write_manifest(inbox, [inbox / name], scheduled_time=epoch(2026, 12, 3))
        while runs(socket) != ["applied"]:
            if time.perf_counter() - started > 1200:
                raise SystemExit(f"not applied within 1200 s: {runs(socket)}")
            time.sleep(0.05)
        applied = time.perf_counter() - started
        while (count := pending_inserts(socket, AUDIENCE)) < args.rows:
            if time.perf_counter() - started > 1200:
                raise SystemExit(f"only {count} accounts folded within 1200 s")
            time.sleep(0.05)
        folded = time.perf_counter() - started
        after = status_kib(daemon.pid)
        code = daemon.stop()

    peak_mb = after["VmHWM"] / 1024
    rate = args.rows / applied
    say(
        f"{args.rows:,} rows ({size / 2**20:.1f} MiB CSV): applied after {applied:.2f} s"
        f" ({rate:,.0f} rows/s), folded after {folded:.2f} s; daemon RSS"
        f" {before['VmRSS'] / 1024:.0f} MiB before, peak {peak_mb:.0f} MiB; exit {code}"
    )
    return emit(
        "files",
        {
            "rows": args.rows,
            "file_mib": round(size / 2**20, 1),
            "applied_seconds": round(applied, 3),
            "applied_rows_per_second": round(rate),
            "folded_seconds": round(folded, 3),
            "folded_rows_per_second": round(args.rows / folded),
            "rss_before_mb": round(before["VmRSS"] / 1024, 1),
            "peak_rss_mb": round(peak_mb, 1),
            "exit_code": code,
            "rate_target_met": rate >= RATE_TARGET,
            "memory_target_met": peak_mb <= PEAK_TARGET_MB,
        },
        check=args.check,
    )


if __name__ == "__main__":
    raise SystemExit(main())

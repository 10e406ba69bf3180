"""Scale: 10,000 activated audiences in one daemon: startup time, resident memory, idle CPU.

Writes a configuration of ``--audiences`` audiences (one destination, the emulator in
its own process, ingest on port 0, the summary every 60 s as by default), starts
``python -m dbsync run`` in its own process and times it until its ``daemon_ready``
log line. Then, with nothing to send, it samples the daemon's /proc/PID/stat over
``--idle-seconds`` for its idle CPU: CPU seconds over wall seconds, everything the
daemon does periodically included. The default, 120 s, is two whole summary
intervals, so the window holds two rounds whatever its phase: the figure is the steady
state. It also reports the seconds that used over 5% of a core (the summary rounds)
apart from the quiet rest. Then VmRSS and VmHWM from /proc/PID/status.
Targets: <= 300 MB resident and <= 2% idle CPU.

    python bench/scale.py [--audiences 10000] [--idle-seconds 120]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench._common import (
    DaemonProcess,
    EmulatorProcess,
    add_check_flag,
    cpu_seconds,
    emit,
    say,
    status_kib,
)

RSS_TARGET_MB = 300.0
IDLE_CPU_TARGET_PERCENT = 2.0


def write_scale_config(directory: Path, base_url: str, audiences: int) -> Path:
    from dbsync.testing import AudienceConfig, write_config

    configs = [
        AudienceConfig(
            f"scale-{i:05d}", max_records=10_000, max_age_seconds=60.0, requests_per_minute=60
        )
        for i in range(audiences)
    ]
    return write_config(
        directory,
        base_url,
        configs,
        daemon={"drain_seconds": 5.0, "summary_interval_seconds": 60.0},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audiences", type=int, default=10_000)
    parser.add_argument("--idle-seconds", type=float, default=120.0)
    parser.add_argument("--settle-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="100 audiences, 2 s idle")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.audiences, args.idle_seconds, args.settle_seconds = 100, 2.0, 0.5

    with tempfile.TemporaryDirectory(prefix="dbsync-bench-") as tmp, EmulatorProcess() as emu:
        config = write_scale_config(Path(tmp), emu.url, args.audiences)
        daemon = DaemonProcess(config)
        ready = daemon.start()
        startup = daemon.ready_seconds
        say(f"{ready['audiences']} audiences ready in {startup:.2f} s")
        time.sleep(args.settle_seconds)  # let the start's own work finish
        cpu_before, wall_before = cpu_seconds(daemon.pid), time.perf_counter()
        samples = []  # CPU seconds of each second: a summary round shows as a burst
        last = cpu_before
        while (elapsed := time.perf_counter() - wall_before) < args.idle_seconds:
            time.sleep(min(1.0, args.idle_seconds - elapsed))
            now = cpu_seconds(daemon.pid)
            samples.append(now - last)
            last = now
        idle_cpu = last - cpu_before
        wall = time.perf_counter() - wall_before
        memory = status_kib(daemon.pid)
        code = daemon.stop()

    rss_mb = memory["VmRSS"] / 1024
    hwm_mb = memory["VmHWM"] / 1024
    idle_percent = 100 * idle_cpu / wall
    # Seconds that used over 5% of a core: the periodic rounds, apart from the quiet rest.
    bursts = [sample for sample in samples if sample > 0.05]
    quiet = idle_cpu - sum(bursts)
    say(
        f"resident {rss_mb:.1f} MiB (peak {hwm_mb:.1f}); idle CPU {idle_percent:.2f}%"
        f" over {wall:.1f} s; exit {code}"
    )
    return emit(
        "scale",
        {
            "audiences": ready["audiences"],
            "startup_seconds": round(startup, 3),
            "rss_mb": round(rss_mb, 1),
            "peak_rss_mb": round(hwm_mb, 1),
            "idle_cpu_percent": round(idle_percent, 3),
            "idle_seconds": round(wall, 1),
            "burst_cpu_seconds": round(sum(bursts), 2),
            "burst_seconds": len(bursts),
            "quiet_cpu_percent": round(100 * quiet / max(wall - len(bursts), 1e-9), 3),
            "exit_code": code,
            "rss_target_met": rss_mb <= RSS_TARGET_MB,
            "idle_cpu_target_met": idle_percent <= IDLE_CPU_TARGET_PERCENT,
            "warnings": len(daemon.events),
        },
        check=args.check,
    )


if __name__ == "__main__":
    raise SystemExit(main())

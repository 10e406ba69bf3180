"""Ingest memory: the daemon's peak RSS while 10 bodies of 60 MiB arrive at once.

A real daemon runs in its own process (so that VmHWM is its own) with one audience,
paused. The CDP sends ``--bodies`` NDJSON bodies of ``--mib`` MiB each, all at once, on
as many connections; each body's last line is malformed, so that each is read and
decoded whole, then refused with 400 and nothing is stored: what is measured is what
holding and decoding bodies costs, not the store growing. Two runs, each on a fresh
daemon: ``unbounded`` (``max_body_bytes_in_flight`` far above the total, which is how
ingest behaved before the bound) and ``bounded`` (the shipped default, 128 MiB: bodies
beyond it wait up to ``body_wait_seconds``, then get 503). Prints each run's peak RSS
and the answers by status. Target: the bounded run's peak under 600 MiB.

    python -m bench.ingest_memory [--bodies 10] [--mib 60] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench._common import DaemonProcess, EmulatorProcess, add_check_flag, emit, say, status_kib

AUDIENCE = "memory"
PEAK_TARGET_MB = 600.0
UNBOUNDED = 64 * 1024**3  # far above any total sent: no bound at all
BOUNDED = 128 * 1024**2  # the shipped default of max_body_bytes_in_flight


def ndjson_body(mib: int) -> bytes:
    line = (
        b'{"audience_id":"memory","account":{"external_id":"MEM-%08d",'
        b'"name":"Company %08d","domain":"c%08d.example"},"member":true}\n'
    )
    count = mib * 2**20 // len(line % (0, 0, 0))
    lines = [line % (i, i, i) for i in range(count)]
    return b"".join(lines) + b"{not json}\n"  # refused at the end, after all was decoded


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/x-ndjson"}
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as refused:
        return int(refused.code)


def run(
    tmp: Path, emulator_url: str, body: bytes, bodies: int, in_flight: int, wait_seconds: float
) -> tuple[float, float, dict[int, int]]:
    """One fresh daemon, ``bodies`` at once; (RSS before, peak RSS, answers by status)."""
    from dbsync.testing import AudienceConfig, write_config

    # Paused: nothing is delivered meanwhile (and nothing is stored: every body is 400).
    config = write_config(
        tmp,
        emulator_url,
        [AudienceConfig(AUDIENCE, paused=True)],
        daemon={"drain_seconds": 5.0, "summary_interval_seconds": 60.0},
        ingest={
            "max_body_bytes_in_flight": in_flight,
            "body_wait_seconds": wait_seconds,
            "body_timeout_seconds": 600.0,
        },
    )
    daemon = DaemonProcess(config)
    try:
        ready = daemon.start()
        before = status_kib(daemon.pid)["VmRSS"] / 1024
        url = f"{ready['ingest']}/v1/changes"
        with ThreadPoolExecutor(bodies) as pool:
            statuses = Counter(pool.map(lambda _: post(url, body), range(bodies)))
        peak = status_kib(daemon.pid)["VmHWM"] / 1024
    finally:
        daemon.stop()
    return before, peak, dict(sorted(statuses.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bodies", type=int, default=10)
    parser.add_argument("--mib", type=int, default=60)
    parser.add_argument(
        "--wait-seconds", type=float, default=5.0, help="body_wait_seconds (default 5)"
    )
    parser.add_argument("--quick", action="store_true", help="10 bodies of 4 MiB")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.mib = 4

    body = ndjson_body(args.mib)
    figures: dict[str, object] = {"bodies": args.bodies, "body_mib": args.mib}
    with EmulatorProcess() as emu:
        for name, in_flight in (("unbounded", UNBOUNDED), ("bounded", BOUNDED)):
            with tempfile.TemporaryDirectory(prefix="dbsync-bench-") as tmp:
                before, peak, statuses = run(
                    Path(tmp), emu.url, body, args.bodies, in_flight, args.wait_seconds
                )
            say(
                f"{name}: {args.bodies} x {args.mib} MiB at once: RSS {before:.0f} MiB"
                f" before, peak {peak:.0f} MiB; answers {statuses}"
            )
            figures[f"{name}_rss_before_mb"] = round(before, 1)
            figures[f"{name}_peak_rss_mb"] = round(peak, 1)
            figures[f"{name}_statuses"] = {str(k): v for k, v in statuses.items()}
    figures["max_body_bytes_in_flight"] = BOUNDED
    figures["body_wait_seconds"] = args.wait_seconds
    figures["peak_target_met"] = figures["bounded_peak_rss_mb"] <= PEAK_TARGET_MB  # type: ignore[operator]
    return emit("ingest_memory", figures, check=args.check)


if __name__ == "__main__":
    raise SystemExit(main())

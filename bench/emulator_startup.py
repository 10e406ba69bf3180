"""Emulator startup: seconds from spawning ``dbsync emulator`` to its first answer.

Each run spawns ``python -m dbsync emulator --port 0`` (default settings: 10,000
accounts), waits for its ``emulator_listening`` line, then times the first answer to
``GET /_emulator/stats``; the process is stopped with SIGTERM and must exit 0. Prints
each run and the median; the target is under 2 s (reported in the JSON line; a miss
exits 1 only with --check).

    python bench/emulator_startup.py [--runs 5] [--accounts 10000] [--quick] [--check]

Human lines go to stderr; the last line on stdout is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench._common import add_check_flag, emit, say

REPOSITORY = Path(__file__).resolve().parent.parent

TARGET_SECONDS = 2.0


def startup_seconds(accounts: int) -> float:
    """One run: spawn, wait for the listening line, GET the stats, stop."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "dbsync", "emulator", "--port", "0", "--accounts", str(accounts)],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["url"]
        with urllib.request.urlopen(f"{url}/_emulator/stats", timeout=30) as answer:
            answer.read()
        elapsed = time.perf_counter() - started
        process.send_signal(signal.SIGTERM)
        if process.wait(timeout=30) != 0:
            raise SystemExit(f"the emulator exited {process.returncode} after SIGTERM")
        return elapsed
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="2 runs")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.runs = 2
    runs = []
    for run in range(1, args.runs + 1):
        runs.append(startup_seconds(args.accounts))
        say(f"run {run}: {runs[-1]:.3f} s")
    median = statistics.median(runs)
    verdict = "within" if median < TARGET_SECONDS else "OVER"
    say(
        f"emulator startup ({args.accounts} accounts): median {median:.3f} s,"
        f" min {min(runs):.3f} s, max {max(runs):.3f} s"
        f" ({verdict} the {TARGET_SECONDS:.0f} s target)"
    )
    return emit(
        "emulator_startup",
        {
            "accounts": args.accounts,
            "runs": len(runs),
            "median_seconds": round(median, 3),
            "min_seconds": round(min(runs), 3),
            "max_seconds": round(max(runs), 3),
            "target_met": median < TARGET_SECONDS,
        },
        check=args.check,
    )


if __name__ == "__main__":
    raise SystemExit(main())

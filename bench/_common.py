"""What every benchmark shares: its one JSON line, the machine, and /proc readings.

Each benchmark prints human lines on stderr and, last, one JSON object on stdout:
``{"bench": NAME, ...figures..., "machine": {...}}``. The smoke test
(tests/integration/test_bench_smoke.py) runs each in its ``--quick`` form and decodes
that line.

A target is a figure named ``*target_met`` (true or false) in that line. A missed target
is a finding, not a failure: the benchmark still exits 0, since a busy or slow machine
misses targets that the code meets. Exit 1 means that the benchmark could not run, or,
with ``--check``, that a target was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import IO, Any

REPOSITORY = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(line: str) -> None:
    """A line for the person running the benchmark: stderr, so stdout stays one JSON line."""
    print(line, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """nproc, the CPU model and the Python version: where the figures were taken."""
    model = ""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
    }


def add_check_flag(parser: argparse.ArgumentParser) -> None:
    """``--check``: exit 1 when a target is missed, for people who want that."""
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target is missed (by default a miss is reported in the JSON"
        " line and the exit code is 0)",
    )


def emit(bench: str, figures: Mapping[str, Any], *, check: bool = False) -> int:
    """Print the benchmark's one JSON line on stdout; return its exit code.

    0, or 1 when ``check`` is set and a ``*target_met`` figure is false.
    """
    line = {"bench": bench, **figures, "machine": machine()}
    print(json.dumps(line, separators=(",", ":")), flush=True)
    missed = sorted(
        key for key, value in figures.items() if key.endswith("target_met") and not value
    )
    if missed:
        say(f"target missed: {', '.join(missed)} (reported, not a failure without --check)")
    return 1 if check and missed else 0


def status_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (resident now and at its peak) of a process, in KiB."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def cpu_seconds(pid: int | str = "self") -> float:
    """User plus system CPU time a process has used so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name (field 2) may hold spaces: count fields after its ')'.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class DaemonProcess:
    """``python -m dbsync run --config CONFIG`` in its own process, so its RSS and CPU are
    its own. Its JSON log lines are read on a thread (a full pipe would stall it).

    ``events`` gathers its warnings and errors; ``kept`` the lines of the events named
    in ``keep`` (e.g. ``batch_acked``), whatever their level, in the order logged.
    """

    def __init__(self, config: Path, *, keep: Collection[str] = ()) -> None:
        self.config = config
        self.process: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self.kept: list[dict[str, Any]] = []
        self._keep = frozenset(keep)
        self._ready = threading.Event()
        self.started_at = 0.0
        self.ready_seconds = 0.0

    def start(self, timeout: float = 120.0) -> dict[str, Any]:
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dbsync", "run", "--config", str(self.config)],
            cwd=REPOSITORY,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()
        if not self._ready.wait(timeout) or self.ready is None:
            self.stop()
            raise SystemExit(f"the daemon was not ready within {timeout} s")
        return self.ready

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "daemon_ready":
                self.ready_seconds = time.perf_counter() - self.started_at
                self.ready = event
                self._ready.set()
            elif event.get("level") in ("warning", "error", "critical"):
                self.events.append(event)
            if event.get("event") in self._keep:
                self.kept.append(event)
        self._ready.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> int:
        """SIGTERM, then the exit code (the daemon drains first)."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.terminate()
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


class EmulatorProcess:
    """``python -m dbsync emulator --port 0 ARGS...`` in its own process; then ``url``."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> EmulatorProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dbsync", "emulator", "--port", "0", *self.args],
            cwd=REPOSITORY,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.url = json.loads(self.process.stdout.readline())["url"]
        # Keep draining its log so that it never blocks on a full pipe.
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def pending_inserts(socket: Path, audience: str) -> int:
    """The audience's accounts waiting to be inserted, from ``dbsync ctl status``."""
    from dbsync.admin.client import exchange
    from dbsync.admin.protocol import Status, StatusReply

    reply = exchange(socket, Status(audience=audience))
    assert isinstance(reply, StatusReply), reply
    return reply.audiences[0].pending_inserts

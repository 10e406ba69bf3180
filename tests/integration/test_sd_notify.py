"""sd_notify as systemd sees it: a datagram socket stands in for systemd's.

The daemon runs in process with ``$NOTIFY_SOCKET`` pointing at a socket the test
reads, and ``$WATCHDOG_USEC``/``$WATCHDOG_PID`` asking for pings, as systemd sets them
for ``Type=notify`` and ``WatchdogSec=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dbsync import systemd
from dbsync.clock import FakeClock
from dbsync.testing import (
    AudienceConfig,
    running_daemon,
    running_emulator,
    wait_until,
    write_config,
)

WATCHDOG_USEC = 200_000  # pings every 0.1 s
SUMMARY_SECONDS = 1.0  # the shortest interval the configuration accepts


class FakeSystemd:
    """The notify socket: every datagram received, as its ``KEY=VALUE`` lines."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.messages: list[list[str]] = []

    def drain(self) -> list[list[str]]:
        """Read every datagram waiting on the socket (it is non-blocking)."""
        with contextlib.suppress(BlockingIOError):
            while True:
                self.messages.append(self._sock.recv(4096).decode().split("\n"))
        return self.messages

    def lines(self) -> list[str]:
        return [line for message in self.drain() for line in message]

    def count(self, line: str) -> int:
        return self.lines().count(line)

    def index(self, prefix: str, start: int = 0) -> int:
        """Index of the first message from ``start`` with a line starting with ``prefix``."""
        for i, message in enumerate(self.drain()[start:], start):
            if any(line.startswith(prefix) for line in message):
                return i
        raise AssertionError(f"no {prefix!r} after message {start}: {self.messages}")


@contextlib.contextmanager
def fake_systemd(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSystemd]:
    with tempfile.TemporaryDirectory(prefix="dbsync-notify-") as directory:
        path = str(Path(directory) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            sock.setblocking(False)
            monkeypatch.setenv("NOTIFY_SOCKET", path)
            yield FakeSystemd(sock)


@contextlib.asynccontextmanager
async def daemon_under_systemd(tmp_path: Path) -> AsyncIterator[None]:
    async with running_emulator() as emulator:
        config = write_config(
            tmp_path,
            emulator.url,
            [AudienceConfig("notify-a")],
            daemon={"summary_interval_seconds": SUMMARY_SECONDS},
        )
        async with running_daemon(config):
            yield


async def test_ready_watchdog_reloading_and_stopping_reach_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. systemd (a datagram socket) asks for a watchdog ping every 0.2 s.
    2. The daemon starts; wait for 3 pings and a STATUS= line.
    3. SIGHUP (the daemon's own handler); then stop it gracefully.
    Result: READY=1 came once startup was done, before any ping; WATCHDOG=1 kept
    coming; the reload sent RELOADING=1 with a MONOTONIC_USEC of this clock, then
    READY=1 again; the stop sent STOPPING=1."""
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    with fake_systemd(monkeypatch) as systemd_socket:
        async with daemon_under_systemd(tmp_path):
            ready = systemd_socket.index("READY=1")
            await wait_until(lambda: systemd_socket.count("WATCHDOG=1") >= 3, 5.0, what="pings")
            assert ready < systemd_socket.index("WATCHDOG=1")
            await wait_until(
                lambda: any(
                    line.startswith("STATUS=delivering 1 audiences")
                    for line in systemd_socket.lines()
                ),
                5.0,
                what="a STATUS= line from the summary",
            )

            before = time.monotonic_ns() // 1000
            os.kill(os.getpid(), signal.SIGHUP)
            await wait_until(
                lambda: any("RELOADING=1" in m for m in systemd_socket.drain()[ready + 1 :]),
                5.0,
                what="RELOADING=1",
            )
            reloading = systemd_socket.index("RELOADING=1", ready + 1)
            [usec] = [
                line for line in systemd_socket.messages[reloading] if line.startswith("MONOTONIC")
            ]
            assert before <= int(usec.removeprefix("MONOTONIC_USEC=")) <= time.monotonic_ns()
            await wait_until(
                lambda: any("READY=1" in m for m in systemd_socket.drain()[reloading + 1 :]),
                5.0,
                what="READY=1 after the reload",
            )
        assert "STOPPING=1" in systemd_socket.lines()


async def test_without_a_watchdog_request_nothing_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd without WatchdogSec= the daemon sends READY=1 and no WATCHDOG=1."""
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    with fake_systemd(monkeypatch) as systemd_socket:
        async with daemon_under_systemd(tmp_path):
            systemd_socket.index("READY=1")
            await wait_until(
                lambda: any(
                    line.startswith("STATUS=delivering") for line in systemd_socket.lines()
                ),
                5.0,
                what="a STATUS= line",
            )
        assert systemd_socket.count("WATCHDOG=1") == 0


async def test_the_watchdog_is_withheld_while_unhealthy_and_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """1. A watchdog every 10 s (fake clock) over a health check that fails for three
    periods, then recovers.
    Result: a ping for each healthy period only; one ``watchdog_withheld`` event with
    the reason, not one per period."""
    problems = iter(
        [
            "",
            "the store is not answering",
            "the store is not answering",
            "the store is not answering",
            "",
            "",
        ]
    )

    async def healthy() -> str:
        return next(problems)

    clock = FakeClock()
    with fake_systemd(monkeypatch) as systemd_socket:
        watchdog = asyncio.create_task(systemd.run_watchdog(10.0, healthy, clock))
        for _ in range(6):
            await clock.wait_for_sleepers(1)
            await clock.advance(10.0)
        await clock.wait_for_sleepers(1)
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        assert systemd_socket.count("WATCHDOG=1") == 3
    withheld = [r for r in caplog.records if r.getMessage() == "watchdog_withheld"]
    assert [r.__dict__["reason"] for r in withheld] == ["the store is not answering"]


async def test_a_health_check_that_raises_withholds_one_ping_and_the_loop_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The health check raises EMFILE once (the process is out of descriptors).
    Result: that period's ping is withheld with the reason; the loop goes on pinging."""
    outcomes: list[BaseException | str] = ["", OSError(errno.EMFILE, "Too many open files"), ""]

    async def healthy() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    clock = FakeClock()
    with fake_systemd(monkeypatch) as systemd_socket:
        watchdog = asyncio.create_task(systemd.run_watchdog(10.0, healthy, clock))
        for _ in range(3):
            await clock.wait_for_sleepers(1)
            await clock.advance(10.0)
        await clock.wait_for_sleepers(1)
        assert not watchdog.done()
        watchdog.cancel()
        await asyncio.gather(watchdog, return_exceptions=True)
        assert systemd_socket.count("WATCHDOG=1") == 2
    withheld = [r for r in caplog.records if r.getMessage() == "watchdog_withheld"]
    assert len(withheld) == 1
    assert "Too many open files" in withheld[0].__dict__["reason"]

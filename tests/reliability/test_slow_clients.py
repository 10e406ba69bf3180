"""Slow-loris, idle and descriptor-exhausting clients against a real daemon.

The daemon is ``python -m dbsync run`` in its own process with a low ``RLIMIT_NOFILE``
(set in the child before exec), so that running out of descriptors takes a few dozen
connections rather than a thousand; the emulator runs in the test process. Loopback
only, every count and wait bounded.

Two scenarios:

* **the cap protects**: an attacker keeps many connections open that trickle headers
  or say nothing, more than ``max_connections`` and more than the descriptor limit.
  Meanwhile ``GET /v1/health`` answers 200 (a new connection evicts an idle one) and
  ``dbsync ctl status`` answers; afterwards every attacking connection is found closed
  by the server, not by the client, and both still answer.
* **exhaustion**: ``max_connections`` above the descriptor limit, so that ingest
  accepts until the process has no descriptor left. A ``dbsync ctl status`` sent then
  waits (``admin_accept_failed`` is logged once); the daemon does not exit; once the
  idle timeout has closed the attackers and they stop, the status is answered and
  health is 200.

The default run has the short form; ``-m slow`` the long one (more connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dbsync.testing import AudienceConfig, running_emulator, write_config

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
# Each phase waits for conditions; this bounds each wait, far beyond what they take.
WAIT_SECONDS = 30.0
# Tries of GET /v1/health, paced 20 ms apart, before it must have answered 200: a new
# connection competes with the flood for a slot, and on a busy machine the flood's
# reconnects win more often. 1,500 paced tries are about the WAIT_SECONDS bound.
HEALTH_TRIES = 1_500
# The long form's 400 attackers on two busy cores need more than the module's 120 s.
LONG_FORM = [pytest.mark.slow, pytest.mark.timeout(600)]


class Daemon:
    """The daemon subprocess; its JSON log lines collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.ingest = ""
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            text = line.decode(errors="replace")
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                event = json.loads(text)
                self.events.append(event)
                if event.get("event") == "daemon_ready":
                    self.ingest = event["ingest"]
                    self._ready.set()
        self._ready.set()

    async def ready(self) -> None:
        await asyncio.wait_for(self._ready.wait(), WAIT_SECONDS)
        assert self.ingest, self.log()

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    def log(self) -> str:
        return "".join(self.raw[-60:])

    @property
    def alive(self) -> bool:
        return self.process.returncode is None


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dbs", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def daemon(directory: Path, nofile: int, **ingest: object) -> AsyncIterator[Daemon]:
    async with running_emulator() as emulator:
        config = write_config(
            directory,
            emulator.url,
            [AudienceConfig("loris")],
            ingest={"host": "127.0.0.1", "port": 0, **ingest},
            logging={"level": "info"},
        )

        def low_descriptor_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dbsync",
            "run",
            "--config",
            str(config),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            preexec_fn=low_descriptor_limit,
        )
        running = Daemon(process)
        try:
            await running.ready()
            yield running
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), WAIT_SECONDS)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            await running._reader


async def ctl_status(config: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dbsync",
        "ctl",
        "--config",
        str(config),
        "--json",
        "status",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    out, _ = await asyncio.wait_for(process.communicate(), WAIT_SECONDS)
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace")


async def health(session: aiohttp.ClientSession, ingest: str, tries: int = 1) -> int:
    """The status of ``GET /v1/health``; under a flood, the first 200 of ``tries``.

    While attackers reconnect as fast as they can, a new connection may find every slot
    held by one still in its grace period: it is answered 503 with Retry-After and
    closed at once (which the client may see as a reset instead). A monitor retries; so
    does this, a bounded number of times.
    """
    status = 0
    for attempt in range(tries):
        try:
            async with session.get(f"{ingest}/v1/health") as response:
                status = response.status
        except aiohttp.ClientConnectionError:
            if attempt == tries - 1:
                raise
        if status == 200:
            break
        await asyncio.sleep(0.02)  # pacing the retries, not waiting for a condition
    return status


class Attacker:
    """Keeps up to ``count`` connections open: half trickle headers, half say nothing.

    A connection the server closes is counted and replaced while :meth:`run` goes on;
    once it stops, the ones still open are left for the server to close.
    """

    def __init__(self, ingest: str, count: int) -> None:
        host, port = ingest.removeprefix("http://").rsplit(":", 1)
        self.address = (host, int(port))
        self.count = count
        self.open: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.closed_by_server = 0
        self.refused = 0
        self._stop = asyncio.Event()

    async def _one(self, slow: bool) -> None:
        try:
            reader, writer = await asyncio.open_connection(*self.address)
        except OSError:
            self.refused += 1
            await asyncio.sleep(0.05)  # the listener is saturated: pace the retries
            return
        pair = (reader, writer)
        self.open.append(pair)
        try:
            if slow:
                writer.write(b"POST /v1/changes HTTP/1.1\r\nHost: x\r\n")
            while not self._stop.is_set():
                if slow:
                    writer.write(b"X-Loris: 1\r\n")  # another header line, never the end
                got = await asyncio.wait_for(reader.read(1024), 0.5)
                if not got:  # closed by the server
                    self.closed_by_server += 1
                    break
        except TimeoutError:
            if self._stop.is_set():
                return  # left open: the server must close it
            return await self._one(slow)
        except OSError:
            self.closed_by_server += 1
        self.open.remove(pair)
        writer.close()

    async def run(self) -> None:
        async def keep(slow: bool) -> None:
            while not self._stop.is_set():
                await self._one(slow)

        async with asyncio.TaskGroup() as group:
            for i in range(self.count):
                group.create_task(keep(slow=i % 2 == 0))

    def stop(self) -> None:
        self._stop.set()

    async def all_closed_by_server(self) -> None:
        """Wait until the server has closed every connection left open."""
        for reader, writer in list(self.open):
            try:
                while await asyncio.wait_for(reader.read(1024), WAIT_SECONDS):
                    pass
            except OSError:
                pass
            writer.close()
            self.closed_by_server += 1
        self.open.clear()


async def until(condition: Callable[[], bool], what: Callable[[], str]) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while not condition():
            await asyncio.sleep(0.05)
    assert condition(), what()


def connections(long: bool) -> int:
    return 400 if long else 120


@pytest.mark.parametrize("long", [pytest.param(True, marks=LONG_FORM), False])
async def test_the_cap_keeps_health_and_ctl_answering_through_slow_clients(
    short_dir: Path, long: bool
) -> None:
    async with (
        daemon(
            short_dir,
            nofile=96,
            max_connections=32,
            header_timeout_seconds=2.0,
            idle_timeout_seconds=2.0,
        ) as running,
        aiohttp.ClientSession() as session,
    ):
        attacker = Attacker(running.ingest, connections(long))
        attack = asyncio.create_task(attacker.run())
        await until(lambda: len(attacker.open) >= 32, running.log)

        try:
            # During: a real request gets in, the admin socket answers.
            assert await health(session, running.ingest, tries=HEALTH_TRIES) == 200
            code, out = await ctl_status(short_dir / "config.toml")
            assert code == 0, out
            assert running.alive, running.log()
        finally:
            attacker.stop()
            await attack
        await attacker.all_closed_by_server()

        assert attacker.closed_by_server > 0
        # Connections the attack left in the listen backlog are accepted (and count)
        # for a moment after it stopped; a monitor's retry gets past them.
        assert await health(session, running.ingest, tries=HEALTH_TRIES) == 200
        code, out = await ctl_status(short_dir / "config.toml")
        assert code == 0, out
        assert running.alive, running.log()
        assert running.named("ingest_request_failed") == []
        assert "Traceback" not in "".join(running.raw), running.log()


@pytest.mark.parametrize("long", [pytest.param(True, marks=LONG_FORM), False])
async def test_running_out_of_descriptors_is_waited_out(short_dir: Path, long: bool) -> None:
    async with (
        daemon(
            short_dir,
            nofile=64,
            max_connections=4096,  # no cap to speak of: the descriptors run out first
            header_timeout_seconds=3.0,
            idle_timeout_seconds=3.0,
        ) as running,
        aiohttp.ClientSession() as session,
    ):
        attacker = Attacker(running.ingest, connections(long))
        attack = asyncio.create_task(attacker.run())
        await until(lambda: len(attacker.open) >= 64, running.log)

        status = asyncio.create_task(ctl_status(short_dir / "config.toml"))
        try:
            await until(
                lambda: bool(running.named("admin_accept_failed")) or not running.alive,
                running.log,
            )
            assert running.alive, running.log()
        finally:
            attacker.stop()
            await attack
        await attacker.all_closed_by_server()
        code, out = await status

        assert code == 0, out
        assert await health(session, running.ingest, tries=HEALTH_TRIES) == 200
        assert running.alive, running.log()
        assert len(running.named("admin_accept_failed")) == 1
        assert running.named("admin_accept_recovered")

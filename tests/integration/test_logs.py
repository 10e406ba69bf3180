"""What ``dbsync run`` writes on stdout: JSON lines that monitoring can parse, never a secret.

The daemon runs as a real process (``python -m dbsync run``) at debug level, so that
every request line is written too, against the emulator in this process; its whole
stdout is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from dbsync.model import Account
from dbsync.testing import AudienceConfig, fast_tenant, running_emulator, wait_until, write_config

SECRET_TOKEN = "tok-5b1d9e0c-never-in-a-log"
AUDIENCE = AudienceConfig("logs-a", max_records=5, max_age_seconds=0.05)
TIMEOUT = 20.0


class DaemonProcess:
    """A ``dbsync run`` subprocess whose stdout lines are kept as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    async def read(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(_unprefixed(line)) for line in self.lines]

    def find(self, event: str) -> dict[str, Any] | None:
        return next((e for e in self.events() if e["event"] == event), None)


def _unprefixed(line: str) -> str:
    return re.sub(r"^<\d>", "", line)


@contextlib.asynccontextmanager
async def dbsync_run(config: Path, *, journal: bool) -> AsyncIterator[DaemonProcess]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    if journal:
        env["JOURNAL_STREAM"] = "8:12345"  # what systemd sets when stdout is the journal
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dbsync",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    daemon = DaemonProcess(process)
    reader = asyncio.create_task(daemon.read())
    try:
        yield daemon
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), TIMEOUT)
        await reader


def debug_config(directory: Path, base_url: str) -> Path:
    return write_config(
        directory, base_url, [AUDIENCE], token=SECRET_TOKEN, logging={"level": "debug"}
    )


async def send_changes(daemon: DaemonProcess, accounts: list[Account]) -> None:
    await wait_until(lambda: daemon.find("daemon_ready") is not None, TIMEOUT, what="ready")
    ready = daemon.find("daemon_ready")
    assert ready is not None
    body = "".join(
        json.dumps(
            {
                "audience_id": AUDIENCE.id,
                "account": {"external_id": a.external_id, "name": a.name, "domain": a.domain},
                "member": True,
            }
        )
        + "\n"
        for a in accounts
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{ready['ingest']}/v1/changes",
            data=body,
            headers={"Content-Type": "application/x-ndjson"},
        ) as answer,
    ):
        assert answer.status == 202, await answer.text()


def assert_every_line_is_an_event(daemon: DaemonProcess, *, journal: bool) -> None:
    assert daemon.lines, "the daemon wrote nothing"
    for line in daemon.lines:
        assert SECRET_TOKEN not in line
        assert bool(re.match(r"^<\d>\{", line)) is journal, line
        event = json.loads(_unprefixed(line))
        assert {"ts", "level", "event"} <= event.keys(), line
        assert re.fullmatch(r"[a-z][a-z0-9_]*", event["event"]), line


async def test_every_line_is_a_json_event_and_the_token_never_appears(tmp_path: Path) -> None:
    """1. The emulator accepts the daemon's legacy token; the daemon logs at debug level.
    2. 20 accounts are sent; wait until the list holds them; SIGTERM.
    Result: exit 0; every stdout line is one JSON object with ts, level and a
    snake_case event, without a journald prefix; the token is in none of them,
    although every request carried it."""
    async with running_emulator(fast_tenant(token=SECRET_TOKEN)) as emulator:
        config = debug_config(tmp_path, emulator.url)
        accounts = (await emulator.control("accounts", limit="20"))["accounts"]
        async with dbsync_run(config, journal=False) as daemon:
            await send_changes(daemon, [Account(**a) for a in accounts])

            async def delivered() -> bool:
                lists = await emulator.control("lists")
                return len(lists.get(AUDIENCE.list, {}).get("members", [])) == 20

            await wait_until(delivered, TIMEOUT, what="the list filled")
        assert daemon.process.returncode == 0
        assert daemon.find("demandbase_request_finished") is not None
        assert daemon.find("daemon_stopped") is not None
        assert_every_line_is_an_event(daemon, journal=False)


async def test_under_journald_lines_carry_the_priority_and_a_refused_token_stays_hidden(
    tmp_path: Path,
) -> None:
    """1. Stdout is the journal ($JOURNAL_STREAM); the emulator refuses the token.
    2. Accounts are sent; the destination stops (auth_failed); SIGTERM.
    Result: every line starts with its syslog priority (<3> for the error that says
    the destination stopped, <6> for info) before the JSON; the refused token is in no
    line, not even in the error's text."""
    async with running_emulator(fast_tenant(token="another-token")) as emulator:
        config = debug_config(tmp_path, emulator.url)
        accounts = (await emulator.control("accounts", limit="5"))["accounts"]
        async with dbsync_run(config, journal=True) as daemon:
            await send_changes(daemon, [Account(**a) for a in accounts])
            await wait_until(
                lambda: daemon.find("destination_stopped") is not None, TIMEOUT, what="a stop"
            )
        assert daemon.process.returncode == 0
        assert_every_line_is_an_event(daemon, journal=True)
        stopped = next(line for line in daemon.lines if '"destination_stopped"' in line)
        assert stopped.startswith("<3>")
        assert next(line for line in daemon.lines if '"daemon_ready"' in line).startswith("<6>")

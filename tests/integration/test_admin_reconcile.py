"""``dbsync ctl reconcile`` and the read-back columns of ``status``, over the real socket.

The daemon runs in process with its reconciler on manual only (``scheduled = false``),
so that the read-backs are the ones the operator asks for; ``dbsync ctl`` runs as a
separate process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from dbsync.exitcodes import ExitCode
from dbsync.model import Account
from dbsync.testing import (
    FAST_RECONCILE,
    AudienceConfig,
    Engine,
    running_reconcile_engine,
    strangers,
)

AUDIENCE = AudienceConfig("readback", max_records=50, max_age_seconds=0.05)
MANUAL = {**FAST_RECONCILE, "scheduled": False}


async def ctl(engine: Engine, *args: str) -> subprocess.CompletedProcess[str]:
    socket = engine.daemon.config.daemon.admin_socket
    command = [sys.executable, "-m", "dbsync", "ctl", "--socket", str(socket), *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


async def delivered(engine: Engine, accounts: list[Account]) -> None:
    await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts])
    await engine.wait_settled()


async def test_reconcile_prints_the_report_and_status_shows_it(tmp_path: Path) -> None:
    """1. 20 tenant accounts and 2 the tenant does not know are delivered.
    2. Past the visibility lag, ``dbsync ctl reconcile`` (human output), then
    ``status --json``.
    Result: exit 0; the report says 22 judged, 20 verified, 2 lost and sent again;
    status carries the same report as the audience's last read-back and the human
    status has its row."""
    async with running_reconcile_engine(tmp_path, [AUDIENCE], reconcile=MANUAL) as engine:
        known = await engine.tenant_accounts(20)
        await delivered(engine, [*known, *strangers(2)])
        # Not waiting for a condition: the scenario is the visibility lag going by.
        await asyncio.sleep(float(MANUAL["visibility_lag_seconds"]))  # type: ignore[arg-type]

        answer = await ctl(engine, "reconcile", AUDIENCE.id)
        assert answer.returncode == ExitCode.OK, answer.stderr
        assert "judged 22 members" in answer.stdout, answer.stdout
        assert "20 verified, 2 lost, 2 sent again" in answer.stdout, answer.stdout
        assert "lost by cause: dropped 2" in answer.stdout, answer.stdout

        status = await ctl(engine, "--json", "status", AUDIENCE.id)
        assert status.returncode == ExitCode.OK, status.stderr
        [view] = json.loads(status.stdout)["audiences"]
        report = view["last_reconcile"]
        assert (report["expected"], report["verified"], report["lost"]) == (22, 20, {"dropped": 2})
        assert view["next_reconcile_at"] is None  # manual only
        last_batch = view["last_batch"]  # the delivery, or the repair the read-back asked for
        assert last_batch["state"] == "completed"
        assert last_batch["action"] == "insert"

        human = await ctl(engine, "status")
        assert human.returncode == ExitCode.OK, human.stderr
        lines = human.stdout.splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("READ BACK"))
        cells = lines[header + 1].split()
        # audience, last (date, time), verified, lost, repaired, unmatched, too young, next
        assert cells[0] == AUDIENCE.id
        assert cells[3:8] == ["20", "2", "2", "0", "0"], lines[header : header + 2]


async def test_reconcile_beyond_the_export_quota_says_when_it_can(tmp_path: Path) -> None:
    """1. The destination may create one export job a day.
    2. Two ``dbsync ctl reconcile`` in a row (``--json`` the second time).
    Result: the first reads the list back (exit 0); the second is deferred: exit 75
    (try again later), fault ``reconcile_deferred``, with the time it can run."""
    limits = {"export_jobs_per_day": 1}
    async with running_reconcile_engine(
        tmp_path, [AUDIENCE], reconcile=MANUAL, limits=limits
    ) as engine:
        await delivered(engine, await engine.tenant_accounts(5))
        first = await ctl(engine, "reconcile", AUDIENCE.id)
        assert first.returncode == ExitCode.OK, first.stderr

        second = await ctl(engine, "--json", "reconcile", AUDIENCE.id)
        assert second.returncode == ExitCode.TEMPFAIL, second.stderr
        fault = json.loads(second.stdout)
        assert fault["code"] == "reconcile_deferred"
        assert "it can run at" in fault["message"], fault


async def test_rejected_shows_when_each_unmatched_account_is_tried_again(tmp_path: Path) -> None:
    """1. 5 tenant accounts and 1 the tenant does not know are delivered; repair limit 0;
    retries after 2 days, then every 5 (of the default 86,400 s).
    2. ``dbsync ctl reconcile`` sets the stranger aside; ``ctl rejected`` (JSON, table).
    Result: the stranger is listed, not retried yet, its next retry 2 days after it was
    set aside; the table has a NEXT RETRY column with that time."""
    manual = {**MANUAL, "repair_limit": 0, "retry_unmatched_days": [2, 5]}
    async with running_reconcile_engine(tmp_path, [AUDIENCE], reconcile=manual) as engine:
        [stranger] = strangers(1)
        await delivered(engine, [*await engine.tenant_accounts(5), stranger])
        await asyncio.sleep(float(MANUAL["visibility_lag_seconds"]))  # type: ignore[arg-type]
        assert (await ctl(engine, "reconcile", AUDIENCE.id)).returncode == ExitCode.OK

        listed = await ctl(engine, "--json", "rejected")
        assert listed.returncode == ExitCode.OK, listed.stderr
        [row] = json.loads(listed.stdout)["accounts"]
        assert row["external_id"] == stranger.external_id
        assert (row["retries"], row["retrying"]) == (0, False)
        assert row["next_retry_at"] == row["rejected_at"] + 2 * 86_400

        table = await ctl(engine, "rejected")
        assert "NEXT RETRY" in table.stdout, table.stdout
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(row["next_retry_at"]))
        assert when in table.stdout, table.stdout

"""Adopting a list that already exists: what it holds is taken as delivered, not sent again.

A customer moving from AEP's own Demandbase destination (or whose state directory was
lost) already has the list, filled. The audience's ``list_id`` is configured and its
store holds nothing delivered: dbsync reads the list back before its first send and
sends only the difference.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from dbsync.daemon import Daemon
from dbsync.exitcodes import ExitCode
from dbsync.model import Account
from dbsync.testing import (
    FAST_RECONCILE,
    AudienceConfig,
    EmulatorApi,
    Engine,
    fast_export_tenant,
    ledger_check,
    running_daemon,
    running_emulator,
    wait_until,
    write_reconcile_config,
)

LISTED = 10_000
DESIRED_LISTED = 9_000
NEW = 1_000
LAG = 0.05
TIMEOUT = 60.0
CHUNK = 2_500  # accounts per request: aiohttp warns about larger raw bodies


async def prefill(emulator: EmulatorApi, name: str, accounts: list[Account]) -> int:
    """A list named ``name`` holding ``accounts``, as AEP's destination left it; its id."""
    jobs = [
        await emulator.import_accounts(name, accounts[i : i + CHUNK])
        for i in range(0, len(accounts), CHUNK)
    ]

    async def completed() -> bool:
        states = [(await emulator.import_job(job_id))["state"] for job_id in jobs]
        return states == ["completed"] * len(jobs)

    await wait_until(completed, TIMEOUT, what="the prefill jobs")
    list_id: int = (await emulator.import_job(jobs[0]))["accountListId"]
    await asyncio.sleep(2 * LAG)  # visible to exports
    return list_id


def rows_sent(emulator: EmulatorApi, name: str, after_job: int) -> Counter[str | None]:
    """Rows of the import jobs of list ``name`` created after ``after_job``, by action."""
    rows: Counter[str | None] = Counter()
    for job in emulator.emulator.tenant.import_jobs:
        if job.data_import_name == name and job.id > after_job:
            rows[job.list_action] += job.rows
    return rows


async def test_a_filled_list_is_adopted_and_only_the_difference_is_sent(tmp_path: Path) -> None:
    """1. The emulator holds a list of 10,000 accounts (filled by another tool).
    2. dbsync starts with that list's id configured and an empty store; the CDP sends
    9,000 of the listed accounts and 1,000 others.
    Result: the list is read back before the first send and the 9,000 are taken as
    delivered (ledger ``adopted``), unsent; dbsync sends exactly 1,000 insert rows (the
    new accounts) and 1,000 delete rows (the listed ones not desired), in a few jobs;
    the list ends equal to desired state and the ledger balances."""
    async with running_emulator(
        fast_export_tenant(accounts=LISTED + NEW, visibility_lag_seconds=LAG)
    ) as emulator:
        page = await emulator.control("accounts", limit=str(LISTED + NEW), offset="0")
        pool = [Account(**a) for a in page["accounts"]]
        name = "Adopted EMEA accounts"
        list_id = await prefill(emulator, name, pool[:LISTED])
        prefill_job = max(job.id for job in emulator.emulator.tenant.import_jobs)

        audience = AudienceConfig(
            "adopt", list_name=name, list_id=list_id, max_records=10_000, max_age_seconds=1.0
        )
        config = write_reconcile_config(
            tmp_path,
            emulator.url,
            [audience],
            reconcile={**FAST_RECONCILE, "visibility_lag_seconds": LAG},
        )
        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, [audience])
            desired = pool[LISTED - DESIRED_LISTED :]  # 9,000 listed and 1,000 new
            for i in range(0, len(desired), CHUNK):
                await engine.cdp.changes((audience.id, a, True) for a in desired[i : i + CHUNK])
            await engine.wait_settled(timeout=TIMEOUT)

            assert (await engine.lists())[name] == {a.external_id for a in desired}
            sent = rows_sent(emulator, name, prefill_job)
            assert sent == {"insert": NEW, "delete": LISTED - DESIRED_LISTED}, sent
            jobs = [j for j in emulator.emulator.tenant.import_jobs if j.id > prefill_job]
            assert len(jobs) <= 4, [(j.list_action, j.rows) for j in jobs]
            check = await ledger_check(engine, audience.id)
            assert check.balanced, check
            assert check.counts.adopted == DESIRED_LISTED
            assert check.counts.exported == NEW + LISTED - DESIRED_LISTED
            print(f"\nadopted {check.counts.adopted}; jobs {len(jobs)}; rows sent {dict(sent)}")


async def ctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    socket = daemon.config.daemon.admin_socket
    command = [sys.executable, "-m", "dbsync", "ctl", "--socket", str(socket), *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60, check=False
    )


async def test_ctl_adopt_takes_what_the_list_holds_now(tmp_path: Path) -> None:
    """1. A list holds 10 accounts; dbsync starts with its id configured, the audience
    paused and read-backs on demand only; the CDP sends those 10 and 5 more.
    2. The first adoption takes the 10. Another tool then adds the 5 to the list.
    3. ``dbsync ctl adopt``; then ``ctl resume``.
    Result: ``adopt`` answers 5 members taken as delivered (and the read-back's
    report); after the resume the list equals desired state and dbsync sent no row."""
    async with running_emulator(fast_export_tenant(visibility_lag_seconds=LAG)) as emulator:
        page = await emulator.control("accounts", limit="15", offset="0")
        pool = [Account(**a) for a in page["accounts"]]
        name = "Adopted on demand"
        list_id = await prefill(emulator, name, pool[:10])
        audience = AudienceConfig("ondemand", list_name=name, list_id=list_id, paused=True)
        config = write_reconcile_config(
            tmp_path,
            emulator.url,
            [audience],
            reconcile={**FAST_RECONCILE, "visibility_lag_seconds": LAG, "scheduled": False},
        )
        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, [audience])
            await engine.cdp.changes((audience.id, a, True) for a in pool)

            async def adopted(n: int) -> bool:
                return (await engine.store.ledger(audience.id)).adopted == n

            await wait_until(lambda: adopted(10), TIMEOUT, what="the first adoption")
            await prefill(emulator, name, pool[10:])
            last_prefill = max(job.id for job in emulator.emulator.tenant.import_jobs)

            answer = await ctl(daemon, "--json", "adopt", audience.id)
            assert answer.returncode == ExitCode.OK, answer.stderr
            reply = json.loads(answer.stdout)
            assert (reply["reply"], reply["adopted"]) == ("adopt", 5), reply
            assert reply["report"]["audience_id"] == audience.id
            human = await ctl(daemon, "adopt", audience.id)
            assert "0 members already in list" in human.stdout, human.stdout

            assert (await ctl(daemon, "resume", audience.id)).returncode == ExitCode.OK
            await engine.wait_settled(timeout=TIMEOUT)
            assert rows_sent(emulator, name, last_prefill) == {}
            assert (await ledger_check(engine, audience.id)).balanced

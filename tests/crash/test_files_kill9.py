"""kill -9 while a 1,000,000-row AEP run is being applied: applied whole, exactly once.

The daemon (a subprocess) watches a folder; the test writes one full run of 1,000,000
accounts into it as AEP would (a part and its manifest), kills the daemon while the run
is staged, restarts it, kills it again later in the same run, restarts it once more,
and checks in the end that the run was recorded applied once, that desired state is
exactly the run's accounts, and that every list equals desired state.
"""

from __future__ import annotations

import asyncio
import csv
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from dbsync.demandbase.emulator import Emulator
from dbsync.testing.aepfiles import epoch, export_name, write_manifest
from tests.crash.harness import (
    AUDIENCES,
    daemon_process,
    emulator_lists,
    emulator_settings,
    free_port,
    tenant_accounts,
    write_config,
)

pytestmark = [pytest.mark.crash]

AEP_ID = "7c1f0d3a-2b4e-4c6f-9a8b-1d2e3f4a5b6c"
ROWS = 1_000_000
KNOWN = 300  # of them, accounts the tenant knows: the list Demandbase can hold


def query(database: Path, sql: str) -> list[tuple[object, ...]]:
    """A read of the daemon's store from outside (WAL: it never blocks the writer)."""
    if not database.exists():
        return []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as db:
        try:
            return db.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []  # not migrated yet


async def until(condition_sql: str, database: Path, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = query(database, condition_sql)
        if rows and rows[0][0]:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {seconds} s: {what}")


def write_run(inbox: Path, known: list[tuple[str, str, str]]) -> list[str]:
    """One AEP run of ROWS accounts (the tenant's first, then made-up ones); their ids."""
    name = export_name(AEP_ID, epoch(2026, 12, 3)) + ".csv"
    upload = inbox.parent / name
    ids = [k for k, _, _ in known] + [f"X{i:07d}@src" for i in range(ROWS - len(known))]
    with upload.open("w", newline="") as file:
        file.write("accountKey_sourceKey,accountName,accountOrganization_domain,status\n")
        csv.writer(file, lineterminator="\n").writerows((k, n, d, "realized") for k, n, d in known)
        file.writelines(f"{k},Company {k},{k[1:8]}.example,realized\n" for k in ids[len(known) :])
    upload.rename(inbox / name)
    write_manifest(inbox, [inbox / name], scheduled_time=epoch(2026, 12, 3))
    return ids


@pytest.mark.timeout(600)
async def test_kill9_while_a_million_row_run_is_applied(tmp_path: Path) -> None:
    """1. Start the daemon watching an empty folder; write a 1,000,000-row full run.
    2. SIGKILL once the daemon is staging the run; restart it; SIGKILL again once it
       has staged more of it than the first time (or is judging it); restart it.
    3. Wait until the run is recorded; then until every list equals desired state.
    Result: one file run, applied, with 1,000,000 rows added; desired state is exactly
    the run's accounts; no snapshot left staging or held; the list holds the tenant's
    accounts of the run; exit 0 at SIGTERM."""
    emulator = Emulator(emulator_settings())
    known = [(a.external_id, a.name, a.domain) for a in tenant_accounts(emulator, KNOWN)]
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "config.toml"
    ingest_port = free_port()
    ingest = f"http://127.0.0.1:{ingest_port}"
    emea, _ = AUDIENCES[0]
    async with (
        emulator.serve(host="127.0.0.1", port=0) as base_url,
        aiohttp.ClientSession() as session,
        daemon_process(config) as daemon,
    ):
        write_config(
            config,
            base_url=base_url,
            token=emulator.settings.token,
            ingest_port=ingest_port,
            max_records=500_000,
            files=inbox,
            aep_audience_ids={emea: AEP_ID},
        )
        database = daemon.database
        await daemon.start()
        await daemon.wait_healthy(session, ingest)
        ids = write_run(inbox, known)

        staged = "SELECT COUNT(*) FROM snapshot_rows"
        await until(staged, database, 120, "the run being staged")
        await daemon.kill9()
        first = int(query(database, staged)[0][0])  # type: ignore[call-overload]
        assert first < ROWS, "the kill came after the run was applied: the scenario missed"
        assert query(database, "SELECT COUNT(*) FROM file_runs") == [(0,)]

        await daemon.start()
        await until(
            f"SELECT COUNT(*) > {first} FROM snapshot_rows", database, 120, "more of it staged"
        )
        await daemon.kill9()
        assert query(database, "SELECT COUNT(*) FROM file_runs WHERE outcome = 'applied'") in (
            [(0,)],
            [(1,)],
        )

        await daemon.start()
        await daemon.wait_healthy(session, ingest)
        await until(
            "SELECT COUNT(*) FROM file_runs WHERE outcome = 'applied'", database, 300, "applied"
        )
        await until("SELECT COUNT(*) = 0 FROM changes", database, 300, "the journal to be folded")
        runs = query(database, "SELECT outcome, rows, added, removed FROM file_runs")
        assert runs == [("applied", ROWS, ROWS, 0)]
        desired = {
            str(r[0])
            for r in query(
                database,
                "SELECT external_id FROM membership JOIN audience_keys USING (audience_key)"
                f" WHERE audience_id = '{emea}' AND desired = 1",
            )
        }
        assert desired == set(ids)
        assert query(database, "SELECT COUNT(*) FROM snapshot_rows") == [(0,)]
        assert query(
            database, "SELECT COUNT(*) FROM snapshots WHERE state IN ('staging', 'held')"
        ) == [(0,)]
        deadline = time.monotonic() + 300
        want = {k for k, _, _ in known}
        while emulator_lists(emulator)[emea] != want:
            assert time.monotonic() < deadline, (
                f"the list holds {len(emulator_lists(emulator)[emea])} of {len(want)}"
                f"\n{daemon.logs()}"
            )
            await asyncio.sleep(0.2)
        assert await daemon.terminate() == 0, daemon.logs()

"""The watched folder in a running daemon: AEP files in, lists out, and the operator's verbs.

A daemon feeding the emulator watches a folder; the test writes runs into it as AEP
would, then uses ``dbsync ctl`` (as a process) to see them and to approve or discard a
snapshot the removal guard held.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbsync.config.schema import FileIngestSettings
from dbsync.exitcodes import ExitCode
from dbsync.model import Account
from dbsync.testing import AudienceConfig, running_engine, wait_until
from dbsync.testing.aepfiles import ExportRow, epoch, write_export

AEP_ID = "59bd2f4d-3c48-4b18-bf56-4f5c5e6967ae"
EMEA = AudienceConfig("emea", "High-intent EMEA", aep_audience_id=AEP_ID)
TIMEOUT = 20.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dbf", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def rows(accounts: list[Account]) -> list[ExportRow]:
    return [(a.external_id, a.name, a.domain, "realized") for a in accounts]


async def ctl(sock: Path, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dbsync",
        "ctl",
        "--socket",
        str(sock),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, (out or err).decode()


async def test_runs_are_applied_held_approved_and_listed(short_dir: Path) -> None:
    inbox = short_dir / "inbox"
    sock = short_dir / "admin.sock"
    files = FileIngestSettings(directory=inbox, poll_seconds=0.05, settle_seconds=0.0)
    async with running_engine(
        short_dir, [EMEA], ingest={"files": files}, daemon={"admin_socket": str(sock)}
    ) as engine:
        accounts = await engine.tenant_accounts(20)
        write_export(inbox, AEP_ID, rows(accounts), when=epoch(2026, 12, 1), manifest=True)

        async def runs() -> list[dict[str, object]]:
            code, out = await ctl(sock, "files", "--json")
            assert code == ExitCode.OK, out
            reply: list[dict[str, object]] = json.loads(out)["runs"]
            return reply

        await wait_until(lambda: engine.store.file_runs(), TIMEOUT, what="the first run")
        await engine.wait_settled()
        assert await engine.lists() == {"High-intent EMEA": {a.external_id for a in accounts}}
        [applied] = await runs()
        assert (applied["outcome"], applied["added"], applied["rows"]) == ("applied", 20, 20)

        # Half the list gone in one file: held, nothing removed.
        write_export(inbox, AEP_ID, rows(accounts[:10]), when=epoch(2026, 12, 2), manifest=True)
        await wait_until(lambda: engine.store.held_snapshots(), TIMEOUT, what="a held snapshot")
        code, status = await ctl(sock, "status")
        assert "emea: snapshot HELD (files, 10 members): would remove 10 of 20 members" in status
        code, table = await ctl(sock, "files")
        assert code == ExitCode.OK
        assert "held by the removal guard" in table
        assert [r["outcome"] for r in await runs()] == ["held", "applied"]
        assert await engine.store.desired_members("emea") == {a.external_id for a in accounts}

        code, out = await ctl(sock, "approve", "emea")
        assert (code, out.strip()) == (
            ExitCode.OK,
            "emea: held snapshot applied: 0 accounts added, 10 removed",
        )
        await engine.wait_settled()
        assert await engine.lists() == {"High-intent EMEA": {a.external_id for a in accounts[:10]}}
        assert [r["outcome"] for r in await runs()] == ["applied", "applied"]

        # An empty file: held; discarded, the list stays as it is.
        write_export(inbox, AEP_ID, [], when=epoch(2026, 12, 3), manifest=True)
        await wait_until(lambda: engine.store.held_snapshots(), TIMEOUT, what="a held snapshot")
        code, out = await ctl(sock, "discard", "emea")
        assert code == ExitCode.OK, out
        code, out = await ctl(sock, "discard", "emea")
        assert code == ExitCode.FAULT
        assert "nothing_held" in out
        assert [r["outcome"] for r in await runs()] == ["discarded", "applied", "applied"]
        await engine.wait_settled()
        assert await engine.lists() == {"High-intent EMEA": {a.external_id for a in accounts[:10]}}

"""kill -9 a process that appends and folds: every change it reported committed is there."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from dbsync.clock import FakeClock
from dbsync.store import Store

pytestmark = pytest.mark.crash

ROOT = Path(__file__).resolve().parents[2]

# Appends batches of new accounts and prints "committed N" once append_changes
# returned for the first N, while the folder folds behind it: the kill can land in
# an append, in a fold, or between them.
WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from dbsync.clock import SystemClock
    from dbsync.model import Account, Change
    from dbsync.folder import Folder
    from dbsync.model import AudienceSpec
    from dbsync.store import Store

    async def main() -> None:
        async with Store.open(Path(sys.argv[1]), clock=SystemClock()) as store:
            await store.sync_audiences(
                [AudienceSpec(audience_id="aud-1", destination="d", name="A", list_name="A")]
            )
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(store.committer.run())
                tasks.create_task(Folder(store, lambda audiences: None, SystemClock()).run())
                committed = 0
                while True:
                    batch = [
                        Change(
                            audience_id="aud-1",
                            account=Account(external_id=f"acct-{committed + i:07d}"),
                            member=True,
                            ts=1.0,
                        )
                        for i in range(200)
                    ]
                    committed += await store.append_changes(batch)
                    print(f"committed {committed}", flush=True)

    asyncio.run(main())
    """
)


async def test_a_killed_writer_loses_no_committed_change(tmp_path: Path) -> None:
    path = tmp_path / "dbsync.sqlite3"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WRITER,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert process.stdout is not None
    committed = 0
    try:
        while committed < 20_000:
            line = await process.stdout.readline()
            assert line, "the writer exited before it was killed"
            committed = int(line.split()[1])
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    assert process.returncode == -signal.SIGKILL

    async with Store.open(path, clock=FakeClock()) as store:
        while await store.fold_pending():
            pass
        members = await store.desired_members("aud-1")
        ledger = await store.ledger("aud-1")
    expected = {f"acct-{i:07d}" for i in range(committed)}
    assert expected <= members
    assert ledger.received == len(members)  # each change folded exactly once

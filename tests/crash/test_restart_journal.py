"""Changes a killed daemon left in the journal reach their actors after the restart.

kill -9 between ingest's commit and the fold leaves accepted changes in the journal
(``test_kill9_right_after_202_loses_nothing`` does it to a real process). After the
restart a snapshot may arrive before the folder ran: the snapshot folds the whole
journal in its own transaction, so its fold, not the folder's, moves those changes
into desired state. The actors of the audiences they belong to must still be woken,
or an idle actor sleeps on a pending backlog until its audience's next change.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dbsync.clock import SystemClock
from dbsync.folder import Folder
from dbsync.model import Account, AudienceSpec, Change
from dbsync.store import Store

pytestmark = pytest.mark.crash


async def test_a_snapshot_first_after_a_restart_still_wakes_the_journal_audiences(
    tmp_path: Path,
) -> None:
    """1. A store holds accepted, unfolded changes of audience "left" (as a kill -9
       right after 202 leaves it); the daemon stops there.
    2. The store opens again; before its folder runs, a snapshot of audience "snap"
       is applied (which folds the journal in its transaction).
    3. The folder runs.
    Result: both "left" and "snap" are woken, and "left" has its changes pending.
    """
    database = tmp_path / "dbsync.sqlite3"
    clock = SystemClock()
    audiences = [
        AudienceSpec(audience_id=a, destination="d", name=a, list_name=a) for a in ("left", "snap")
    ]
    left = [Account(external_id=f"L-{i}") for i in range(3)]
    async with Store.open(database, clock=clock) as store:
        await store.sync_audiences(audiences)
        await store.append_changes(
            [Change(audience_id="left", account=a, member=True, ts=clock.time()) for a in left]
        )
        assert await store.pending_journal_rows() == 3

    async with Store.open(database, clock=clock) as store:
        await store.replace_members("snap", [Account(external_id="S-1")], ts=clock.time())
        assert await store.pending_journal_rows() == 1  # the snapshot's own row

        woken: set[str] = set()
        both = asyncio.Event()

        def on_folded(audience_ids: set[str]) -> None:
            woken.update(audience_ids)
            if woken >= {"left", "snap"}:
                both.set()

        folder = asyncio.create_task(Folder(store, on_folded, SystemClock()).run(), name="folder")
        try:
            async with asyncio.timeout(5):
                await both.wait()
        except TimeoutError:
            pytest.fail(f"the folder woke only {sorted(woken)}")
        finally:
            folder.cancel()
            await asyncio.gather(folder, return_exceptions=True)

        assert (await store.backlog("left")).inserts == 3
        assert await store.desired_members("left") == {a.external_id for a in left}

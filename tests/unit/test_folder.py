"""The folder in virtual time: a full disk is waited out, a broken store is not.

Issue 10, item 3: the fold's COMMIT failing on a full disk ended the folder, and with
it (through the daemon's TaskGroup) the daemon, which exited again on every restart
while the disk stayed full.
"""

from __future__ import annotations

import asyncio

import pytest

from dbsync.clock import FakeClock
from dbsync.errors import StoreError
from dbsync.folder import RETRY_SECONDS, Folder


class DiskStore:
    """A journal whose folds fail while ``full``; ``writable`` as the engine reports it."""

    def __init__(self) -> None:
        self.full = True
        self.writable = True
        self.broken = False
        self.pending = {"a": 3}
        self.attempts = 0
        self._appended = asyncio.Event()
        self._appended.set()
        self._writable = asyncio.Event()

    async def wait_appended(self) -> None:
        await self._appended.wait()
        self._appended.clear()

    async def fold_pending(self) -> dict[str, int]:
        self.attempts += 1
        if self.broken:
            raise StoreError("fold: database disk image is malformed")
        if self.full:
            self.writable = False  # the engine saw SQLITE_FULL
            self._writable.clear()
            raise StoreError("fold: database or disk is full")
        folded, self.pending = self.pending, {}
        return folded

    def take_folded_elsewhere(self) -> set[str]:
        return set()

    async def wait_writable(self) -> None:
        await self._writable.wait()

    def space_returns_through_another_write(self) -> None:
        self.full = False
        self.writable = True
        self._writable.set()


async def test_a_full_disk_is_waited_out_and_the_fold_tried_again() -> None:
    clock = FakeClock()
    store = DiskStore()
    woken: list[set[str]] = []
    folding = asyncio.create_task(Folder(store, woken.append, clock).run())
    try:
        await clock.wait_for_sleepers()
        assert store.attempts == 1
        assert not folding.done()  # the daemon's TaskGroup goes on

        await clock.advance(RETRY_SECONDS)  # still full: tried again, waits again
        await clock.wait_for_sleepers()
        assert store.attempts == 2
        assert woken == []

        store.full = False  # space returns; nothing else wrote: the retry proves it
        await clock.advance(RETRY_SECONDS)
        await asyncio.sleep(0)
        assert woken == [{"a"}]
        assert store.pending == {}
    finally:
        folding.cancel()
        await asyncio.gather(folding, return_exceptions=True)


async def test_a_write_elsewhere_that_succeeds_wakes_the_fold_at_once() -> None:
    clock = FakeClock()
    store = DiskStore()
    woken: list[set[str]] = []
    folding = asyncio.create_task(Folder(store, woken.append, clock).run())
    try:
        await clock.wait_for_sleepers()
        store.space_returns_through_another_write()  # an ingest commit went through
        for _ in range(10):
            await asyncio.sleep(0)
        assert woken == [{"a"}]  # with no clock advance at all
    finally:
        folding.cancel()
        await asyncio.gather(folding, return_exceptions=True)


async def test_a_broken_store_still_ends_the_folder() -> None:
    store = DiskStore()
    store.broken = True

    with pytest.raises(StoreError, match="malformed"):
        await Folder(store, lambda audiences: None, FakeClock()).run()

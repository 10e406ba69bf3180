"""The folder: the service that folds ingest's journal into desired state.

Ingest answers once its changes are appended to the store's journal; this service
runs right behind it. It waits until something was appended, folds the journal a
chunk at a time (:meth:`~dbsync.store.Store.fold_pending`: one transaction each,
the last change per account of the chunk), and wakes the actors of the audiences each
chunk touched, so that a change is planned as soon as it is desired state. Changes a
snapshot folded in its own transaction wake their actors too.

It runs in the daemon's TaskGroup, like every other service, until cancelled; a fold
interrupted by cancellation is one transaction, committed or not, and the journal
rows it did not fold are folded after a restart.

A full disk does not end it (nor, through the TaskGroup, the daemon): a fold the file
system refuses rolls back whole, and the folder tries again every
:data:`RETRY_SECONDS`, or as soon as another write (an ingest commit) succeeded; a
fold that goes through is what tells the store that space returned. Any other store
failure still ends the daemon, as a broken store should.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from dbsync.clock import Clock
from dbsync.errors import StoreError

__all__ = ["RETRY_SECONDS", "Folder", "FoldingStore"]

# While the store is unwritable, a fold is tried again this often: each try is a
# probe of the disk, one small transaction that rolls back if it is still full.
RETRY_SECONDS = 5.0


class FoldingStore(Protocol):
    """The part of :class:`~dbsync.store.Store` the folder uses."""

    async def wait_appended(self) -> None: ...

    async def fold_pending(self) -> dict[str, int]: ...

    def take_folded_elsewhere(self) -> set[str]: ...

    @property
    def writable(self) -> bool: ...

    async def wait_writable(self) -> None: ...


class Folder:
    """Folds whatever ingest appends, waking the audiences it touched; :meth:`run` it."""

    def __init__(
        self, store: FoldingStore, on_folded: Callable[[set[str]], None], clock: Clock
    ) -> None:
        self._store = store
        self._on_folded = on_folded
        self._clock = clock

    async def run(self) -> None:
        """Fold until cancelled."""
        while True:
            await self._store.wait_appended()
            await self._fold_all()
            if elsewhere := self._store.take_folded_elsewhere():
                self._on_folded(elsewhere)

    async def _fold_all(self) -> None:
        """Fold the whole journal, waiting out a store that cannot write."""
        while True:
            try:
                while folded := await self._store.fold_pending():
                    self._on_folded(set(folded))
                return
            except StoreError:
                if self._store.writable:
                    raise  # not the file system refusing: the store is broken
            # The engine logged store_unwritable; try again in a while, or at once when
            # another write proved that space returned.
            waits = [
                asyncio.ensure_future(self._store.wait_writable()),
                asyncio.ensure_future(self._clock.sleep(RETRY_SECONDS)),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
                await asyncio.gather(*waits, return_exceptions=True)

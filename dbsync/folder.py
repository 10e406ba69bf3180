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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["Folder", "FoldingStore"]


class FoldingStore(Protocol):
    """The part of :class:`~dbsync.store.Store` the folder uses."""

    async def wait_appended(self) -> None: ...

    async def fold_pending(self) -> dict[str, int]: ...

    def take_folded_elsewhere(self) -> set[str]: ...


class Folder:
    """Folds whatever ingest appends, waking the audiences it touched; :meth:`run` it."""

    def __init__(self, store: FoldingStore, on_folded: Callable[[set[str]], None]) -> None:
        self._store = store
        self._on_folded = on_folded

    async def run(self) -> None:
        """Fold until cancelled."""
        while True:
            await self._store.wait_appended()
            while folded := await self._store.fold_pending():
                self._on_folded(set(folded))
            if elsewhere := self._store.take_folded_elsewhere():
                self._on_folded(elsewhere)

"""Adopting a list that already exists, for one destination's reconciler.

An audience asked to adopt its list (configured ``list_id`` and nothing delivered yet:
a first start, a migration, a lost state directory; or ``dbsync ctl adopt``) is read
back before every scheduled turn once it has desired members. Its read-back first
takes the pending members the list holds as delivered (``list_adopted``), then judges
as usual, so the actor sends only the difference. If the list cannot be read, the
adoption is given up (``list_adoption_failed``) and the audience sends its whole
desired state rather than wait. The store's side is :mod:`dbsync.store.adoption`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from dbsync.model import Backlog, ListedAccount, ReconcileFacts, ReconcileRun

__all__ = ["AdoptionStore", "Adoptions"]

log = logging.getLogger("dbsync.reconcile")


class AdoptionStore(Protocol):
    """The part of :class:`~dbsync.store.Store` that adopting lists uses
    (:mod:`dbsync.store.adoption`); a reconciler without one adopts nothing."""

    async def backlog(self, audience_id: str) -> Backlog: ...

    async def adoptions_pending(self, audience_ids: Iterable[str]) -> list[str]: ...

    async def adopt_listed(
        self, audience_id: str, listed: Sequence[ListedAccount]
    ) -> int | None: ...

    async def abandon_adoption(self, audience_id: str) -> bool: ...


class Adoptions:
    """The adoptions of one destination's audiences: whose turn, taking, giving up."""

    def __init__(
        self,
        store: AdoptionStore | None,
        *,
        destination: str,
        wake: Callable[[Iterable[str]], None],
    ) -> None:
        self._store = store
        self._destination = destination
        self._wake = wake
        # Members each audience's last adoption took as delivered (dbsync ctl adopt).
        self.adopted: dict[str, int] = {}

    async def pending(self, audience_ids: Iterable[str]) -> list[str]:
        """The audiences asked to adopt their list, oldest request first."""
        if self._store is None:
            return []
        return await self._store.adoptions_pending(audience_ids)

    async def turn(
        self, facts: Sequence[ReconcileFacts], adopting: Sequence[str]
    ) -> ReconcileFacts | None:
        """The audience whose list to adopt first (``adopting``: asked, oldest first): with
        a list id and members desired already (compared with its desired state)."""
        if self._store is None:
            return None
        by_id = {f.audience_id: f for f in facts}
        for audience_id in adopting:
            turn = by_id[audience_id]
            if turn.list_id is not None and (await self._store.backlog(audience_id)).pending:
                return turn
        return None

    async def adopt(self, run: ReconcileRun, listed: Sequence[ListedAccount]) -> None:
        """Take the run's listed members as delivered if its audience asked to adopt."""
        if self._store is None:
            return
        adopted = await self._store.adopt_listed(run.audience_id, listed)
        if adopted is None:
            return
        self.adopted[run.audience_id] = adopted
        log.info(
            "list_adopted",
            extra={
                "audience": run.audience_id,
                "destination": self._destination,
                "list_id": run.list_id,
                "listed": len(listed),
                "adopted": adopted,
            },
        )

    async def failed(self, audience_id: str) -> None:
        """The list could not be read: its audience sends everything rather than wait."""
        if self._store is not None and await self._store.abandon_adoption(audience_id):
            log.warning(
                "list_adoption_failed",
                extra={"audience": audience_id, "destination": self._destination},
            )
            self._wake([audience_id])

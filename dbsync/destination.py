"""A destination as its actors and its reconciler share it: client, budget, and state.

One Demandbase tenant connection is used by every actor of its audiences and by its
reconciler. What they share lives here: the client they call through, the
:class:`~dbsync.budget.DestinationBudget` they spend, and whether the destination
runs (:class:`~dbsync.states.DestinationState`).

A 401 that a fresh token does not cure, or a 403, *stops* the destination: every
actor of it holds its work (nothing is dropped). A reload with new credentials builds
a new Destination; without one, each actor probes again every
:data:`STOPPED_PROBE_SECONDS` (a permission granted in Demandbase's UI needs no change
on our side), and the first call that succeeds restarts the destination.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from dbsync.budget import DestinationBudget
from dbsync.clock import Clock, wait_event
from dbsync.demandbase.wire import ImportJob
from dbsync.errors import DemandbaseError, PermissionDeniedError
from dbsync.states import DestinationState, check_transition

__all__ = ["STOPPED_PROBE_SECONDS", "Destination", "ImportClient"]

log = logging.getLogger(__name__)

# A stopped destination (401/403) is tried again this often, in case it was fixed.
STOPPED_PROBE_SECONDS = 900.0


class ImportClient(Protocol):
    """The part of :class:`~dbsync.demandbase.client.DemandbaseClient` an actor uses."""

    async def create_import_job(self, data_import_name: str) -> ImportJob: ...

    async def upload_import_data(
        self, job_id: int, data: bytes, *, list_action: str
    ) -> ImportJob: ...

    async def get_import_job(self, job_id: int) -> ImportJob: ...


class Destination:
    """What one destination's actors share: its client, its budget and whether it runs."""

    def __init__(self, name: str, client: ImportClient, budget: DestinationBudget) -> None:
        self.name = name
        self.client = client
        self.budget = budget
        self.state = DestinationState.RUNNING
        self._running = asyncio.Event()
        self._running.set()

    @property
    def is_running(self) -> bool:
        return self.state is DestinationState.RUNNING

    @property
    def stopped_reason(self) -> str:
        """Why the destination is stopped (the state's name); empty while it runs."""
        return "" if self.is_running else self.state.value

    def stop(self, reason: DestinationState, error: DemandbaseError) -> None:
        """Hold every call of the destination: ``reason`` is what Demandbase refused."""
        if not self.is_running:
            return
        self.state = check_transition(self.state, reason)
        self._running.clear()
        fields: dict[str, object] = {"destination": self.name, "reason": reason}
        if isinstance(error, PermissionDeniedError):
            fields["missing_permission"] = error.permission
        log.error("destination_stopped", extra={**fields, "error": str(error)})

    def restart(self) -> None:
        """Let calls go again: a probe went through, or the operator reloaded."""
        if self.is_running:
            return
        log.info("destination_restarted", extra={"destination": self.name})
        self.state = check_transition(self.state, DestinationState.RUNNING)
        self._running.set()

    async def wait_running(self, clock: Clock, *, unless: asyncio.Event | None = None) -> None:
        """Until the destination runs, it is time to probe it again, or ``unless`` is set."""
        await wait_event(self._running, clock, STOPPED_PROBE_SECONDS, unless=unless)

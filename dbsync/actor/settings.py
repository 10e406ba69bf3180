"""What an actor is built from: its audience's settings and the store it works with.

:class:`ActorSettings` is built from the configuration by the daemon and the
supervisor; :class:`DeliveryStore` is the part of :class:`~dbsync.store.Store` an
actor uses, so that unit tests give it an in-memory one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from dbsync.actor.calls import CallsStore
from dbsync.contract.watch import UNKNOWN_STATE_DEADLINE_SECONDS
from dbsync.model import AudienceRecord, Backlog, Batch, ListAction
from dbsync.triage import TriageStore

__all__ = ["ActorSettings", "DeliveryStore"]


class ActorSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What one actor needs to know of its audience (built from the configuration)."""

    audience_id: str
    destination: str
    name: str
    list_name: str
    requests_per_minute: float = 60.0
    max_records: int = 10_000
    max_age_seconds: float = 60.0
    max_jobs_in_flight: int = 2
    job_poll_initial_seconds: float = 2.0
    job_poll_max_seconds: float = 300.0
    # How long a job may stay in a state dbsync does not know before it counts as failed.
    unknown_state_deadline_seconds: float = UNKNOWN_STATE_DEADLINE_SECONDS
    paused: bool = False
    # Seconds after which an account set aside as unmatched is sent again, one per
    # try, the last repeating (``retry_unmatched_days`` in days of ``day_seconds``).
    retry_delays: tuple[float, ...] = ()


class DeliveryStore(TriageStore, CallsStore, Protocol):
    """The part of :class:`~dbsync.store.Store` an actor uses."""

    async def backlog(self, audience_id: str) -> Backlog: ...
    async def plan_batch(
        self, audience_id: str, action: ListAction, max_rows: int
    ) -> Batch | None: ...
    async def open_batches(self, audience_id: str) -> list[Batch]: ...
    async def mark_created(self, batch_id: int, job_id: int) -> None: ...
    async def mark_uploaded(self, batch_id: int) -> None: ...
    async def complete_batch(self, batch_id: int, *, list_id: int | None) -> int: ...
    async def fail_batch(self, batch_id: int, reason: str) -> None: ...
    async def abandon_batch(self, batch_id: int, reason: str) -> None: ...
    async def resync(self, audience_id: str) -> int: ...
    async def retry_due_in(self, audience_id: str, delays: Sequence[float]) -> float: ...
    async def adoption_pending(self, audience_id: str) -> bool: ...
    async def release_retries(
        self, audience_id: str, delays: Sequence[float], max_rows: int
    ) -> int: ...
    async def audience(self, audience_id: str) -> AudienceRecord | None: ...

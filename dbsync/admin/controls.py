"""What the admin verbs work with: the daemon's :class:`Controls`, and their fault.

Every verb module (:mod:`~dbsync.admin.verbs`, :mod:`~dbsync.admin.status`,
:mod:`~dbsync.admin.plan`) reads and acts only through :class:`Controls`, and says
that a request was not done by raising :class:`AdminFault` with a stable code.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from dbsync.admin.protocol import FaultCode
from dbsync.clock import Clock
from dbsync.config import Config
from dbsync.files.watcher import Watcher
from dbsync.model import AudienceRecord
from dbsync.store import Store
from dbsync.supervisor import Supervisor

__all__ = ["AdminFault", "Controls", "audience_record"]


class AdminFault(Exception):
    """A request that was not done: its stable code and a message for the operator."""

    def __init__(self, code: FaultCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, kw_only=True)
class Controls:
    """What the daemon lets the admin socket see and do."""

    supervisor: Supervisor
    store: Store
    clock: Clock
    config: Callable[[], Config]  # the configuration in force (a reload replaces it)
    config_path: Path
    started_at: float  # clock.time() at start
    reload: Callable[[], Awaitable[str | None]]  # None: applied; else why it was rejected
    drain: Callable[[], None]
    draining: Callable[[], bool]
    watcher: Watcher | None = None  # the watched folder, when [ingest.files] is set


async def audience_record(c: Controls, audience: str) -> AudienceRecord:
    """The audience's record, or the ``unknown_audience`` fault naming the known ones."""
    records = await c.store.audiences()
    if audience not in records:
        raise AdminFault(
            FaultCode.UNKNOWN_AUDIENCE,
            f"no audience {audience!r} (known: {', '.join(records)})",
        )
    return records[audience]

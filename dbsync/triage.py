"""What a batch costs when Demandbase refuses its rows or fails its jobs: bounded.

An actor sends a batch as one import job. Two kinds of trouble are about the batch's
content, and both would spend the daily quota in a loop if the batch were simply sent
again:

* **an upload refused with 400**: some row is one Demandbase will not take. The batch
  is halved, and each half sent, down to the single row that Demandbase refuses, which
  is set aside as rejected with its reason. One bad row in a batch of n rows costs at
  most 1 + 2⌈log₂ n⌉ jobs (29 for the default 10,000 rows); ingest refuses what the
  contract says Demandbase refuses, so only what ingest could not foresee gets here.
* **a job Demandbase fails** (or one left in a state dbsync does not know past its
  deadline): it may fail for its file's content, every time. The batch is sent once
  more as it is (:data:`JOB_ATTEMPTS`), then halved, each half treated alike down to
  :data:`MAX_SPLIT_DEPTH` levels; a part still failing there is set aside with its
  reason. One batch costs at most :data:`MAX_JOBS_PER_BATCH` jobs, however its jobs fail.

409, 413 and 415 say nothing of a row (:data:`NOT_ABOUT_A_ROW`): splitting would only
multiply the jobs, so the actor holds the audience instead (see its docstring).

The count of failed jobs per batch is kept in memory: a restart starts it again, which
at worst doubles the bound once per restart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from dbsync.logs import AudienceLogger
from dbsync.model import Batch

__all__ = [
    "JOB_ATTEMPTS",
    "MAX_JOBS_PER_BATCH",
    "MAX_SPLIT_DEPTH",
    "NOT_ABOUT_A_ROW",
    "Triage",
    "TriageStore",
]

#: Jobs Demandbase may fail for one batch (or one part of it) before it is split.
JOB_ATTEMPTS = 2
#: How often a failing batch is halved; a part this deep that fails is set aside.
MAX_SPLIT_DEPTH = 3
#: The most jobs one batch can cost when Demandbase fails every one of them:
#: JOB_ATTEMPTS per part, over the 1 + 2 + 4 + 8 parts of MAX_SPLIT_DEPTH halvings.
MAX_JOBS_PER_BATCH = JOB_ATTEMPTS * (2 ** (MAX_SPLIT_DEPTH + 1) - 1)
#: Statuses that say nothing of a row: splitting would only multiply the jobs.
NOT_ABOUT_A_ROW = frozenset({409, 413, 415})


class TriageStore(Protocol):
    """The part of :class:`~dbsync.store.Store` triage uses."""

    async def renew_batch(self, batch_id: int, reason: str) -> Batch: ...
    async def split_batch(self, batch_id: int) -> tuple[Batch, Batch]: ...
    async def reject_batch(self, batch_id: int, reason: str) -> None: ...


class Triage:
    """One audience's troubled batches: bisect refused rows, renew or split failed jobs.

    ``send`` is the actor's delivery of a batch (create, upload, poll); a part that is
    sent again comes back here if it is refused or fails again.
    """

    def __init__(
        self,
        store: TriageStore,
        send: Callable[[Batch], Awaitable[None]],
        log: AudienceLogger,
    ) -> None:
        self._store = store
        self._send = send
        self._log = log
        # Per open batch: (failed jobs so far, times halved) of its accounts.
        self._failures_of: dict[int, tuple[int, int]] = {}

    def completed(self, batch_id: int) -> None:
        """The batch's job completed: nothing more to count for it."""
        self._failures_of.pop(batch_id, None)

    async def refused(self, batch: Batch, reason: str) -> None:
        """A 400 on the upload: halve until the refused row stands alone, set it aside."""
        if len(batch.accounts) == 1:
            account = batch.accounts[0]
            await self._store.reject_batch(batch.batch_id, reason)
            self._log.warning(
                "account_rejected",
                extra={"external_id": account.external_id, "reason": reason},
            )
            return
        self._log.warning(
            "batch_split", extra={"batch_id": batch.batch_id, "rows": len(batch.accounts)}
        )
        for half in await self._store.split_batch(batch.batch_id):
            await self._send(half)

    async def failed(self, batch: Batch, reason: str) -> None:
        """Send again, split, or set aside: at most MAX_JOBS_PER_BATCH jobs per batch."""
        failures, depth = self._failures_of.pop(batch.batch_id, (0, 0))
        failures += 1
        renewed = await self._store.renew_batch(batch.batch_id, reason)
        if failures < JOB_ATTEMPTS:
            self._failures_of[renewed.batch_id] = (failures, depth)
            await self._send(renewed)
            return
        if depth >= MAX_SPLIT_DEPTH or len(renewed.accounts) == 1:
            reason = f"{reason}; {failures} jobs failed with these accounts"
            await self._store.reject_batch(renewed.batch_id, reason)
            self._log.warning(
                "batch_set_aside",
                extra={
                    "batch_id": renewed.batch_id,
                    "rows": len(renewed.accounts),
                    "reason": reason,
                },
            )
            return
        self._log.warning(
            "batch_split", extra={"batch_id": renewed.batch_id, "rows": len(renewed.accounts)}
        )
        for half in await self._store.split_batch(renewed.batch_id):
            self._failures_of[half.batch_id] = (0, depth + 1)
            await self._send(half)

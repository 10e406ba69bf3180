"""One actor per activated audience: it turns the audience's dirty set into import jobs.

The queue is the difference, not a log: the store keeps, per account, the desired
state and the state Demandbase acknowledged, and the actor sends only accounts whose
two states differ (ARCHITECTURE invariant 3). Many changes to one account therefore
cost one row.

An actor's life::

    resume open batches ──> idle ──backlog due and budget grants──> delivering ──┐
                             ^  └──pause──> paused ──resume──┘                   │
                             └───────────────────────────────────────────────────┘
    every call: ──transient failures──> backing off ──keeps failing──> failed
                                              └───────── success ────────> active

A backlog is *due* when it holds ``max_records`` accounts, when its oldest change is
``max_age_seconds`` old, or when the operator asks for a flush. Each delivery holds a
destination job slot from job creation until the job completes, and runs as its own
task so that one audience can have a few jobs processing at once (never the same
account twice: the store plans only accounts not already in flight).

A batch goes: create job -> upload CSV with an explicit ``listAction`` (``insert`` or
``delete``; never Demandbase's default ``replace``) -> poll until ``completed`` ->
``store.complete_batch`` marks its accounts delivered and advances the checkpoint in
one transaction. Only then; a crash anywhere before re-sends, which is harmless
because list membership is a set (invariant 2).

Failures: 429 slows the destination's pace and retries (never drops anything); 5xx,
timeouts and resets retry with capped exponential backoff and full jitter; after
``_FAILED_AFTER`` consecutive failures the actor reports ``failed`` and keeps trying
at the longest backoff, so it recovers by itself; 401/403 stop the whole destination
(see :class:`Destination`); a 400 on an upload splits the batch in two, down to the
single row that Demandbase refuses, which is set aside as rejected with its reason.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec
from aiolimiter import AsyncLimiter

from dbsync.budget import DestinationBudget
from dbsync.clock import Clock
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.wire import Endpoint, ImportJob
from dbsync.errors import (
    AuthError,
    BadRequestError,
    DemandbaseError,
    NotFoundError,
    PermissionDeniedError,
    ThrottledError,
)
from dbsync.logs import AudienceLogger
from dbsync.model import AudienceState, Backlog, Batch, BatchState, ListAction

__all__ = ["ActorSettings", "AudienceActor", "Destination", "ImportClient", "backoff_seconds"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Consecutive failed calls after which the actor reports ``failed``.
_FAILED_AFTER = 8
_BACKOFF_BASE_SECONDS = 1.0
_BACKOFF_MAX_SECONDS = 300.0
_THROTTLED_BACKOFF_MAX_SECONDS = 60.0  # after a 429: see backoff_seconds
# A stopped destination (401/403) is tried again this often, in case it was fixed.
_STOPPED_PROBE_SECONDS = 900.0
# Learned job duration: exponentially weighted moving average of completed jobs.
_JOB_SECONDS_WEIGHT = 0.3


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
    paused: bool = False


class ImportClient(Protocol):
    """The part of :class:`~dbsync.demandbase.client.DemandbaseClient` an actor uses."""

    async def create_import_job(self, data_import_name: str) -> ImportJob: ...

    async def upload_import_data(
        self, job_id: int, data: bytes, *, list_action: str
    ) -> ImportJob: ...

    async def get_import_job(self, job_id: int) -> ImportJob: ...


class DeliveryStore(Protocol):
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
    async def split_batch(self, batch_id: int) -> tuple[Batch, Batch]: ...
    async def reject_batch(self, batch_id: int, reason: str) -> None: ...
    async def resync(self, audience_id: str) -> int: ...
    async def add_to_ledger(self, audience_id: str, **deltas: int) -> None: ...
    async def set_audience_state(
        self, audience_id: str, state: AudienceState, reason: str = ""
    ) -> None: ...


async def wait_event(
    event: asyncio.Event,
    clock: Clock,
    seconds: float | None,
    *,
    unless: asyncio.Event | None = None,
) -> bool:
    """Wait until ``event`` (or ``unless``) is set or ``seconds`` pass on ``clock``.

    True if ``event`` was set.
    """
    events = [e for e in (event, unless) if e is not None]
    if any(e.is_set() for e in events):
        return event.is_set()
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(e.wait()) for e in events]
    if seconds is not None and seconds != float("inf"):
        waiters.append(asyncio.ensure_future(clock.sleep(seconds)))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in waiters:
            pending.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return event.is_set()


def backoff_seconds(rng: random.Random, attempt: int, *, throttled: bool = False) -> float:
    """How long to wait before retrying a call that failed ``attempt + 1`` times in a row.

    Full jitter (a random share of a capped exponential) spreads retries out: 1 s,
    doubling, at most 5 minutes; at most a minute after a 429, by when Demandbase's
    per-minute window has turned (the destination's pace, halved by the 429, does the
    slowing down). Shared by every caller of Demandbase: actors and reconcilers.
    """
    longest = _THROTTLED_BACKOFF_MAX_SECONDS if throttled else _BACKOFF_MAX_SECONDS
    cap = min(longest, _BACKOFF_BASE_SECONDS * 2**attempt)
    return rng.uniform(cap / 2, cap)


class _HeldBack(Exception):
    """A delivery waited for a stopped destination when its actor was told to stop.

    Nothing runs at Demandbase for it that a drain could wait for: its batch stays open
    in the store, and the next start resumes it.
    """


class Destination:
    """What one destination's actors share: its client, its budget and whether it runs.

    A 401 that a fresh token does not cure, or a 403, *stops* the destination: every
    actor of it holds its work (nothing is dropped). A reload with new credentials
    builds a new Destination; without one, each actor probes again every
    ``_STOPPED_PROBE_SECONDS`` (a permission granted in Demandbase's UI needs no
    change on our side), and the first call that succeeds restarts the destination.
    """

    def __init__(self, name: str, client: ImportClient, budget: DestinationBudget) -> None:
        self.name = name
        self.client = client
        self.budget = budget
        self.stopped_reason = ""
        self._running = asyncio.Event()
        self._running.set()

    @property
    def is_running(self) -> bool:
        return self._running.is_set()

    def stop(self, reason: str, error: DemandbaseError) -> None:
        if not self._running.is_set():
            return
        self._running.clear()
        self.stopped_reason = reason
        fields: dict[str, object] = {"destination": self.name, "reason": reason}
        if isinstance(error, PermissionDeniedError):
            fields["missing_permission"] = error.permission
        log.error("destination_stopped", extra={**fields, "error": str(error)})

    def restart(self) -> None:
        if self._running.is_set():
            return
        log.info("destination_restarted", extra={"destination": self.name})
        self.stopped_reason = ""
        self._running.set()

    async def wait_running(self, clock: Clock, *, unless: asyncio.Event | None = None) -> None:
        """Until the destination runs, it is time to probe it again, or ``unless`` is set."""
        await wait_event(self._running, clock, _STOPPED_PROBE_SECONDS, unless=unless)


class AudienceActor:
    """Delivers one audience's dirty accounts to its Demandbase list."""

    def __init__(
        self,
        settings: ActorSettings,
        *,
        destination: Destination,
        store: DeliveryStore,
        clock: Clock,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._destination = destination
        self._store = store
        self._clock = clock
        self._rng = rng or random.Random()
        self._limiter = AsyncLimiter(settings.requests_per_minute, 60)
        self._log = AudienceLogger(
            log, {"audience": settings.audience_id, "destination": settings.destination}
        )
        self._wakeup = asyncio.Event()
        self._flush_requested = False
        self._paused = settings.paused
        self._stopping = asyncio.Event()
        self._deliveries: set[asyncio.Task[None]] = set()
        # Deliveries past their job slot: they carry (or are planning) a batch and are
        # let finish on stop; the others only wait in the queue and are cancelled.
        self._carrying: set[asyncio.Task[None]] = set()
        self._backlog = Backlog(inserts=0, deletes=0, oldest_changed_at=None)
        self._next_action = ListAction.INSERT
        self._failures = 0
        self._job_seconds = settings.job_poll_initial_seconds
        self.state = AudienceState.PAUSED if settings.paused else AudienceState.ACTIVE
        self.last_error = ""
        self.jobs_completed = 0

    # --- control (called by the supervisor and the admin socket) ---------------------

    def wake(self) -> None:
        """New changes were folded for this audience (coalesced: many wakes, one check)."""
        self._wakeup.set()

    def flush(self) -> None:
        """Send what is pending now, within the budget, whatever its size and age."""
        self._flush_requested = True
        self._wakeup.set()

    def pause(self) -> None:
        self._paused = True
        self._wakeup.set()

    def resume(self) -> None:
        self._paused = False
        self._wakeup.set()

    def stop(self) -> None:
        """Finish the jobs in flight, start no new one, and return from :meth:`run`."""
        self._stopping.set()
        for task in self._deliveries - self._carrying:
            task.cancel()
        self._wakeup.set()

    @property
    def is_paused(self) -> bool:
        return self._paused

    @property
    def jobs_in_flight(self) -> int:
        return len(self._deliveries)

    async def resync(self) -> int:
        """Push the whole desired membership again (e.g. after the list was emptied)."""
        count = await self._store.resync(self.settings.audience_id)
        self._log.info("resync_requested", extra={"accounts": count})
        self.flush()
        return count

    # --- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until stopped, then wait for the jobs in flight to finish."""
        await self._set_state(AudienceState.PAUSED if self._paused else AudienceState.ACTIVE)
        async with asyncio.TaskGroup() as deliveries:
            # Batches left open by a previous run go first: their accounts are in
            # flight and would otherwise never be planned again.
            for batch in await self._store.open_batches(self.settings.audience_id):
                # One Demandbase already processes is in flight: a stop lets it finish.
                uploaded = batch.state is BatchState.UPLOADED
                self._spawn(deliveries, self._resume(batch), batch.batch_id, carrying=uploaded)
            while not self._stopping.is_set():
                if self._paused:
                    await self._set_state(AudienceState.PAUSED)
                    await self._wait(None)
                    continue
                if self.state is AudienceState.PAUSED:
                    await self._set_state(AudienceState.ACTIVE)
                delay = await self._due_in()
                if delay > 0 or len(self._deliveries) >= self.settings.max_jobs_in_flight:
                    await self._wait(delay if delay > 0 else None)
                    continue
                self._flush_requested = False
                self._spawn(deliveries, self._deliver_next(), "new")
                # Let the new delivery plan its batch before the backlog is read again.
                await asyncio.sleep(0)
        self._log.info("actor_stopped", extra={"jobs_completed": self.jobs_completed})

    def _spawn(
        self,
        group: asyncio.TaskGroup,
        work: Awaitable[None],
        label: object,
        *,
        carrying: bool = False,
    ) -> None:
        async def tracked() -> None:
            try:
                await work
            except _HeldBack:
                pass
            finally:
                self._deliveries.discard(task)
                self._carrying.discard(task)
                self._wakeup.set()

        task = group.create_task(tracked(), name=f"delivery:{self.settings.audience_id}:{label}")
        self._deliveries.add(task)
        if carrying:
            self._carrying.add(task)

    async def _due_in(self) -> float:
        """Seconds until the backlog is due (0: now; inf: nothing pending)."""
        backlog = self._backlog = await self._store.backlog(self.settings.audience_id)
        if backlog.pending == 0:
            return float("inf")
        if self._flush_requested or backlog.pending >= self.settings.max_records:
            return 0.0
        assert backlog.oldest_changed_at is not None
        age = self._clock.time() - backlog.oldest_changed_at
        # A change stamped in the future (a CDP clock ahead of ours) waits max_age at most.
        return min(self.settings.max_age_seconds, max(0.0, self.settings.max_age_seconds - age))

    async def _wait(self, seconds: float | None) -> None:
        """Until woken, or ``seconds`` on the injected clock (None: until woken)."""
        await wait_event(self._wakeup, self._clock, seconds)
        self._wakeup.clear()

    # --- one delivery ----------------------------------------------------------------

    def _priority(self) -> float:
        """The destination serves the audience whose backlog is oldest first."""
        return self._backlog.oldest_changed_at or self._clock.time()

    async def _deliver_next(self) -> None:
        await self._destination.wait_running(self._clock)
        async with self._destination.budget.job(priority=self._priority()):
            task = asyncio.current_task()
            assert task is not None
            self._carrying.add(task)
            if self._stopping.is_set():
                return
            batch = await self._plan()
            if batch is None:
                return
            await self._send(batch)

    async def _plan(self) -> Batch | None:
        # Alternate inserts and deletes so that neither starves the other.
        first = self._next_action
        second = ListAction.DELETE if first is ListAction.INSERT else ListAction.INSERT
        self._next_action = second
        for action in (first, second):
            batch = await self._store.plan_batch(
                self.settings.audience_id, action, self.settings.max_records
            )
            if batch is not None:
                self._log.info(
                    "batch_planned",
                    extra={
                        "batch_id": batch.batch_id,
                        "action": action,
                        "rows": len(batch.accounts),
                    },
                )
                return batch
        return None

    async def _resume(self, batch: Batch) -> None:
        self._log.info(
            "batch_resumed",
            extra={"batch_id": batch.batch_id, "state": batch.state, "job_id": batch.job_id},
        )
        if batch.state is BatchState.UPLOADED:
            # Demandbase is already processing it: take a slot without queueing.
            async with self._destination.budget.resumed_job():
                await self._finish(batch)
            return
        async with self._destination.budget.job(priority=batch.created_at):
            task = asyncio.current_task()
            assert task is not None
            self._carrying.add(task)
            if batch.state is BatchState.CREATED and batch.job_id is not None:
                # We cannot know whether the upload reached Demandbase before the crash.
                try:
                    job = await self._call(
                        Endpoint.IMPORT_JOB_STATUS,
                        lambda: self._destination.client.get_import_job(batch.job_id or 0),
                    )
                except NotFoundError:
                    await self._store.abandon_batch(batch.batch_id, "job vanished")
                    return
                if job.state != "new":
                    await self._store.mark_uploaded(batch.batch_id)
                    await self._finish(batch)
                    return
            await self._send(batch)

    async def _send(self, batch: Batch) -> None:
        """Create the job if needed, upload, then wait for the verdict."""
        client = self._destination.client
        job_id = batch.job_id
        if job_id is None:
            job = await self._call(
                Endpoint.IMPORT_CREATE_JOB,
                lambda: client.create_import_job(self.settings.list_name),
            )
            job_id = job.id
            await self._store.mark_created(batch.batch_id, job_id)
        data = encode_accounts(batch.accounts)
        try:
            await self._call(
                Endpoint.IMPORT_UPLOAD,
                lambda: client.upload_import_data(job_id, data, list_action=batch.action),
            )
        except BadRequestError as exc:
            # An attempt whose answer was lost (retried by us, or by aiohttp on a dropped
            # kept-alive connection) may have been taken: the job then refuses the repeat
            # ("data goes to a new job, once"), which says nothing of the rows.
            if not await self._job_has_data(job_id):
                await self._bisect(batch, exc)
                return
        except NotFoundError:
            await self._store.abandon_batch(batch.batch_id, "job vanished before upload")
            return
        await self._store.mark_uploaded(batch.batch_id)
        self._log.info(
            "batch_uploaded",
            extra={"batch_id": batch.batch_id, "job_id": job_id, "rows": len(batch.accounts)},
        )
        await self._finish(msgspec.structs.replace(batch, job_id=job_id))

    async def _job_has_data(self, job_id: int) -> bool:
        try:
            job = await self._call(
                Endpoint.IMPORT_JOB_STATUS,
                lambda: self._destination.client.get_import_job(job_id),
            )
        except NotFoundError:
            return False
        return job.state != "new"

    async def _bisect(self, batch: Batch, error: BadRequestError) -> None:
        """Find the rows Demandbase refuses: halve until the culprit stands alone."""
        if len(batch.accounts) == 1:
            account = batch.accounts[0]
            await self._store.reject_batch(batch.batch_id, error.message)
            self._log.warning(
                "account_rejected",
                extra={"external_id": account.external_id, "reason": error.message},
            )
            return
        self._log.warning(
            "batch_split", extra={"batch_id": batch.batch_id, "rows": len(batch.accounts)}
        )
        for half in await self._store.split_batch(batch.batch_id):
            await self._send(half)

    async def _finish(self, batch: Batch) -> None:
        """Poll the job, sparingly, until Demandbase says completed or failed."""
        assert batch.job_id is not None
        job_id = batch.job_id
        started = self._clock.monotonic()
        delay = self._job_seconds
        while True:
            await self._clock.sleep(delay)
            try:
                job = await self._call(
                    Endpoint.IMPORT_JOB_STATUS,
                    lambda: self._destination.client.get_import_job(job_id),
                )
            except NotFoundError:
                await self._store.fail_batch(batch.batch_id, "job vanished while processing")
                return
            if job.state == "completed":
                rows = await self._store.complete_batch(batch.batch_id, list_id=job.account_list_id)
                self._learn_job_seconds(self._clock.monotonic() - started)
                self.jobs_completed += 1
                self._log.info(
                    "batch_acked",
                    extra={
                        "batch_id": batch.batch_id,
                        "job_id": job_id,
                        "action": batch.action,
                        "rows": rows,
                        "list_id": job.account_list_id,
                    },
                )
                return
            if job.state == "failed":
                await self._store.fail_batch(batch.batch_id, "Demandbase failed the job")
                self._log.warning(
                    "job_failed", extra={"batch_id": batch.batch_id, "job_id": job_id}
                )
                return
            # Status calls have a daily quota too: wait longer each time.
            delay = min(delay * 2, self.settings.job_poll_max_seconds)

    def _learn_job_seconds(self, seconds: float) -> None:
        blended = (1 - _JOB_SECONDS_WEIGHT) * self._job_seconds + _JOB_SECONDS_WEIGHT * seconds
        self._job_seconds = max(0.05, min(blended, self.settings.job_poll_max_seconds))

    # --- one call, with the retry policy ----------------------------------------------

    async def _call(self, endpoint: Endpoint, request: Callable[[], Awaitable[T]]) -> T:
        """Spend budget, make the request, retry what is retriable; never drop the work.

        401/403 stop the destination; the call then waits for it to run again.
        Errors that are not retriable (400, 404) go back to the caller.
        """
        attempt = 0
        while True:
            await self._destination.wait_running(self._clock, unless=self._stopping)
            if self._stopping.is_set() and not self._destination.is_running:
                raise _HeldBack
            # The audience's own pace first: between the destination's charge and the
            # request nothing should wait, or a request charged to today could reach
            # Demandbase tomorrow.
            await self._limiter.acquire()
            await self._destination.budget.spend(endpoint, priority=self._priority())
            try:
                result = await request()
            except (AuthError, PermissionDeniedError) as exc:
                reason = "auth_failed" if isinstance(exc, AuthError) else "permission_denied"
                self._destination.stop(reason, exc)
                await self._set_state(AudienceState.STOPPED, reason)
                continue
            except ThrottledError as exc:
                await self._destination.budget.on_throttled(exc.retry_after)
                await self._store.add_to_ledger(self.settings.audience_id, throttled=1)
                backoff = backoff_seconds(self._rng, attempt, throttled=True)
                delay = max(backoff, exc.retry_after or 0.0)
                await self._failed_call(endpoint, exc, delay)
            except DemandbaseError as exc:
                if not exc.retriable:
                    raise
                await self._failed_call(endpoint, exc, backoff_seconds(self._rng, attempt))
            else:
                await self._succeeded_call()
                return result
            attempt += 1

    async def _failed_call(self, endpoint: Endpoint, error: DemandbaseError, delay: float) -> None:
        self._failures += 1
        self.last_error = str(error)
        self._log.warning(
            "api_retry",
            extra={
                "endpoint": endpoint,
                "status": error.status,
                "error_code": error.error_code,
                "failures": self._failures,
                "retry_in_seconds": round(delay, 3),
            },
        )
        if self._failures >= _FAILED_AFTER and self.state is not AudienceState.FAILED:
            await self._set_state(AudienceState.FAILED, str(error))
        await self._clock.sleep(delay)

    async def _succeeded_call(self) -> None:
        self._failures = 0
        self._destination.restart()  # a probe of a stopped destination went through
        if self.state in (AudienceState.FAILED, AudienceState.STOPPED):
            await self._set_state(AudienceState.PAUSED if self._paused else AudienceState.ACTIVE)

    async def _set_state(self, state: AudienceState, reason: str = "") -> None:
        if state is self.state:
            return
        previous, self.state = self.state, state
        level = logging.ERROR if state is AudienceState.FAILED else logging.INFO
        self._log.log(
            level,
            "actor_state_changed",
            extra={"from": previous, "to": state, "reason": reason},
        )
        await self._store.set_audience_state(self.settings.audience_id, state, reason)

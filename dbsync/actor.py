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

Failures (the policy is :mod:`dbsync.retry`'s, shared with the reconcilers): 429
slows the destination's pace and retries (never drops anything); 5xx, timeouts and
resets retry with capped exponential backoff and full jitter; after
:data:`~dbsync.retry.GIVE_UP_AFTER` consecutive failures the actor reports ``failed``
and keeps trying at the longest backoff, so it recovers by itself; 401/403 stop the
whole destination (see :mod:`dbsync.destination`); a 400 on an upload splits the
batch in two, down to the single row that Demandbase refuses, which is set aside as
rejected with its reason.

Time: the actor reads time, sleeps and paces its requests (:class:`~dbsync.clock.Limiter`)
through the injected clock only, so that a test drives it with a FakeClock.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec

from dbsync.clock import Clock, Limiter, PaceLimiter, wait_event
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.wire import Endpoint
from dbsync.destination import Destination, ImportClient
from dbsync.errors import (
    AuthError,
    BadRequestError,
    DemandbaseError,
    NotFoundError,
    ThrottledError,
)
from dbsync.logs import AudienceLogger
from dbsync.model import AudienceState, Backlog, Batch, BatchState, ListAction
from dbsync.retry import (
    GIVE_UP_AFTER,
    LearnedDuration,
    OnRefused,
    RetryPolicy,
    call_with_retries,
    poll_until,
)
from dbsync.states import DestinationState, ImportJobState, check_transition

# Destination and ImportClient used to live here; importers of them keep working.
__all__ = ["ActorSettings", "AudienceActor", "Destination", "ImportClient"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# An actor never gives up a call: it holds its work until Demandbase takes it.
_POLICY = RetryPolicy(give_up_after=None, on_refused=OnRefused.STOP_DESTINATION)


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


class _HeldBack(Exception):
    """A delivery waited for a stopped destination when its actor was told to stop.

    Nothing runs at Demandbase for it that a drain could wait for: its batch stays open
    in the store, and the next start resumes it.
    """


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
        limiter: Limiter | None = None,
    ) -> None:
        self.settings = settings
        self._destination = destination
        self._store = store
        self._clock = clock
        self._rng = rng or random.Random()
        self._limiter = limiter or PaceLimiter(settings.requests_per_minute, 60, clock)
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
        self._job_seconds = LearnedDuration(
            settings.job_poll_initial_seconds, settings.job_poll_max_seconds
        )
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

    async def record_failure(self, reason: str) -> None:
        """The supervisor saw :meth:`run` crash: report ``failed``, saying why."""
        self.last_error = reason
        await self._set_state(AudienceState.FAILED, reason, persist=True)

    async def resync(self) -> int:
        """Push the whole desired membership again (e.g. after the list was emptied)."""
        count = await self._store.resync(self.settings.audience_id)
        self._log.info("resync_requested", extra={"accounts": count})
        self.flush()
        return count

    # --- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until stopped, then wait for the jobs in flight to finish."""
        # The store may hold what an earlier run left (failed, stopped): say what is true.
        await self._set_state(
            AudienceState.PAUSED if self._paused else AudienceState.ACTIVE, persist=True
        )
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
                if job.state != ImportJobState.NEW:
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
        return job.state != ImportJobState.NEW

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
        try:
            job = await poll_until(
                lambda: self._call(
                    Endpoint.IMPORT_JOB_STATUS,
                    lambda: self._destination.client.get_import_job(job_id),
                ),
                lambda job: job.state in (ImportJobState.COMPLETED, ImportJobState.FAILED),
                clock=self._clock,
                initial_seconds=self._job_seconds.seconds,
                maximum_seconds=self.settings.job_poll_max_seconds,
            )
        except NotFoundError:
            await self._store.fail_batch(batch.batch_id, "job vanished while processing")
            return
        if job.state == ImportJobState.FAILED:
            await self._store.fail_batch(batch.batch_id, "Demandbase failed the job")
            self._log.warning("job_failed", extra={"batch_id": batch.batch_id, "job_id": job_id})
            return
        # Checkpoint only now: a crash before this line re-sends the batch, not skips it.
        rows = await self._store.complete_batch(batch.batch_id, list_id=job.account_list_id)
        self._job_seconds.learn(self._clock.monotonic() - started)
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

    # --- one call, with the retry policy (dbsync.retry) and the actor's hooks ---------

    async def _call(self, endpoint: Endpoint, request: Callable[[], Awaitable[T]]) -> T:
        """Spend budget, make the request, retry what is retriable; never drop the work.

        401/403 stop the destination; the call then waits for it to run again.
        Errors that are not retriable (400, 404) go back to the caller.
        """
        return await call_with_retries(
            endpoint, request, policy=_POLICY, hooks=self, clock=self._clock, rng=self._rng
        )

    async def before_attempt(self, endpoint: Endpoint) -> None:
        await self._destination.wait_running(self._clock, unless=self._stopping)
        if self._stopping.is_set() and not self._destination.is_running:
            raise _HeldBack
        # The audience's own pace first: between the destination's charge and the
        # request nothing should wait, or a request charged to today could reach
        # Demandbase tomorrow.
        await self._limiter.acquire()
        await self._destination.budget.spend(endpoint, priority=self._priority())

    async def refused(self, endpoint: Endpoint, error: DemandbaseError) -> None:
        reason = (
            DestinationState.AUTH_FAILED
            if isinstance(error, AuthError)
            else DestinationState.PERMISSION_DENIED
        )
        self._destination.stop(reason, error)
        await self._set_state(AudienceState.STOPPED, reason)

    async def throttled(self, endpoint: Endpoint, error: ThrottledError) -> None:
        await self._destination.budget.on_throttled(error.retry_after)
        await self._store.add_to_ledger(self.settings.audience_id, throttled=1)

    async def retrying(
        self, endpoint: Endpoint, error: DemandbaseError, attempt: int, delay: float
    ) -> None:
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
        if self._failures >= GIVE_UP_AFTER and self.state is not AudienceState.FAILED:
            await self._set_state(AudienceState.FAILED, str(error))

    async def succeeded(self, endpoint: Endpoint) -> None:
        self._failures = 0
        self._destination.restart()  # a probe of a stopped destination went through
        if self.state in (AudienceState.FAILED, AudienceState.STOPPED):
            await self._set_state(AudienceState.PAUSED if self._paused else AudienceState.ACTIVE)

    async def _set_state(
        self, state: AudienceState, reason: str = "", *, persist: bool = False
    ) -> None:
        """Move to ``state`` (checked against its machine) and store it.

        ``persist``: store it even if it is the state already (a new reason, a new run).
        """
        if state is self.state:
            if persist:
                await self._store.set_audience_state(self.settings.audience_id, state, reason)
            return
        previous, self.state = self.state, check_transition(self.state, state)
        level = logging.ERROR if state is AudienceState.FAILED else logging.INFO
        self._log.log(
            level,
            "actor_state_changed",
            extra={"from": previous, "to": state, "reason": reason},
        )
        await self._store.set_audience_state(self.settings.audience_id, state, reason)

"""The actor of one audience: it turns the audience's dirty set into import jobs
(the package's docstring draws its life).

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

Failures: what happens around each call to Demandbase (429s, 5xx, 401/403, the
``failed`` state) is :mod:`dbsync.actor.calls`'s. A 400 on an upload splits the
batch in two, down to the single row that Demandbase refuses, which is set aside as
rejected with its reason; a job Demandbase *fails* is sent again, then split, and a
part still failing is set aside: :mod:`dbsync.triage` bounds what either costs. 409,
413 and 415 are not about a row: the batch is not split, its accounts wait in the
queue, the audience reports ``failed`` naming the status and sends nothing for
:data:`REFUSED_HOLD_SECONDS` (or until ``ctl resume``): a file too large is cured by a
smaller ``max_records``, the others by a fix.

The contract (:mod:`dbsync.contract.watch`): a job state is compared whatever its
case; one dbsync does not know is polled until a deadline, then counts as failed.
A completed job that reports another list than the audience's stops the audience in
``contract_broken`` (its accounts go back to the queue, not marked delivered) until
``dbsync ctl resume``.

Time: the actor reads time, sleeps and paces its requests (:class:`~dbsync.clock.Limiter`)
through the injected clock only, so that a test drives it with a FakeClock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable

import msgspec

from dbsync.actor.calls import ActorCalls, HeldBack, ReportedState
from dbsync.actor.settings import ActorSettings, DeliveryStore
from dbsync.clock import Clock, Limiter, PaceLimiter, wait_event
from dbsync.contract.watch import UnknownStateWatch, list_breach
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.wire import Endpoint, ImportJob
from dbsync.destination import Destination
from dbsync.errors import BadRequestError, NotFoundError
from dbsync.logs import AudienceLogger
from dbsync.model import AudienceState, Backlog, Batch, BatchState, ListAction
from dbsync.retry import LearnedDuration, poll_until
from dbsync.states import ImportJobState, import_job_state
from dbsync.triage import NOT_ABOUT_A_ROW, Triage

__all__ = ["ADOPTION_RECHECK_SECONDS", "REFUSED_HOLD_SECONDS", "AudienceActor"]

log = logging.getLogger(__name__)
# After one of them, the audience sends nothing for this long (or until ``ctl resume``):
# the same request would meet the same answer, so at most 48 jobs a day go to it.
REFUSED_HOLD_SECONDS = 1_800.0
# While its list is being adopted, an audience looks again this often (it is woken too).
ADOPTION_RECHECK_SECONDS = 5.0


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
        # Deliveries that hold no batch yet (new ones, retries): a pause cancels those
        # still waiting for a slot; a batch left open by a previous run is not dropped.
        self._unplanned: set[asyncio.Task[None]] = set()
        self._backlog = Backlog(inserts=0, deletes=0, oldest_changed_at=None)
        self._next_action = ListAction.INSERT
        self._job_seconds = LearnedDuration(
            settings.job_poll_initial_seconds, settings.job_poll_max_seconds
        )
        initial = AudienceState.PAUSED if settings.paused else AudienceState.ACTIVE
        self._status = ReportedState(settings.audience_id, initial, store, self._log)
        self._calls = ActorCalls(
            settings.audience_id,
            destination=destination,
            store=store,
            clock=clock,
            rng=self._rng,
            limiter=self._limiter,
            status=self._status,
            stopping=self._stopping,
            priority=self._priority,
            is_paused=lambda: self._paused,
            log=self._log,
        )
        self.jobs_completed = 0
        # The list the audience feeds (configured, or reported by its first job) [A1/A2].
        self._list_id: int | None = None
        # Until two jobs have named the same list (or jobs name none), one job at a time:
        # a tenant whose every job creates a list then leaves one stray list, not two.
        self._list_settled = False
        self._triage = Triage(store, self._send, self._log)
        # Monotonic time before which nothing new is sent (after a 409, 413 or 415).
        self._held_until = 0.0
        # The delivery that carries set-aside accounts tried again: it asks the budget
        # with the lowest priority, so it spends only what no other batch waits for.
        self._retry_task: asyncio.Task[None] | None = None

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
        # Deliveries still waiting for a job slot leave the queue: granted, they would
        # send a batch of a paused audience (and spend its turn).
        for task in self._unplanned - self._carrying:
            task.cancel()
        self._wakeup.set()

    def resume(self) -> None:
        """Also the operator's word that a broken contract was looked at (``ctl resume``)."""
        self._paused = False
        self._held_until = 0.0
        self._status.clear_breach()
        self._wakeup.set()

    @property
    def contract_breach(self) -> str:
        """Why the contract broke (a job fed another list); "" while it holds."""
        return self._status.contract_breach

    @property
    def is_held(self) -> bool:
        """Paused, or stopped by a broken contract: nothing is sent until ``ctl resume``."""
        return self._paused or bool(self.contract_breach)

    def stop(self) -> None:
        """Finish the jobs in flight, start no new one, and return from :meth:`run`."""
        self._stopping.set()
        for task in self._deliveries - self._carrying:
            task.cancel()
        self._wakeup.set()

    @property
    def state(self) -> AudienceState:
        return self._status.state

    @property
    def last_error(self) -> str:
        return self._status.last_error

    @property
    def next_action(self) -> ListAction:
        """The action its next batch tries first (inserts and deletes alternate)."""
        return self._next_action

    @property
    def job_seconds(self) -> float:
        """How long its import jobs take, as learned (the first poll waits this long)."""
        return self._job_seconds.seconds

    @property
    def is_paused(self) -> bool:
        return self._paused

    @property
    def jobs_in_flight(self) -> int:
        return len(self._deliveries)

    async def record_failure(self, reason: str) -> None:
        """The supervisor saw :meth:`run` crash: report ``failed``, saying why."""
        self._status.last_error = reason
        await self._status.set(AudienceState.FAILED, reason, persist=True)

    async def resync(self) -> int:
        """Push the whole desired membership again (e.g. after the list was emptied)."""
        count = await self._store.resync(self.settings.audience_id)
        self._log.info("resync_requested", extra={"accounts": count})
        self.flush()
        return count

    # --- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until stopped, then wait for the jobs in flight to finish."""
        record = await self._store.audience(self.settings.audience_id)
        if record is not None:
            self._list_id = record.list_id
            if record.state is AudienceState.CONTRACT_BROKEN and not self.contract_breach:
                # A breach outlives a restart: only an operator's resume clears it.
                self._status.contract_breach = record.state_reason or "the contract broke"
        self._list_settled = self._list_id is not None
        # The store may hold what an earlier run left (failed, stopped): say what is true.
        if self.contract_breach:
            breach = self.contract_breach
            await self._status.set(AudienceState.CONTRACT_BROKEN, breach, persist=True)
        else:
            await self._status.set(
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
                if self.contract_breach:
                    await self._status.set(AudienceState.CONTRACT_BROKEN, self.contract_breach)
                    await self._wait(None)
                    continue
                if self._paused:
                    await self._status.set(AudienceState.PAUSED)
                    await self._wait(None)
                    continue
                if self.state in (AudienceState.PAUSED, AudienceState.CONTRACT_BROKEN):
                    await self._status.set(AudienceState.ACTIVE)
                held = self._held_until - self._clock.monotonic()
                if held > 0:
                    await self._wait(held)
                    continue
                delay = await self._due_in()
                if delay == float("inf") and not self._deliveries and self.settings.retry_delays:
                    # Nothing else to send: the set-aside accounts whose retry is due.
                    delay = await self._store.retry_due_in(
                        self.settings.audience_id, self.settings.retry_delays
                    )
                    if delay <= 0:
                        self._spawn(deliveries, self._retry_next(), "retry", unplanned=True)
                        await asyncio.sleep(0)
                        continue
                most = self.settings.max_jobs_in_flight if self._list_settled else 1
                if delay > 0 or len(self._deliveries) >= most:
                    await self._wait(delay if delay > 0 else None)
                    continue
                if await self._store.adoption_pending(self.settings.audience_id):
                    # Its list is read back first: what it holds is not sent again. The
                    # reconciler wakes the actor once adopted (or given up).
                    await self._wait(ADOPTION_RECHECK_SECONDS)
                    continue
                self._flush_requested = False
                self._spawn(deliveries, self._deliver_next(), "new", unplanned=True)
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
        unplanned: bool = False,
    ) -> None:
        async def tracked() -> None:
            with contextlib.suppress(HeldBack):
                await work

        def done(task: asyncio.Task[None]) -> None:
            # A callback, not a finally: a task cancelled before its first step (a pause
            # right after the spawn) never runs its body.
            if asyncio.iscoroutine(work):
                work.close()  # never started: no "never awaited" warning
            self._deliveries.discard(task)
            self._carrying.discard(task)
            self._unplanned.discard(task)
            self._wakeup.set()

        task = group.create_task(tracked(), name=f"delivery:{self.settings.audience_id}:{label}")
        task.add_done_callback(done)
        self._deliveries.add(task)
        if carrying:
            self._carrying.add(task)
        if unplanned:
            self._unplanned.add(task)

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
        """The destination serves the audience waiting longest first (from its oldest
        pending change, or its last turn: :mod:`dbsync.budget`); set-aside accounts
        tried again come after every other batch."""
        if self._retry_task is not None and asyncio.current_task() is self._retry_task:
            return math.inf
        return self._backlog.oldest_changed_at or self._clock.time()

    async def _retry_next(self) -> None:
        """Send again the set-aside accounts whose retry is due, with the quota and the
        job slot that no other batch of the destination waits for."""
        self._retry_task = asyncio.current_task()
        await self._calls.reflect_destination()
        await self._destination.wait_running(self._clock)
        async with self._destination.budget.job(priority=math.inf):
            task = asyncio.current_task()
            assert task is not None
            self._carrying.add(task)
            if self._stopping.is_set() or self.contract_breach or self._paused:
                return
            released = await self._store.release_retries(
                self.settings.audience_id, self.settings.retry_delays, self.settings.max_records
            )
            if not released:
                return
            self._log.info("unmatched_retried", extra={"accounts": released})
            batch = await self._store.plan_batch(
                self.settings.audience_id, ListAction.INSERT, self.settings.max_records
            )
            if batch is None:
                return
            self._log.info(
                "batch_planned",
                extra={"batch_id": batch.batch_id, "action": "insert", "rows": len(batch.accounts)},
            )
            await self._send(batch)

    async def _deliver_next(self) -> None:
        await self._calls.reflect_destination()
        await self._destination.wait_running(self._clock)
        async with self._destination.budget.job(
            priority=self._priority(), audience=self.settings.audience_id
        ):
            task = asyncio.current_task()
            assert task is not None
            self._carrying.add(task)
            if self._stopping.is_set() or self.contract_breach or self._paused:
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
        async with self._destination.budget.job(
            priority=batch.created_at, audience=self.settings.audience_id
        ):
            task = asyncio.current_task()
            assert task is not None
            self._carrying.add(task)
            if batch.state is BatchState.CREATED and batch.job_id is not None:
                # We cannot know whether the upload reached Demandbase before the crash.
                try:
                    job = await self._calls.call(
                        Endpoint.IMPORT_JOB_STATUS,
                        lambda: self._destination.client.get_import_job(batch.job_id or 0),
                    )
                except NotFoundError:
                    await self._store.abandon_batch(batch.batch_id, "job vanished")
                    return
                if import_job_state(job.state) is not ImportJobState.NEW:
                    await self._store.mark_uploaded(batch.batch_id)
                    await self._finish(batch)
                    return
            await self._send(batch)

    async def _send(self, batch: Batch) -> None:
        """Create the job if needed, upload, then wait for the verdict."""
        client = self._destination.client
        job_id = batch.job_id
        if job_id is None:
            job = await self._calls.call(
                Endpoint.IMPORT_CREATE_JOB,
                lambda: client.create_import_job(self.settings.list_name),
            )
            job_id = job.id
            await self._store.mark_created(batch.batch_id, job_id)
        data = encode_accounts(batch.accounts)
        try:
            await self._calls.call(
                Endpoint.IMPORT_UPLOAD,
                lambda: client.upload_import_data(job_id, data, list_action=batch.action),
            )
        except BadRequestError as exc:
            # An attempt whose answer was lost (retried by us, or by aiohttp on a dropped
            # kept-alive connection) may have been taken: the job then refuses the repeat
            # ("data goes to a new job, once"), which says nothing of the rows.
            if not await self._job_has_data(job_id):
                if exc.status in NOT_ABOUT_A_ROW:
                    await self._refused_whole(batch, exc)
                else:
                    await self._triage.refused(batch, exc.message)
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
            job = await self._calls.call(
                Endpoint.IMPORT_JOB_STATUS,
                lambda: self._destination.client.get_import_job(job_id),
            )
        except NotFoundError:
            return False
        return import_job_state(job.state) is not ImportJobState.NEW

    async def _refused_whole(self, batch: Batch, error: BadRequestError) -> None:
        """409, 413 or 415: about the request, not a row. Hold the accounts; say so."""
        await self._store.abandon_batch(batch.batch_id, error.message)
        self._held_until = self._clock.monotonic() + REFUSED_HOLD_SECONDS
        self._status.last_error = str(error)
        self._log.error(
            "upload_refused",
            extra={"batch_id": batch.batch_id, "status": error.status, "reason": error.message},
        )
        await self._status.set(AudienceState.FAILED, str(error))

    async def _finish(self, batch: Batch) -> None:
        """Poll the job, sparingly, until Demandbase says completed or failed."""
        assert batch.job_id is not None
        job_id = batch.job_id
        started = self._clock.monotonic()
        unknown = UnknownStateWatch(self.settings.unknown_state_deadline_seconds)

        def done(job: ImportJob) -> bool:
            state = import_job_state(job.state)
            if state in (ImportJobState.COMPLETED, ImportJobState.FAILED):
                return True
            return unknown.expired(job.state, state is not None, self._clock.monotonic())

        try:
            job = await poll_until(
                lambda: self._calls.call(
                    Endpoint.IMPORT_JOB_STATUS,
                    lambda: self._destination.client.get_import_job(job_id),
                ),
                done,
                clock=self._clock,
                initial_seconds=self._job_seconds.seconds,
                maximum_seconds=self.settings.job_poll_max_seconds,
            )
        except NotFoundError:
            await self._store.fail_batch(batch.batch_id, "job vanished while processing")
            return
        state = import_job_state(job.state)
        if state is None:
            self._log.warning(
                "job_state_unknown",
                extra={
                    "batch_id": batch.batch_id,
                    "job_id": job_id,
                    "state": job.state,
                    "deadline_seconds": unknown.deadline_seconds,
                },
            )
            await self._triage.failed(batch, f"job {job_id} stayed in unknown state {job.state!r}")
            return
        if state is ImportJobState.FAILED:
            self._log.warning("job_failed", extra={"batch_id": batch.batch_id, "job_id": job_id})
            await self._triage.failed(batch, f"Demandbase failed job {job_id}")
            return
        breach = list_breach(self._list_id, job.account_list_id)
        if breach is not None:
            # Not delivered to the audience's list: its accounts go back to the queue.
            await self._store.fail_batch(batch.batch_id, breach)
            await self._status.break_contract(
                breach, job_id=job_id, list_id=job.account_list_id, expected_list_id=self._list_id
            )
            self._wakeup.set()
            return
        # Learned before the next await, so that a job completing meanwhile is held to it;
        # settled once a second job names the same list (or jobs name none: A2 differs).
        if self._list_id is None:
            self._list_id = job.account_list_id
        else:
            self._list_settled = True
        if job.account_list_id is None:
            self._list_settled = True
        # Checkpoint only now: a crash before this line re-sends the batch, not skips it.
        rows = await self._store.complete_batch(batch.batch_id, list_id=job.account_list_id)
        self._triage.completed(batch.batch_id)
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

"""The reconciler: whose list is read back when, within a destination's export quotas.

A completed import job is the only acknowledgment Demandbase gives, and it carries no
per-row result: rows it throttled or could not match are silently missing from the
list. So one :class:`Reconciler` per destination reads each audience's list back
(:mod:`~dbsync.reconcile.readback`: one export job's life, the judgment, the report).
This module decides when, within Demandbase's export limits (60 jobs a day, one at a
time):

* each export job and each status read is charged to the destination's
  :class:`~dbsync.budget.DestinationBudget` first, which persists the day's spending;
  a read-back starts only when today's quota still has room for its job and a status
  read, and at most ``concurrent_export_jobs`` run at once (a slot is held from the
  job's creation until its results are judged);
* an audience is due ``interval_seconds`` after its last read-back started, or, never
  read back, once its first acknowledged job is older than the visibility lag; among
  the due ones the one read back longest ago goes first, so with more audiences than
  exports a day they take turns and each is read back within
  :func:`days_to_reconcile_all` days (:mod:`~dbsync.reconcile.schedule`);
* with multi-list exports [A5], one job reads many audiences' lists
  (:mod:`~dbsync.reconcile.multi`), so that each is read within ``verify_within_hours``;
* an audience adopting its list goes before every scheduled turn
  (:mod:`~dbsync.reconcile.adoption`);
* a read-back's export job is recorded as soon as Demandbase accepted it: a restart
  resumes polling it instead of paying for another.

The reconciler never holds up delivery: it spends only the export quotas, stops
(cancelled) when the drain begins, and an export or permission error fails the
read-back, never the destination.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence

import msgspec

from dbsync.clock import Clock, wait_event
from dbsync.config import Destination as DestinationConfig
from dbsync.config import ReconcileSettings
from dbsync.demandbase.wire import Endpoint
from dbsync.destination import STOPPED_PROBE_SECONDS, Destination
from dbsync.errors import DbsyncError
from dbsync.model import ReconcileFacts, ReconcileRun
from dbsync.reconcile import multi
from dbsync.reconcile.adoption import Adoptions, AdoptionStore
from dbsync.reconcile.losses import LossEstimate
from dbsync.reconcile.multi import ExportVolume
from dbsync.reconcile.readback import ExportClient, ReadBackFailed, ReadBacks, ReadbackStore
from dbsync.reconcile.report import ReconcileReport, decode_report
from dbsync.reconcile.schedule import due_at, predict_next, turn_order
from dbsync.retry import backoff_seconds

__all__ = [
    "ExportClient",
    "ReadbackStore",
    "ReconcileDeferred",
    "ReconcilePlan",
    "Reconciler",
]

# Every module of the package logs as ``dbsync.reconcile``: the name is in each event.
log = logging.getLogger("dbsync.reconcile")

# With nothing due, look again this often at most (a list id may have been learned).
_RECHECK_SECONDS = 60.0
_MIN_WAIT_SECONDS = 0.05
_UNLIMITED = 1_000_000_000


class ReconcileDeferred(DbsyncError):
    """A read-back cannot run now; ``retry_at`` (epoch seconds) is when it can, ``reason`` why."""

    def __init__(self, reason: str, *, retry_at: float) -> None:
        self.reason = reason
        self.retry_at = retry_at
        super().__init__(f"{reason}; retry at {retry_at:.3f}")


class ReconcilePlan(msgspec.Struct, frozen=True, kw_only=True):
    """What a destination's reconciler runs with, derived from its configuration."""

    settings: ReconcileSettings = ReconcileSettings()
    concurrent_export_jobs: int = 1
    list_ids: dict[str, int] = msgspec.field(default_factory=dict)  # configured, by audience
    # Many lists per export job: A5 holds (``multi_list_exports``, or the probe's record).
    multi_list: bool = False
    export_bytes_per_day: int = 10_000_000_000

    @classmethod
    def from_config(
        cls, destination: DestinationConfig, *, a5_holds: bool = False
    ) -> ReconcilePlan:
        """``a5_holds``: the destination's last probe found multi-list exports say each
        row's list (``<state_dir>/contract.json``); ``multi_list_exports = "auto"`` follows it."""
        mode = destination.reconcile.multi_list_exports
        return cls(
            settings=destination.reconcile,
            concurrent_export_jobs=destination.limits.concurrent_export_jobs,
            list_ids={a.id: a.list_id for a in destination.audiences if a.list_id is not None},
            multi_list=mode == "yes" or (mode == "auto" and a5_holds),
            export_bytes_per_day=destination.limits.export_bytes_per_day,
        )


class Reconciler:
    """Reads one destination's lists back, in turns, within its export quotas."""

    def __init__(
        self,
        destination: Destination,
        client: ExportClient,
        plan: ReconcilePlan,
        *,
        store: ReadbackStore,
        clock: Clock,
        audience_ids: Callable[[], Iterable[str]],
        wake: Callable[[Iterable[str]], None],
        rng: random.Random | None = None,
        adoptions: AdoptionStore | None = None,
    ) -> None:
        self.plan = plan
        self._destination = destination
        self._client = client
        self._settings = plan.settings
        self._store = store
        self._clock = clock
        self._audience_ids = audience_ids
        self._wake = wake
        self._adoptions = Adoptions(adoptions, destination=destination.name, wake=wake)
        self._last_multi_at = -math.inf  # when the last multi-list export started
        self._free_slots = plan.concurrent_export_jobs
        self._wakeup = asyncio.Event()
        self._loaded: set[str] = set()
        self._next: dict[str, float] = {}
        self._rng = rng or random.Random()
        self._tasks: asyncio.TaskGroup | None = None
        self._volume_spent_in = -1  # the quota window export_volume_spent was logged in
        self._reads = ReadBacks(
            destination,
            client,
            plan.settings,
            store=store,
            clock=clock,
            rng=self._rng,
            adoptions=self._adoptions,
            volume=ExportVolume(plan.export_bytes_per_day),
            multi=plan.multi_list,
            wake=wake,
            changed=self._wakeup.set,
        )
        # Set by stop(); the supervisor's restart backoff ends on it too.
        self.stopping = asyncio.Event()
        self._task: asyncio.Task[object] | None = None

    @property
    def name(self) -> str:
        return self._destination.name

    @property
    def last_estimate(self) -> LossEstimate | None:
        """The loss estimate after the last read-back, for the destination's summary line."""
        return self._reads.last_estimate

    @property
    def adopted(self) -> dict[str, int]:
        """Members each audience's last adoption took as delivered (dbsync ctl adopt)."""
        return self._adoptions.adopted

    # --- what the supervisor and the admin socket call -------------------------------------

    def state(self, audience_id: str) -> tuple[ReconcileReport | None, float | None]:
        """The audience's last report and when its next read-back is due (None: not planned)."""
        return self._reads.last.get(audience_id), self._next.get(audience_id)

    async def reconcile_now(self, audience_id: str) -> ReconcileReport:
        """Read the audience's list back now, within the quota, and return the report.

        Raises:
            KeyError: the audience is not one of this destination's.
            ReconcileDeferred: not possible now (no list id yet, the destination is
                stopped, today's exports are spent, an export is running, or the
                read-back failed); ``retry_at`` says when to ask again.
        """
        if audience_id not in set(self._audience_ids()):
            raise KeyError(audience_id)
        now = self._clock.time()
        await self._load_reports([audience_id])
        [facts] = await self._store.reconcile_facts([audience_id])
        if facts.list_id is None:
            raise ReconcileDeferred(
                "no Demandbase list id yet: the first completed import job records it"
                " (or set list_id in the audience's configuration)",
                retry_at=now + self._recheck_seconds(),
            )
        if not self._destination.is_running:
            raise ReconcileDeferred(
                f"destination {self.name} is stopped ({self._destination.stopped_reason})",
                retry_at=now + STOPPED_PROBE_SECONDS,
            )
        room, window_ends_at = self._room()
        if room <= 0:
            raise ReconcileDeferred(
                f"today's export quota of destination {self.name} is spent",
                retry_at=window_ends_at,
            )
        if not self._take_slot():
            others = ", ".join(sorted(self._reads.running)) or "another audience"
            started = min(self._reads.running.values(), default=now)
            raise ReconcileDeferred(
                f"an export is running ({others}); Demandbase runs"
                f" {self.plan.concurrent_export_jobs} at a time",
                retry_at=max(now, started + self._reads.export_duration.seconds)
                + _MIN_WAIT_SECONDS,
            )
        try:
            [report] = await self._reads.read_back([facts])
            return report
        except ReadBackFailed as exc:
            retry_at = self._clock.time() + backoff_seconds(self._rng, 0)
            raise ReconcileDeferred(f"the read-back failed: {exc}", retry_at=retry_at) from exc
        finally:
            self._release_slot()

    async def loss_estimate(self, since: float = 0.0) -> LossEstimate:
        """Lost accounts per thousand sent, overall and while throttled (ledger by batch)."""
        return await self._reads.loss_estimate(since)

    # --- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to end, at once: an export it leaves running is resumed later."""
        self.stopping.set()
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        """Resume the exports a stop left running, then read lists back in turns, forever."""
        self._task = asyncio.current_task()
        if self.stopping.is_set():
            return
        ids = list(self._audience_ids())
        await self._load_reports(ids)
        await self._reads.load_volume()
        # Runs of one export job (several lists [A5]) are resumed together.
        jobs: dict[str, list[ReconcileRun]] = {}
        for run in await self._store.open_reconcile_runs(ids):
            jobs.setdefault(run.export_job_id, []).append(run)
        for runs in jobs.values():
            while not self._take_slot():
                await self._wait(None)
            try:
                for run in runs:
                    log.info(
                        "reconcile_resumed",
                        extra={
                            "audience": run.audience_id,
                            "destination": self.name,
                            "export_job_id": run.export_job_id,
                        },
                    )
                    self._reads.running[run.audience_id] = run.started_at
                # Its estimate was charged before the stop.
                charged = self._reads.estimated_bytes(run.audience_id for run in runs)
                await self._reads.finish_group(runs, charged=charged)
            except ReadBackFailed:
                pass
            finally:
                for run in runs:
                    self._reads.running.pop(run.audience_id, None)
                self._release_slot()
        # Multi-list read-backs run as tasks of this group: one is judged while the
        # next is exported. Cancelling the loop cancels them. A task's error is raised
        # as itself, not in a group: the supervisor stops the daemon on a StoreError.
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                while True:
                    await self._wait(await self._step())
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None

    async def _step(self) -> float | None:
        """Start the read-back whose turn it is, if any can start; else how long to wait."""
        ids = list(self._audience_ids())
        await self._load_reports(ids)
        facts = await self._store.reconcile_facts(ids)
        now = self._clock.time()
        room, window_ends_at = self._room()
        adopting = await self._adoptions.pending(f.audience_id for f in facts)
        adopt = await self._adoptions.turn(facts, adopting)
        if adopt is not None and room > 0 and self._destination.is_running:
            if not self._take_slot():
                return None  # woken when the slot is released
            try:
                await self._reads.read_back([adopt])
            except ReadBackFailed:
                await self._adoptions.failed(adopt.audience_id)
            finally:
                self._release_slot()
            return 0.0
        if not self._settings.scheduled:
            self._next = {}
            # On demand only; an adoption waiting for its first members is looked at again.
            return self._recheck_seconds() if adopting else None
        if self._reads.multi:
            return await self._step_many(facts, now, room, window_ends_at)
        self._next = predict_next(
            facts,
            self._settings,
            first_start=now,
            room_today=max(0, room),
            per_day=self._per_day(),
            window_ends_at=window_ends_at,
            day_seconds=self._destination.budget.limits.day_seconds,
            job_seconds=self._reads.export_duration.seconds,
        )
        order = turn_order(facts, self._settings, now)
        wait = await self._not_yet(order, facts, self._settings, now, room, window_ends_at)
        if wait is not None:
            return wait
        if not self._take_slot():
            return None  # woken when the slot is released
        try:
            await self._reads.read_back(order[:1])
        except ReadBackFailed:
            pass
        finally:
            self._release_slot()
        return 0.0

    async def _not_yet(
        self,
        order: Sequence[ReconcileFacts],
        facts: Sequence[ReconcileFacts],
        settings: ReconcileSettings,
        now: float,
        room: int,
        window_ends_at: float,
    ) -> float | None:
        """Seconds to wait before the next read-back (0: look again now), or None to go:
        nobody due yet (``order``, those due now, is empty), no export left today, or
        the destination stopped."""
        if not order:
            dues = [at for f in facts if (at := due_at(f, settings)) is not None and at > now]
            return min([self._recheck_seconds(), *(at - now for at in dues)])
        if room <= 0:
            # The budget rolls its window at the boundary; never spin while it does.
            return max(window_ends_at - now, _MIN_WAIT_SECONDS)
        if not self._destination.is_running:
            await self._destination.wait_running(self._clock)
            return 0.0
        return None

    async def _step_many(
        self, facts: Sequence[ReconcileFacts], now: float, room: int, window_ends_at: float
    ) -> float | None:
        """Multi-list exports: at most one job every ``gap`` (the day's exports spread
        evenly) reads the audiences due, up to a cap of rows (:func:`multi.row_cap`), so
        that each waits little past its due time and is read back within
        ``verify_within_hours`` (its interval is shortened to fit), within the jobs,
        status reads and export volume left. A job's lists are judged while the next
        job is exported; no further job starts while a downloaded file waits."""
        day_seconds = self._destination.budget.limits.day_seconds
        per_day = self._per_day()
        every = multi.gap(day_seconds, per_day)
        settings = multi.settings_within(self._settings, every)
        window = self._settings.verify_within_hours * 3_600.0
        listed = [f for f in facts if f.list_id is not None]
        rows = self._reads.row_estimates()
        max_rows = multi.row_cap(
            sum(rows(f.audience_id) for f in listed),
            min(_UNLIMITED, math.floor(per_day * window / day_seconds)),
        )
        self._next = predict_next(
            [f for f in facts if f.audience_id not in self._reads.running],
            settings,
            first_start=max(now, self._last_multi_at + every),
            room_today=max(0, room),
            per_day=per_day,
            window_ends_at=window_ends_at,
            day_seconds=day_seconds,
            job_seconds=max(every, self._reads.export_duration.seconds),
            rows=rows,
            max_rows=max_rows,
        )
        order = [
            f for f in turn_order(facts, settings, now) if f.audience_id not in self._reads.running
        ]
        wait = await self._not_yet(order, facts, settings, now, room, window_ends_at)
        if wait is not None:
            return wait
        if now < self._last_multi_at + every:
            return self._last_multi_at + every - now
        margin = self._destination.budget.limits.quota_safety_margin
        group, left = multi.choose_group(
            order,
            rows,
            bytes_per_row=self._reads.volume.bytes_per_row,
            bytes_left=self._reads.volume.left(self._destination.budget.snapshot().window, margin),
            max_rows=max_rows,
        )
        if left < 0:
            # Not even one list fits in today's volume: wait for tomorrow's.
            window_number = self._destination.budget.snapshot().window
            if self._volume_spent_in != window_number:
                self._volume_spent_in = window_number
                log.warning(
                    "export_volume_spent",
                    extra={
                        "destination": self.name,
                        "used_bytes": self._reads.volume.used,
                        "allowed_bytes": self.plan.export_bytes_per_day,
                        "waiting": len(order),
                        "retry_at": window_ends_at,
                    },
                )
            return max(window_ends_at - now, _MIN_WAIT_SECONDS)
        if self._reads.judging_waits or not self._take_slot():
            return None  # woken when the slot is released, or the waiting file is judged
        self._last_multi_at = now
        assert self._tasks is not None
        self._tasks.create_task(self._read_group(group))
        return 0.0

    async def _read_group(self, group: Sequence[ReconcileFacts]) -> None:
        """One multi-list read-back, holding the export slot until its file is read."""
        held = True

        def downloaded() -> None:
            nonlocal held
            if held:
                held = False
                self._release_slot()

        try:
            await self._reads.read_back(group, downloaded=downloaded)
        except ReadBackFailed:
            pass
        finally:
            downloaded()

    async def _wait(self, seconds: float | None) -> None:
        if seconds is not None and seconds <= 0:
            await asyncio.sleep(0)
            return
        if seconds is not None:
            seconds = max(seconds, _MIN_WAIT_SECONDS)
        await wait_event(self._wakeup, self._clock, seconds)
        self._wakeup.clear()

    def _recheck_seconds(self) -> float:
        lag = self._settings.visibility_lag_seconds or math.inf
        return max(_MIN_WAIT_SECONDS, min(_RECHECK_SECONDS, self._settings.interval_seconds, lag))

    def _take_slot(self) -> bool:
        if self._free_slots <= 0:
            return False
        self._free_slots -= 1
        return True

    def _release_slot(self) -> None:
        self._free_slots += 1
        self._wakeup.set()

    def _room(self) -> tuple[int, float]:
        """Exports today's quota still allows (0 when its status reads are spent too)."""
        snapshot = self._destination.budget.snapshot()
        room = _UNLIMITED
        for endpoint in (Endpoint.EXPORT_CREATE_JOB, Endpoint.EXPORT_JOB_STATUS):
            if (allowed := snapshot.allowed.get(endpoint)) is not None:
                room = min(room, allowed - snapshot.used.get(endpoint, 0))
        return room, snapshot.window_ends_at

    def _per_day(self) -> int:
        allowed = self._destination.budget.snapshot().allowed
        return allowed.get(Endpoint.EXPORT_CREATE_JOB, _UNLIMITED)

    async def _load_reports(self, audience_ids: Iterable[str]) -> None:
        missing = set(audience_ids) - self._loaded
        if not missing:
            return
        for audience_id, body in (await self._store.last_reconcile_reports(missing)).items():
            try:
                self._reads.last[audience_id] = decode_report(body)
            except msgspec.DecodeError:
                log.warning("reconcile_report_unreadable", extra={"audience": audience_id})
        self._loaded |= missing

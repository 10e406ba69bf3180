"""Read-back: what each Demandbase list really holds, compared with desired state, repaired.

A completed import job is the only acknowledgment Demandbase gives, and it carries no
per-row result: rows it throttled or could not match are silently missing from the
list. So one :class:`Reconciler` per destination reads each audience's list back
through the Data Export API (create an account-list export, poll it, download the
results file) and hands the members to :meth:`~dbsync.store.Store.apply_readback`,
which judges the audience's accounts by the rule of :mod:`dbsync.judgment`:

* only settled accounts (nothing pending, in flight or set aside) acknowledged longer
  than ``visibility_lag_seconds`` before the export started are judged: Demandbase
  applies loaded data late, so a recent change missing from the list is not a loss;
* a member missing, or an acknowledged removal still listed, is *lost* (by cause) and
  marked dirty again, so that its actor sends it again; after ``repair_limit`` repairs
  it is set aside instead, as ``unmatched`` (Demandbase has no account matching it) or
  ``not_removable``, with its identifiers, rather than sent forever;
* a listed account that dbsync never acknowledged there is *extra*: marked for removal.

Then the ledger's sums are checked (:class:`~dbsync.model.LedgerCheck`) and the report
is kept in the store, logged (``reconcile_completed``, ``loss_detected``,
``accounts_set_aside``, ``ledger_imbalance``) and shown by ``dbsync ctl``.

Scheduling, within Demandbase's export limits (60 jobs a day, one at a time):

* each export job and each status read is charged to the destination's
  :class:`~dbsync.budget.DestinationBudget` first, which persists the day's spending;
  a read-back starts only when today's quota still has room for its job and a status
  read, and at most ``concurrent_export_jobs`` run at once (a slot is held from the
  job's creation until its results are judged);
* an audience is due ``interval_seconds`` after its last read-back started, or, never
  read back, once its first acknowledged job is older than the visibility lag; among
  the due ones the one read back longest ago goes first, so with more audiences than
  exports a day they take turns and each is read back within
  :func:`days_to_reconcile_all` days;
* a read-back's export job is recorded as soon as Demandbase accepted it: a restart
  resumes polling it instead of paying for another.

Adopting a list (:mod:`dbsync.store.adoption`): an audience asked to adopt its list
(configured ``list_id``, nothing delivered yet; or ``dbsync ctl adopt``) goes before
every scheduled turn once it has desired members; its read-back first takes the
pending members the list holds as delivered (``list_adopted``), then judges as usual.
If the list cannot be read, the adoption is given up (``list_adoption_failed``) and the
audience sends its whole desired state rather than wait.

The reconciler never holds up delivery: it spends only the export quotas, stops
(cancelled) when the drain begins, and an export or permission error fails the
read-back, never the destination.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NoReturn, Protocol, TypeVar, runtime_checkable

import msgspec

from dbsync.clock import Clock, wait_event
from dbsync.config import Destination as DestinationConfig
from dbsync.config import ReconcileSettings
from dbsync.contract.watch import UnknownStateWatch
from dbsync.demandbase import wire
from dbsync.demandbase.wire import EXPORT_JOB_NAME_MAX_CHARS, Endpoint
from dbsync.destination import STOPPED_PROBE_SECONDS, Destination
from dbsync.errors import (
    DbsyncError,
    DemandbaseError,
    PayloadError,
    PermissionDeniedError,
    ThrottledError,
)
from dbsync.model import (
    Backlog,
    LedgerCheck,
    ListedAccount,
    LossTally,
    ReadbackVerdict,
    ReconcileFacts,
    ReconcileRun,
)
from dbsync.reconcile.losses import LossEstimate, estimate_losses
from dbsync.reconcile.report import (
    ReconcileReport,
    decode_report,
    encode_report,
    log_report,
    make_report,
)
from dbsync.reconcile.schedule import due_at, predict_next, turn_order
from dbsync.retry import (
    GIVE_UP_AFTER,
    LearnedDuration,
    OnRefused,
    RetryPolicy,
    backoff_seconds,
    call_with_retries,
    poll_until,
)
from dbsync.states import ExportJobState, export_job_state

__all__ = [
    "ExportClient",
    "ReadbackStore",
    "ReconcileDeferred",
    "ReconcilePlan",
    "Reconciler",
]

# Every module of the package logs as ``dbsync.reconcile``: the name is in each event.
log = logging.getLogger("dbsync.reconcile")
T = TypeVar("T")

# With nothing due, look again this often at most (a list id may have been learned).
_RECHECK_SECONDS = 60.0
_MIN_WAIT_SECONDS = 0.05
# A call gives up after GIVE_UP_AFTER failures: the read-back fails and waits for its
# next turn. A 401 or a 403 fails this read-back only: stopping the destination is its
# actors' business, and a missing export permission must not stop delivery.
_POLICY = RetryPolicy(give_up_after=GIVE_UP_AFTER, on_refused=OnRefused.RAISE)
_EXPORT_DONE = (ExportJobState.FINISHED, ExportJobState.FAILED)
_UNLIMITED = 1_000_000_000
# Lists one export job may name (``accountListIds``) [DOC].
MAX_LISTS_PER_EXPORT = 10_000
# Bytes a results row takes, until a download says: four columns of a few dozen bytes.
_BYTES_PER_ROW_GUESS = 100.0
# Rows of a list no read-back has counted yet, for the volume estimate.
_ROWS_GUESS = 10_000


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


@runtime_checkable
class ExportClient(Protocol):
    """The part of :class:`~dbsync.demandbase.client.DemandbaseClient` a reconciler uses."""

    async def create_account_list_export(
        self, job_name: str, account_list_id: int
    ) -> wire.ExportJobDetails: ...

    async def get_export_job(self, job_id: str) -> wire.ExportJobStatus: ...

    async def read_export_accounts(self, results_url: str) -> list[ListedAccount]: ...


@runtime_checkable
class MultiListExportClient(Protocol):
    """Exports of many lists in one job [A5]: a client without them reads one at a time."""

    async def create_account_lists_export(
        self, job_name: str, account_list_ids: list[int]
    ) -> wire.ExportJobDetails: ...

    async def read_export_accounts_by_list(
        self, results_url: str
    ) -> tuple[dict[int, list[ListedAccount]], int]: ...


class ReadbackStore(Protocol):
    """The part of :class:`~dbsync.store.Store` a reconciler uses."""

    async def reconcile_facts(self, audience_ids: Iterable[str]) -> list[ReconcileFacts]: ...

    async def last_reconcile_reports(self, audience_ids: Iterable[str]) -> dict[str, bytes]: ...

    async def open_reconcile_runs(self, audience_ids: Iterable[str]) -> list[ReconcileRun]: ...

    async def start_reconcile_run(
        self, audience_id: str, list_id: int, export_job_id: str, started_at: float
    ) -> ReconcileRun: ...

    async def apply_readback(
        self,
        run_id: int,
        listed: Sequence[ListedAccount],
        *,
        judged_before: float,
        repair_limit: int,
    ) -> ReadbackVerdict | None: ...

    async def ledger_check(self, audience_id: str, *, recount: bool = True) -> LedgerCheck: ...

    async def finish_reconcile_run(self, run_id: int, report: bytes) -> None: ...

    async def fail_reconcile_run(self, run_id: int, reason: str) -> None: ...

    async def loss_tallies(self, destination: str, since: float = 0.0) -> list[LossTally]: ...


class AdoptionStore(Protocol):
    """The part of :class:`~dbsync.store.Store` that adopting lists uses
    (:mod:`dbsync.store.adoption`); a reconciler without one adopts nothing."""

    async def backlog(self, audience_id: str) -> Backlog: ...

    async def adoptions_pending(self, audience_ids: Iterable[str]) -> list[str]: ...

    async def adopt_listed(
        self, audience_id: str, listed: Sequence[ListedAccount]
    ) -> int | None: ...

    async def abandon_adoption(self, audience_id: str) -> bool: ...


class _ReadBackFailed(Exception):
    """A read-back ended without a verdict (logged as ``reconcile_failed``)."""


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
        self._adoptions = adoptions
        # Many lists per export job while A5 holds; a results file without the list
        # column turns it off until the next start.
        self._multi = plan.multi_list and isinstance(client, MultiListExportClient)
        self._last_multi_at = -math.inf  # when the last multi-list export started
        self._volume = (-1, 0)  # (quota window, export bytes downloaded in it)
        self._bytes_per_row = _BYTES_PER_ROW_GUESS
        self._rng = rng or random.Random()
        self._free_slots = plan.concurrent_export_jobs
        self._wakeup = asyncio.Event()
        self._running: dict[str, float] = {}  # audience -> when its export started
        self._last: dict[str, ReconcileReport] = {}
        self._loaded: set[str] = set()
        self._next: dict[str, float] = {}
        self._export_duration = LearnedDuration(
            self._settings.export_poll_initial_seconds, self._settings.export_poll_max_seconds
        )
        # Members each audience's last adoption took as delivered (dbsync ctl adopt).
        self.adopted: dict[str, int] = {}
        # Refreshed after each read-back, for the destination's summary line.
        self.last_estimate: LossEstimate | None = None
        # Set by stop(); the supervisor's restart backoff ends on it too.
        self.stopping = asyncio.Event()
        self._task: asyncio.Task[object] | None = None

    @property
    def name(self) -> str:
        return self._destination.name

    # --- what the supervisor and the admin socket call -------------------------------------

    def state(self, audience_id: str) -> tuple[ReconcileReport | None, float | None]:
        """The audience's last report and when its next read-back is due (None: not planned)."""
        return self._last.get(audience_id), self._next.get(audience_id)

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
            others = ", ".join(sorted(self._running)) or "another audience"
            started = min(self._running.values(), default=now)
            raise ReconcileDeferred(
                f"an export is running ({others}); Demandbase runs"
                f" {self.plan.concurrent_export_jobs} at a time",
                retry_at=max(now, started + self._export_duration.seconds) + _MIN_WAIT_SECONDS,
            )
        try:
            return await self._read_back(audience_id, facts.list_id)
        except _ReadBackFailed as exc:
            retry_at = self._clock.time() + backoff_seconds(self._rng, 0)
            raise ReconcileDeferred(f"the read-back failed: {exc}", retry_at=retry_at) from exc
        finally:
            self._release_slot()

    async def loss_estimate(self, since: float = 0.0) -> LossEstimate:
        """Lost accounts per thousand sent, overall and while throttled (ledger by batch)."""
        return estimate_losses(self.name, since, await self._store.loss_tallies(self.name, since))

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
                    self._running[run.audience_id] = run.started_at
                await self._finish_group(runs)
            except _ReadBackFailed:
                pass
            finally:
                for run in runs:
                    self._running.pop(run.audience_id, None)
                self._release_slot()
        while True:
            await self._wait(await self._step())

    async def _step(self) -> float | None:
        """Start the read-back whose turn it is, if any can start; else how long to wait."""
        ids = list(self._audience_ids())
        await self._load_reports(ids)
        facts = await self._store.reconcile_facts(ids)
        now = self._clock.time()
        room, window_ends_at = self._room()
        adopting = (
            []
            if self._adoptions is None
            else await self._adoptions.adoptions_pending(f.audience_id for f in facts)
        )
        adopt = await self._adoption_turn(facts, adopting)
        if adopt is not None and room > 0 and self._destination.is_running:
            if not self._take_slot():
                return None  # woken when the slot is released
            try:
                await self._read_back(adopt.audience_id, adopt.list_id or 0)
            except _ReadBackFailed:
                await self._adoption_failed(adopt.audience_id)
            finally:
                self._release_slot()
            return 0.0
        if not self._settings.scheduled:
            self._next = {}
            # On demand only; an adoption waiting for its first members is looked at again.
            return self._recheck_seconds() if adopting else None
        self._next = predict_next(
            facts,
            self._settings,
            now=now,
            room_today=max(0, room),
            per_day=self._per_day(),
            window_ends_at=window_ends_at,
            day_seconds=self._destination.budget.limits.day_seconds,
            export_seconds=self._export_duration.seconds,
        )
        if self._multi:
            return await self._step_many(facts, now, room, window_ends_at)
        order = turn_order(facts, self._settings, now)
        if not order:
            dues = [at for f in facts if (at := due_at(f, self._settings)) is not None]
            return min([self._recheck_seconds(), *(at - now for at in dues)])
        if room <= 0:
            # The budget rolls its window at the boundary; never spin while it does.
            return max(window_ends_at - now, _MIN_WAIT_SECONDS)
        if not self._destination.is_running:
            await self._destination.wait_running(self._clock)
            return 0.0
        if not self._take_slot():
            return None  # woken when the slot is released
        turn = order[0]
        assert turn.list_id is not None
        try:
            await self._read_back(turn.audience_id, turn.list_id)
        except _ReadBackFailed:
            pass
        finally:
            self._release_slot()
        return 0.0

    async def _step_many(
        self, facts: Sequence[ReconcileFacts], now: float, room: int, window_ends_at: float
    ) -> float | None:
        """Multi-list exports: at most one job every ``gap`` (the day's exports spread
        evenly) reads every audience due, so each waits at most ``gap`` past its due time
        and is read back within ``verify_within_hours`` (its interval is shortened to
        fit), within the jobs, status reads and export volume left."""
        day_seconds = self._destination.budget.limits.day_seconds
        gap = day_seconds / max(1, self._per_day())
        window = self._settings.verify_within_hours * 3_600.0
        settings = msgspec.structs.replace(
            self._settings,
            interval_seconds=max(gap, min(self._settings.interval_seconds, window - 2 * gap)),
        )
        order = turn_order(facts, settings, now)
        if not order:
            dues = [at for f in facts if (at := due_at(f, settings)) is not None]
            return min([self._recheck_seconds(), *(at - now for at in dues)])
        if room <= 0:
            return max(window_ends_at - now, _MIN_WAIT_SECONDS)
        if not self._destination.is_running:
            await self._destination.wait_running(self._clock)
            return 0.0
        if now < self._last_multi_at + gap:
            return self._last_multi_at + gap - now
        left = self._volume_left()
        group: list[ReconcileFacts] = []
        for turn in order[:MAX_LISTS_PER_EXPORT]:
            cost = self._estimated_bytes(turn.audience_id)
            if group and cost > left:
                break
            group.append(turn)
            left -= cost
        if left < 0:
            # Not even one list fits in today's volume: wait for tomorrow's.
            return max(window_ends_at - now, _MIN_WAIT_SECONDS)
        if not self._take_slot():
            return None
        self._last_multi_at = now
        try:
            if len(group) == 1:
                assert group[0].list_id is not None
                await self._read_back(group[0].audience_id, group[0].list_id)
            else:
                await self._read_back_many(group)
        except _ReadBackFailed:
            pass
        finally:
            self._release_slot()
        return 0.0

    def _volume_left(self) -> int:
        """Export bytes today's volume still allows, by our count (less the safety margin)."""
        window = self._destination.budget.snapshot().window
        if self._volume[0] != window:
            self._volume = (window, 0)
        margin = self._destination.budget.limits.quota_safety_margin
        return int(self.plan.export_bytes_per_day * (1.0 - margin)) - self._volume[1]

    def _charge_volume(self, size: int) -> None:
        self._volume_left()  # rolls the window
        self._volume = (self._volume[0], self._volume[1] + size)

    def _estimated_bytes(self, audience_id: str) -> int:
        last = self._last.get(audience_id)
        rows = last.listed if last is not None else _ROWS_GUESS
        return int(max(1, rows) * self._bytes_per_row)

    async def _adoption_turn(
        self, facts: Sequence[ReconcileFacts], adopting: Sequence[str]
    ) -> ReconcileFacts | None:
        """The audience whose list to adopt first (``adopting``: asked, oldest first): with
        a list id and members desired already (compared with its desired state)."""
        by_id = {f.audience_id: f for f in facts}
        for audience_id in adopting:
            turn = by_id[audience_id]
            assert self._adoptions is not None
            if turn.list_id is not None and (await self._adoptions.backlog(audience_id)).pending:
                return turn
        return None

    async def _adoption_failed(self, audience_id: str) -> None:
        """The list could not be read: its audience sends everything rather than wait."""
        if self._adoptions is not None and await self._adoptions.abandon_adoption(audience_id):
            log.warning(
                "list_adoption_failed",
                extra={"audience": audience_id, "destination": self.name},
            )
            self._wake([audience_id])

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
                self._last[audience_id] = decode_report(body)
            except msgspec.DecodeError:
                log.warning("reconcile_report_unreadable", extra={"audience": audience_id})
        self._loaded |= missing

    # --- one read-back ---------------------------------------------------------------------

    async def _read_back(self, audience_id: str, list_id: int) -> ReconcileReport:
        started = self._clock.time()
        self._running[audience_id] = started
        try:
            job_name = f"dbsync {audience_id}"[:EXPORT_JOB_NAME_MAX_CHARS]
            try:
                job = await self._call(
                    Endpoint.EXPORT_CREATE_JOB,
                    lambda: self._client.create_account_list_export(job_name, list_id),
                )
            except DemandbaseError as exc:
                self._failed(audience_id, "", f"the export job was not created: {exc}", exc)
                raise _ReadBackFailed(str(exc)) from exc
            run = await self._store.start_reconcile_run(audience_id, list_id, job.job_id, started)
            log.info(
                "reconcile_started",
                extra={
                    "audience": audience_id,
                    "destination": self.name,
                    "list_id": list_id,
                    "export_job_id": job.job_id,
                },
            )
            return await self._finish(run)
        finally:
            self._running.pop(audience_id, None)
            self._wakeup.set()  # predictions change: the loop looks again

    async def _read_back_many(self, group: Sequence[ReconcileFacts]) -> list[ReconcileReport]:
        """One export job reading every list of ``group`` [A5]; a report per audience."""
        assert isinstance(self._client, MultiListExportClient)
        client = self._client
        started = self._clock.time()
        for turn in group:
            self._running[turn.audience_id] = started
        lists = {turn.audience_id: turn.list_id or 0 for turn in group}
        try:
            job_name = f"dbsync {len(group)} lists"[:EXPORT_JOB_NAME_MAX_CHARS]
            try:
                job = await self._call(
                    Endpoint.EXPORT_CREATE_JOB,
                    lambda: client.create_account_lists_export(job_name, list(lists.values())),
                )
            except DemandbaseError as exc:
                for audience_id in lists:
                    self._failed(audience_id, "", f"the export job was not created: {exc}", exc)
                raise _ReadBackFailed(str(exc)) from exc
            runs = []
            for audience_id, list_id in lists.items():
                runs.append(
                    await self._store.start_reconcile_run(audience_id, list_id, job.job_id, started)
                )
                log.info(
                    "reconcile_started",
                    extra={
                        "audience": audience_id,
                        "destination": self.name,
                        "list_id": list_id,
                        "export_job_id": job.job_id,
                        "lists_in_job": len(lists),
                    },
                )
            return await self._finish_group(runs)
        finally:
            for audience_id in lists:
                self._running.pop(audience_id, None)
            self._wakeup.set()

    async def _finish(self, run: ReconcileRun) -> ReconcileReport:
        [report] = await self._finish_group([run])
        return report

    async def _finish_group(self, runs: Sequence[ReconcileRun]) -> list[ReconcileReport]:
        """Poll the export sparingly until finished, download it, judge each list, report.

        ``runs`` share one export job: one list, or several [A5]."""
        lead = runs[0]
        unknown = UnknownStateWatch()

        def done(status: wire.ExportJobStatus) -> bool:
            # A state in another case is the same state; one nobody knows is polled
            # until the deadline, then the read-back fails (and waits for its next turn).
            state = export_job_state(status.job_status)
            if state in _EXPORT_DONE:
                return True
            return unknown.expired(status.job_status, state is not None, self._clock.time())

        try:
            # Status reads have a daily quota too (300 for 60 exports): each wait is longer.
            status = await poll_until(
                lambda: self._call(
                    Endpoint.EXPORT_JOB_STATUS,
                    lambda: self._client.get_export_job(lead.export_job_id),
                ),
                done,
                clock=self._clock,
                initial_seconds=self._export_duration.seconds,
                maximum_seconds=self._settings.export_poll_max_seconds,
            )
        except DemandbaseError as exc:
            await self._fail_all(runs, f"the export job could not be read: {exc}", exc)
        state = export_job_state(status.job_status)
        if state is None:
            log.warning(
                "export_state_unknown",
                extra={
                    "audience": lead.audience_id,
                    "export_job_id": lead.export_job_id,
                    "state": status.job_status,
                },
            )
            await self._fail_all(runs, f"the export stayed in unknown state {status.job_status!r}")
        if state is ExportJobState.FAILED:
            await self._fail_all(runs, f"Demandbase failed the export: {status.message or ''}")
        results_url = status.results_url or ""
        if not results_url:
            await self._fail_all(runs, "the finished export names no results file")
        self._export_duration.learn(self._clock.time() - lead.started_at)
        by_run = await self._download(runs, results_url)
        reports = []
        for run in runs:
            reports.append(await self._judge(run, by_run[run.run_id]))
        self.last_estimate = await self.loss_estimate()
        return reports

    async def _download(
        self, runs: Sequence[ReconcileRun], results_url: str
    ) -> dict[int, list[ListedAccount]]:
        """The members of each run's list, from the export's results file."""
        if len(runs) == 1:
            try:
                listed = await self._call(
                    Endpoint.EXPORT_DOWNLOAD,
                    lambda: self._client.read_export_accounts(results_url),
                )
            except DemandbaseError as exc:
                await self._fail_all(runs, f"the results file could not be read: {exc}", exc)
            self._charge_volume(int(len(listed) * self._bytes_per_row))
            return {runs[0].run_id: listed}
        assert isinstance(self._client, MultiListExportClient)
        client = self._client
        try:
            by_list, size = await self._call(
                Endpoint.EXPORT_DOWNLOAD, lambda: client.read_export_accounts_by_list(results_url)
            )
        except DemandbaseError as exc:
            if isinstance(exc, PayloadError) and self._multi:
                # A5 does not hold here: one list per export job from now on.
                self._multi = False
                log.warning(
                    "multi_list_export_unsupported",
                    extra={"destination": self.name, "reason": str(exc)},
                )
            await self._fail_all(runs, f"the results file could not be read: {exc}", exc)
        self._charge_volume(size)
        rows = sum(len(members) for members in by_list.values())
        if rows:
            self._bytes_per_row = size / rows
        return {run.run_id: by_list.get(run.list_id, []) for run in runs}

    async def _judge(self, run: ReconcileRun, listed: list[ListedAccount]) -> ReconcileReport:
        """Adopt (if asked), judge the audience against its list, check the ledger, report."""
        adopted = (
            None
            if self._adoptions is None
            else await self._adoptions.adopt_listed(run.audience_id, listed)
        )
        if adopted is not None:
            self.adopted[run.audience_id] = adopted
            log.info(
                "list_adopted",
                extra={
                    "audience": run.audience_id,
                    "destination": self.name,
                    "list_id": run.list_id,
                    "listed": len(listed),
                    "adopted": adopted,
                },
            )
        judged_before = run.started_at - self._settings.visibility_lag_seconds
        verdict = await self._store.apply_readback(
            run.run_id,
            listed,
            judged_before=judged_before,
            repair_limit=self._settings.repair_limit,
        )
        if verdict is None:
            await self._fail(run, "the read-back was judged already")
        # Repaired accounts are pending again: their actor sends them.
        self._wake([run.audience_id])
        check = await self._store.ledger_check(run.audience_id)
        report = make_report(
            verdict,
            check,
            audience_id=run.audience_id,
            destination=self.name,
            list_id=run.list_id,
            export_job_id=run.export_job_id,
            started_at=run.started_at,
            finished_at=self._clock.time(),
            judged_before=judged_before,
        )
        await self._store.finish_reconcile_run(run.run_id, encode_report(report))
        self._last[run.audience_id] = report
        log_report(report, check, repair_limit=self._settings.repair_limit)
        return report

    async def _fail_all(
        self, runs: Sequence[ReconcileRun], reason: str, error: Exception | None = None
    ) -> NoReturn:
        for run in runs:
            await self._store.fail_reconcile_run(run.run_id, reason)
            self._failed(run.audience_id, run.export_job_id, reason, error)
        raise _ReadBackFailed(reason)

    async def _fail(
        self, run: ReconcileRun, reason: str, error: Exception | None = None
    ) -> NoReturn:
        await self._store.fail_reconcile_run(run.run_id, reason)
        self._failed(run.audience_id, run.export_job_id, reason, error)
        raise _ReadBackFailed(reason)

    def _failed(
        self, audience_id: str, export_job_id: str, reason: str, error: Exception | None
    ) -> None:
        fields: dict[str, object] = {
            "audience": audience_id,
            "destination": self.name,
            "export_job_id": export_job_id,
            "reason": reason,
        }
        if isinstance(error, PermissionDeniedError):
            fields["missing_permission"] = error.permission
        log.warning("reconcile_failed", extra=fields)

    # --- one call, with the retry policy (dbsync.retry) and the reconciler's hooks -----

    async def _call(self, endpoint: Endpoint, request: Callable[[], Awaitable[T]]) -> T:
        """Spend budget and make the request, retrying 429s and transient failures."""
        return await call_with_retries(
            endpoint, request, policy=_POLICY, hooks=self, clock=self._clock, rng=self._rng
        )

    async def before_attempt(self, endpoint: Endpoint) -> None:
        while not self._destination.is_running:
            await self._destination.wait_running(self._clock)
        await self._destination.budget.spend(endpoint)

    async def refused(self, endpoint: Endpoint, error: DemandbaseError) -> None:
        raise AssertionError("a reconciler's policy raises 401/403 to its caller")

    async def throttled(self, endpoint: Endpoint, error: ThrottledError) -> None:
        await self._destination.budget.on_throttled(error.retry_after)

    async def retrying(
        self, endpoint: Endpoint, error: DemandbaseError, attempt: int, delay: float
    ) -> None:
        log.warning(
            "reconcile_retry",
            extra={
                "destination": self.name,
                "endpoint": endpoint,
                "status": error.status,
                "error_code": error.error_code,
                "attempt": attempt,
                "retry_in_seconds": round(delay, 3),
            },
        )

    async def succeeded(self, endpoint: Endpoint) -> None:
        pass

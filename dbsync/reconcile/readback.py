"""One read-back: an export job's life, from its creation to a report per list.

Create the account-list export (one list, or several [A5]: :mod:`~dbsync.reconcile.multi`),
record a run per list as soon as Demandbase accepted it (a restart resumes polling it
instead of paying for another), poll it sparingly (status reads have a daily quota
too), download the results file and hand each list's members to
:meth:`~dbsync.store.Store.apply_readback`, which judges the audience's accounts by the
rule of :mod:`dbsync.judgment`:

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
``accounts_set_aside``, ``ledger_imbalance``) and shown by ``dbsync ctl``. When and
whose list is read is the reconciler's business (:mod:`~dbsync.reconcile.reconciler`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import NoReturn, Protocol, TypeVar, runtime_checkable

from dbsync.clock import Clock
from dbsync.config import ReconcileSettings
from dbsync.contract.watch import UnknownStateWatch
from dbsync.demandbase import wire
from dbsync.demandbase.wire import EXPORT_JOB_NAME_MAX_CHARS, Endpoint
from dbsync.destination import Destination
from dbsync.errors import (
    DemandbaseError,
    PayloadError,
    PermissionDeniedError,
    ThrottledError,
)
from dbsync.model import (
    LedgerCheck,
    ListedAccount,
    LossTally,
    ReadbackVerdict,
    ReconcileFacts,
    ReconcileRun,
)
from dbsync.reconcile.adoption import Adoptions
from dbsync.reconcile.losses import LossEstimate, estimate_losses
from dbsync.reconcile.multi import ROWS_GUESS, ExportVolume, MultiListExportClient
from dbsync.reconcile.report import ReconcileReport, encode_report, log_report, make_report
from dbsync.retry import (
    GIVE_UP_AFTER,
    LearnedDuration,
    OnRefused,
    RetryPolicy,
    call_with_retries,
    poll_until,
)
from dbsync.states import ExportJobState, export_job_state

__all__ = ["ExportClient", "ReadBackFailed", "ReadBacks", "ReadbackStore", "job_seconds"]

log = logging.getLogger("dbsync.reconcile")
T = TypeVar("T")

# A call gives up after GIVE_UP_AFTER failures: the read-back fails and waits for its
# next turn. A 401 or a 403 fails this read-back only: stopping the destination is its
# actors' business, and a missing export permission must not stop delivery.
_POLICY = RetryPolicy(give_up_after=GIVE_UP_AFTER, on_refused=OnRefused.RAISE)
_EXPORT_DONE = (ExportJobState.FINISHED, ExportJobState.FAILED)
_LISTS_JUDGED_AT_ONCE = 2


@runtime_checkable
class ExportClient(Protocol):
    """The part of :class:`~dbsync.demandbase.client.DemandbaseClient` a reconciler uses."""

    async def create_account_list_export(
        self, job_name: str, account_list_id: int
    ) -> wire.ExportJobDetails: ...

    async def get_export_job(self, job_id: str) -> wire.ExportJobStatus: ...

    async def read_export_accounts(
        self, results_url: str, *, before_reading: Callable[[], Awaitable[None]] | None = None
    ) -> list[ListedAccount]: ...


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

    async def export_volume(self, destination: str, window: int) -> int: ...

    async def spend_export_volume(self, destination: str, window: int, size: int) -> None: ...


class _ReadBackFailed(Exception):
    """A read-back ended without a verdict (logged as ``reconcile_failed``)."""


def job_seconds(status: wire.ExportJobStatus) -> float | None:
    """How long a finished export ran by Demandbase's stamps (``created_at`` to
    ``updated_at``, ISO 8601); None when they are missing or unreadable."""
    try:
        created = dt.datetime.fromisoformat(status.created_at.replace("Z", "+00:00"))
        updated = dt.datetime.fromisoformat(status.updated_at.replace("Z", "+00:00"))
        seconds = (updated - created).total_seconds()
    except (ValueError, TypeError):  # empty, another format, or one naive and one not
        return None
    return seconds if seconds >= 0 else None


class ReadBackFailed(Exception):
    """A read-back ended without a verdict (logged as ``reconcile_failed``)."""


class ReadBacks:
    """The export jobs of one destination's reconciler, and what they learned."""

    def __init__(
        self,
        destination: Destination,
        client: ExportClient,
        settings: ReconcileSettings,
        *,
        store: ReadbackStore,
        clock: Clock,
        rng: random.Random,
        adoptions: Adoptions,
        volume: ExportVolume,
        multi: bool,
        wake: Callable[[Iterable[str]], None],
        changed: Callable[[], None],
    ) -> None:
        self._destination = destination
        self._client = client
        self._settings = settings
        self._store = store
        self._clock = clock
        self._rng = rng
        self._adoptions = adoptions
        self._wake = wake
        self._changed = changed
        # Many lists per export job while A5 holds; a results file without the list
        # column turns it off until the next start.
        self.multi = multi and isinstance(client, MultiListExportClient)
        self.volume = volume
        self.running: dict[str, float] = {}  # audience -> when its export started
        self.last: dict[str, ReconcileReport] = {}
        self.export_duration = LearnedDuration(
            settings.export_poll_initial_seconds, settings.export_poll_max_seconds
        )
        # Refreshed after each read-back, for the destination's summary line.
        self.last_estimate: LossEstimate | None = None
        # One job's lists are judged at a time; the next job may be exported meanwhile
        # (``downloaded``), and ``judging_waits`` counts files downloaded, not yet judged.
        self._judging = asyncio.Lock()
        self.judging_waits = 0

    @property
    def name(self) -> str:
        return self._destination.name

    async def loss_estimate(self, since: float = 0.0) -> LossEstimate:
        """Lost accounts per thousand sent, overall and while throttled (ledger by batch)."""
        return estimate_losses(self.name, since, await self._store.loss_tallies(self.name, since))

    def row_estimates(self) -> Callable[[str], int]:
        """Rows each audience's list is expected to hold: its last read-back's count; for
        a list never read, the mean of those read (:data:`ROWS_GUESS` before any)."""
        last = self.last
        counted = [report.listed for report in last.values()]
        unknown = round(sum(counted) / len(counted)) if counted else ROWS_GUESS

        def rows(audience_id: str) -> int:
            report = last.get(audience_id)
            return report.listed if report is not None else unknown

        return rows

    def estimated_bytes(self, audience_ids: Iterable[str]) -> int:
        rows = self.row_estimates()
        return sum(self.volume.estimate(rows(a)) for a in audience_ids)

    async def load_volume(self) -> None:
        """Today's export volume as the store kept it: a restart does not forget it."""
        window = self._destination.budget.snapshot().window
        self.volume.load(window, await self._store.export_volume(self.name, window))

    async def _spend_volume(self, size: int) -> None:
        """Charge ``size`` bytes of results (negative: correct an estimate), kept at once."""
        if size:
            window = self._destination.budget.snapshot().window
            self.volume.charge(window, size)
            await self._store.spend_export_volume(self.name, window, size)

    async def read_back(
        self, group: Sequence[ReconcileFacts], *, downloaded: Callable[[], None] | None = None
    ) -> list[ReconcileReport]:
        """One export job reading every list of ``group`` (several [A5], or one); a report
        per audience. ``downloaded`` is called once its results file has arrived: Demandbase
        may run the next export while this one's file is read and its lists judged."""
        started = self._clock.time()
        for turn in group:
            self.running[turn.audience_id] = started
        lists = {turn.audience_id: turn.list_id or 0 for turn in group}
        create: Callable[[], Awaitable[wire.ExportJobDetails]]
        if len(group) == 1:
            [(audience_id, list_id)] = lists.items()
            job_name = f"dbsync {audience_id}"[:EXPORT_JOB_NAME_MAX_CHARS]
            create = lambda: self._client.create_account_list_export(job_name, list_id)  # noqa: E731
        else:
            assert isinstance(self._client, MultiListExportClient)
            client = self._client
            job_name = f"dbsync {len(group)} lists"[:EXPORT_JOB_NAME_MAX_CHARS]
            create = lambda: client.create_account_lists_export(job_name, list(lists.values()))  # noqa: E731
        # The volume is charged (estimated) before the job, like the other quotas.
        charged = self.estimated_bytes(lists)
        try:
            await self._spend_volume(charged)
            try:
                job = await self._call(Endpoint.EXPORT_CREATE_JOB, create)
            except DemandbaseError as exc:
                await self._spend_volume(-charged)  # no job, no results
                for audience_id in lists:
                    self._failed(audience_id, "", f"the export job was not created: {exc}", exc)
                raise ReadBackFailed(str(exc)) from exc
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
                        **({"lists_in_job": len(lists)} if len(lists) > 1 else {}),
                    },
                )
            return await self.finish_group(runs, charged=charged, downloaded=downloaded)
        finally:
            for audience_id in lists:
                self.running.pop(audience_id, None)
            self._changed()  # predictions change: the loop looks again

    async def finish_group(
        self,
        runs: Sequence[ReconcileRun],
        *,
        charged: int,
        downloaded: Callable[[], None] | None = None,
    ) -> list[ReconcileReport]:
        """Poll the export sparingly until finished, download it, judge each list, report.

        ``runs`` share one export job: one list, or several [A5]. ``charged``: the
        volume charged for it before, corrected by the file's size once downloaded."""
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
                initial_seconds=self.export_duration.seconds,
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
        # Demandbase's own stamps say how long the job ran; ours would add the wait
        # before the poll that saw it finished, and the first poll would drift later.
        took = job_seconds(status)
        self.export_duration.learn(self._clock.time() - lead.started_at if took is None else took)
        judging = False

        async def before_reading() -> None:
            # The file is here: Demandbase may export the next job. Reading it waits
            # for the lists judged before it: a file read in a thread while another's
            # lists are judged slows that judging more than it gains (the GIL: each of
            # its statements waits for the reading thread's turn).
            nonlocal judging
            if downloaded is not None:
                downloaded()
            if judging:
                return
            self.judging_waits += 1
            try:
                await self._judging.acquire()
            finally:
                self.judging_waits -= 1
            judging = True
            self._changed()  # the next job may be exported now

        try:
            by_run = await self._download(runs, results_url, charged, before_reading)
            await before_reading()  # for a client that does not call it
            adopting = set(await self._adoptions.pending(run.audience_id for run in runs))
            # Two lists at a time: one's transaction on the store's writer while the
            # other's accounts are read and matched on its reader.
            # A list that fails does not stop the others; the first failure is raised
            # after them, and an error of the store as itself, not in a group.
            turns = asyncio.Semaphore(_LISTS_JUDGED_AT_ONCE)

            async def judge(run: ReconcileRun) -> ReconcileReport | ReadBackFailed:
                async with turns:
                    try:
                        return await self._judge(run, by_run.pop(run.run_id), adopting)
                    except ReadBackFailed as failed:
                        return failed

            try:
                async with asyncio.TaskGroup() as tasks:
                    judged = [tasks.create_task(judge(run)) for run in runs]
            except BaseExceptionGroup as group:
                raise group.exceptions[0] from None
            reports = []
            for task in judged:
                if isinstance(outcome := task.result(), ReadBackFailed):
                    raise outcome
                reports.append(outcome)
        finally:
            if judging:
                self._judging.release()
        self.last_estimate = await self.loss_estimate()
        return reports

    async def _download(
        self,
        runs: Sequence[ReconcileRun],
        results_url: str,
        charged: int,
        before_reading: Callable[[], Awaitable[None]],
    ) -> dict[int, list[ListedAccount]]:
        """The members of each run's list, from the export's results file; the volume
        ``charged`` before is corrected to the file's size (estimated for one list).
        ``before_reading`` is awaited once the file has arrived, before it is read."""
        if len(runs) == 1:
            try:
                listed = await self._call(
                    Endpoint.EXPORT_DOWNLOAD,
                    lambda: self._client.read_export_accounts(
                        results_url, before_reading=before_reading
                    ),
                )
            except DemandbaseError as exc:
                await self._fail_all(runs, f"the results file could not be read: {exc}", exc)
            await self._spend_volume(self.volume.estimate(len(listed)) - charged)
            return {runs[0].run_id: listed}
        assert isinstance(self._client, MultiListExportClient)
        client = self._client
        try:
            by_list, size = await self._call(
                Endpoint.EXPORT_DOWNLOAD,
                lambda: client.read_export_accounts_by_list(
                    results_url, before_reading=before_reading
                ),
            )
        except DemandbaseError as exc:
            if isinstance(exc, PayloadError) and self.multi:
                # A5 does not hold here: one list per export job from now on.
                self.multi = False
                log.warning(
                    "multi_list_export_unsupported",
                    extra={"destination": self.name, "reason": str(exc)},
                )
            await self._fail_all(runs, f"the results file could not be read: {exc}", exc)
        await self._spend_volume(size - charged)
        self.volume.learn(size, sum(len(members) for members in by_list.values()))
        return {run.run_id: by_list.get(run.list_id, []) for run in runs}

    async def _judge(
        self, run: ReconcileRun, listed: list[ListedAccount], adopting: set[str]
    ) -> ReconcileReport:
        """Adopt (if asked), judge the audience against its list, check the ledger, report."""
        if run.audience_id in adopting:
            await self._adoptions.adopt(run, listed)
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
        self.last[run.audience_id] = report
        log_report(report, check, repair_limit=self._settings.repair_limit)
        return report

    async def _fail_all(
        self, runs: Sequence[ReconcileRun], reason: str, error: Exception | None = None
    ) -> NoReturn:
        for run in runs:
            await self._store.fail_reconcile_run(run.run_id, reason)
            self._failed(run.audience_id, run.export_job_id, reason, error)
        raise ReadBackFailed(reason)

    async def _fail(
        self, run: ReconcileRun, reason: str, error: Exception | None = None
    ) -> NoReturn:
        await self._store.fail_reconcile_run(run.run_id, reason)
        self._failed(run.audience_id, run.export_job_id, reason, error)
        raise ReadBackFailed(reason)

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

"""The supervisor: actors' lifecycle, the destinations they share, and config reloads.

It owns one TaskGroup that holds everything long-running besides the servers: one
task per actor (``actor:<audience id>``), the store's folder (journal -> desired
state, waking the actors it touched), each destination budget's window keeper, each
destination's reconciler (``reconciler:<destination>``, reading lists back within the
export quotas; see :mod:`dbsync.reconcile`), and the summary logger. :meth:`drain`
cancels the reconcilers (an export they left running is resumed at the next start)
and stops every actor (each finishes its jobs in flight and starts no new one); when
the last actor has returned the helpers are cancelled and :meth:`run` returns.

Failure containment (ARCHITECTURE invariant 6): an actor that raises is logged,
marked ``failed`` and restarted after a capped backoff while the others go on, and so
is a reconciler (``reconciler_crashed``), whose trouble never holds up delivery; a
:class:`~dbsync.errors.StoreError` (shared infrastructure) is not contained and stops
the daemon, which exits non-zero so that systemd restarts it.

Reload applies a new configuration without a restart: new audiences get an actor,
removed ones are deactivated (their actor stops; the Demandbase list is never
deleted), changed ones are restarted, and a destination whose connection settings
changed gets a new client and budget. A renamed audience keeps feeding the list it
was first activated with: the public API cannot rename a list, so the operator is
told to rename it in Demandbase.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import msgspec

from dbsync.actor import ActorSettings, AudienceActor
from dbsync.budget import BudgetLimits, DestinationBudget
from dbsync.clock import Clock
from dbsync.config import Credentials
from dbsync.destination import Destination, ImportClient
from dbsync.errors import StoreError
from dbsync.model import AudienceState, Backlog, LedgerCheck
from dbsync.reconcile import (
    ExportClient,
    LossEstimate,
    ReconcileDeferred,
    ReconcilePlan,
    Reconciler,
    ReconcileReport,
    log_ledger_imbalance,
)
from dbsync.store import AudienceSpec, Store

__all__ = ["AudienceStatus", "DestinationPlan", "SummaryTotals", "Supervisor"]

log = logging.getLogger(__name__)

_RESTART_BACKOFF_SECONDS = (1.0, 5.0, 30.0, 120.0, 300.0)
# Audiences whose summary figures are read in one statement: a few milliseconds of the
# reader's thread each, so that other reads are not held up behind 10,000.
_SUMMARY_CHUNK = 500


class DestinationPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One destination as the supervisor runs it, derived from the configuration.

    The client factory builds the destination's client from ``base_url``,
    ``request_timeout_seconds`` and ``credentials``; ``connection`` is their
    fingerprint (never a secret): when it changes on reload, the client is rebuilt.
    ``reconcile`` is the destination's ``[destinations.reconcile]``, its export
    concurrency and the list ids the configuration gives
    (:meth:`ReconcilePlan.from_config <dbsync.reconcile.ReconcilePlan.from_config>`).
    """

    name: str
    base_url: str
    request_timeout_seconds: float
    credentials: Credentials
    limits: BudgetLimits
    audiences: tuple[ActorSettings, ...]
    reconcile: ReconcilePlan = ReconcilePlan()

    @property
    def connection(self) -> str:
        return "|".join(
            (self.base_url, str(self.request_timeout_seconds), self.credentials.fingerprint)
        )


class AudienceStatus(msgspec.Struct, frozen=True, kw_only=True):
    audience_id: str
    name: str
    destination: str
    list_name: str
    state: AudienceState
    paused: bool
    jobs_in_flight: int
    last_error: str


class SummaryTotals(msgspec.Struct, frozen=True, kw_only=True):
    """What one round of summary lines adds up to."""

    audiences: int
    pending: int  # accounts waiting to be sent, all audiences
    failed: int  # audiences whose actor reports failed
    stopped_destinations: list[str]


ClientFactory = Callable[[DestinationPlan], ImportClient]


class _Running(msgspec.Struct, kw_only=True):
    actor: AudienceActor
    task: asyncio.Task[None]


class Supervisor:
    def __init__(
        self,
        plans: Iterable[DestinationPlan],
        *,
        store: Store,
        clock: Clock,
        client_factory: ClientFactory,
        summary_interval_seconds: float = 60.0,
        stop_timeout_seconds: float = 20.0,
        on_summary: Callable[[SummaryTotals], None] | None = None,
    ) -> None:
        self._plans = {plan.name: plan for plan in plans}
        self._store = store
        self._clock = clock
        self._client_factory = client_factory
        self._summary_interval = summary_interval_seconds
        self._on_summary = on_summary
        self._stop_timeout = stop_timeout_seconds
        self._destinations: dict[str, Destination] = {}
        self._budget_tasks: dict[str, asyncio.Task[None]] = {}
        self._reconcilers: dict[str, tuple[Reconciler, asyncio.Task[None]]] = {}
        self._asked: set[asyncio.Task[None]] = set()  # read-backs asked by the operator
        self._actors: dict[str, _Running] = {}
        self._group: asyncio.TaskGroup | None = None
        self._draining = asyncio.Event()
        self._started = asyncio.Event()
        self._list_names: dict[str, str] = {}

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Run every actor until :meth:`drain`; then wait for them and return."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            helpers = [
                group.create_task(self._store.run_folder(self.wake), name="folder"),
                group.create_task(self._summaries(), name="summary"),
            ]
            await self._apply(self._plans.values(), first=True)
            self._started.set()
            await self._draining.wait()
            # Read-backs never hold up a drain: an export left running is resumed later.
            for _, task in self._reconcilers.values():
                task.cancel()
            for task in self._asked:
                task.cancel()
            for running in self._actors.values():
                running.actor.stop()
            await asyncio.gather(*(r.task for r in self._actors.values()), return_exceptions=True)
            for task in [*helpers, *self._budget_tasks.values()]:
                task.cancel()
        self._group = None

    async def started(self) -> None:
        """Wait until every actor of the initial configuration has been started."""
        await self._started.wait()

    def drain(self) -> None:
        """Stop starting work; actors finish their jobs in flight, then :meth:`run` returns."""
        self._draining.set()

    async def reload(self, plans: Iterable[DestinationPlan]) -> None:
        """Apply a new (already validated) configuration to the running actors."""
        await self._apply(list(plans), first=False)

    # --- control ---------------------------------------------------------------------

    def wake(self, audience_ids: Iterable[str]) -> None:
        for audience_id in audience_ids:
            running = self._actors.get(audience_id)
            if running is not None:
                running.actor.wake()

    def actor(self, audience_id: str) -> AudienceActor | None:
        running = self._actors.get(audience_id)
        return running.actor if running else None

    def destination(self, name: str) -> Destination | None:
        return self._destinations.get(name)

    def audience_ids(self) -> list[str]:
        return sorted(self._actors)

    async def reconcile_now(self, audience_id: str) -> ReconcileReport:
        """Read the audience's list back now, within the export quota; the report.

        Raises:
            KeyError: no active audience has this id.
            ReconcileDeferred: not possible now; ``retry_at`` (epoch seconds) says when
                it can be, ``reason`` why (no list id yet, quota spent, an export
                running, destination stopped, draining, the read-back failed).
        """
        running = self._actors.get(audience_id)
        if running is None:
            raise KeyError(audience_id)
        destination = running.actor.settings.destination
        entry = self._reconcilers.get(destination)
        if self._draining.is_set() or entry is None:
            reason = (
                "the daemon is draining"
                if self._draining.is_set()
                else f"destination {destination}'s client cannot export lists"
            )
            raise ReconcileDeferred(reason, retry_at=self._clock.time() + 60.0)
        # It runs in the supervisor's TaskGroup, so that the drain stops it like the
        # rest; its outcome, errors included, reaches the caller through a future
        # (an error escaping a task would bring the whole group down).
        outcome: asyncio.Future[ReconcileReport] = asyncio.get_running_loop().create_future()
        # Retrieved even when the caller went away, so that asyncio does not complain.
        outcome.add_done_callback(lambda done: done.cancelled() or done.exception())
        reconciler = entry[0]

        async def read_back() -> None:
            try:
                outcome.set_result(await reconciler.reconcile_now(audience_id))
            except asyncio.CancelledError:
                outcome.cancel()
                raise
            except StoreError as exc:
                outcome.set_exception(exc)
                raise  # shared infrastructure: stop the daemon
            except Exception as exc:
                outcome.set_exception(exc)

        assert self._group is not None
        task = self._group.create_task(read_back(), name=f"reconcile-now:{audience_id}")
        self._asked.add(task)
        task.add_done_callback(self._asked.discard)
        try:
            return await asyncio.shield(outcome)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if outcome.cancelled() and (current is None or not current.cancelling()):
                raise ReconcileDeferred(
                    "the daemon is draining", retry_at=self._clock.time() + 60.0
                ) from None
            task.cancel()  # the caller went away
            raise

    def reconcile_state(self, audience_id: str) -> tuple[ReconcileReport | None, float | None]:
        """The audience's last read-back report, and when the next is due (epoch seconds).

        None for the report before its first read-back; None for the time when none
        is planned (no list id or nothing acknowledged yet, ``scheduled = false``).
        """
        running = self._actors.get(audience_id)
        if running is None:
            return None, None
        entry = self._reconcilers.get(running.actor.settings.destination)
        return entry[0].state(audience_id) if entry is not None else (None, None)

    async def loss_estimate(self, destination: str, since: float = 0.0) -> LossEstimate | None:
        """Accounts lost per thousand sent by ``destination``, overall and while throttled."""
        entry = self._reconcilers.get(destination)
        return await entry[0].loss_estimate(since) if entry is not None else None

    def statuses(self) -> list[AudienceStatus]:
        return [
            AudienceStatus(
                audience_id=audience_id,
                name=r.actor.settings.name,
                destination=r.actor.settings.destination,
                list_name=r.actor.settings.list_name,
                state=r.actor.state,
                paused=r.actor.is_paused,
                jobs_in_flight=r.actor.jobs_in_flight,
                last_error=r.actor.last_error,
            )
            for audience_id, r in sorted(self._actors.items())
        ]

    # --- applying a configuration --------------------------------------------------------

    async def _apply(self, plans: Iterable[DestinationPlan], *, first: bool) -> None:
        plans = list(plans)
        result = await self._store.sync_audiences(
            [
                AudienceSpec(
                    audience_id=a.audience_id,
                    destination=plan.name,
                    name=a.name,
                    list_name=a.list_name,
                    list_id=plan.reconcile.list_ids.get(a.audience_id),
                )
                for plan in plans
                for a in plan.audiences
            ]
        )
        records = await self._store.audiences()
        for audience_id, old_name, new_name in result.renamed:
            log.warning(
                "audience_renamed",
                extra={
                    "audience": audience_id,
                    "old_name": old_name,
                    "new_name": new_name,
                    "list_name": records[audience_id].list_name,
                    "action_required": "rename the list in Demandbase; dbsync keeps feeding it",
                },
            )
        old_plans = {} if first else self._plans
        self._plans = {plan.name: plan for plan in plans}

        wanted: dict[str, ActorSettings] = {}
        for plan in plans:
            old = old_plans.get(plan.name)
            rebuilt = old is None or old.connection != plan.connection or old.limits != plan.limits
            if rebuilt:
                await self._build_destination(plan)
            else:
                # A reload is the operator saying "try again": a destination stopped by
                # a 401/403 may have been fixed on Demandbase's side.
                self._destinations[plan.name].restart()
            if rebuilt or old is None or old.reconcile != plan.reconcile:
                self._start_reconciler(plan)
            for settings in plan.audiences:
                # The list an audience feeds is fixed when it is first activated.
                settings = msgspec.structs.replace(
                    settings, list_name=records[settings.audience_id].list_name
                )
                wanted[settings.audience_id] = settings
                running = self._actors.get(settings.audience_id)
                if running is not None and (rebuilt or running.actor.settings != settings):
                    await self._stop_actor(settings.audience_id, reason="reconfigured")
        for audience_id in list(self._actors):
            if audience_id not in wanted:
                await self._stop_actor(audience_id, reason="deactivated")
                log.info(
                    "audience_deactivated",
                    extra={"audience": audience_id, "list_kept": True},
                )
        for name in list(self._destinations):
            if name not in self._plans:
                self._budget_tasks.pop(name).cancel()
                self._stop_reconciler(name)
                del self._destinations[name]
        for audience_id, settings in wanted.items():
            if audience_id not in self._actors:
                self._start_actor(settings, paused=records[audience_id].operator_paused)

    async def _build_destination(self, plan: DestinationPlan) -> None:
        budget = DestinationBudget(plan.name, plan.limits, self._store, self._clock)
        await budget.open()
        previous = self._budget_tasks.pop(plan.name, None)
        if previous is not None:
            previous.cancel()
        self._destinations[plan.name] = Destination(plan.name, self._client_factory(plan), budget)
        assert self._group is not None
        self._budget_tasks[plan.name] = self._group.create_task(
            budget.run(), name=f"budget:{plan.name}"
        )

    def _start_reconciler(self, plan: DestinationPlan) -> None:
        """(Re)start the destination's reconciler, if its client can export lists."""
        self._stop_reconciler(plan.name)
        destination = self._destinations[plan.name]
        client = destination.client
        if not isinstance(client, ExportClient):
            log.warning("reconcile_unavailable", extra={"destination": plan.name})
            return
        name = plan.name

        def audience_ids() -> list[str]:
            return [
                audience_id
                for audience_id, running in self._actors.items()
                if running.actor.settings.destination == name
            ]

        reconciler = Reconciler(
            destination,
            client,
            plan.reconcile,
            store=self._store,
            clock=self._clock,
            audience_ids=audience_ids,
            wake=self.wake,
        )
        assert self._group is not None
        task = self._group.create_task(
            self._keep_reconciling(reconciler), name=f"reconciler:{name}"
        )
        self._reconcilers[name] = (reconciler, task)

    def _stop_reconciler(self, name: str) -> None:
        entry = self._reconcilers.pop(name, None)
        if entry is not None:
            entry[1].cancel()

    async def _keep_reconciling(self, reconciler: Reconciler) -> None:
        """Run one reconciler; restart it after a crash, with a capped backoff."""
        await self._restarting(
            reconciler.run, "reconciler_crashed", {"destination": reconciler.name}
        )

    def _start_actor(self, settings: ActorSettings, *, paused: bool) -> None:
        """Start an audience's actor; ``paused``: an operator paused it (``ctl pause``)."""
        assert self._group is not None
        actor = AudienceActor(
            settings,
            destination=self._destinations[settings.destination],
            store=self._store,
            clock=self._clock,
        )
        if paused:
            actor.pause()
        task = self._group.create_task(
            self._keep_running(actor), name=f"actor:{settings.audience_id}"
        )
        self._actors[settings.audience_id] = _Running(actor=actor, task=task)
        log.info(
            "actor_started",
            extra={"audience": settings.audience_id, "list_name": settings.list_name},
        )

    async def _stop_actor(self, audience_id: str, *, reason: str) -> None:
        """Stop one actor for a reload, waiting at most ``stop_timeout_seconds``.

        It finishes the jobs Demandbase is processing if they complete in time; past
        that it is cancelled, which leaves their batches open for its successor.
        """
        running = self._actors.pop(audience_id)
        running.actor.stop()
        timer = asyncio.ensure_future(self._clock.sleep(self._stop_timeout))
        await asyncio.wait({running.task, timer}, return_when=asyncio.FIRST_COMPLETED)
        timer.cancel()
        if not running.task.done():
            log.warning(
                "actor_stop_cut_short",
                extra={"audience": audience_id, "after_seconds": self._stop_timeout},
            )
            running.task.cancel()
        await asyncio.gather(running.task, timer, return_exceptions=True)
        if reason == "deactivated":
            await self._store.set_audience_state(audience_id, AudienceState.DEACTIVATED)

    async def _keep_running(self, actor: AudienceActor) -> None:
        """Run one actor; restart it after a crash, with a capped backoff."""

        async def failed(exc: Exception) -> None:
            actor.state = AudienceState.FAILED
            actor.last_error = repr(exc)
            await self._store.set_audience_state(
                actor.settings.audience_id, AudienceState.FAILED, repr(exc)
            )

        await self._restarting(
            actor.run, "actor_crashed", {"audience": actor.settings.audience_id}, failed
        )

    async def _restarting(
        self,
        run: Callable[[], Awaitable[None]],
        event: str,
        fields: dict[str, object],
        on_crash: Callable[[Exception], Awaitable[None]] | None = None,
    ) -> None:
        """``run`` until it returns; after a crash, log ``event`` and run it again after a
        capped backoff, unless the daemon is draining by then. A StoreError is not a
        crash of ``run`` but of the shared store: it stops the daemon."""
        crashes = 0
        while True:
            try:
                await run()
                return
            except StoreError:
                raise
            except Exception as exc:
                delay = _RESTART_BACKOFF_SECONDS[min(crashes, len(_RESTART_BACKOFF_SECONDS) - 1)]
                crashes += 1
                log.exception(
                    event,
                    extra={
                        **fields,
                        "crashes": crashes,
                        "restart_in_seconds": delay,
                        "error": repr(exc),
                    },
                )
                if on_crash is not None:
                    await on_crash(exc)
                await self._clock.sleep(delay)
                if self._draining.is_set():
                    return

    # --- summaries -----------------------------------------------------------------------

    async def _summaries(self) -> None:
        while True:
            await self._clock.sleep(self._summary_interval)
            totals = await self.log_summaries()
            if self._on_summary is not None:
                self._on_summary(totals)

    async def log_summaries(self) -> SummaryTotals:
        """One ``audience_summary`` line per audience, one ``destination_summary`` each;
        returns their totals (what systemd's ``STATUS=`` shows)."""
        statuses = self.statuses()
        pending = 0
        figures: dict[str, tuple[Backlog, LedgerCheck]] = {}
        for start in range(0, len(statuses), _SUMMARY_CHUNK):
            chunk = statuses[start : start + _SUMMARY_CHUNK]
            # Without the pending recount: that one is a reconciliation's price.
            figures.update(await self._store.summaries([s.audience_id for s in chunk]))
        for status in statuses:
            backlog, check = figures[status.audience_id]
            pending += backlog.pending
            if not check.balanced:
                # Rows that no verdict, acknowledgment or failure accounts for: something
                # lost track of them. Never silence.
                log_ledger_imbalance(status.audience_id, check, checked_by="summary")
            report, next_due = self.reconcile_state(status.audience_id)
            log.info(
                "audience_summary",
                extra={
                    "audience": status.audience_id,
                    "destination": status.destination,
                    "state": status.state,
                    "pending_inserts": backlog.inserts,
                    "pending_deletes": backlog.deletes,
                    "oldest_pending_age_seconds": (
                        round(self._clock.time() - backlog.oldest_changed_at, 3)
                        if backlog.oldest_changed_at is not None
                        else None
                    ),
                    "in_flight": backlog.in_flight,
                    "rejected": backlog.rejected,
                    "jobs_in_flight": status.jobs_in_flight,
                    "ledger": msgspec.structs.asdict(check.counts),
                    "ledger_balanced": check.balanced,
                    "last_reconciled_at": report.finished_at if report is not None else None,
                    "next_reconcile_at": next_due,
                },
            )
        for name, destination in sorted(self._destinations.items()):
            log.info(
                "destination_summary",
                extra={
                    "destination": name,
                    "running": destination.is_running,
                    "stopped_reason": destination.stopped_reason,
                    "budget": msgspec.structs.asdict(destination.budget.snapshot()),
                    "loss_estimate": (
                        msgspec.to_builtins(entry[0].last_estimate)
                        if (entry := self._reconcilers.get(name)) is not None
                        else None
                    ),
                },
            )
        return SummaryTotals(
            audiences=len(statuses),
            pending=pending,
            failed=sum(s.state is AudienceState.FAILED for s in statuses),
            stopped_destinations=sorted(
                name for name, d in self._destinations.items() if not d.is_running
            ),
        )

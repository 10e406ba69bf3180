"""The supervisor: actors' lifecycle, the destinations they share, and config reloads.

It owns one TaskGroup that holds everything long-running besides the servers and the
store's services (group commit, folder: the daemon runs those): one
task per actor (``actor:<audience id>``), each destination budget's window keeper, each
destination's reconciler (``reconciler:<destination>``, reading lists back within the
export quotas; see :mod:`dbsync.reconcile`), and the summary lines
(:mod:`dbsync.summaries`).

One lifecycle vocabulary for every service: ``run()`` is the long-lived coroutine,
awaited in a TaskGroup; ``stop()`` asks it to end and returns at once; a service that
must be ready before others rely on it has an ``async start()`` too (a budget loads
its spending, a server binds). :meth:`stop` stops the reconcilers (an export they left
running is resumed at the next start) and every actor (each finishes its jobs in
flight and starts no new one); when the last actor has returned the helpers are
stopped and :meth:`run` returns. :attr:`ready` is set once every actor of the first
configuration runs.

Failure containment (ARCHITECTURE invariant 6): an actor that raises is logged
(``actor_crashed``), marked ``failed`` and restarted after a backoff while the others
go on, and so is a reconciler (``reconciler_crashed``), whose trouble never holds up
delivery. A :class:`RestartPolicy` (the ``restart_*`` keys of ``[daemon]``) bounds
the restarts: the backoff doubles with each crash, a quiet ``window_seconds`` forgets
the crashes before it, and the ``max_crashes``-th crash within the window gives up:
the audience stays ``failed`` (``actor_failed``, with the reason ``dbsync ctl status``
shows) until ``dbsync ctl resume`` restarts it; a reconciler stays down
(``reconciler_failed``) until a reload. A graceful stop never waits out a backoff. A
:class:`~dbsync.errors.StoreError` (shared infrastructure) is not contained and stops
the daemon, which exits non-zero so that systemd restarts it; except while the store
cannot write (a full disk): then it is a crash, and the restart waits until the
store takes writes again (:mod:`dbsync.restarts`).

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
from collections.abc import Callable, Iterable

import msgspec

from dbsync.actor import ActorSettings, AudienceActor
from dbsync.budget import BudgetLimits, DestinationBudget
from dbsync.clock import Clock
from dbsync.config import Credentials
from dbsync.destination import Destination, ImportClient
from dbsync.errors import StoreError
from dbsync.model import AudienceState
from dbsync.reconcile import (
    ExportClient,
    LossEstimate,
    ReconcileDeferred,
    ReconcilePlan,
    Reconciler,
    ReconcileReport,
)
from dbsync.restarts import RestartBudgetSpent, RestartPolicy, describe, run_with_restarts
from dbsync.store import AudienceSpec, Store
from dbsync.summaries import AudienceStatus, EtaWatch, SummaryTotals, log_summaries

__all__ = ["AudienceStatus", "DestinationPlan", "SummaryTotals", "Supervisor"]

log = logging.getLogger(__name__)


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
    # When an audience's forecast is later than this, ``backlog_eta_exceeded``.
    backlog_eta_warn_hours: float = 24.0

    @property
    def connection(self) -> str:
        return "|".join(
            (self.base_url, str(self.request_timeout_seconds), self.credentials.fingerprint)
        )


ClientFactory = Callable[[DestinationPlan], ImportClient]


class _Running(msgspec.Struct, kw_only=True):
    actor: AudienceActor
    task: asyncio.Task[None]
    # Set when this actor is asked to stop (a reload, a deactivation, the daemon's stop),
    # so that a restart backoff under way ends at once rather than being waited out.
    stopping: asyncio.Event
    gave_up: bool = False


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
        restarts: RestartPolicy | None = None,
        on_summary: Callable[[SummaryTotals], None] | None = None,
    ) -> None:
        self._plans = {plan.name: plan for plan in plans}
        self._store = store
        self._clock = clock
        self._client_factory = client_factory
        self._summary_interval = summary_interval_seconds
        self._on_summary = on_summary
        self._stop_timeout = stop_timeout_seconds
        self._restarts = restarts or RestartPolicy()
        self._destinations: dict[str, Destination] = {}
        self._reconcilers: dict[str, tuple[Reconciler, asyncio.Task[None]]] = {}
        self._asked: set[asyncio.Task[None]] = set()  # read-backs asked by the operator
        self._actors: dict[str, _Running] = {}
        self._eta_watch = EtaWatch()
        self._group: asyncio.TaskGroup | None = None
        self._stopping = asyncio.Event()
        # Set once every actor of the first configuration has been started.
        self.ready = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------

    async def run(self) -> None:
        """Run every actor until :meth:`stop`; then wait for them and return."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            helpers = [group.create_task(self._summaries(), name="summary")]
            await self._apply(self._plans.values(), first=True)
            self.ready.set()
            await self._stopping.wait()
            # Read-backs never hold up a stop: an export left running is resumed later.
            for reconciler, _ in self._reconcilers.values():
                reconciler.stop()
            for task in self._asked:
                task.cancel()
            for running in self._actors.values():
                running.stopping.set()
                running.actor.stop()
            await asyncio.gather(*(r.task for r in self._actors.values()), return_exceptions=True)
            for task in helpers:
                task.cancel()
            for destination in self._destinations.values():
                destination.budget.stop()
        self._group = None

    def stop(self) -> None:
        """Start no new work; actors finish their jobs in flight, then :meth:`run` returns."""
        self._stopping.set()

    async def reload(self, plans: Iterable[DestinationPlan]) -> None:
        """Apply a new (already validated) configuration to the running actors."""
        await self._apply(list(plans), first=False)

    # --- control ---------------------------------------------------------------------

    def wake(self, audience_ids: Iterable[str]) -> None:
        for audience_id in audience_ids:
            running = self._actors.get(audience_id)
            if running is not None:
                running.actor.wake()

    async def resume(self, audience_id: str) -> None:
        """Restart an actor that crashed past its restart budget (``ctl resume``).

        Raises:
            KeyError: no active audience has this id.
        """
        running = self._actors[audience_id]
        if running.gave_up and not self._stopping.is_set():
            log.info("actor_resumed", extra={"audience": audience_id})
            self._start_actor(running.actor.settings, paused=running.actor.is_paused)

    def actor(self, audience_id: str) -> AudienceActor | None:
        running = self._actors.get(audience_id)
        return running.actor if running else None

    def destination(self, name: str) -> Destination | None:
        return self._destinations.get(name)

    def plan_of(self, destination: str) -> DestinationPlan | None:
        """The destination's plan in force (the configuration's, since the last reload)."""
        return self._plans.get(destination)

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
        if self._stopping.is_set() or entry is None:
            reason = (
                "the daemon is draining"
                if self._stopping.is_set()
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
                if self._store.writable:
                    raise  # shared infrastructure: stop the daemon
                # A full disk: the caller hears of it; the daemon waits it out.
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

    async def adopt_now(self, audience_id: str) -> tuple[ReconcileReport, int]:
        """Adopt the audience's list now: read it back and take the pending members it
        holds as delivered (:mod:`dbsync.store.adoption`); the report and how many.

        Raises what :meth:`reconcile_now` raises; a deferred adoption stays asked for,
        and the reconciler does it as soon as it can (its actor sends nothing new).
        """
        if audience_id not in self._actors:
            raise KeyError(audience_id)
        entry = self._reconcilers.get(self._actors[audience_id].actor.settings.destination)
        if entry is not None:
            entry[0].adopted.pop(audience_id, None)
        await self._store.request_adoption(audience_id)
        report = await self.reconcile_now(audience_id)
        return report, 0 if entry is None else entry[0].adopted.get(audience_id, 0)

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
                rows_per_job=r.actor.settings.max_records,
                max_jobs_in_flight=r.actor.settings.max_jobs_in_flight,
                requests_per_minute=r.actor.settings.requests_per_minute,
                max_age_seconds=r.actor.settings.max_age_seconds,
                job_seconds=r.actor.job_seconds,
                held=r.actor.is_held,
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
        # A configured list that this store never fed (a first start, a migration from
        # AEP's own destination, a lost state directory) is adopted before its first send.
        for audience_id in await self._store.request_first_adoptions(
            a.audience_id
            for plan in plans
            for a in plan.audiences
            if a.audience_id in plan.reconcile.list_ids
        ):
            log.info("list_adoption_requested", extra={"audience": audience_id})
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
                self._destinations[name].budget.stop()
                self._stop_reconciler(name)
                del self._destinations[name]
        for audience_id, settings in wanted.items():
            if audience_id not in self._actors:
                self._start_actor(settings, paused=records[audience_id].operator_paused)

    async def _build_destination(self, plan: DestinationPlan) -> None:
        budget = DestinationBudget(plan.name, plan.limits, self._store, self._clock)
        await budget.start()
        if (previous := self._destinations.get(plan.name)) is not None:
            previous.budget.stop()
        self._destinations[plan.name] = Destination(plan.name, self._client_factory(plan), budget)
        assert self._group is not None
        self._group.create_task(budget.run(), name=f"budget:{plan.name}")

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
            adoptions=self._store,
        )
        assert self._group is not None
        task = self._group.create_task(
            self._keep_reconciling(reconciler), name=f"reconciler:{name}"
        )
        self._reconcilers[name] = (reconciler, task)

    def _stop_reconciler(self, name: str) -> None:
        entry = self._reconcilers.pop(name, None)
        if entry is not None:
            entry[0].stop()

    async def _keep_reconciling(self, reconciler: Reconciler) -> None:
        """Run one reconciler; restart it after a crash, within the restart budget."""
        fields: dict[str, object] = {"destination": reconciler.name}
        try:
            await run_with_restarts(
                reconciler.run,
                policy=self._restarts,
                clock=self._clock,
                stopping=reconciler.stopping,
                unless=self._stopping,
                event="reconciler_crashed",
                fields=fields,
                store=self._store,
            )
        except RestartBudgetSpent as exc:
            # Delivery goes on without read-backs; a reload starts a new reconciler.
            log.error("reconciler_failed", extra={**fields, "reason": exc.reason})

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
        stopping = asyncio.Event()
        task = self._group.create_task(
            self._keep_running(actor, stopping), name=f"actor:{settings.audience_id}"
        )
        self._actors[settings.audience_id] = _Running(actor=actor, task=task, stopping=stopping)
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
        running.stopping.set()
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

    async def _record_failure(self, actor: AudienceActor, reason: str) -> None:
        """Report ``actor`` failed; with the store unwritable, in memory only.

        ``ctl status`` shows the reason from memory; the store gets the next state the
        actor reaches once it takes writes again. Failing here would end the daemon.
        """
        try:
            await actor.record_failure(reason)
        except StoreError:
            if self._store.writable:
                raise

    async def _keep_running(self, actor: AudienceActor, stopping: asyncio.Event) -> None:
        """Run one actor; restart it after a crash, within the restart budget."""
        audience_id = actor.settings.audience_id
        fields: dict[str, object] = {"audience": audience_id}

        async def crashed(exc: Exception) -> None:
            await self._record_failure(actor, describe(exc))

        try:
            await run_with_restarts(
                actor.run,
                policy=self._restarts,
                clock=self._clock,
                stopping=stopping,
                unless=self._stopping,
                event="actor_crashed",
                fields=fields,
                on_crash=crashed,
                store=self._store,
            )
        except RestartBudgetSpent as exc:
            # The others go on; this audience waits for the operator (ctl resume).
            if (running := self._actors.get(audience_id)) is not None and running.actor is actor:
                running.gave_up = True
            await self._record_failure(actor, exc.reason)
            log.error("actor_failed", extra={**fields, "reason": exc.reason})

    # --- summaries -----------------------------------------------------------------------

    async def _summaries(self) -> None:
        while True:
            await self._clock.sleep(self._summary_interval)
            totals = await self.log_summaries()
            if self._on_summary is not None:
                self._on_summary(totals)

    async def log_summaries(self) -> SummaryTotals:
        """The summary lines of every audience and destination (:mod:`dbsync.summaries`)."""

        def loss_estimate(destination: str) -> LossEstimate | None:
            entry = self._reconcilers.get(destination)
            return entry[0].last_estimate if entry is not None else None

        return await log_summaries(
            self.statuses(),
            self._destinations,
            store=self._store,
            clock=self._clock,
            reconcile_state=self.reconcile_state,
            loss_estimate=loss_estimate,
            eta_watch=self._eta_watch,
            warn_hours={name: p.backlog_eta_warn_hours for name, p in self._plans.items()},
        )

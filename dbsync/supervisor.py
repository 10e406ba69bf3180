"""The supervisor: actors' lifecycle, the destinations they share, and config reloads.

It owns one TaskGroup that holds everything long-running besides the servers: one
task per actor (``actor:<audience id>``), the store's folder (journal -> desired
state, waking the actors it touched), each destination budget's window keeper, and
the summary logger. :meth:`drain` stops every actor (each finishes its jobs in
flight and starts no new one); when the last actor has returned the helpers are
cancelled and :meth:`run` returns.

Failure containment (ARCHITECTURE invariant 6): an actor that raises is logged,
marked ``failed`` and restarted after a capped backoff while the others go on; a
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
from collections.abc import Callable, Iterable

import msgspec

from dbsync.actor import ActorSettings, AudienceActor, Destination, ImportClient
from dbsync.budget import BudgetLimits, DestinationBudget
from dbsync.clock import Clock
from dbsync.config import Credentials
from dbsync.errors import StoreError
from dbsync.model import AudienceState
from dbsync.store import AudienceSpec, Store

__all__ = ["AudienceStatus", "DestinationPlan", "Supervisor"]

log = logging.getLogger(__name__)

_RESTART_BACKOFF_SECONDS = (1.0, 5.0, 30.0, 120.0, 300.0)


class DestinationPlan(msgspec.Struct, frozen=True, kw_only=True):
    """One destination as the supervisor runs it, derived from the configuration.

    The client factory builds the destination's client from ``base_url``,
    ``request_timeout_seconds`` and ``credentials``; ``connection`` is their
    fingerprint (never a secret): when it changes on reload, the client is rebuilt.
    """

    name: str
    base_url: str
    request_timeout_seconds: float
    credentials: Credentials
    limits: BudgetLimits
    audiences: tuple[ActorSettings, ...]

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
    ) -> None:
        self._plans = {plan.name: plan for plan in plans}
        self._store = store
        self._clock = clock
        self._client_factory = client_factory
        self._summary_interval = summary_interval_seconds
        self._stop_timeout = stop_timeout_seconds
        self._destinations: dict[str, Destination] = {}
        self._budget_tasks: dict[str, asyncio.Task[None]] = {}
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
                    list_id=None,
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
                del self._destinations[name]
        for audience_id, settings in wanted.items():
            if audience_id not in self._actors:
                self._start_actor(settings)

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

    def _start_actor(self, settings: ActorSettings) -> None:
        assert self._group is not None
        actor = AudienceActor(
            settings,
            destination=self._destinations[settings.destination],
            store=self._store,
            clock=self._clock,
        )
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
        crashes = 0
        while True:
            try:
                await actor.run()
                return
            except StoreError:
                raise  # shared infrastructure: stop the daemon
            except Exception as exc:
                delay = _RESTART_BACKOFF_SECONDS[min(crashes, len(_RESTART_BACKOFF_SECONDS) - 1)]
                crashes += 1
                log.exception(
                    "actor_crashed",
                    extra={
                        "audience": actor.settings.audience_id,
                        "crashes": crashes,
                        "restart_in_seconds": delay,
                        "error": repr(exc),
                    },
                )
                actor.state = AudienceState.FAILED
                actor.last_error = repr(exc)
                await self._store.set_audience_state(
                    actor.settings.audience_id, AudienceState.FAILED, repr(exc)
                )
                await self._clock.sleep(delay)
                if self._draining.is_set():
                    return

    # --- summaries -----------------------------------------------------------------------

    async def _summaries(self) -> None:
        while True:
            await self._clock.sleep(self._summary_interval)
            await self.log_summaries()

    async def log_summaries(self) -> None:
        """One ``audience_summary`` line per audience, one ``destination_summary`` each."""
        for status in self.statuses():
            backlog = await self._store.backlog(status.audience_id)
            ledger = await self._store.ledger(status.audience_id)
            imbalance = await self._store.ledger_imbalance(status.audience_id)
            if imbalance:
                # Rows uploaded that are neither acknowledged, failed nor still
                # processing: something lost track of them. Never silence.
                log.error(
                    "ledger_imbalance",
                    extra={"audience": status.audience_id, "unaccounted_rows": imbalance},
                )
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
                    "ledger": msgspec.structs.asdict(ledger),
                    "ledger_balanced": imbalance == 0,
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
                },
            )

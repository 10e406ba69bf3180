"""``dbsync run``: wiring, signals, the drain deadline and exit codes.

Start, in order: configuration and credentials (a bad one exits 78 before anything
opens), the admin socket (exit 1 if another daemon answers on it: two daemons must
not share a store), the store (migrated), one HTTP session, the supervisor with its
actors, then the ingest server and the admin socket's answers; only then ``READY=1``
to systemd. Readiness never depends on Demandbase answering: an outage there is
reported in logs and ``STATUS=``, not turned into a restart loop.

Stop (SIGTERM, SIGINT or ``dbsync ctl drain``): stop intake (ingest answers 503, the
admin socket closes once it has answered), let every actor finish the jobs it has in
flight and checkpoint, for at most ``drain_seconds``; a second signal cuts the drain
short. Whatever was cut is still in flight in the store and is resumed or re-sent at
the next start, so the exit is 0 either way. SIGHUP (or ``dbsync ctl reload``)
re-reads the configuration; a rejected one is logged and the running one kept.

Exit codes: 0 clean stop; 78 invalid configuration at start; 1 the daemon failed
(store or another shared part, or the admin socket is taken), so that systemd's
``Restart=on-failure`` acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp

from dbsync import __version__, logs, systemd
from dbsync.actor import ActorSettings
from dbsync.admin.controls import Controls
from dbsync.admin.server import AdminServer, AdminSocketError
from dbsync.budget import BudgetLimits
from dbsync.clock import Clock, SystemClock, wait_event
from dbsync.config import (
    Config,
    Credentials,
    load_config,
    load_credentials,
    load_ingest_token,
)
from dbsync.contract.record import a5_holds
from dbsync.demandbase.auth import token_source
from dbsync.demandbase.client import DemandbaseClient
from dbsync.demandbase.wire import Endpoint
from dbsync.destination import ImportClient
from dbsync.errors import ConfigError, StoreError
from dbsync.exitcodes import ExitCode
from dbsync.files.watcher import AudienceFiles, Watcher
from dbsync.folder import Folder
from dbsync.ingest import IngestServer
from dbsync.reconcile import ReconcilePlan
from dbsync.restarts import RestartPolicy
from dbsync.store import Store
from dbsync.supervisor import DestinationPlan, SummaryTotals, Supervisor

__all__ = ["Daemon", "build_plans", "run"]

log = logging.getLogger(__name__)

DATABASE_NAME = "dbsync.sqlite3"

# Opening a store the file system refuses is tried again after 1 s, then twice as long
# each time up to 30 s; systemd is asked to wait for READY that long and a margin more.
_STORE_RETRY_FIRST_SECONDS = 1.0
_STORE_RETRY_MAX_SECONDS = 30.0
_STORE_RETRY_MARGIN_SECONDS = 30.0


def build_plans(config: Config, credentials: dict[str, Credentials]) -> list[DestinationPlan]:
    """What the supervisor runs, derived from a validated configuration."""
    plans = []
    for destination in config.destinations:
        limits = destination.limits
        delivery = destination.delivery
        plans.append(
            DestinationPlan(
                name=destination.name,
                base_url=destination.base_url,
                request_timeout_seconds=destination.request_timeout_seconds,
                credentials=credentials[destination.name],
                backlog_eta_warn_hours=delivery.backlog_eta_warn_hours,
                reconcile=ReconcilePlan.from_config(
                    destination, a5_holds=a5_holds(config.daemon.state_dir, destination.name)
                ),
                limits=BudgetLimits(
                    requests_per_minute=limits.requests_per_minute,
                    daily={
                        Endpoint.IMPORT_CREATE_JOB: limits.import_jobs_per_day,
                        Endpoint.IMPORT_UPLOAD: limits.import_uploads_per_day,
                        Endpoint.IMPORT_JOB_STATUS: limits.import_status_per_day,
                        Endpoint.IMPORT_JOB_LIST: limits.import_list_per_day,
                        Endpoint.EXPORT_CREATE_JOB: limits.export_jobs_per_day,
                        Endpoint.EXPORT_JOB_STATUS: limits.export_status_per_day,
                    },
                    concurrent_import_jobs=limits.concurrent_import_jobs,
                    day_seconds=limits.day_seconds,
                    quota_safety_margin=limits.quota_safety_margin,
                    pace_recovery_seconds=delivery.pace_recovery_seconds,
                ),
                audiences=tuple(
                    ActorSettings(
                        audience_id=audience.id,
                        destination=destination.name,
                        name=audience.name,
                        list_name=audience.list_name,
                        requests_per_minute=audience.requests_per_minute,
                        max_records=audience.flush.max_records,
                        max_age_seconds=audience.flush.max_age_seconds,
                        max_jobs_in_flight=delivery.max_jobs_in_flight_per_audience,
                        job_poll_initial_seconds=delivery.job_poll_initial_seconds,
                        job_poll_max_seconds=delivery.job_poll_max_seconds,
                        paused=audience.paused,
                        retry_delays=tuple(
                            days * limits.day_seconds
                            for days in destination.reconcile.retry_unmatched_days
                        ),
                    )
                    for audience in destination.audiences
                ),
            )
        )
    return plans


class Daemon:
    """One running daemon; :meth:`run` returns its exit code."""

    def __init__(
        self,
        config_path: Path,
        *,
        clock: Clock | None = None,
        on_config: Callable[[Config], None] | None = None,
    ) -> None:
        self._config_path = config_path
        self._clock = clock or SystemClock()
        self._on_config = on_config
        self._shutdown = asyncio.Event()
        self._signals = 0
        self._drain_deadline: asyncio.Timeout | None = None
        self.ready = asyncio.Event()
        self.ingest_address: tuple[str, int] | None = None
        self.supervisor: Supervisor | None = None
        self.store: Store | None = None
        self.config: Config | None = None  # the configuration in force
        # A SIGHUP and `dbsync ctl reload` may come together: one reload at a time.
        self._watcher: Watcher | None = None
        self._reload_lock = asyncio.Lock()
        self._reload_error = ""

    def request_shutdown(self) -> None:
        """First call: drain. Second call: cut the drain short."""
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown_requested", extra={"drain": True})
            systemd.notify("STOPPING=1", "STATUS=draining")
            self._shutdown.set()
        elif self._drain_deadline is not None:
            log.warning("drain_cut_short")
            self._drain_deadline.reschedule(asyncio.get_running_loop().time())

    async def run(self) -> int:
        try:
            config = load_config(self._config_path)
            credentials = _load_all_credentials(config)
            ingest_token = load_ingest_token(config.ingest)
        except ConfigError as exc:
            log.error("config_invalid", extra={"path": str(self._config_path), "error": str(exc)})
            return ExitCode.CONFIG
        if self._on_config is not None:
            self._on_config(config)
        self.config = config
        log.info(
            "daemon_starting",
            extra={"version": __version__, "config": str(self._config_path)},
        )
        admin = AdminServer(config.daemon.admin_socket)
        try:
            admin.start()
        except AdminSocketError:
            return ExitCode.FAULT  # admin_socket_in_use or admin_socket_failed says why
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(admin.stop)
            self._install_signals()
            opened = await self._open_store(stack, config.daemon.state_dir / DATABASE_NAME)
            if opened is None:  # asked to stop while waiting for the disk
                log.info("daemon_stopped")
                return ExitCode.OK
            store = self.store = opened
            session = await stack.enter_async_context(aiohttp.ClientSession())
            supervisor = self.supervisor = Supervisor(
                build_plans(config, credentials),
                store=store,
                clock=self._clock,
                client_factory=_client_factory(session, self._clock),
                summary_interval_seconds=config.daemon.summary_interval_seconds,
                stop_timeout_seconds=config.daemon.drain_seconds,
                restarts=RestartPolicy.from_config(config.daemon),
                on_summary=self._status_line,
            )
            ingest = IngestServer(
                store,
                audiences=supervisor.audience_ids,
                host=config.ingest.host,
                port=config.ingest.port,
                token=ingest_token,
                max_body_bytes=config.ingest.max_body_bytes,
                aep_mapping=config.ingest.aep_mapping,
                clock=self._clock,
                header_timeout_seconds=config.ingest.header_timeout_seconds,
                body_timeout_seconds=config.ingest.body_timeout_seconds,
                idle_timeout_seconds=config.ingest.idle_timeout_seconds,
                max_connections=config.ingest.max_connections,
                max_body_bytes_in_flight=config.ingest.max_body_bytes_in_flight,
                body_wait_seconds=config.ingest.body_wait_seconds,
                max_removal_percent=self._max_removal_percent,
            )
            watcher = None
            if config.ingest.files is not None:
                watcher = Watcher(
                    store,
                    config.ingest.files,
                    functools.partial(self._file_audiences, supervisor),
                    self._clock,
                )
            self._watcher = watcher
            async with asyncio.TaskGroup() as group:
                # The store's services: ingest's group commit, and the fold behind it.
                committing = group.create_task(store.committer.run(), name="store:group-commit")
                folding = group.create_task(
                    Folder(store, supervisor.wake, self._clock).run(), name="folder"
                )
                supervising = group.create_task(supervisor.run(), name="supervisor")
                await supervisor.ready.wait()
                self.ingest_address = await ingest.start()
                stack.push_async_callback(ingest.close)
                group.create_task(admin.run(self._admin_controls(supervisor, store)), name="admin")
                if watcher is not None:
                    # After ingest: a run it applies wakes actors already running.
                    watching = group.create_task(watcher.run(), name="files:watcher")
                systemd.notify(
                    "READY=1", f"STATUS=delivering {len(supervisor.audience_ids())} audiences"
                )
                log.info(
                    "daemon_ready",
                    extra={
                        "ingest": f"http://{self.ingest_address[0]}:{self.ingest_address[1]}",
                        "audiences": len(supervisor.audience_ids()),
                    },
                )
                self.ready.set()
                reloads = group.create_task(self._reloads(supervisor), name="reloads")
                service = [reloads]
                if (interval := systemd.watchdog_interval()) is not None:
                    healthy = functools.partial(self._health, supervising, store, interval)
                    service.append(
                        group.create_task(
                            systemd.run_watchdog(interval, healthy, self._clock),
                            name="systemd-watchdog",
                        )
                    )
                await self._shutdown.wait()
                reloads.cancel()  # no reload during the drain
                ingest.stop()
                if watcher is not None:
                    watcher.stop()
                admin.stop()
                supervisor.stop()
                try:
                    async with asyncio.timeout(config.daemon.drain_seconds) as deadline:
                        self._drain_deadline = deadline
                        await asyncio.shield(supervising)
                except TimeoutError:
                    log.warning(
                        "drain_deadline_exceeded",
                        extra={
                            "in_flight": [
                                s.audience_id for s in supervisor.statuses() if s.jobs_in_flight
                            ]
                        },
                    )
                    supervising.cancel()
                finally:
                    # A signal after the drain (one asked by `dbsync ctl drain`, say)
                    # has nothing left to cut short.
                    self._drain_deadline = None
                if watcher is not None:
                    # A run being applied is one transaction: committed whole or not.
                    watching.cancel()
                for task in [*service, folding]:
                    task.cancel()
                # Appends still arriving (requests cut short by the drain) commit alone.
                store.committer.stop()
                await committing
        log.info("daemon_stopped")
        return ExitCode.OK

    async def _open_store(self, stack: contextlib.AsyncExitStack, path: Path) -> Store | None:
        """The store, opened; None if a stop was asked while waiting for it.

        A file system that refuses writes (full, read-only) is waited out, not an exit:
        exiting would have systemd restart the daemon into the same full disk until its
        start limit left the unit failed for good, with nothing to bring it back once
        space returns. Each try tells systemd to wait longer for READY and says why in
        STATUS=; ``store_unwritable`` is logged once, ``store_writable`` when it opens.
        """
        delay = _STORE_RETRY_FIRST_SECONDS
        waited_since: float | None = None
        while True:
            try:
                store = await stack.enter_async_context(Store.open(path, clock=self._clock))
            except StoreError as exc:
                if not exc.unwritable:
                    raise
                if waited_since is None:
                    waited_since = self._clock.monotonic()
                    log.error("store_unwritable", extra={"path": str(path), "error": str(exc)})
                systemd.notify(
                    f"EXTEND_TIMEOUT_USEC={int((delay + _STORE_RETRY_MARGIN_SECONDS) * 1e6)}",
                    f"STATUS=waiting for the store to take writes: {exc}",
                )
                if await wait_event(self._shutdown, self._clock, delay):
                    return None
                delay = min(delay * 2, _STORE_RETRY_MAX_SECONDS)
                continue
            if waited_since is not None:
                log.warning(
                    "store_writable",
                    extra={
                        "path": str(path),
                        "unwritable_seconds": round(self._clock.monotonic() - waited_since, 3),
                    },
                )
            return store

    def _file_audiences(self, supervisor: Supervisor) -> dict[str, AudienceFiles]:
        """Active audiences fed by AEP files, by AEP audience id, in the config in force."""
        assert self.config is not None
        active = set(supervisor.audience_ids())
        return {
            audience.aep_audience_id.lower(): AudienceFiles(
                audience_id=audience.id,
                aep_audience_id=audience.aep_audience_id.lower(),
                file_mode=audience.file_mode,
                file_columns=audience.file_columns,
                max_removal_percent=audience.max_removal_percent,
            )
            for destination in self.config.destinations
            for audience in destination.audiences
            if audience.aep_audience_id is not None and audience.id in active
        }

    def _max_removal_percent(self, audience_id: str) -> float:
        """The removal guard of ``audience_id`` in the configuration in force."""
        assert self.config is not None
        for destination in self.config.destinations:
            for audience in destination.audiences:
                if audience.id == audience_id:
                    return audience.max_removal_percent
        return 20.0

    # --- systemd: watchdog and status ----------------------------------------------------

    async def _health(
        self, supervising: asyncio.Task[None], store: Store, within_seconds: float
    ) -> str:
        """What keeps the daemon from doing its job, or "" (gates the watchdog's pings)."""
        if supervising.done():
            return "the supervisor has stopped"
        try:
            async with asyncio.timeout(within_seconds):
                await store.ping()
        except TimeoutError:
            return f"the store did not answer a read within {within_seconds} s"
        except StoreError as exc:
            return f"the store cannot be read: {exc}"
        return ""

    @staticmethod
    def _status_line(totals: SummaryTotals) -> None:
        """``STATUS=`` for ``systemctl status``, from each round of summary lines."""
        line = f"delivering {totals.audiences} audiences, {totals.pending} accounts pending"
        if totals.failed:
            line += f", {totals.failed} failed"
        if totals.stopped_destinations:
            line += f", destination stopped: {', '.join(totals.stopped_destinations)}"
        systemd.notify(f"STATUS={line}")

    # --- the admin socket ---------------------------------------------------------------

    def _admin_controls(self, supervisor: Supervisor, store: Store) -> Controls:
        def config() -> Config:
            assert self.config is not None
            return self.config

        async def reload() -> str | None:
            # Read at once after the reload, under no other await: it is this one's.
            return None if await self.reload(supervisor) else self._reload_error

        return Controls(
            supervisor=supervisor,
            store=store,
            clock=self._clock,
            config=config,
            config_path=self._config_path,
            started_at=self._clock.time(),
            reload=reload,
            drain=self.request_shutdown,
            draining=self._shutdown.is_set,
            watcher=self._watcher,
        )

    # --- signals and reload --------------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        self._reload_requested = asyncio.Event()

    def _request_reload(self) -> None:
        self._reload_requested.set()

    async def _reloads(self, supervisor: Supervisor) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            await self.reload(supervisor)

    async def reload(self, supervisor: Supervisor) -> bool:
        """Re-read the configuration and apply it; False (old one kept) if rejected."""
        async with self._reload_lock:
            return await self._reload(supervisor)

    async def _reload(self, supervisor: Supervisor) -> bool:
        systemd.reloading()
        try:
            config = load_config(self._config_path)
            credentials = _load_all_credentials(config)
        except ConfigError as exc:
            self._reload_error = str(exc)
            log.error("config_reload_rejected", extra={"error": str(exc)})
            systemd.notify("READY=1")
            return False
        await supervisor.reload(build_plans(config, credentials))
        self.config = config
        log.info("config_reloaded", extra={"audiences": len(supervisor.audience_ids())})
        systemd.notify("READY=1", f"STATUS=delivering {len(supervisor.audience_ids())} audiences")
        return True


def _load_all_credentials(config: Config) -> dict[str, Credentials]:
    return {d.name: load_credentials(d, i) for i, d in enumerate(config.destinations)}


def _client_factory(
    session: aiohttp.ClientSession, clock: Clock
) -> Callable[[DestinationPlan], ImportClient]:
    """Clients built from the plan alone, so that a reload's new URL or secret is used."""

    def build(plan: DestinationPlan) -> ImportClient:
        auth = token_source(
            session,
            plan.base_url,
            plan.credentials,
            clock=clock,
            timeout_seconds=plan.request_timeout_seconds,
        )
        return DemandbaseClient(
            session, plan.base_url, auth, timeout_seconds=plan.request_timeout_seconds
        )

    return build


def run(config_path: Path) -> int:
    """The ``dbsync run`` entry point: JSON logs on stdout, uvloop, then :class:`Daemon`."""
    import uvloop

    logs.configure()

    def configure_logs(config: Config) -> None:
        logs.configure(config.logging.level, config.logging.format)

    daemon = Daemon(config_path, on_config=configure_logs)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(daemon.run())

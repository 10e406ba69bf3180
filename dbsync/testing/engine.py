"""The whole sync engine in one event loop: the emulator, a real daemon, and the CDP.

The integration tests of the engine, the benchmarks and ``dbsync demo`` run
:class:`~dbsync.daemon.Daemon` in process, as a task beside them, against the emulator
on loopback and a real SQLite file. This module holds what they share:

- :func:`running_daemon` starts ``Daemon.run()`` as a task, yields the daemon once it
  is ready, and on exit asks for a graceful stop and checks that it exited 0;
- :class:`Engine` bundles an emulator, a daemon and a :class:`~dbsync.testing.cdp.Cdp`
  and answers the question every scenario ends with: does each Demandbase list (the
  emulator's true contents, ``GET /_emulator/lists``) equal the desired state the
  store holds, restricted to the accounts the tenant knows?
  :func:`running_engine` starts it all (:func:`running_reconcile_engine` with
  read-backs on);
- :func:`list_differences` is that verdict for any two sets of lists, for a harness
  that keeps its own account of the desired state;
- :func:`wait_until` polls a condition under a hard bound. Nothing here sleeps to
  wait for something.

    async with running_engine(tmp_path, [AudienceConfig("emea")]) as engine:
        accounts = await engine.tenant_accounts(10)
        await engine.cdp.changes([("emea", account, True) for account in accounts])
        await engine.wait_settled()
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence, Set
from pathlib import Path
from typing import Any

import msgspec

from dbsync.daemon import Daemon
from dbsync.demandbase.emulator import EmulatorSettings
from dbsync.exitcodes import ExitCode
from dbsync.model import Account, LedgerCheck
from dbsync.reconcile import ReconcileReport
from dbsync.store import Store
from dbsync.supervisor import Supervisor
from dbsync.testing.cdp import Cdp
from dbsync.testing.config import (
    DESTINATION,
    FAST_RECONCILE,
    ApiKeySet,
    AudienceConfig,
    write_config,
    write_reconcile_config,
)
from dbsync.testing.emulator import EmulatorApi, fast_export_tenant, fast_tenant, running_emulator

__all__ = [
    "DaemonExited",
    "Engine",
    "last_report",
    "ledger_check",
    "list_differences",
    "running_daemon",
    "running_engine",
    "running_reconcile_engine",
    "wait_until",
]

POLL_SECONDS = 0.02
READY_TIMEOUT_SECONDS = 15.0
SETTLE_TIMEOUT_SECONDS = 20.0


# --- waiting -----------------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    what: str | Callable[[], str | Awaitable[str]] = "",
    *,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Poll ``condition`` every ``poll_seconds`` until it holds; fail after ``timeout`` s.

    ``what`` says what was awaited (a callable is asked only on failure, for the state
    it ended in).
    """
    deadline = time.monotonic() + timeout
    while not await _resolve(condition()):
        if time.monotonic() > deadline:
            detail = await _resolve(what()) if callable(what) else what
            raise AssertionError(f"not within {timeout} s: {detail or condition}")
        await asyncio.sleep(poll_seconds)


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# --- the daemon --------------------------------------------------------------------------------


class DaemonExited(AssertionError):
    """The daemon ended before it was ready; ``code`` is its exit code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the daemon exited with {code} before ready")
        self.code = code


@contextlib.asynccontextmanager
async def running_daemon(
    config: Path, *, check_exit: bool = True, ready_timeout: float = READY_TIMEOUT_SECONDS
) -> AsyncIterator[Daemon]:
    """``Daemon(config).run()`` as a task; yields the daemon once it is ready.

    Raises :class:`DaemonExited` if the daemon ends before it is ready, and fails if it
    is not ready within ``ready_timeout``. On exit it asks for a graceful stop and
    waits for it; with ``check_exit``, it fails unless the daemon exited 0.
    """
    daemon = Daemon(config)
    running = asyncio.create_task(daemon.run(), name="daemon")
    ready = asyncio.create_task(daemon.ready.wait(), name="daemon-ready")
    await asyncio.wait({running, ready}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        ready.cancel()
        if running.done():
            raise DaemonExited(running.result())
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        raise AssertionError(f"the daemon was not ready within {ready_timeout} s")
    try:
        yield daemon
    finally:
        daemon.request_shutdown()
        code = await running
    if check_exit and code != ExitCode.OK:
        raise AssertionError(f"the daemon exited with {code}")


def _ingest_url(daemon: Daemon) -> str:
    assert daemon.ingest_address is not None
    host, port = daemon.ingest_address
    return f"http://{host}:{port}"


# --- the engine as a whole -----------------------------------------------------------------------


def list_differences(
    expected: Mapping[str, Set[str]], actual: Mapping[str, Set[str]]
) -> dict[str, str]:
    """The verdict "every list equals its desired state", as what differs.

    Per audience whose members differ between ``expected`` and ``actual`` (a missing
    audience counts as empty): how many are missing and extra, and the first few of
    each. Empty when every list equals its desired state.
    """
    found = {}
    for audience in sorted(expected.keys() | actual.keys()):
        want, have = expected.get(audience, set()), actual.get(audience, set())
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            found[audience] = (
                f"{len(missing)} missing {missing[:5]}, {len(extra)} extra {extra[:5]}"
            )
    return found


class Engine:
    """A running emulator and daemon, the CDP that feeds them, and the verdicts."""

    def __init__(
        self, emulator: EmulatorApi, daemon: Daemon, audiences: Sequence[AudienceConfig]
    ) -> None:
        self.emulator = emulator
        self.daemon = daemon
        self.audiences = tuple(audiences)
        self.cdp = Cdp(emulator.session, _ingest_url(daemon))

    @property
    def store(self) -> Store:
        assert self.daemon.store is not None
        return self.daemon.store

    @property
    def supervisor(self) -> Supervisor:
        assert self.daemon.supervisor is not None
        return self.daemon.supervisor

    async def tenant_accounts(self, count: int, offset: int = 0) -> list[Account]:
        """Accounts of the tenant's database (``GET /_emulator/accounts``): they all match."""
        page = await self.emulator.control("accounts", limit=str(count), offset=str(offset))
        assert len(page["accounts"]) == count, f"the tenant has {page['total']} accounts"
        accounts: list[Account] = msgspec.convert(page["accounts"], list[Account])
        return accounts

    async def lists(self) -> dict[str, set[str]]:
        """Every Demandbase list by name: its true members (``GET /_emulator/lists``)."""
        lists = await self.emulator.control("lists")
        return {name: set(entry["members"]) for name, entry in lists.items()}

    async def expected_members(self, audience_id: str) -> set[str]:
        """The desired members the tenant knows: what the list must hold."""
        known = self.emulator.emulator.tenant.accounts.index_of
        return {m for m in await self.store.desired_members(audience_id) if known(m) is not None}

    async def differences(self, lists: Mapping[str, str] | None = None) -> dict[str, str]:
        """Per audience whose list differs from its desired state, what is missing and extra.

        ``lists`` maps audience id to list name; by default the configured audiences'.
        """
        lists = lists if lists is not None else {a.id: a.list for a in self.audiences}
        actual = await self.lists()
        expected = {audience_id: await self.expected_members(audience_id) for audience_id in lists}
        have = {audience_id: actual.get(name, set()) for audience_id, name in lists.items()}
        return list_differences(expected, have)

    async def lists_match_desired(self, lists: Mapping[str, str] | None = None) -> bool:
        return not await self.differences(lists)

    async def idle(self, audience_ids: Iterable[str] | None = None) -> bool:
        """Every change folded; nothing pending or in flight for these audiences."""
        if await self.store.pending_journal_rows():
            return False
        for audience_id in audience_ids or [a.id for a in self.audiences]:
            backlog = await self.store.backlog(audience_id)
            if backlog.pending or backlog.in_flight:
                return False
        return True

    async def settled(self, lists: Mapping[str, str] | None = None) -> bool:
        """Idle, and every list equal to its desired state."""
        audience_ids = lists.keys() if lists is not None else None
        return await self.idle(audience_ids) and await self.lists_match_desired(lists)

    async def wait_settled(
        self, lists: Mapping[str, str] | None = None, timeout: float = SETTLE_TIMEOUT_SECONDS
    ) -> None:
        await wait_until(lambda: self.settled(lists), timeout, what=lambda: self._state(lists))

    async def wait_folded(self, timeout: float = SETTLE_TIMEOUT_SECONDS) -> None:
        """Until the store has folded every accepted change into desired state."""
        await wait_until(lambda: self._journal_empty(), timeout, what="the journal to be folded")

    async def _journal_empty(self) -> bool:
        return await self.store.pending_journal_rows() == 0

    async def _state(self, lists: Mapping[str, str] | None) -> str:
        ids = list(lists) if lists is not None else [a.id for a in self.audiences]
        backlogs = {a: await self.store.backlog(a) for a in ids}
        actors = {s.audience_id: s for s in self.supervisor.statuses() if s.audience_id in ids}
        destination = self.supervisor.destination(DESTINATION)
        budget = destination.budget.snapshot() if destination is not None else None
        return (
            f"journal={await self.store.pending_journal_rows()} backlogs={backlogs}"
            f" differences={await self.differences(lists)} actors={actors} budget={budget}"
        )


@contextlib.asynccontextmanager
async def running_engine(
    directory: Path,
    audiences: Sequence[AudienceConfig],
    *,
    tenant: EmulatorSettings | None = None,
    limits: Mapping[str, float] | None = None,
    delivery: Mapping[str, float] | None = None,
    daemon: Mapping[str, object] | None = None,
    api_key_set: ApiKeySet | None = None,
    ingest: Mapping[str, object] | None = None,
) -> AsyncIterator[Engine]:
    """An emulator (``tenant``, by default :func:`fast_tenant`), then a daemon feeding it.

    The daemon authenticates with the legacy token, or with ``api_key_set`` when given.
    """
    async with running_emulator(tenant or fast_tenant()) as emulator:
        config = write_config(
            directory,
            emulator.url,
            audiences,
            limits=limits,
            delivery=delivery,
            daemon=daemon,
            api_key_set=api_key_set,
            ingest=ingest,
        )
        async with running_daemon(config) as running:
            yield Engine(emulator, running, audiences)


@contextlib.asynccontextmanager
async def running_reconcile_engine(
    directory: Path,
    audiences: Sequence[AudienceConfig],
    *,
    reconcile: Mapping[str, object] = FAST_RECONCILE,
    tenant: EmulatorSettings | None = None,
    limits: Mapping[str, float] | None = None,
    delivery: Mapping[str, float] | None = None,
    daemon: Mapping[str, object] | None = None,
) -> AsyncIterator[Engine]:
    """An emulator and a daemon whose reconciler runs with ``reconcile``; export quotas
    far from any limit on both sides unless ``tenant`` or ``limits`` say otherwise."""
    async with running_emulator(tenant or fast_export_tenant()) as emulator:
        config = write_reconcile_config(
            directory,
            emulator.url,
            audiences,
            reconcile=reconcile,
            limits=limits,
            delivery=delivery,
            daemon=daemon,
        )
        async with running_daemon(config) as running:
            yield Engine(emulator, running, audiences)


def last_report(engine: Engine, audience_id: str) -> ReconcileReport | None:
    """The audience's last read-back report, if one ran."""
    report, _ = engine.supervisor.reconcile_state(audience_id)
    return report


async def ledger_check(engine: Engine, audience_id: str) -> LedgerCheck:
    return await engine.store.ledger_check(audience_id)

"""The whole sync engine in one event loop: the emulator, a real daemon, and the CDP.

The integration tests of the engine run :class:`~dbsync.daemon.Daemon` in process, as
a task beside the test, against the emulator on loopback and a real SQLite file under
``tmp_path``. This module holds what they share:

- :func:`write_config` writes the daemon's ``config.toml`` (and the token file, or an
  :class:`ApiKeySet`'s two files) for an emulator's base URL, a few audiences and the
  limits, delivery and flush settings a scenario needs; everything not given is fast
  and far from any limit;
- :func:`running_daemon` starts ``Daemon.run()`` as a task, yields the daemon once it
  is ready, and on exit asks for a graceful stop and checks that it exited 0;
- :class:`Cdp` sends changes the three ways a CDP can (native NDJSON, AEP profile
  exports, full snapshots) and insists on 202;
- :class:`Engine` bundles the three and answers the question every scenario ends
  with: does each Demandbase list (the emulator's true contents, ``GET
  /_emulator/lists``) equal the desired state the store holds, restricted to the
  accounts the tenant knows? :func:`running_engine` starts it all;
- :func:`wait_until` polls a condition every 20 ms under a hard bound. Tests never
  sleep to wait for something.

    async with running_engine(tmp_path, [AudienceConfig("emea")]) as engine:
        accounts = await engine.tenant_accounts(10)
        await engine.cdp.changes([("emea", account, True) for account in accounts])
        await engine.wait_settled()
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from dbsync.daemon import DATABASE_NAME, Daemon
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.emulator import EmulatorSettings
from dbsync.exitcodes import ExitCode
from dbsync.model import Account
from dbsync.store import Store
from dbsync.supervisor import Supervisor
from tests.support.emulator import TOKEN, EmulatorApi, running_emulator

__all__ = [
    "DESTINATION",
    "ApiKeySet",
    "AudienceConfig",
    "Cdp",
    "Engine",
    "aep_profile",
    "fast_tenant",
    "running_daemon",
    "running_engine",
    "strangers",
    "wait_until",
    "write_config",
]

DESTINATION = "emulator"
POLL_SECONDS = 0.02
READY_TIMEOUT_SECONDS = 15.0
SETTLE_TIMEOUT_SECONDS = 20.0
# Far above anything a scenario spends: only the scenarios about limits meet one.
HIGH = 1_000_000

DEFAULT_LIMITS: Mapping[str, float] = {
    "requests_per_minute": HIGH,
    "import_jobs_per_day": HIGH,
    "import_uploads_per_day": HIGH,
    "import_status_per_day": HIGH,
    "import_list_per_day": HIGH,
    "concurrent_import_jobs": 20,
}
DEFAULT_DELIVERY: Mapping[str, float] = {
    "job_poll_initial_seconds": 0.05,
    "job_poll_max_seconds": 0.5,
    "max_jobs_in_flight_per_audience": 2,
}
DEFAULT_DAEMON: Mapping[str, float] = {
    "drain_seconds": 5.0,
    # Summaries are not what these tests look at: keep the log quiet.
    "summary_interval_seconds": 3600.0,
    # A crashed actor or reconciler comes back at once, and a crash loop gives up fast.
    "restart_backoff_seconds": 0.05,
    "restart_backoff_max_seconds": 0.2,
}


def fast_tenant(**settings: Any) -> EmulatorSettings:
    """A tenant whose jobs complete in 50 ms and whose limits no scenario reaches unasked."""
    defaults: dict[str, Any] = {
        "accounts": 2_000,
        "seed": 11,
        "job_delay_seconds": 0.05,
        "requests_per_minute": HIGH,
        "import_jobs_per_day": HIGH,
        "import_uploads_per_day": HIGH,
        "import_status_per_day": HIGH,
        "import_list_per_day": HIGH,
        "concurrent_import_jobs": 100,
    }
    return EmulatorSettings(**(defaults | settings))


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AudienceConfig:
    """One ``[[destinations.audiences]]`` table; ``list`` is the Demandbase list it feeds."""

    id: str
    name: str = ""
    list_name: str = ""
    max_records: int = 1_000
    max_age_seconds: float = 0.2
    requests_per_minute: int = HIGH

    @property
    def display_name(self) -> str:
        return self.name or f"List {self.id}"

    @property
    def list(self) -> str:
        """The list the configuration names: ``list_name``, else the audience's name."""
        return self.list_name or self.display_name


@dataclass(frozen=True)
class ApiKeySet:
    """API Key Set credentials (``client_id`` and ``client_secret``); the emulator's defaults."""

    client_id: str = "emulator-client"
    client_secret: str = "emulator-secret"


def write_config(
    directory: Path,
    base_url: str,
    audiences: Sequence[AudienceConfig],
    *,
    limits: Mapping[str, float] | None = None,
    delivery: Mapping[str, float] | None = None,
    daemon: Mapping[str, object] | None = None,
    api_key_set: ApiKeySet | None = None,
    token: str = TOKEN,
) -> Path:
    """``directory/config.toml`` (and its secret files) for the emulator at ``base_url``.

    ``limits``, ``delivery`` and ``daemon`` override keys of ``[destinations.limits]``,
    ``[destinations.delivery]`` and ``[daemon]``, named exactly as in config.toml. The
    credentials are the legacy ``token`` (the emulator's default), or ``api_key_set``
    when given. State
    goes to ``directory/state``; writing again (a reload) keeps it.
    """
    credentials = _write_credentials(directory, api_key_set, token)
    daemon_keys = {"state_dir": str(directory / "state"), **DEFAULT_DAEMON, **(daemon or {})}
    tables = [
        _table("daemon", daemon_keys),
        _table("ingest", {"host": "127.0.0.1", "port": 0}),
        "[[destinations]]\n"
        + _keys({"name": DESTINATION, "base_url": base_url, "request_timeout_seconds": 10}),
        _table("destinations.credentials", credentials),
        _table("destinations.limits", {**DEFAULT_LIMITS, **(limits or {})}),
        _table("destinations.delivery", {**DEFAULT_DELIVERY, **(delivery or {})}),
    ]
    for audience in audiences:
        keys: dict[str, object] = {
            "id": audience.id,
            "name": audience.display_name,
            "origin": "segmentation",
            "requests_per_minute": audience.requests_per_minute,
        }
        if audience.list_name:
            keys["list_name"] = audience.list_name
        tables.append("[[destinations.audiences]]\n" + _keys(keys))
        tables.append(
            _table(
                "destinations.audiences.flush",
                {
                    "max_records": audience.max_records,
                    "max_age_seconds": audience.max_age_seconds,
                },
            )
        )
    path = directory / "config.toml"
    path.write_text("\n".join(tables))
    return path


def _write_credentials(
    directory: Path, api_key_set: ApiKeySet | None, token: str = TOKEN
) -> dict[str, object]:
    """Write the secret files; the ``[destinations.credentials]`` keys that refer to them."""
    if api_key_set is None:
        secrets = {"token": token}
    else:
        secrets = {"client_id": api_key_set.client_id, "client_secret": api_key_set.client_secret}
    keys: dict[str, object] = {}
    for key, secret in secrets.items():
        path = directory / ("emulator-token" if key == "token" else f"emulator-{key}")
        path.write_text(secret + "\n")
        keys[key] = {"file": str(path)}
    return keys


def _table(name: str, keys: Mapping[str, object]) -> str:
    return f"[{name}]\n{_keys(keys)}"


def _keys(keys: Mapping[str, object]) -> str:
    return "".join(f"{key} = {_toml(value)}\n" for key, value in keys.items())


def _toml(value: object) -> str:
    match value:
        case bool():
            return "true" if value else "false"
        case int() | float():
            return repr(value)
        case str():
            return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
        case Mapping():
            return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


# --- waiting -----------------------------------------------------------------------------------


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float,
    *,
    what: str | Callable[[], str | Awaitable[str]] = "",
) -> None:
    """Poll ``condition`` every 20 ms until it holds; fail after ``timeout`` seconds.

    ``what`` says what was awaited (a callable is asked only on failure, for the state
    it ended in).
    """
    deadline = time.monotonic() + timeout
    while not await _resolve(condition()):
        if time.monotonic() > deadline:
            detail = await _resolve(what()) if callable(what) else what
            raise AssertionError(f"not within {timeout} s: {detail or condition}")
        await asyncio.sleep(POLL_SECONDS)


async def _resolve(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# --- the daemon --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_daemon(config: Path) -> AsyncIterator[Daemon]:
    """``Daemon(config).run()`` as a task; yields the daemon once it is ready.

    Fails with the exit code if the daemon ends before it is ready. On exit it asks for
    a graceful stop and waits for it, and fails unless the daemon exited 0.
    """
    daemon = Daemon(config)
    running = asyncio.create_task(daemon.run(), name="daemon")
    ready = asyncio.create_task(daemon.ready.wait(), name="daemon-ready")
    await asyncio.wait(
        {running, ready}, timeout=READY_TIMEOUT_SECONDS, return_when=asyncio.FIRST_COMPLETED
    )
    if not ready.done():
        ready.cancel()
        if running.done():
            raise AssertionError(f"the daemon exited with {running.result()} before ready")
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        raise AssertionError(f"the daemon was not ready within {READY_TIMEOUT_SECONDS} s")
    try:
        yield daemon
    finally:
        daemon.request_shutdown()
        code = await running
    assert code == ExitCode.OK, f"the daemon exited with {code}"


def _ingest_url(daemon: Daemon) -> str:
    assert daemon.ingest_address is not None
    host, port = daemon.ingest_address
    return f"http://{host}:{port}"


# --- the CDP -------------------------------------------------------------------------------------


def aep_profile(account: Account, statuses: Mapping[str, str]) -> dict[str, Any]:
    """One AEP HTTP-destination profile export: ``statuses`` maps audience id to status.

    The account sits at the attributes of Adobe's Demandbase destination (the ingest
    defaults): ``accountName``, ``accountOrganization.domain``, ``accountKey.sourceKey``.
    """
    return {
        "segmentMembership": {
            "ups": {
                audience: {"status": status, "lastQualificationTime": "2025-03-01T10:00:00Z"}
                for audience, status in statuses.items()
            }
        },
        "identityMap": {"b2b_account": [{"id": account.external_id, "primary": True}]},
        "accountName": account.name,
        "accountOrganization": {"domain": account.domain},
        "accountKey": {"sourceKey": account.external_id},
    }


def strangers(count: int) -> list[Account]:
    """Accounts the CDP knows and the tenant does not: Demandbase ignores their rows."""
    return [
        Account(external_id=f"CDP-ONLY-{i}", name=f"Nobody Known {i}", domain=f"nobody{i}.invalid")
        for i in range(count)
    ]


class Cdp:
    """The CDP's side of ingest. The typed senders insist on 202 and return its counts."""

    def __init__(self, http: aiohttp.ClientSession, ingest_url: str) -> None:
        self.http = http
        self.url = ingest_url

    async def send(
        self, method: str, path: str, body: bytes, content_type: str
    ) -> tuple[int, dict[str, Any]]:
        """Any request, answered or refused: its status and JSON body."""
        async with self.http.request(
            method, f"{self.url}{path}", data=body, headers={"Content-Type": content_type}
        ) as response:
            return response.status, await response.json()

    async def changes(self, changes: Iterable[tuple[str, Account, bool]]) -> dict[str, Any]:
        """``POST /v1/changes``, NDJSON: (audience id, account, member) one a line."""
        lines = [
            msgspec.json.encode({"audience_id": audience, "account": account, "member": member})
            for audience, account, member in changes
        ]
        return await self._accepted(
            "POST", "/v1/changes", b"\n".join(lines) + b"\n", "application/x-ndjson"
        )

    async def aep(self, profiles: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """``POST /v1/aep``: an array of AEP profile exports (see :func:`aep_profile`)."""
        return await self._accepted(
            "POST", "/v1/aep", msgspec.json.encode(profiles), "application/json"
        )

    async def snapshot(
        self, audience_id: str, accounts: Sequence[Account], *, media: str = "csv"
    ) -> dict[str, Any]:
        """``PUT /v1/audiences/{id}/members``: the whole membership, as CSV or NDJSON."""
        if media == "csv":
            body, content_type = encode_accounts(accounts), "text/csv"
        else:
            body = b"".join(msgspec.json.encode(a) + b"\n" for a in accounts)
            content_type = "application/x-ndjson"
        return await self._accepted(
            "PUT", f"/v1/audiences/{audience_id}/members", body, content_type
        )

    async def health(self) -> int:
        async with self.http.get(f"{self.url}/v1/health") as response:
            return response.status

    async def _accepted(
        self, method: str, path: str, body: bytes, content_type: str
    ) -> dict[str, Any]:
        status, answer = await self.send(method, path, body, content_type)
        assert status == 202, f"{method} {path}: {status} {answer}"
        return answer


# --- the engine as a whole -----------------------------------------------------------------------


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
        return msgspec.convert(page["accounts"], list[Account])

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
        found = {}
        for audience_id, list_name in lists.items():
            want = await self.expected_members(audience_id)
            have = actual.get(list_name, set())
            if want != have:
                missing, extra = sorted(want - have), sorted(have - want)
                found[audience_id] = f"missing {missing[:5]} extra {extra[:5]}"
        return found

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


def database(config: Path) -> Path:
    """The SQLite file of the daemon that ``config`` configures (see :func:`write_config`)."""
    return config.parent / "state" / DATABASE_NAME


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
        )
        async with running_daemon(config) as running:
            yield Engine(emulator, running, audiences)

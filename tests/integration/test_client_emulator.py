"""The Demandbase client against the emulator over loopback: both auth modes, each error class.

No scripted answers here: every status comes from the emulator's own gate (tokens,
permissions, quotas, faults), so the client is tested against the same Demandbase
that the daemon's tests use. Jobs run with ``job_delay_seconds=0`` and complete at the
next request, so polling needs no sleep, only a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from dbsync.clock import Clock, FakeClock, SystemClock
from dbsync.demandbase.auth import REFRESH_MARGIN_SECONDS, ApiKeyTokenSource, LegacyToken
from dbsync.demandbase.client import DemandbaseClient
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.emulator import Emulator, EmulatorSettings, Faults, StatusStorm
from dbsync.demandbase.wire import Endpoint, ExportJobStatus, ImportJob
from dbsync.errors import (
    AuthError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    ThrottledError,
    TransientError,
)
from dbsync.model import Account

TOKEN = "emulator-token"
CLIENT_ID = "emulator-client"
CLIENT_SECRET = "emulator-secret"
TOKEN_TTL_SECONDS = 28_800
POLLS = 20


def settings(**overrides: object) -> EmulatorSettings:
    defaults: dict[str, object] = {
        "accounts": 500,
        "seed": 7,
        "job_delay_seconds": 0.0,
        "token": TOKEN,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token_ttl_seconds": TOKEN_TTL_SECONDS,
    }
    return EmulatorSettings(**{**defaults, **overrides})  # type: ignore[arg-type]


class Attempts:
    """A RequestObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[Endpoint, int]] = []

    def request_finished(self, endpoint: Endpoint, status: int, elapsed_seconds: float) -> None:
        assert elapsed_seconds >= 0
        self.seen.append((endpoint, status))

    def count(self, endpoint: Endpoint) -> int:
        return sum(1 for seen, _ in self.seen if seen is endpoint)


@contextlib.asynccontextmanager
async def serving(
    emulator_settings: EmulatorSettings, clock: Clock | None = None
) -> AsyncIterator[tuple[Emulator, str]]:
    emulator = Emulator(emulator_settings, clock=clock or SystemClock())
    async with emulator.serve() as base_url:
        yield emulator, base_url


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def attempts() -> Attempts:
    return Attempts()


def api_key_client(
    session: aiohttp.ClientSession,
    base_url: str,
    attempts: Attempts,
    *,
    clock: Clock | None = None,
    token_url: str | None = None,
    client_secret: str = CLIENT_SECRET,
) -> DemandbaseClient:
    auth = ApiKeyTokenSource(
        session,
        token_url or base_url,
        CLIENT_ID,
        client_secret,
        clock=clock or SystemClock(),
        observer=attempts,
    )
    return DemandbaseClient(session, base_url, auth, observer=attempts)


def legacy_client(
    session: aiohttp.ClientSession, base_url: str, attempts: Attempts, token: str = TOKEN
) -> DemandbaseClient:
    return DemandbaseClient(session, base_url, LegacyToken(token), observer=attempts)


async def completed(client: DemandbaseClient, job_id: int) -> ImportJob:
    for _ in range(POLLS):
        job = await client.get_import_job(job_id)
        if job.state in ("completed", "failed"):
            assert job.state == "completed", job
            return job
    raise AssertionError(f"import job {job_id} did not complete in {POLLS} polls")


async def finished(client: DemandbaseClient, job_id: str) -> ExportJobStatus:
    for _ in range(POLLS):
        job = await client.get_export_job(job_id)
        if job.job_status in ("finished", "failed"):
            assert job.job_status == "finished", job
            return job
    raise AssertionError(f"export job {job_id} did not finish in {POLLS} polls")


async def import_accounts(
    client: DemandbaseClient, list_name: str, accounts: list[Account], list_action: str
) -> ImportJob:
    job = await client.create_import_job(list_name)
    assert job.state == "new"
    uploaded = await client.upload_import_data(
        job.id, encode_accounts(accounts), list_action=list_action
    )
    assert uploaded.id == job.id
    return await completed(client, job.id)


async def read_back(client: DemandbaseClient, list_id: int, job_name: str) -> list[Account]:
    """The list's members, as Accounts (the emulator keeps every member's external id)."""
    export = await client.create_account_list_export(job_name, list_id)
    assert export.job_status == "accepted"
    done = await finished(client, export.job_id)
    return [
        Account(external_id=a.external_id, name=a.name, domain=a.domain)
        for a in await client.read_export_accounts(done.results_url)
    ]


def awkward(emulator: Emulator, count: int) -> list[Account]:
    """Accounts of the emulator's database whose names need CSV quoting or UTF-8."""
    found = [
        account
        for account in emulator.tenant.accounts.page(0, len(emulator.tenant.accounts))
        if "," in account.name or '"' in account.name or not account.name.isascii()
    ][:count]
    assert any("," in a.name for a in found)
    assert any('"' in a.name for a in found)
    assert any(not a.name.isascii() for a in found)
    return found


def by_id(accounts: list[Account]) -> list[Account]:
    return sorted(accounts, key=lambda a: a.external_id)


# --- the whole way: import, read back, delete -----------------------------------------


async def test_inserted_accounts_read_back_equal_and_delete_removes_them(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)
        accounts = awkward(emulator, 30)

        inserted = await import_accounts(client, "Awkward names", accounts, "insert")
        assert inserted.account_list_id is not None
        assert by_id(await read_back(client, inserted.account_list_id, "after-insert")) == by_id(
            accounts
        )

        removed, kept = accounts[:10], accounts[10:]
        deleted = await import_accounts(client, "Awkward names", removed, "delete")
        assert deleted.account_list_id == inserted.account_list_id
        assert by_id(await read_back(client, inserted.account_list_id, "after-delete")) == by_id(
            kept
        )

        listed = await client.list_import_jobs(state="completed", per_page=1)
        assert listed.total_count == 2
        assert [job.id for job in listed.data] == [deleted.id]

        stats = emulator.stats()
        assert stats["tokens_minted"] == 0
        # Every attempt reached the observer; the signed downloads are not Demandbase
        # requests for the emulator, but they are for the client.
        downloads = attempts.count(Endpoint.EXPORT_DOWNLOAD)
        assert downloads == stats["downloads"] == 2
        assert len(attempts.seen) - downloads == stats["requests"]


async def test_names_with_line_breaks_quotes_and_commas_survive_the_upload(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)
        names = ['Zürich "Labs"\nAG', "Société Générale, S.A.", "Line\r\nBreak", 'a,"b",c']
        accounts = [
            Account(external_id=account.external_id, name=name, domain=account.domain)
            for account, name in zip(emulator.tenant.accounts.page(0, 4), names, strict=True)
        ]

        job = await import_accounts(client, "Line breaks", accounts, "insert")

        # Had a quote or line break split a row, its External Account ID would be
        # garbled and the row unmatched.
        tenant_job = emulator.tenant.import_job(job.id)
        assert tenant_job is not None
        assert tenant_job.rows == 4
        assert tenant_job.unmatched == []
        assert emulator.tenant.lists["Line breaks"].members == {a.external_id for a in accounts}


# --- API Key Set tokens ------------------------------------------------------------------


async def test_one_token_is_minted_and_shared_by_every_call(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = api_key_client(session, base_url, attempts)

        # Concurrent first calls wait for one mint rather than minting each.
        async with asyncio.TaskGroup() as group:
            for i in range(8):
                group.create_task(client.create_import_job(f"list-{i}"))
        for _ in range(5):
            await client.list_import_jobs()

        assert emulator.stats()["tokens_minted"] == 1
        assert attempts.count(Endpoint.AUTH_TOKEN) == 1
        assert {status for _, status in attempts.seen} == {200}


async def test_a_token_is_minted_again_within_the_refresh_margin_of_its_expiry(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    clock = FakeClock()
    async with serving(settings(), clock) as (emulator, base_url):
        client = api_key_client(session, base_url, attempts, clock=clock)
        await client.list_import_jobs()

        await clock.advance(TOKEN_TTL_SECONDS - REFRESH_MARGIN_SECONDS - 1)
        await client.list_import_jobs()
        assert emulator.stats()["tokens_minted"] == 1

        await clock.advance(2)
        await client.list_import_jobs()
        assert emulator.stats()["tokens_minted"] == 2
        # Refreshed ahead of expiry: Demandbase never had to refuse the old token.
        assert 401 not in {status for _, status in attempts.seen}


async def test_a_401_causes_exactly_one_mint_and_the_call_succeeds(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = api_key_client(session, base_url, attempts)
        job = await client.create_import_job("Expiring")
        emulator.set_faults(Faults(expire_tokens=True))
        attempts.seen.clear()

        assert (await client.get_import_job(job.id)).id == job.id

        assert attempts.seen == [
            (Endpoint.IMPORT_JOB_STATUS, 401),
            (Endpoint.AUTH_TOKEN, 200),
            (Endpoint.IMPORT_JOB_STATUS, 200),
        ]
        assert emulator.stats()["tokens_minted"] == 2


async def test_a_401_that_a_fresh_token_does_not_cure_is_an_auth_error(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    # Tokens minted by another tenant's emulator are valid tokens that this one refuses.
    async with serving(settings()) as (_, base_url), serving(settings()) as (other, other_url):
        client = api_key_client(session, base_url, attempts, token_url=other_url)

        with pytest.raises(AuthError) as caught:
            await client.list_import_jobs()

        assert (caught.value.status, caught.value.endpoint) == (401, "import.job_list")
        assert attempts.seen == [
            (Endpoint.AUTH_TOKEN, 200),
            (Endpoint.IMPORT_JOB_LIST, 401),
            (Endpoint.AUTH_TOKEN, 200),
            (Endpoint.IMPORT_JOB_LIST, 401),
        ]
        assert other.stats()["tokens_minted"] == 2


async def test_wrong_client_credentials_are_an_auth_error(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = api_key_client(session, base_url, attempts, client_secret="not-the-secret")

        with pytest.raises(AuthError) as caught:
            await client.create_import_job("Never")

        assert (caught.value.status, caught.value.endpoint) == (400, "auth.token")
        assert "not-the-secret" not in str(caught.value)
        assert emulator.stats()["requests_by_endpoint"] == {"auth.token": 1}


# --- legacy token ----------------------------------------------------------------------


async def test_a_wrong_legacy_token_is_an_auth_error_without_any_mint(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts, token="revoked-user-token")

        with pytest.raises(AuthError) as caught:
            await client.create_import_job("Never")

        assert caught.value.status == 401
        assert "revoked-user-token" not in repr(caught.value)
        assert attempts.seen == [(Endpoint.IMPORT_CREATE_JOB, 401)]
        assert emulator.stats()["tokens_minted"] == 0


# --- 403: a missing permission, never a token problem ------------------------------------


async def create_import_job(client: DemandbaseClient) -> object:
    return await client.create_import_job("Forbidden")


async def create_export(client: DemandbaseClient) -> object:
    return await client.create_account_list_export("forbidden", 1)


@pytest.mark.parametrize(
    ("granted", "call", "permission", "error_code"),
    [
        ("export", create_import_job, "Import Data", None),
        ("import", create_export, "Data Export", "403-102"),
    ],
)
async def test_a_403_names_the_missing_permission_and_causes_no_mint(
    session: aiohttp.ClientSession,
    attempts: Attempts,
    granted: str,
    call: Callable[[DemandbaseClient], Awaitable[object]],
    permission: str,
    error_code: str | None,
) -> None:
    async with serving(settings(permissions=frozenset({granted}))) as (emulator, base_url):
        client = api_key_client(session, base_url, attempts)

        with pytest.raises(PermissionDeniedError) as caught:
            await call(client)

        error = caught.value
        assert (error.status, error.permission, error.error_code) == (403, permission, error_code)
        assert not error.retriable
        assert attempts.count(Endpoint.AUTH_TOKEN) == 1  # the first token only
        assert emulator.stats()["tokens_minted"] == 1


# --- 429 ---------------------------------------------------------------------------------


async def test_a_429_storm_is_throttled_with_its_error_code(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)
        emulator.set_faults(Faults(status_storm=StatusStorm(status=429, count=1)))

        with pytest.raises(ThrottledError) as caught:
            await client.create_import_job("Throttled")

        error = caught.value
        assert (error.status, error.error_code, error.retry_after) == (429, "429-100", None)
        assert error.diagnostic_code
        assert error.retriable
        assert (await client.create_import_job("Throttled")).state == "new"


async def test_a_429_honours_retry_after_when_one_is_sent(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)
        emulator.set_faults(
            Faults(status_storm=StatusStorm(status=429, count=1), retry_after_seconds=42)
        )

        with pytest.raises(ThrottledError) as caught:
            await client.list_import_jobs()

        assert caught.value.retry_after == 42.0


async def test_a_spent_daily_quota_is_throttled(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings(import_jobs_per_day=1)) as (_, base_url):
        client = legacy_client(session, base_url, attempts)
        await client.create_import_job("Once")

        with pytest.raises(ThrottledError) as caught:
            await client.create_import_job("Twice")

        assert caught.value.error_code == "429-100"


async def test_a_second_export_while_one_runs_is_throttled_429_102(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    clock = FakeClock()
    async with serving(settings(job_delay_seconds=10.0), clock) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)
        job = await client.create_import_job("Exported")
        accounts = list(emulator.tenant.accounts.page(0, 3))
        await client.upload_import_data(job.id, encode_accounts(accounts), list_action="insert")
        await clock.advance(10)
        list_id = (await completed(client, job.id)).account_list_id
        assert list_id is not None
        await client.create_account_list_export("first", list_id)

        with pytest.raises(ThrottledError) as caught:
            await client.create_account_list_export("second", list_id)

        assert caught.value.error_code == "429-102"


# --- server errors and no answer ---------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_a_5xx_is_transient(
    session: aiohttp.ClientSession, attempts: Attempts, status: int
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)
        emulator.set_faults(Faults(status_storm=StatusStorm(status=status, count=1)))

        with pytest.raises(TransientError) as caught:
            await client.list_import_jobs()

        assert caught.value.status == status
        assert caught.value.retriable


async def test_a_dropped_connection_is_transient_though_the_job_was_created(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)
        emulator.set_faults(Faults(reset_ratio=1.0))

        with pytest.raises(TransientError) as caught:
            await client.create_import_job("Reset")

        assert (caught.value.status, caught.value.endpoint) == (0, "import.create_job")
        assert attempts.seen == [(Endpoint.IMPORT_CREATE_JOB, 0)]
        # Why the client does not repeat it: the job exists, no answer said so.
        assert [job.data_import_name for job in emulator.tenant.import_jobs] == ["Reset"]


async def test_a_slow_answer_times_out_as_transient(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings(faults=Faults(latency_ms=1000.0))) as (_, base_url):
        client = DemandbaseClient(
            session, base_url, LegacyToken(TOKEN), timeout_seconds=0.1, observer=attempts
        )

        with pytest.raises(TransientError) as caught:
            await client.list_import_jobs()

        assert caught.value.status == 0
        assert "no complete answer: TimeoutError GET" in str(caught.value)


# --- 400 and 404 -------------------------------------------------------------------------


async def test_unknown_jobs_are_not_found(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (_, base_url):
        client = legacy_client(session, base_url, attempts)

        with pytest.raises(NotFoundError):
            await client.get_import_job(1)
        with pytest.raises(NotFoundError) as caught:
            await client.get_export_job("no-such-job")

        assert caught.value.error_code == "404-302"


async def test_bad_requests_carry_demandbases_reason(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)

        with pytest.raises(BadRequestError) as caught:
            await client.create_account_list_export("unknown-list", 999)
        assert caught.value.error_code == "400-142"

        job = await import_accounts(
            client, "Once", list(emulator.tenant.accounts.page(0, 2)), "insert"
        )
        with pytest.raises(BadRequestError, match="new job"):
            await client.upload_import_data(job.id, encode_accounts([]), list_action="insert")


async def test_an_expired_results_url_is_not_found(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    clock = FakeClock()
    async with serving(settings(results_url_ttl_seconds=60.0), clock) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)
        job = await import_accounts(
            client, "Stale", list(emulator.tenant.accounts.page(0, 3)), "insert"
        )
        assert job.account_list_id is not None
        export = await client.create_account_list_export("stale", job.account_list_id)
        done = await finished(client, export.job_id)

        await clock.advance(61)

        with pytest.raises(NotFoundError) as caught:
            await client.download_export_results(done.results_url)
        assert caught.value.status == 403


async def test_arguments_refused_locally_spend_no_request(
    session: aiohttp.ClientSession, attempts: Attempts
) -> None:
    async with serving(settings()) as (emulator, base_url):
        client = legacy_client(session, base_url, attempts)

        with pytest.raises(ValueError, match="list_action"):
            await client.upload_import_data(70_001, encode_accounts([]), list_action="upsert")
        with pytest.raises(ValueError, match="empty"):
            await client.upload_import_data(70_001, b"", list_action="insert")
        with pytest.raises(ValueError, match="job_name"):
            await client.create_account_list_export("x" * 51, 1)
        with pytest.raises(ValueError, match="job_name"):
            await client.create_account_list_export("", 1)

        assert emulator.stats()["requests"] == 0
        assert attempts.seen == []

"""How the Demandbase client turns answers it cannot use into typed errors.

Scripted with aioresponses, one answer per test, so that each error class is pinned
by the exact status, body and headers that call for it. The token's life (re-mints,
single flight, 403 without a mint) is tested against the emulator in
tests/integration/test_client_emulator.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgspec
import pytest
import yarl
from aioresponses import aioresponses

from dbsync.clock import FakeClock
from dbsync.demandbase.auth import ApiKeyTokenSource, LegacyToken
from dbsync.demandbase.client import DemandbaseClient
from dbsync.demandbase.http import error_for
from dbsync.demandbase.wire import Endpoint
from dbsync.errors import (
    AuthError,
    BadRequestError,
    DemandbaseError,
    NotFoundError,
    PayloadError,
    PermissionDeniedError,
    ThrottledError,
    TransientError,
)

BASE = "https://uapi.example.test"
TOKEN = "tok-3f9c1a-never-print-me"
SECRET = "sec-77d2e0-never-print-me"
CREATE_JOB = f"{BASE}/import/v1/job"
JOB_7 = f"{BASE}/import/v1/job/7"
EXPORT_CREATE = f"{BASE}/data/export/v1/accountList/job"
EXPORT_JOB = f"{BASE}/data/export/v1/job/ex-1"
AUTH_URL = f"{BASE}/auth/v1/token"

IMPORT_JOB = {
    "id": 7,
    "dataImportName": "audience-a",
    "entityType": "Account",
    "state": "new",
    "createdAt": "2026-08-01T00:00:00Z",
    "updatedAt": "2026-08-01T00:00:00Z",
}


def error_dto(code: str, message: str, diagnostic: str = "diag-1") -> bytes:
    return msgspec.json.encode(
        {"errorCode": code, "errorMessage": message, "diagnosticCode": diagnostic}
    )


class Attempts:
    """A RequestObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[Endpoint, int]] = []

    def request_finished(self, endpoint: Endpoint, status: int, elapsed_seconds: float) -> None:
        assert elapsed_seconds >= 0
        self.seen.append((endpoint, status))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


class _SentRequest:
    """What aiohttp 3.14 asks of a request's writer once the request is sent."""

    output_size = 0


class _Response(aiohttp.ClientResponse):
    """A ClientResponse that aioresponses 0.7.9, the latest release, can build.

    aiohttp 3.14 made ``stream_writer`` a required argument that aioresponses does
    not pass yet (pnuckowski/aioresponses#289).
    """

    def __init__(self, method: str, url: yarl.URL, **kwargs: Any) -> None:
        super().__init__(method, url, stream_writer=_SentRequest(), **kwargs)


class ScriptedApi(aioresponses):
    def add(self, url: Any, method: str = "GET", status: int = 200, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _Response)
        super().add(url, method, status, **kwargs)


@pytest.fixture
def api() -> Iterator[aioresponses]:
    with ScriptedApi() as mocked:
        yield mocked


@pytest.fixture
def attempts() -> Attempts:
    return Attempts()


@pytest.fixture
def client(session: aiohttp.ClientSession, attempts: Attempts) -> DemandbaseClient:
    return DemandbaseClient(session, BASE, LegacyToken(TOKEN), observer=attempts)


def requests_made(api: aioresponses) -> int:
    return sum(len(calls) for calls in api.requests.values())


# --- one test per error class --------------------------------------------------------


async def test_400_is_a_bad_request_carrying_the_import_message(
    client: DemandbaseClient, api: aioresponses
) -> None:
    api.post(CREATE_JOB, status=400, payload={"message": "entityType is invalid"})

    with pytest.raises(BadRequestError) as caught:
        await client.create_import_job("audience-a")

    error = caught.value
    assert (error.status, error.endpoint) == (400, "import.create_job")
    assert "entityType is invalid" in str(error)
    assert not error.retriable


async def test_export_400_carries_the_error_code(
    client: DemandbaseClient, api: aioresponses
) -> None:
    api.post(EXPORT_CREATE, status=400, body=error_dto("400-142", "List id does not exist"))

    with pytest.raises(BadRequestError) as caught:
        await client.create_account_list_export("verify-a", 99)

    assert caught.value.error_code == "400-142"
    assert caught.value.diagnostic_code == "diag-1"


async def test_401_with_a_legacy_token_is_an_auth_error_without_a_second_try(
    client: DemandbaseClient, api: aioresponses, attempts: Attempts
) -> None:
    api.get(JOB_7, status=401, payload={"status": "Unauthorized"})

    with pytest.raises(AuthError) as caught:
        await client.get_import_job(7)

    assert caught.value.status == 401
    assert "Unauthorized" in str(caught.value)
    assert not caught.value.retriable
    assert attempts.seen == [(Endpoint.IMPORT_JOB_STATUS, 401)]


async def test_403_on_import_names_the_import_permission_and_quotes_the_body(
    client: DemandbaseClient, api: aioresponses
) -> None:
    api.get(JOB_7, status=403, payload={"status": "User lacks the Import Data permission"})

    with pytest.raises(PermissionDeniedError) as caught:
        await client.get_import_job(7)

    assert caught.value.permission == "Import Data"
    assert "User lacks the Import Data permission" in str(caught.value)
    assert not caught.value.retriable


async def test_403_on_export_names_the_export_permission(
    client: DemandbaseClient, api: aioresponses
) -> None:
    api.get(EXPORT_JOB, status=403, body=error_dto("403-102", "API Key lacks privilege"))

    with pytest.raises(PermissionDeniedError) as caught:
        await client.get_export_job("ex-1")

    assert caught.value.permission == "Data Export"
    assert caught.value.error_code == "403-102"
    assert "API Key lacks privilege" in str(caught.value)


async def test_403_on_a_signed_results_url_means_it_expired_not_a_missing_permission(
    client: DemandbaseClient, api: aioresponses
) -> None:
    url = f"{BASE}/results/ex-1.csv?signature=abc"
    api.get(url, status=403, body=b"<Error><Code>AccessDenied</Code></Error>")

    with pytest.raises(NotFoundError):
        await client.download_export_results(url)


async def test_404_is_not_found(client: DemandbaseClient, api: aioresponses) -> None:
    api.get(EXPORT_JOB, status=404, body=error_dto("404-302", "Job id invalid"))

    with pytest.raises(NotFoundError) as caught:
        await client.get_export_job("ex-1")

    assert caught.value.error_code == "404-302"
    assert not caught.value.retriable


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("429-100", "Rate limit exceeded."),
        ("429-101", "Daily export volume exceeded."),
        ("429-102", "Only one export job may run at a time."),
    ],
)
async def test_429_parses_the_documented_body(
    client: DemandbaseClient, api: aioresponses, attempts: Attempts, code: str, message: str
) -> None:
    api.post(EXPORT_CREATE, status=429, body=error_dto(code, message, "ce0fc177"))

    with pytest.raises(ThrottledError) as caught:
        await client.create_account_list_export("verify-a", 1)

    error = caught.value
    assert (error.error_code, error.diagnostic_code) == (code, "ce0fc177")
    assert message in str(error)
    assert error.retry_after is None
    assert error.retriable
    assert attempts.seen == [(Endpoint.EXPORT_CREATE_JOB, 429)]


async def test_429_with_retry_after_in_seconds(client: DemandbaseClient, api: aioresponses) -> None:
    api.get(JOB_7, status=429, headers={"Retry-After": "7"}, body=b"")

    with pytest.raises(ThrottledError) as caught:
        await client.get_import_job(7)

    assert caught.value.retry_after == 7.0


def test_retry_after_as_an_http_date_counts_from_the_servers_date() -> None:
    headers = {
        "Retry-After": "Sat, 01 Aug 2026 12:00:30 GMT",
        "Date": "Sat, 01 Aug 2026 12:00:00 GMT",
    }

    error = error_for(Endpoint.IMPORT_UPLOAD, 429, b"", headers)

    assert isinstance(error, ThrottledError)
    assert error.retry_after == 30.0


@pytest.mark.parametrize("value", ["soon", "-5", ""])
def test_retry_after_that_is_neither_seconds_nor_a_date_is_ignored(value: str) -> None:
    error = error_for(Endpoint.IMPORT_UPLOAD, 429, b"", {"Retry-After": value})

    assert isinstance(error, ThrottledError)
    assert error.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
async def test_server_errors_are_transient_even_with_an_html_body(
    client: DemandbaseClient, api: aioresponses, status: int
) -> None:
    api.get(JOB_7, status=status, body=b"<html><body><h1>Bad Gateway</h1></body></html>")

    with pytest.raises(TransientError) as caught:
        await client.get_import_job(7)

    assert caught.value.status == status
    assert caught.value.retriable
    assert "Bad Gateway" in str(caught.value)


async def test_import_500_carries_its_message(client: DemandbaseClient, api: aioresponses) -> None:
    api.get(JOB_7, status=500, payload={"message": "Internal failure"})

    with pytest.raises(TransientError, match="Internal failure"):
        await client.get_import_job(7)


async def test_other_4xx_are_bad_requests(client: DemandbaseClient, api: aioresponses) -> None:
    api.get(JOB_7, status=415, body=b"")

    with pytest.raises(BadRequestError) as caught:
        await client.get_import_job(7)

    assert caught.value.status == 415


@pytest.mark.parametrize(
    "failure",
    [
        TimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
    ids=["timeout", "disconnected", "reset", "payload"],
)
async def test_no_answer_is_transient_and_observed_as_status_0(
    client: DemandbaseClient, api: aioresponses, attempts: Attempts, failure: Exception
) -> None:
    api.post(CREATE_JOB, exception=failure)

    with pytest.raises(TransientError) as caught:
        await client.create_import_job("audience-a")

    error = caught.value
    assert (error.endpoint, error.status) == ("import.create_job", 0)
    assert error.retriable
    # Named by the transport's one description, and not chained: a logged traceback
    # would print the aiohttp error's own words (demandbase/http.py, Secrets).
    assert f"no complete answer: {type(failure).__name__} POST {CREATE_JOB}" in str(error)
    assert error.__cause__ is None
    assert attempts.seen == [(Endpoint.IMPORT_CREATE_JOB, 0)]


async def test_a_success_body_that_does_not_decode_is_a_payload_error(
    client: DemandbaseClient, api: aioresponses
) -> None:
    api.get(JOB_7, status=200, payload={**IMPORT_JOB, "id": "seven"})

    with pytest.raises(PayloadError) as caught:
        await client.get_import_job(7)

    assert caught.value.endpoint == "import.job_status"
    assert isinstance(caught.value.__cause__, msgspec.ValidationError)
    assert not caught.value.retriable


async def test_a_success_body_that_is_not_json_is_a_payload_error(
    client: DemandbaseClient, api: aioresponses
) -> None:
    api.get(JOB_7, status=200, body=b"<html>maintenance</html>")

    with pytest.raises(PayloadError):
        await client.get_import_job(7)


async def test_wrong_client_credentials_are_an_auth_error(
    session: aiohttp.ClientSession, api: aioresponses, attempts: Attempts
) -> None:
    api.post(AUTH_URL, status=400, payload={"message": "invalid client credentials"})
    auth = ApiKeyTokenSource(
        session, BASE, "client-1", SECRET, clock=FakeClock(), observer=attempts
    )
    client = DemandbaseClient(session, BASE, auth, observer=attempts)

    with pytest.raises(AuthError) as caught:
        await client.get_import_job(7)

    assert (caught.value.endpoint, caught.value.status) == ("auth.token", 400)
    assert attempts.seen == [(Endpoint.AUTH_TOKEN, 400)]


async def test_the_token_endpoint_throttled_is_throttled(
    session: aiohttp.ClientSession, api: aioresponses
) -> None:
    api.post(AUTH_URL, status=429, body=error_dto("429-100", "Rate limit exceeded."))
    auth = ApiKeyTokenSource(session, BASE, "client-1", SECRET, clock=FakeClock())

    with pytest.raises(ThrottledError) as caught:
        await auth.token()

    assert caught.value.endpoint == "auth.token"


# --- secrets ------------------------------------------------------------------------


def assert_secret_free(error: BaseException, *secrets: str) -> None:
    """Neither the error nor anything chained to it shows a secret."""
    seen: BaseException | None = error
    while seen is not None:
        texts = [str(seen), repr(seen), *map(repr, seen.args), repr(vars(seen))]
        for secret in secrets:
            assert not any(secret in text for text in texts), (type(seen), texts)
        seen = seen.__cause__ or seen.__context__


async def test_the_token_and_secret_appear_in_no_error_and_no_log_line(
    session: aiohttp.ClientSession, api: aioresponses, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    api.post(AUTH_URL, status=200, payload={"accessToken": TOKEN, "expiresIn": 28800})
    answers: list[dict[str, object]] = [
        {"status": 400, "payload": {"message": "bad"}},
        {"status": 401, "payload": {"status": "Unauthorized"}},
        {"status": 401, "payload": {"status": "Unauthorized"}},
        {"status": 403, "payload": {"status": "Forbidden"}},
        {"status": 404, "payload": {"message": "no job"}},
        {"status": 429, "body": error_dto("429-100", "Rate limit exceeded.")},
        {"status": 503, "body": b"Service Unavailable"},
        {"status": 200, "body": b"{}"},
        {"exception": TimeoutError()},
    ]
    for answer in answers:
        api.get(JOB_7, **answer)
    # The second 401 follows a re-mint, which gets the same token back.
    api.post(AUTH_URL, status=200, payload={"accessToken": TOKEN, "expiresIn": 28800})
    auth = ApiKeyTokenSource(session, BASE, "client-1", SECRET, clock=FakeClock())
    client = DemandbaseClient(session, BASE, auth)

    errors: list[DemandbaseError] = []
    for _ in range(len(answers) - 1):  # the two 401s make one call
        with pytest.raises(DemandbaseError) as caught:
            await client.get_import_job(7)
        errors.append(caught.value)

    assert [type(e) for e in errors] == [
        BadRequestError,
        AuthError,
        PermissionDeniedError,
        NotFoundError,
        ThrottledError,
        TransientError,
        PayloadError,
        TransientError,
    ]
    sent = [
        call.kwargs["headers"]["Authorization"] for call in api.requests[("GET", yarl.URL(JOB_7))]
    ]
    assert sent == [f"Bearer {TOKEN}"] * len(answers)  # the token did travel
    for error in errors:
        assert_secret_free(error, TOKEN, SECRET)
    assert TOKEN not in repr(auth)
    assert SECRET not in repr(auth)
    assert any(r.getMessage() == "demandbase_token_minted" for r in caplog.records)
    for record in caplog.records:
        logged = repr(vars(record)) + record.getMessage()
        assert TOKEN not in logged
        assert SECRET not in logged


async def test_a_legacy_token_is_not_shown_by_its_repr() -> None:
    assert TOKEN not in repr(LegacyToken(TOKEN))


async def test_the_signed_results_url_is_requested_without_a_token(
    client: DemandbaseClient, api: aioresponses
) -> None:
    url = f"{BASE}/results/ex-1.csv?X-Sig=a%2Fb%3D&Expires=1"
    api.get(url, status=200, body=b"Account ID\r\n")

    assert await client.download_export_results(url) == b"Account ID\r\n"

    (call,) = [c for calls in api.requests.values() for c in calls]
    assert "Authorization" not in (call.kwargs.get("headers") or {})
    assert requests_made(api) == 1


async def test_export_members_without_an_external_id_are_kept_with_an_empty_one(
    client: DemandbaseClient, api: aioresponses
) -> None:
    """A read-back matches such a member by domain and name: the client must not drop it."""
    url = f"{BASE}/results/ex-2.csv?X-Sig=x"
    api.get(
        url,
        status=200,
        body=(
            b"Account ID,External Account ID,Account Name,Account Domain\r\n"
            b"101,ACC-1,Acme,acme.example\r\n"
            b"102,,Globex,globex.example\r\n"
        ),
    )
    members = await client.read_export_accounts(url)
    assert [(m.external_id, m.name, m.domain) for m in members] == [
        ("ACC-1", "Acme", "acme.example"),
        ("", "Globex", "globex.example"),
    ]

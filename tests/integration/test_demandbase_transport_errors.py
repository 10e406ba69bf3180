"""Every way an HTTP exchange with Demandbase fails, against real sockets, and the token.

The client is driven against a hostile server on loopback (tests/support/hostile.py):
a same-origin redirect loop, a single redirect elsewhere, a body cut short, a gzip body
that is not gzip, an answer that never comes (read timeout), a connect that is never
accepted (connect timeout) and https:// to a plain-HTTP port (TLS). Each failure must be
a typed DemandbaseError whose words, repr and traceback name the class, the method, the
URL without its query and the status, and nothing of the request: the token and the
signature searched for are nowhere. A real daemon meets them all in
tests/reliability/test_credential_leak.py.
"""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator

import aiohttp
import pytest
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from dbsync.demandbase.auth import LegacyToken
from dbsync.demandbase.client import DemandbaseClient
from dbsync.demandbase.http import describe_transport_error
from dbsync.errors import DemandbaseError, RedirectError, TransientError
from dbsync.model import Account
from tests.support.hostile import SIGNATURE, hostile_demandbase, unanswered_port

TOKEN = "dbtok-hQljGMChsKMevsmZhXckh3Nj-never-print-me"
# The results URL's own signature; not SIGNATURE, which marks a followed redirect.
RESULTS_SIGNATURE = "X-Goog-Signature=results-sig-never-print-me"
SECRETS = (TOKEN, SIGNATURE, "sig-5b1e7c", RESULTS_SIGNATURE)
TIMEOUT_SECONDS = 0.5  # the client's: the silent server and the full backlog wait it out
WAIT = 30.0
AUDIENCES = ("leak-plain", "leak-tls")
ACCOUNT = Account(external_id="ACC-1", name="Acme", domain="acme.example")


def leaks(text: str | bytes) -> list[str]:
    """The secrets found in ``text``."""
    data = text.encode() if isinstance(text, str) else text
    return [secret for secret in SECRETS if secret.encode() in data]


def every_word_of(exc: BaseException) -> str:
    """All that can be shown of ``exc``: its words, its repr, its whole traceback."""
    return "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def client(session: aiohttp.ClientSession, base_url: str) -> DemandbaseClient:
    return DemandbaseClient(session, base_url, LegacyToken(TOKEN), timeout_seconds=TIMEOUT_SECONDS)


@pytest.mark.parametrize(
    ("mode", "error", "described"),
    [
        ("loop", RedirectError, "redirect to /import/v1/job not followed"),
        ("redirect", RedirectError, "redirect to https://elsewhere.example/import/v1/job"),
        ("truncated", TransientError, "ClientPayloadError POST http://127.0.0.1:"),
        ("bad_encoding", TransientError, "ClientPayloadError POST http://127.0.0.1:"),
        ("silent", TransientError, "TimeoutError POST http://127.0.0.1:"),
    ],
)
async def test_a_failed_exchange_names_class_method_url_and_status_only(
    session: aiohttp.ClientSession, mode: str, error: type[DemandbaseError], described: str
) -> None:
    async with hostile_demandbase([mode]) as hostile:
        with pytest.raises(error) as caught:
            await client(session, hostile.url).create_import_job("audience")

    assert hostile.authorizations == [f"Bearer {TOKEN}"]  # once: nothing was followed
    assert hostile.followed == 0
    assert described in str(caught.value)
    assert caught.value.endpoint == "import.create_job"
    assert caught.value.__cause__ is None
    assert leaks(every_word_of(caught.value)) == []


async def test_a_redirect_carries_its_status_and_location_without_the_query(
    session: aiohttp.ClientSession,
) -> None:
    async with hostile_demandbase(["redirect"]) as hostile:
        with pytest.raises(RedirectError) as caught:
            await client(session, hostile.url).create_import_job("audience")

    assert caught.value.status == 307
    assert caught.value.location == "https://elsewhere.example/import/v1/job"
    assert caught.value.retriable


async def test_the_signed_results_url_is_never_shown_when_its_download_fails(
    session: aiohttp.ClientSession,
) -> None:
    async with hostile_demandbase(["truncated", "loop"]) as hostile:
        dbclient = client(session, hostile.url)
        for expected in (TransientError, RedirectError):
            with pytest.raises(expected) as caught:
                await dbclient.read_export_accounts(f"/results/file.csv?{RESULTS_SIGNATURE}")
            assert "/results/file.csv" in str(caught.value) or expected is RedirectError
            assert leaks(every_word_of(caught.value)) == []

    assert hostile.authorizations == []  # the signed URL goes without a token


async def test_tls_to_a_plain_http_port_is_a_transient_error_without_secrets(
    session: aiohttp.ClientSession,
) -> None:
    async with hostile_demandbase(["loop"]) as hostile:
        with pytest.raises(TransientError) as caught:
            await client(session, hostile.tls_url).create_import_job("audience")

    assert hostile.tls_handshakes == 1
    assert f"POST https://127.0.0.1:{hostile.port}/import/v1/job" in str(caught.value)
    assert "SSL" in str(caught.value) or "Ssl" in str(caught.value)
    assert leaks(every_word_of(caught.value)) == []


async def test_a_connect_that_is_never_accepted_times_out_without_secrets(
    session: aiohttp.ClientSession,
) -> None:
    with unanswered_port() as url, pytest.raises(TransientError) as caught:
        await client(session, url).create_import_job("audience")

    assert "TimeoutError POST http://127.0.0.1:" in str(caught.value)
    assert leaks(every_word_of(caught.value)) == []


def test_the_one_description_keeps_class_method_url_and_status() -> None:
    info = aiohttp.RequestInfo(
        url=yarl.URL(f"https://h.example/import/v1/job?{SIGNATURE}"),
        method="POST",
        headers=CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {TOKEN}"})),
    )
    exc = aiohttp.TooManyRedirects(info, (), status=302, message=f"Found {TOKEN}")

    assert TOKEN in repr(exc)  # what the daemon once logged and stored
    assert describe_transport_error(exc) == (
        "TooManyRedirects POST https://h.example/import/v1/job status=302"
    )

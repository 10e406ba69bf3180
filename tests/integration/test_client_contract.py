"""The client's requests, and the emulator's answers to them, hold to Demandbase's definitions.

Every call the client makes is driven against the emulator with exchanges recorded,
along its success path and its error paths, in both auth modes; then every recorded
exchange is validated with tests/support/openapi.py: the client's request against the
operation it names, and the answer it was given against the declared response.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from dbsync.clock import SystemClock
from dbsync.demandbase.auth import ApiKeyTokenSource, LegacyToken
from dbsync.demandbase.client import DemandbaseClient
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.emulator import Emulator, EmulatorSettings, Faults, StatusStorm
from dbsync.demandbase.wire import Endpoint
from dbsync.errors import DemandbaseError
from tests.support.openapi import ContractViolation, validate_exchange

TOKEN = "emulator-token"
CLIENT_ID = "emulator-client"
CLIENT_SECRET = "emulator-secret"


def recording(**overrides: object) -> Emulator:
    return Emulator(
        EmulatorSettings(
            accounts=100,
            seed=7,
            job_delay_seconds=0.0,
            record_exchanges=True,
            token=TOKEN,
            client_id=CLIENT_ID,
            client_secret=CLIENT_SECRET,
            **overrides,  # type: ignore[arg-type]
        ),
        clock=SystemClock(),
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def violations(emulator: Emulator) -> list[str]:
    found = []
    for exchange in emulator.exchanges:
        try:
            validate_exchange(exchange)
        except ContractViolation as violation:
            found.append(str(violation))
    return found


async def refused(call: object) -> int:
    """Await ``call`` expecting a Demandbase error; its status."""
    with pytest.raises(DemandbaseError) as caught:
        await call  # type: ignore[misc]
    return caught.value.status


async def test_every_call_and_its_answers_validate(session: aiohttp.ClientSession) -> None:
    emulator = recording()
    async with emulator.serve() as base_url:
        auth = ApiKeyTokenSource(session, base_url, CLIENT_ID, CLIENT_SECRET, clock=SystemClock())
        client = DemandbaseClient(session, base_url, auth)
        accounts = list(emulator.tenant.accounts.page(0, 10))

        # The success path of every call.
        job = await client.create_import_job("Contract")
        await client.upload_import_data(job.id, encode_accounts(accounts), list_action="insert")
        done = await client.get_import_job(job.id)
        assert done.state == "completed"
        assert done.account_list_id is not None
        await client.list_import_jobs()
        await client.list_import_jobs(state="completed", page=1, per_page=5)
        second = await client.create_import_job("Contract")
        await client.upload_import_data(
            second.id, encode_accounts(accounts[:3]), list_action="delete"
        )
        export = await client.create_account_list_export("contract", done.account_list_id)
        status = await client.get_export_job(export.job_id)
        assert status.job_status == "finished"
        assert len(await client.read_export_accounts(status.results_url)) == 7

        # Error paths: 401 then a re-mint, 404 on both APIs, 400, 429 and a 5xx.
        emulator.set_faults(Faults(expire_tokens=True))
        await client.get_import_job(job.id)
        assert await refused(client.get_import_job(1)) == 404
        assert await refused(client.get_export_job("no-such-job")) == 404
        assert await refused(client.create_account_list_export("contract", 999)) == 400
        assert (
            await refused(
                client.upload_import_data(job.id, encode_accounts(accounts), list_action="insert")
            )
            == 400
        )
        emulator.set_faults(Faults(status_storm=StatusStorm(status=429, count=2)))
        assert await refused(client.create_import_job("Contract")) == 429
        assert await refused(client.get_export_job(export.job_id)) == 429
        emulator.set_faults(Faults(status_storm=StatusStorm(status=503, count=1)))
        assert await refused(client.list_import_jobs()) == 503
        emulator.set_faults(Faults())

        # Wrong client credentials, and a legacy token that is not the tenant's.
        wrong = ApiKeyTokenSource(session, base_url, CLIENT_ID, "wrong", clock=SystemClock())
        assert await refused(DemandbaseClient(session, base_url, wrong).list_import_jobs()) == 400
        stranger = DemandbaseClient(session, base_url, LegacyToken("stranger"))
        assert await refused(stranger.create_import_job("Contract")) == 401
        assert await refused(stranger.get_export_job(export.job_id)) == 401

    recorded = {(e.endpoint, e.status) for e in emulator.exchanges}
    assert {endpoint for endpoint, _ in recorded} == {
        Endpoint.AUTH_TOKEN,
        Endpoint.IMPORT_CREATE_JOB,
        Endpoint.IMPORT_UPLOAD,
        Endpoint.IMPORT_JOB_STATUS,
        Endpoint.IMPORT_JOB_LIST,
        Endpoint.EXPORT_CREATE_JOB,
        Endpoint.EXPORT_JOB_STATUS,
    }
    assert {status for _, status in recorded} == {200, 202, 400, 401, 404, 429, 503}
    assert violations(emulator) == []


@pytest.mark.parametrize("granted", ["import", "export"])
async def test_forbidden_calls_and_their_answers_validate(
    session: aiohttp.ClientSession, granted: str
) -> None:
    emulator = recording(permissions=frozenset({granted}))
    async with emulator.serve() as base_url:
        client = DemandbaseClient(session, base_url, LegacyToken(TOKEN))
        if granted == "export":
            assert await refused(client.create_import_job("Forbidden")) == 403
            assert await refused(client.list_import_jobs()) == 403
        else:
            assert await refused(client.create_account_list_export("forbidden", 1)) == 403
            assert await refused(client.get_export_job("any")) == 403

    assert [e.status for e in emulator.exchanges] == [403, 403]
    assert violations(emulator) == []

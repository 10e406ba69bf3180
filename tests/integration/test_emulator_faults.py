"""Faults set at run time through POST /_emulator/faults, and what each does to requests."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.emulator import EmulatorSettings, Faults, StatusStorm
from dbsync.testing import EmulatorApi, running_emulator, wait_until

SETTINGS = EmulatorSettings(accounts=100, job_delay_seconds=0.0)


async def test_a_storm_of_429s_then_recovery() -> None:
    async with running_emulator(SETTINGS) as api:
        answer = await api.set_faults({"status_storm": {"status": 429, "count": 3}})
        assert answer.status == 200
        assert answer.json()["status_storm"] == {"status": 429, "count": 3}

        first = await api.request("GET", "/import/v1/jobs")
        assert first.status == 429
        assert first.json()["errorCode"] == "429-100"
        assert (await api.control("faults"))["status_storm"] == {"status": 429, "count": 2}
        for path in ("/data/export/v1/jobs", "/import/v1/Account/sources"):
            assert (await api.request("GET", path)).status == 429
        assert (await api.request("GET", "/import/v1/jobs")).status == 200
        assert (await api.control("faults"))["status_storm"] is None

        stats = await api.control("stats")
        assert stats["throttled_by_kind"]["injected"] == 3
        assert stats["throttled_by_kind"]["daily"] == 0
        # Injected answers come before the request counts for any limit.
        assert stats["quota"]["endpoints"]["import.job_list"]["used"] == 1
        assert stats["quota"]["minute_requests"] == 1


async def test_a_storm_of_5xx_answers_with_each_apis_body_before_any_effect() -> None:
    async with running_emulator(SETTINGS) as api:
        api.emulator.set_faults(Faults(status_storm=StatusStorm(status=503, count=3)))
        created = await api.request(
            "POST", "/import/v1/job", json={"dataImportName": "x", "entityType": "Account"}
        )
        assert created.status == 503
        assert set(created.json()) == {"message"}
        assert api.emulator.tenant.import_jobs == []  # the job was never created
        exported = await api.request("GET", "/data/export/v1/jobs")
        assert exported.json()["errorCode"] == "503-100"
        minted = await api.request("POST", "/auth/v1/token", token=None, json={})
        assert minted.json()["errorCode"] == "503-100"
        assert (await api.control("stats"))["server_errors_injected"] == 3


async def test_reset_ratio_drops_the_connection_after_the_request_took_effect() -> None:
    async with running_emulator(SETTINGS) as api:
        await api.set_faults({"reset_ratio": 1.0})
        with pytest.raises(aiohttp.ClientConnectionError):
            await api.create_import_job("Orphan")
        # The worst case for a client: the job exists, the answer never came.
        assert [job.data_import_name for job in api.emulator.tenant.import_jobs] == ["Orphan"]
        assert (await api.control("stats"))["resets_injected"] == 1
        await api.set_faults({})
        assert await api.create_import_job("Answered")


async def reset_pattern(seed: int) -> list[bool]:
    settings = EmulatorSettings(accounts=10, seed=seed)
    async with running_emulator(settings) as api:
        await api.set_faults({"reset_ratio": 0.5})
        pattern = []
        for _ in range(20):
            try:
                await api.request("GET", "/import/v1/jobs")
            except aiohttp.ClientConnectionError:
                pattern.append(True)
            else:
                pattern.append(False)
        return pattern


async def test_reset_draws_are_seeded() -> None:
    pattern = await reset_pattern(seed=5)
    assert 3 <= sum(pattern) <= 17
    assert await reset_pattern(seed=5) == pattern


async def test_error_ratio_answers_random_server_errors() -> None:
    async with running_emulator(SETTINGS) as api:
        await api.set_faults({"error_ratio": 1.0, "error_status": 502})
        statuses = {(await api.request("GET", "/import/v1/jobs")).status for _ in range(5)}
        assert statuses == {502}
        await api.set_faults({"error_ratio": 0.0})
        assert (await api.request("GET", "/import/v1/jobs")).status == 200


async def test_latency_delays_every_demandbase_answer_but_not_the_control_routes() -> None:
    """Order, not durations: a control request sent after a delayed Demandbase request
    is answered first, and the Demandbase request is answered in the end."""
    async with running_emulator(SETTINGS) as api:
        await api.set_faults({"latency_ms": 1_000})
        delayed = asyncio.create_task(api.request("GET", "/import/v1/jobs"))
        # Answered by the emulator, now held back by the network's delay.
        await wait_until(lambda: api.emulator.stats()["answers_by_status"] == {"200": 1}, 30)
        stats = await api.control("stats")
        assert not delayed.done()
        assert stats["requests"] == 1
        assert (await delayed).status == 200


async def test_rejected_external_ids_make_an_upload_answer_400_naming_the_row() -> None:
    async with running_emulator(SETTINGS) as api:
        accounts = api.accounts(0, 4)
        await api.set_faults({"reject_external_ids": [accounts[2].external_id]})
        job_id = await api.create_import_job("Bisect me")
        refused = await api.upload(job_id, encode_accounts(accounts))
        assert refused.status == 400
        assert (
            refused.json()["message"]
            == f"row 3: account {accounts[2].external_id!r} cannot be imported"
        )
        # The halves without it go through, as a bisecting client would find.
        assert (await api.upload(job_id, encode_accounts(accounts[:2]))).status == 200


async def faults_answer(api: EmulatorApi, body: bytes) -> tuple[int, str]:
    answer = await api.request(
        "POST", "/_emulator/faults", token=None, data=body, content_type="application/json"
    )
    return answer.status, answer.json().get("message", "")


async def test_fault_changes_are_checked_and_replace_the_faults_in_force() -> None:
    async with running_emulator(SETTINGS) as api:
        status, message = await faults_answer(api, b'{"drop_ratio": 0.1, "storm": 3}')
        assert status == 400
        assert "storm" in message
        status, message = await faults_answer(api, b'{"drop_ratio": 1.5}')
        assert (status, "drop_ratio" in message) == (400, True)
        status, message = await faults_answer(api, b'{"status_storm": {"status": 404, "count": 1}}')
        assert (status, "status_storm" in message) == (400, True)
        assert (await faults_answer(api, b"{nope"))[0] == 400
        assert api.emulator.faults == Faults()  # refused changes change nothing

        await api.set_faults({"drop_ratio": 0.2, "latency_ms": 1})
        await api.set_faults({"job_fail_ratio": 0.5})  # replaces: the others are off again
        faults = await api.control("faults")
        assert (faults["drop_ratio"], faults["latency_ms"], faults["job_fail_ratio"]) == (0, 0, 0.5)
        assert api.emulator.faults == Faults(job_fail_ratio=0.5)

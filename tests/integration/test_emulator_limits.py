"""Limits answer 429 exactly at their thresholds, with the documented bodies, and reset.

Time is a FakeClock: a "day" or a "minute" passes when the test advances it.
"""

from __future__ import annotations

import math

import pytest

from dbsync.clock import FakeClock
from dbsync.demandbase.emulator import EmulatorSettings
from dbsync.testing import Answer, running_emulator

DAY = 3600.0


def assert_rate_limited(answer: Answer, code: str = "429-100") -> None:
    assert answer.status == 429
    body = answer.json()
    assert body["errorCode"] == code
    assert body["errorMessage"]
    assert body["diagnosticCode"]
    assert "Retry-After" not in answer.headers  # Demandbase documents none


async def until_next_window(clock: FakeClock, length: float) -> None:
    """Advance the clock to the start of the next epoch-aligned window."""
    await clock.advance((math.floor(clock.time() / length) + 1) * length - clock.time())


async def test_a_daily_quota_refuses_the_request_after_the_last_then_resets_at_the_day() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=10, day_seconds=DAY, import_list_per_day=5)
    async with running_emulator(settings, clock=clock) as api:
        for _ in range(5):
            assert (await api.request("GET", "/import/v1/jobs")).status == 200
        assert_rate_limited(await api.request("GET", "/import/v1/jobs"))
        # Refused requests spend nothing: the quota stays at its limit, not above.
        stats = api.emulator.stats()
        assert stats["quota"]["endpoints"]["import.job_list"] == {"used": 5, "limit": 5}
        assert stats["throttled_by_kind"]["daily"] == 1
        assert stats["throttled_by_endpoint"] == {"import.job_list": 1}
        # Other endpoints have their own quota.
        assert (await api.request("GET", "/import/v1/Account/sources")).status == 200

        day = stats["quota"]["day"]
        await clock.advance((day + 1) * DAY - clock.time() - 1.0)
        assert_rate_limited(await api.request("GET", "/import/v1/jobs"))  # a second early
        await clock.advance(1.0)
        assert (await api.request("GET", "/import/v1/jobs")).status == 200
        stats = api.emulator.stats()
        assert stats["quota"]["day"] == day + 1
        assert stats["quota"]["endpoints"]["import.job_list"]["used"] == 1


async def test_the_day_window_is_aligned_to_the_epoch_so_86400_resets_at_midnight_utc() -> None:
    midnight = 1_800_000_000.0 - 1_800_000_000.0 % 86_400
    clock = FakeClock(start=midnight - 10.0)
    settings = EmulatorSettings(accounts=10, export_list_per_day=1)
    async with running_emulator(settings, clock=clock) as api:
        assert (await api.request("GET", "/data/export/v1/jobs")).status == 200
        assert_rate_limited(await api.request("GET", "/data/export/v1/jobs"))
        await clock.advance(10.0)
        assert (await api.request("GET", "/data/export/v1/jobs")).status == 200
        assert api.emulator.stats()["quota"]["day_started_at"] == midnight


async def test_the_per_minute_rate_counts_every_request_and_resets_with_the_minute() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=10, requests_per_minute=3)
    async with running_emulator(settings, clock=clock) as api:
        await until_next_window(clock, 60.0)
        answers = [await api.request("GET", "/import/v1/jobs", token=t) for t in (None, "x", None)]
        assert [a.status for a in answers] == [401, 401, 401]  # they count all the same
        assert_rate_limited(await api.request("GET", "/import/v1/jobs"))
        assert_rate_limited(await api.request("GET", "/data/export/v1/jobs"))  # all routes
        assert api.emulator.stats()["throttled_by_kind"]["minute"] == 2
        # The control routes are never throttled and are not Demandbase traffic.
        for _ in range(5):
            assert (await api.request("GET", "/_emulator/stats", token=None)).status == 200

        await clock.advance(59.0)
        assert_rate_limited(await api.request("GET", "/import/v1/jobs"))
        await clock.advance(1.0)
        assert (await api.request("GET", "/import/v1/jobs")).status == 200
        stats = api.emulator.stats()
        assert stats["requests"] == 7
        assert stats["quota"]["minute_requests"] == 1


async def test_one_export_at_a_time_and_a_refused_export_spends_no_quota() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=50, job_delay_seconds=30.0, export_jobs_per_day=60)
    async with running_emulator(settings, clock=clock) as api:
        await api.import_accounts("Read me", api.accounts(0, 10))
        await clock.advance(30.0)
        first = await api.create_export(1)
        assert first.status == 202
        assert_rate_limited(await api.create_export(1), code="429-102")
        await clock.advance(15.0)  # processing now: still running
        assert_rate_limited(await api.create_export(1), code="429-102")

        stats = api.emulator.stats()
        assert stats["throttled_by_kind"]["concurrent"] == 2
        assert stats["throttled_by_kind"]["daily"] == 0
        assert stats["quota"]["endpoints"]["export.create_job"]["used"] == 1

        await clock.advance(15.0)  # finished
        assert (await api.create_export(1)).status == 202


async def test_import_uploads_are_refused_while_the_processing_cap_is_reached() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=50, job_delay_seconds=10.0, concurrent_import_jobs=2)
    async with running_emulator(settings, clock=clock) as api:
        for name in ("a", "b"):
            await api.import_accounts(name, api.accounts(0, 3))
        waiting = await api.create_import_job("c")  # creating is not processing
        file = b"Account Name,Account Domain\r\nAcme,acme.com\r\n"
        refused = await api.upload(waiting, file)
        assert_rate_limited(refused, code="429-102")
        assert refused.json()["errorMessage"] == "Max 2 jobs are allowed at a time"
        assert (await api.import_job(waiting))["state"] == "new"  # it may be retried
        quota = api.emulator.stats()["quota"]["endpoints"]["import.upload"]
        assert quota["used"] == 2

        await clock.advance(10.0)
        assert (await api.upload(waiting, file)).status == 200


async def test_the_daily_export_volume_refuses_new_exports_with_429_101() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=50, job_delay_seconds=0.0, export_bytes_per_day=100)
    async with running_emulator(settings, clock=clock) as api:
        await api.import_accounts("Big", api.accounts(0, 20))
        assert (await api.create_export(1)).status == 202
        await api.control("stats")  # the export finishes: its file is over 100 bytes
        assert_rate_limited(await api.create_export(1), code="429-101")
        assert api.emulator.stats()["throttled_by_kind"]["volume"] == 1
        await clock.advance(settings.day_seconds)
        assert (await api.create_export(1)).status == 202


@pytest.mark.parametrize("retry_after", [0, 7])
async def test_retry_after_appears_only_when_a_fault_asks_for_it(retry_after: int) -> None:
    settings = EmulatorSettings(accounts=10, import_list_per_day=0)
    async with running_emulator(settings) as api:
        assert "Retry-After" not in (await api.request("GET", "/import/v1/jobs")).headers
        assert (await api.set_faults({"retry_after_seconds": retry_after})).status == 200
        answer = await api.request("GET", "/import/v1/jobs")
        assert answer.status == 429
        assert answer.headers["Retry-After"] == str(retry_after)
        # Only 429s carry it.
        assert "Retry-After" not in (await api.request("GET", "/import/v1/job/1")).headers

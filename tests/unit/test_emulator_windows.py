"""Limit windows and fault draws, without HTTP."""

from __future__ import annotations

import msgspec

from dbsync.clock import FakeClock
from dbsync.demandbase.emulator import EmulatorSettings, Faults, StatusStorm
from dbsync.demandbase.emulator.faults import FaultState, Injection
from dbsync.demandbase.emulator.limits import Limits
from dbsync.demandbase.wire import Endpoint

DAY = 100.0


def limits(clock: FakeClock, **settings: object) -> Limits:
    base = EmulatorSettings(accounts=0, day_seconds=DAY, minute_seconds=10.0)
    return Limits(msgspec.structs.replace(base, **settings), clock)


async def test_a_reservation_given_back_in_its_day_is_refunded_and_not_after() -> None:
    clock = FakeClock(start=1_000.0)  # the start of day 10
    quota = limits(clock, export_jobs_per_day=2)
    first = quota.reserve(Endpoint.EXPORT_CREATE_JOB)
    assert first == 10
    second = quota.reserve(Endpoint.EXPORT_CREATE_JOB)
    assert second == 10
    assert quota.reserve(Endpoint.EXPORT_CREATE_JOB) is None
    quota.give_back(Endpoint.EXPORT_CREATE_JOB, second)
    assert quota.reserve(Endpoint.EXPORT_CREATE_JOB) == 10

    await clock.advance(DAY)
    assert quota.reserve(Endpoint.EXPORT_CREATE_JOB) == 11
    quota.give_back(Endpoint.EXPORT_CREATE_JOB, 10)  # yesterday's: nothing to refund today
    assert quota.use().endpoints["export.create_job"].used == 1
    assert quota.reserve(Endpoint.AUTH_TOKEN) == 11  # no daily quota


async def test_export_volume_counts_results_finished_in_the_day() -> None:
    clock = FakeClock(start=1_000.0)
    quota = limits(clock, export_bytes_per_day=100)
    quota.spend_export_bytes(999.0, 500)  # yesterday's export does not count today
    assert not quota.export_volume_spent()
    quota.spend_export_bytes(1_000.0, 60)
    assert not quota.export_volume_spent()
    quota.spend_export_bytes(1_050.0, 40)
    assert quota.export_volume_spent()
    await clock.advance(DAY)
    assert not quota.export_volume_spent()


async def test_the_minute_rate_counts_refused_requests_too() -> None:
    clock = FakeClock(start=1_000.0)
    rate = limits(clock, requests_per_minute=2)
    assert [rate.admit() for _ in range(4)] == [True, True, False, False]
    await clock.advance(9.9)
    assert not rate.admit()
    await clock.advance(0.1)
    assert rate.admit()
    assert rate.use().minute_requests == 1


def test_a_storm_answers_first_and_counts_down() -> None:
    faults = FaultState(Faults(status_storm=StatusStorm(status=429, count=2)), seed=0)
    assert [faults.draw() for _ in range(3)] == [
        (Injection.STATUS, 429),
        (Injection.STATUS, 429),
        (Injection.NONE, 0),
    ]
    assert faults.current.status_storm is None


def test_request_draws_are_the_same_for_a_seed_whatever_the_ratios() -> None:
    def fates(seed: int, faults: Faults) -> list[Injection]:
        state = FaultState(faults, seed)
        return [state.draw()[0] for _ in range(200)]

    resets = fates(1, Faults(reset_ratio=0.5))
    assert resets == fates(1, Faults(reset_ratio=0.5))
    assert 60 <= resets.count(Injection.RESET) <= 140
    # Turning errors on does not reshuffle which of the other requests are reset.
    mixed = fates(1, Faults(reset_ratio=0.5, error_ratio=0.3))
    assert Injection.STATUS in mixed
    assert all(m == r for r, m in zip(resets, mixed, strict=True) if m is not Injection.STATUS)


def test_drops_and_failures_are_fixed_per_job_and_seed() -> None:
    faults = FaultState(Faults(drop_ratio=0.5, job_fail_ratio=0.5), seed=3)
    assert faults.dropped(70_001, 50) == faults.dropped(70_001, 50)
    assert faults.dropped(70_001, 50) != faults.dropped(70_002, 50)
    assert [faults.import_fails(j) for j in range(40)] == [
        faults.import_fails(j) for j in range(40)
    ]
    assert 5 <= sum(faults.import_fails(j) for j in range(40)) <= 35
    assert FaultState(Faults(), seed=3).dropped(70_001, 5) == [False] * 5

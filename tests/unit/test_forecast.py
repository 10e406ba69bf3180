"""The backlog forecast, with numbers: days of backlog, spent quota, halved pace, shares."""

from __future__ import annotations

import math

import msgspec
import pytest

import dbsync.forecast as forecast_module
from dbsync.forecast import REQUESTS_PER_JOB, Capacity, Load, forecast, jobs_needed

DAY = 86_400.0
# Noon of day 100: the window is 100, twelve hours of it left.
NOON = 100 * DAY + DAY / 2


def capacity(**overrides: float) -> Capacity:
    fields: dict[str, float | None] = {
        "now": NOON,
        "day_seconds": DAY,
        "jobs_left_today": 1176,
        "jobs_per_day": 1176,
        "pace_per_minute": 1000.0,
        "job_slots": 10,
        "edge_seconds": 5.0,
    }
    fields.update(overrides)
    return Capacity(**fields)  # type: ignore[arg-type]


def load(audience: str = "a", *, inserts: int = 0, deletes: int = 0, **overrides: object) -> Load:
    fields: dict[str, object] = {
        "audience_id": audience,
        "inserts": inserts,
        "deletes": deletes,
        "oldest_changed_at": NOON - 3600,
        "rows_per_job": 10_000,
        "max_jobs_in_flight": 2,
        "job_seconds": 60.0,
    }
    fields.update(overrides)
    return Load(**fields)  # type: ignore[arg-type]


def test_jobs_count_inserts_and_deletes_apart() -> None:
    assert jobs_needed(load(inserts=10_001, deletes=1)) == 3
    assert jobs_needed(load(inserts=10_000)) == 1
    assert jobs_needed(load()) == 0


def test_nothing_pending_has_no_time() -> None:
    result = forecast(capacity(), [load()])
    assert result.jobs == 0
    assert result.eta is None
    assert result.audiences[0].eta is None


def test_one_job_is_done_a_job_duration_from_now() -> None:
    result = forecast(capacity(), [load(inserts=500)])
    assert result.audiences[0].jobs == 1
    assert result.eta == pytest.approx(NOON + 60.0)
    assert result.window == 100


def test_several_days_of_backlog_end_in_the_window_the_quota_reaches() -> None:
    # 40 jobs a day, 10 of them left today; 100 jobs: 10 today, 40 on day 101,
    # 40 on day 102, the last 10 on day 103.
    cap = capacity(jobs_left_today=10, jobs_per_day=40)
    result = forecast(cap, [load(inserts=100 * 10_000)])
    assert result.audiences[0].jobs == 100
    assert result.window == 103
    # The last ten start at the beginning of day 103, two slots, 60 s each.
    assert result.eta is not None
    assert 103 * DAY < result.eta < 103 * DAY + 10 * 60.0


def test_exhausted_quota_today_waits_for_the_next_window() -> None:
    cap = capacity(jobs_left_today=0)
    result = forecast(cap, [load(inserts=1)], starts_wanted=1)
    a = result.audiences[0]
    assert a.starts == (101 * DAY,)
    assert a.eta == pytest.approx(101 * DAY + 60.0)
    assert a.window == 101


def test_no_job_starts_in_the_edge_of_a_window() -> None:
    now = 101 * DAY - 3.0  # inside the last 5 s
    result = forecast(capacity(now=now), [load(inserts=1)], starts_wanted=1)
    assert result.audiences[0].starts == (101 * DAY,)


def test_halved_pace_doubles_a_pace_bound_backlog() -> None:
    # Jobs of 1 s with 10 slots: the pace bounds the rate, at pace / 60 / 4 jobs a second.
    jobs = 200
    fast = forecast(
        capacity(pace_per_minute=240.0),
        [load(inserts=jobs * 10_000, job_seconds=1.0, max_jobs_in_flight=10)],
    )
    slow = forecast(
        capacity(pace_per_minute=120.0),
        [load(inserts=jobs * 10_000, job_seconds=1.0, max_jobs_in_flight=10)],
    )
    assert fast.eta is not None
    assert slow.eta is not None
    per_second = 240.0 / 60.0 / REQUESTS_PER_JOB
    assert fast.eta - NOON == pytest.approx((jobs - 1) / per_second + 1.0)
    assert slow.eta - NOON == pytest.approx(2 * (jobs - 1) / per_second + 1.0)


def test_a_halved_pace_climbs_back_as_the_budget_recovers_it() -> None:
    # Pace-bound as above, halved from 240 to 120, 24 a minute back every minute: the
    # time lies between the halved pace kept and the full pace, nearer the full one.
    loads = [load(inserts=400 * 10_000, job_seconds=1.0, max_jobs_in_flight=10)]
    full = forecast(capacity(pace_per_minute=240.0), loads)
    kept = forecast(capacity(pace_per_minute=120.0), loads)
    recovering = forecast(
        capacity(
            pace_per_minute=120.0,
            pace_limit_per_minute=240.0,
            pace_recovery_step=24.0,
            pace_recovery_seconds=60.0,
        ),
        loads,
    )
    assert full.eta is not None
    assert kept.eta is not None
    assert recovering.eta is not None
    assert full.eta < recovering.eta < kept.eta
    # Back to 240 after 5 minutes: 5 minutes at the climbing pace lose under 2.5 of them.
    assert recovering.eta - full.eta < 150.0


def test_job_slots_bound_a_slot_bound_backlog() -> None:
    # Two jobs in flight, 60 s each, starts a pace gap (4 requests at 1000 a minute) apart.
    gap = 60.0 * REQUESTS_PER_JOB / 1000.0
    result = forecast(capacity(), [load(inserts=10 * 10_000)], starts_wanted=3)
    a = result.audiences[0]
    assert a.starts == pytest.approx((NOON, NOON + gap, NOON + 60.0))
    # Five rounds of two: the last starts a gap after the fifth round began.
    assert a.eta == pytest.approx(NOON + 4 * 60.0 + gap + 60.0)


def test_many_audiences_share_the_budget_by_turns() -> None:
    # 30 audiences of 2 jobs each under 20 jobs a day, all of today's left. Turns: the
    # first round (one job each, oldest first) takes today's 20 and tomorrow's first
    # 10; the second round starts with the oldest: a00-a09 end tomorrow, the other 20
    # the day after, not the oldest ten today as "oldest backlog first" would have it.
    loads = [
        load(f"a{i:02d}", inserts=20_000, oldest_changed_at=NOON - 1000 + i) for i in range(30)
    ]
    result = forecast(capacity(jobs_left_today=20, jobs_per_day=20), loads)
    windows = [a.window for a in result.audiences]
    assert windows == [101] * 10 + [102] * 20
    assert result.jobs == 60
    assert result.window == 102
    # The order is the backlog's age, not the order given.
    reverse = forecast(capacity(jobs_left_today=20, jobs_per_day=20), loads[::-1])
    assert reverse.of("a00") == result.of("a00")
    assert reverse.eta == result.eta


def test_a_held_audience_has_no_time_and_takes_no_share() -> None:
    loads = [
        load("old", inserts=20 * 10_000, oldest_changed_at=NOON - 5000, held=True),
        load("young", inserts=10_000),
    ]
    result = forecast(capacity(jobs_left_today=1, jobs_per_day=1), loads)
    old = result.of("old")
    assert old is not None
    assert old.held
    assert old.eta is None
    assert old.jobs == 20
    young = result.of("young")
    assert young is not None
    assert young.window == 100


def test_a_small_backlog_waits_for_its_age() -> None:
    result = forecast(
        capacity(),
        [load(inserts=5, oldest_changed_at=NOON - 10, max_age_seconds=60.0)],
        starts_wanted=1,
    )
    assert result.audiences[0].starts == (NOON + 50.0,)


def test_jobs_in_flight_finish_a_job_duration_from_now() -> None:
    result = forecast(capacity(), [load(in_flight=300)])
    assert result.audiences[0].jobs == 0
    assert result.eta == pytest.approx(NOON + 60.0)


def test_jobs_in_flight_hold_their_slots() -> None:
    # Two slots for the audience, both held by jobs running now: the next one starts
    # when the first of them is done, a job's duration from now.
    result = forecast(
        capacity(),
        [load(inserts=1, in_flight=600, jobs_in_flight=2, oldest_changed_at=NOON - 100)],
        starts_wanted=1,
    )
    assert result.audiences[0].starts == (NOON + 60.0,)
    assert result.eta == pytest.approx(NOON + 120.0)


def test_no_quota_at_all_has_no_time() -> None:
    result = forecast(capacity(jobs_left_today=0, jobs_per_day=0), [load(inserts=1)])
    assert result.audiences[0].eta is None
    assert result.jobs == 1


def test_a_week_of_backlog_at_the_real_quotas() -> None:
    # 1,000 audiences of 70,000 accounts: 7 jobs each, 7,000 jobs; 1,176 a day.
    loads = [
        load(f"a{i:04d}", inserts=70_000, oldest_changed_at=NOON - 10_000 + i) for i in range(1000)
    ]
    result = forecast(capacity(jobs_left_today=1176, jobs_per_day=1176), loads)
    assert result.jobs == 7000
    # Today's twelve hours at 10 slots of 60 s start 7,199 jobs' worth of time, but the
    # quota allows 1,176: 1,176 today, then 5,824 / 1,176 = 4.95 more days.
    assert result.window == 100 + math.ceil((7000 - 1176) / 1176)


def test_younger_audiences_fill_the_slots_an_older_one_cannot_use() -> None:
    # 10 slots, 2 per audience, 60 s jobs: five audiences of 2 jobs run at once.
    loads = [load(f"a{i}", inserts=20_000, oldest_changed_at=NOON - 100 + i) for i in range(5)]
    together = forecast(capacity(), loads)
    alone = forecast(capacity(), loads[:1])
    assert together.eta is not None
    assert alone.eta is not None
    gap = 60.0 * REQUESTS_PER_JOB / 1000.0
    # All ten jobs start one pace gap apart, each done 60 s later.
    assert together.eta - NOON == pytest.approx(9 * gap + 60.0)
    assert alone.eta - NOON == pytest.approx(gap + 60.0)
    # The oldest backlog's jobs start first.
    assert [a.audience_id for a in sorted(together.audiences, key=lambda a: a.eta or 0)] == [
        f"a{i}" for i in range(5)
    ]


def test_jobs_beyond_the_simulated_depth_are_counted_in_whole_windows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3,000 jobs of 30 audiences at 40 a day: simulated whole, then with only the first
    # 100 simulated and the rest counted 40 a window. The same windows, +-1.
    loads = [
        load(f"a{i:02d}", inserts=100 * 10_000, oldest_changed_at=NOON - 1000 + i)
        for i in range(30)
    ]
    cap = capacity(jobs_left_today=40, jobs_per_day=40)
    whole = forecast(cap, loads)
    monkeypatch.setattr(forecast_module, "MAX_SIMULATED_JOBS", 100)
    shallow = forecast(cap, loads)
    assert whole.window == shallow.window == 100 + math.ceil(3000 / 40) - 1
    for deep, counted in zip(whole.audiences, shallow.audiences, strict=True):
        assert deep.window is not None
        assert counted.window is not None
        assert abs(deep.window - counted.window) <= 1, (deep, counted)


def test_an_audience_that_just_had_its_turn_waits_behind_one_that_did_not() -> None:
    # One job slot, one job a day left today: "old" has the older backlog, but the
    # budget granted it a slot a moment ago; "new" has waited since before that.
    loads = [
        load("old", inserts=10_000, oldest_changed_at=NOON - 500, last_turn=NOON - 10),
        load("new", inserts=10_000, oldest_changed_at=NOON - 100),
    ]
    result = forecast(capacity(jobs_left_today=1, jobs_per_day=1), loads)
    assert (result.of("new").window, result.of("old").window) == (100, 101)  # type: ignore[union-attr]
    # Without the turn, the older backlog goes first.
    plain = [msgspec.structs.replace(loads[0], last_turn=None), loads[1]]
    result = forecast(capacity(jobs_left_today=1, jobs_per_day=1), plain)
    assert (result.of("old").window, result.of("new").window) == (100, 101)  # type: ignore[union-attr]

"""Many lists per export job, planned: the row cap, the groups, the predictions. Pure.

Demandbase's real limits: 60 export jobs a day; 1,000 audiences of 10,000 members (the
issue's full size) are to be read back within one day.
"""

from __future__ import annotations

import math

from dbsync.config import ReconcileSettings
from dbsync.model import ReconcileFacts
from dbsync.reconcile import multi
from dbsync.reconcile.schedule import predict_next

DAY = 60.0  # one-minute emulated days, as in bench.multi_readback
JOBS_PER_DAY = 60
AUDIENCES = 1_000
MEMBERS = 10_000
BYTES_PER_ROW = 65.0
TEN_GB = 10 * 1000**3
SETTINGS = ReconcileSettings(
    interval_seconds=DAY, verify_within_hours=DAY / 3_600.0, visibility_lag_seconds=0.0
)


def facts(count: int, *, started_at: float | None = None) -> list[ReconcileFacts]:
    return [
        ReconcileFacts(
            audience_id=f"aud-{i:05d}",
            list_id=i + 1,
            first_acked_at=0.0,
            last_started_at=started_at,
            last_completed_at=None,
        )
        for i in range(count)
    ]


def rows(audience_id: str) -> int:
    return MEMBERS


def plan_day(order: list[ReconcileFacts], max_rows: int) -> list[list[ReconcileFacts]]:
    """The jobs the planner makes of ``order``, each group taken off the front."""
    jobs = []
    left = TEN_GB
    while order:
        group, left = multi.choose_group(
            order, rows, bytes_per_row=BYTES_PER_ROW, bytes_left=left, max_rows=max_rows
        )
        assert left >= 0
        jobs.append(group)
        order = order[len(group) :]
    return jobs


def test_the_full_size_is_spread_over_half_the_days_jobs() -> None:
    cap = multi.row_cap(AUDIENCES * MEMBERS, JOBS_PER_DAY)
    assert cap == math.ceil(10_000_000 / 30) == 333_334

    jobs = plan_day(facts(AUDIENCES), cap)

    # 33 lists of 10,000 rows fit under the cap, 34 do not: 31 jobs, the last of 10.
    assert [len(group) for group in jobs] == [33] * 30 + [10]
    assert len(jobs) <= JOBS_PER_DAY
    assert all(len(group) * MEMBERS <= cap for group in jobs)
    # Every audience once, in turn order.
    assert [f.audience_id for group in jobs for f in group] == [
        f"aud-{i:05d}" for i in range(AUDIENCES)
    ]


def test_a_small_population_is_not_split_below_the_floor() -> None:
    # 20 audiences of 1,000: 20,000 rows, under MIN_ROWS_PER_EXPORT: one job.
    cap = multi.row_cap(20 * 1_000, JOBS_PER_DAY)
    assert cap == multi.MIN_ROWS_PER_EXPORT
    group, _ = multi.choose_group(
        facts(20), lambda _: 1_000, bytes_per_row=BYTES_PER_ROW, bytes_left=TEN_GB, max_rows=cap
    )
    assert len(group) == 20


def test_a_list_larger_than_the_cap_still_goes_alone() -> None:
    group, left = multi.choose_group(
        facts(3), lambda _: 500_000, bytes_per_row=1.0, bytes_left=TEN_GB, max_rows=100_000
    )
    assert [f.audience_id for f in group] == ["aud-00000"]
    assert left == TEN_GB - 500_000


def test_the_volume_left_ends_a_group_and_says_when_not_even_one_list_fits() -> None:
    one_list = int(MEMBERS * BYTES_PER_ROW)  # 650,000 bytes
    group, left = multi.choose_group(
        facts(10), rows, bytes_per_row=BYTES_PER_ROW, bytes_left=3 * one_list + 1, max_rows=10**9
    )
    assert (len(group), left) == (3, 1)
    group, left = multi.choose_group(
        facts(10), rows, bytes_per_row=BYTES_PER_ROW, bytes_left=one_list - 1, max_rows=10**9
    )
    assert (len(group), left) == (1, -1)  # the caller waits for tomorrow's volume


def test_the_prediction_follows_the_planned_jobs_not_one_list_per_job() -> None:
    # All 1,000 due at 0; a job every second (60 a day over 60 s). One list per job
    # would predict the 1,000th audience 999 jobs later, 16 days on.
    cap = multi.row_cap(AUDIENCES * MEMBERS, JOBS_PER_DAY)
    every = multi.gap(DAY, JOBS_PER_DAY)
    predicted = predict_next(
        facts(AUDIENCES),
        multi.settings_within(SETTINGS, every),
        first_start=0.0,
        room_today=JOBS_PER_DAY,
        per_day=JOBS_PER_DAY,
        window_ends_at=DAY,
        day_seconds=DAY,
        job_seconds=every,
        rows=rows,
        max_rows=cap,
    )
    assert every == 1.0
    assert len(predicted) == AUDIENCES
    assert predicted["aud-00000"] == predicted["aud-00032"] == 0.0  # the first job: 33
    assert predicted["aud-00033"] == 1.0
    assert predicted["aud-00999"] == 30.0  # the 31st job: within the day
    assert max(predicted.values()) < DAY


def test_the_prediction_waits_for_tomorrow_when_todays_jobs_are_spent() -> None:
    cap = multi.row_cap(AUDIENCES * MEMBERS, JOBS_PER_DAY)
    predicted = predict_next(
        facts(AUDIENCES),
        SETTINGS,
        first_start=10.0,
        room_today=5,  # 5 jobs left today: 165 audiences
        per_day=JOBS_PER_DAY,
        window_ends_at=DAY,
        day_seconds=DAY,
        job_seconds=1.0,
        rows=rows,
        max_rows=cap,
    )
    assert predicted["aud-00164"] == 14.0
    assert predicted["aud-00165"] == DAY  # the 6th job: when the next day starts
    assert predicted["aud-00999"] == DAY + 25.0


def test_an_audience_is_predicted_at_the_first_job_after_it_falls_due() -> None:
    # Read back at 0 (interval 60 s, shortened to 58 s for a 60 s window and 1 s gaps):
    # due at 58; the next job after is at 58.
    settings = multi.settings_within(SETTINGS, 1.0)
    assert settings.interval_seconds == 58.0
    predicted = predict_next(
        facts(2, started_at=0.0),
        settings,
        first_start=1.0,
        room_today=JOBS_PER_DAY,
        per_day=JOBS_PER_DAY,
        window_ends_at=DAY,
        day_seconds=DAY,
        job_seconds=1.0,
        rows=rows,
        max_rows=10**6,
    )
    assert predicted == {"aud-00000": 58.0, "aud-00001": 58.0}


def test_the_volume_count_rolls_with_the_window_and_loads_what_the_store_kept() -> None:
    volume = multi.ExportVolume(1_000)
    volume.load(7, 600)  # at a start: window 7 had 600 bytes charged
    assert volume.left(7, 0.0) == 400
    volume.charge(7, 500)
    assert (volume.used, volume.left(7, 0.0)) == (1_100, -100)
    assert volume.left(7, 0.1) == -200  # less the safety margin
    assert (volume.left(8, 0.0), volume.used) == (1_000, 0)  # a new day
    volume.learn(6_500, 100)
    assert volume.estimate(10_000) == 650_000

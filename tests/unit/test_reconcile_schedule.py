"""The read-back scheduling arithmetic: when an audience is due, whose turn it is, and when."""

from __future__ import annotations

from pathlib import Path

import pytest

from dbsync.config import ReconcileSettings, decode_config
from dbsync.contract.record import ContractRecord, Verdict, a5_holds, write_record
from dbsync.errors import ConfigError
from dbsync.model import LossTally, ReconcileFacts
from dbsync.reconcile import (
    ReconcilePlan,
    days_to_reconcile_all,
    due_at,
    estimate_losses,
    predict_next,
    turn_order,
)

SETTINGS = ReconcileSettings(visibility_lag_seconds=100.0, interval_seconds=1000.0)


def facts(
    audience_id: str,
    *,
    list_id: int | None = 1,
    first_acked_at: float | None = 0.0,
    last_started_at: float | None = None,
) -> ReconcileFacts:
    return ReconcileFacts(
        audience_id=audience_id,
        list_id=list_id,
        first_acked_at=first_acked_at,
        last_started_at=last_started_at,
        last_completed_at=last_started_at,
    )


@pytest.mark.parametrize(
    ("audiences", "per_day", "days"),
    [(0, 60, 0), (1, 60, 1), (60, 60, 1), (61, 60, 2), (150, 60, 3), (6, 2, 3), (5, 0, 5)],
)
def test_days_to_reconcile_all(audiences: int, per_day: int, days: int) -> None:
    assert days_to_reconcile_all(audiences, per_day) == days


def test_due_waits_for_a_list_and_for_the_first_acknowledgment_to_age() -> None:
    assert due_at(facts("a", list_id=None), SETTINGS) is None
    assert due_at(facts("a", first_acked_at=None), SETTINGS) is None
    assert due_at(facts("a", first_acked_at=50.0), SETTINGS) == 150.0  # + the lag
    assert due_at(facts("a", last_started_at=500.0), SETTINGS) == 1500.0  # + the interval


def test_the_turn_goes_to_the_never_read_then_to_the_longest_ago() -> None:
    candidates = [
        facts("recent", last_started_at=0.0),
        facts("old", last_started_at=-5000.0),
        facts("never-b"),
        facts("never-a"),
        facts("not-due", last_started_at=900.0),
        facts("no-list", list_id=None),
    ]
    order = turn_order(candidates, SETTINGS, now=1000.0)
    assert [f.audience_id for f in order] == ["never-a", "never-b", "old", "recent"]


def test_prediction_spreads_turns_over_the_days_the_quota_allows() -> None:
    """Six audiences due now, 2 exports a day, 1 left today (day ends at 100, lasts 100)."""
    candidates = [facts(f"a{i}", last_started_at=-10_000.0 + i) for i in range(6)]
    predicted = predict_next(
        candidates,
        SETTINGS,
        first_start=50.0,
        room_today=1,
        per_day=2,
        window_ends_at=100.0,
        day_seconds=100.0,
        job_seconds=1.0,
    )
    assert predicted == {
        "a0": 50.0,
        "a1": 100.0,
        "a2": 101.0,
        "a3": 200.0,
        "a4": 201.0,
        "a5": 300.0,
    }
    assert max(predicted.values()) < 100.0 + 100.0 * days_to_reconcile_all(6 - 1, 2)


def test_prediction_waits_for_an_audience_to_be_due() -> None:
    candidates = [facts("soon", first_acked_at=400.0), facts("unknown", list_id=None)]
    predicted = predict_next(
        candidates,
        SETTINGS,
        first_start=0.0,
        room_today=5,
        per_day=5,
        window_ends_at=10_000.0,
        day_seconds=10_000.0,
    )
    assert predicted == {"soon": 500.0}


def test_loss_estimate_per_thousand_judged_throttled_or_not() -> None:
    tallies = [
        LossTally(throttled=False, batches=10, acknowledged=1000, verified=990, lost=0),
        LossTally(throttled=True, batches=2, acknowledged=200, verified=150, lost=10),
    ]
    estimate = estimate_losses("d", 0.0, tallies)
    assert estimate.unthrottled.lost_per_thousand == 0.0
    assert estimate.throttled.lost_per_thousand == pytest.approx(1000 * 10 / 160, abs=0.001)
    assert (estimate.overall.judged, estimate.overall.lost) == (1150, 10)
    assert estimate.overall.acknowledged == 1200
    assert estimate_losses("d", 0.0, []).overall.lost_per_thousand is None


def test_reconcile_settings_validate_the_poll_waits() -> None:
    text = (
        '[[destinations]]\nname = "d"\n[destinations.credentials]\ntoken = { file = "t" }\n'
        "[destinations.reconcile]\nexport_poll_initial_seconds = 10\n"
    )
    with pytest.raises(ConfigError, match="export_poll_max_seconds") as caught:
        decode_config((text + "export_poll_max_seconds = 5\n").encode(), base_dir=Path("/"))
    assert caught.value.key == "destinations[0].reconcile"
    with pytest.raises(ConfigError, match="repair_limit"):
        decode_config((text + "repair_limit = -1\n").encode(), base_dir=Path("/"))
    config = decode_config((text + "scheduled = false\n").encode(), base_dir=Path("/"))
    settings = config.destinations[0].reconcile
    assert (settings.scheduled, settings.repair_limit) == (False, 3)
    assert settings.export_poll_max_seconds == 1800.0


@pytest.mark.parametrize(
    ("mode", "probed", "multi"),
    [
        ("auto", None, False),
        ("auto", "holds", True),
        ("auto", "differs", False),
        ("yes", None, True),
        ("no", "holds", False),
    ],
)
def test_multi_list_exports_follow_the_setting_or_the_probe(
    tmp_path: Path, mode: str, probed: str | None, multi: bool
) -> None:
    """``multi_list_exports``: ``auto`` follows the A5 verdict of the destination's last
    probe in ``<state_dir>/contract.json`` (none: one list per job)."""
    text = (
        '[[destinations]]\nname = "d"\n[destinations.credentials]\ntoken = { file = "t" }\n'
        f'[destinations.reconcile]\nmulti_list_exports = "{mode}"\n'
    )
    [destination] = decode_config(text.encode(), base_dir=Path("/")).destinations
    if probed is not None:
        verdict = Verdict(check="A5", outcome=probed, finding="", action="")
        record = ContractRecord(
            destination="d",
            probed_at=0.0,
            state="holds",
            list_name="",
            verdicts=[verdict],
            spent={},
        )
        write_record(tmp_path, record)
    plan = ReconcilePlan.from_config(destination, a5_holds=a5_holds(tmp_path, "d"))
    assert plan.multi_list is multi
    assert plan.export_bytes_per_day == 10_000_000_000

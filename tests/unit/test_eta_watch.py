"""backlog_eta_exceeded once per crossing, backlog_eta_recovered once when it falls back."""

from __future__ import annotations

import logging

import pytest

from dbsync.summaries import EtaWatch

NOW = 1_000_000.0
HOUR = 3600.0


def events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.getMessage(), getattr(r, "audience", ""))
        for r in caplog.records
        if r.getMessage().startswith("backlog_eta_")
    ]


def test_one_warning_per_crossing_and_one_recovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dbsync.summaries")
    watch = EtaWatch()

    def observe(audience: str, eta_hours: float | None, *, jobs: int = 5) -> None:
        eta = NOW + eta_hours * HOUR if eta_hours is not None else None
        watch.observe(audience, "d", eta, jobs=jobs, held=False, now=NOW, warn_hours=24.0)

    observe("a", 2.0)
    observe("a", 30.0)
    observe("a", 40.0)  # still over: nothing new
    observe("b", 25.0)
    observe("a", 23.0)
    observe("a", 22.0)  # still under: nothing new
    observe("a", None, jobs=0)  # nothing pending
    observe("b", None)  # beyond the simulation: still over, nothing new
    assert events(caplog) == [
        ("backlog_eta_exceeded", "a"),
        ("backlog_eta_exceeded", "b"),
        ("backlog_eta_recovered", "a"),
    ]
    exceeded = next(r for r in caplog.records if r.getMessage() == "backlog_eta_exceeded")
    assert exceeded.backlog_eta_hours == 30.0  # type: ignore[attr-defined]
    assert exceeded.warn_hours == 24.0  # type: ignore[attr-defined]


def test_a_held_audience_is_not_judged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dbsync.summaries")
    watch = EtaWatch()
    watch.observe("a", "d", None, jobs=50, held=True, now=NOW, warn_hours=1.0)
    assert events(caplog) == []


def test_an_audience_gone_starts_afresh(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dbsync.summaries")
    watch = EtaWatch()
    watch.observe("a", "d", NOW + 10 * HOUR, jobs=1, held=False, now=NOW, warn_hours=1.0)
    watch.forget([])
    watch.observe("a", "d", NOW + 10 * HOUR, jobs=1, held=False, now=NOW, warn_hours=1.0)
    assert events(caplog) == [("backlog_eta_exceeded", "a"), ("backlog_eta_exceeded", "a")]

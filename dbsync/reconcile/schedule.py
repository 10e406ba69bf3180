"""Read-back scheduling: when each audience's turn comes, within the export quota. Pure.

Demandbase allows about 60 export jobs a day per tenant, one at a time. An audience
is due ``interval_seconds`` after its last read-back started, or, never read back,
once its first acknowledged job is older than the visibility lag; among the due ones
the one read back longest ago goes first, so with more audiences than exports a day
they take turns and each is read back within :func:`days_to_reconcile_all` days.
:func:`predict_next` says when each one's next read-back should start, for
``dbsync ctl status``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from dbsync.config import ReconcileSettings
from dbsync.model import ReconcileFacts

__all__ = ["days_to_reconcile_all", "due_at", "predict_next", "priority", "turn_order"]


def days_to_reconcile_all(audiences: int, exports_per_day: int) -> int:
    """Whole quota days within which every one of ``audiences`` is read back once."""
    if audiences <= 0:
        return 0
    return math.ceil(audiences / max(1, exports_per_day))


def due_at(facts: ReconcileFacts, settings: ReconcileSettings) -> float | None:
    """When the audience's next read-back is due; None while one is impossible or pointless.

    Impossible without a list id; pointless before anything was acknowledged. Never
    read back: once its first acknowledgment is older than the visibility lag. Else
    ``interval_seconds`` after its last attempt started.
    """
    if facts.list_id is None or facts.first_acked_at is None:
        return None
    if facts.last_started_at is None:
        return facts.first_acked_at + settings.visibility_lag_seconds
    return facts.last_started_at + settings.interval_seconds


def priority(facts: ReconcileFacts) -> tuple[float, str]:
    """Sort key of turns: never read back first, then the one read back longest ago;
    ties by id."""
    last = facts.last_started_at
    return (-math.inf if last is None else last, facts.audience_id)


def turn_order(
    facts: Iterable[ReconcileFacts], settings: ReconcileSettings, now: float
) -> list[ReconcileFacts]:
    """The audiences due by ``now``, the one whose turn it is first."""
    due = [f for f in facts if (at := due_at(f, settings)) is not None and at <= now]
    return sorted(due, key=priority)


def predict_next(
    facts: Iterable[ReconcileFacts],
    settings: ReconcileSettings,
    *,
    first_start: float,
    room_today: int,
    per_day: int,
    window_ends_at: float,
    day_seconds: float,
    job_seconds: float = 0.0,
    rows: Callable[[str], int] | None = None,
    max_rows: int = 0,
) -> dict[str, float]:
    """When each audience's next read-back should start, given the quota and the turns.

    The first export job can start at ``first_start``, each next one ``job_seconds``
    later; today has ``room_today`` jobs left until ``window_ends_at``, each later day
    ``per_day``. Whenever a job can start, the due audience whose turn it is goes
    (:func:`turn_order`); with multi-list exports (``rows``, each audience's estimated
    rows, and ``max_rows``), the due audiences after it join the same job in turn order
    up to ``max_rows``. A lower bound: the volume, failures and a busy tenant only
    delay it.
    """
    waiting = {f.audience_id: f for f in facts if due_at(f, settings) is not None}
    due = {key: due_at(f, settings) or 0.0 for key, f in waiting.items()}
    predicted: dict[str, float] = {}
    at, left, window_end = first_start, room_today, window_ends_at
    per_day = max(1, per_day)
    while waiting:
        if left <= 0:
            at, left = max(at, window_end), per_day
        while at >= window_end:
            window_end += day_seconds
            left = per_day
        ready = [f for key, f in waiting.items() if due[key] <= at]
        if not ready:
            at = min(due.values())
            continue
        taken, joined = 0, 0  # this job's rows and audiences; the first always goes
        for turn in sorted(ready, key=priority):
            n = rows(turn.audience_id) if rows is not None else 0
            if joined and (rows is None or taken + n > max_rows):
                break
            taken, joined = taken + n, joined + 1
            predicted[turn.audience_id] = at
            del waiting[turn.audience_id], due[turn.audience_id]
        left -= 1
        at += job_seconds
    return predicted

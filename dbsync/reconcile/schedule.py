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
from collections.abc import Iterable

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
    now: float,
    room_today: int,
    per_day: int,
    window_ends_at: float,
    day_seconds: float,
    export_seconds: float = 0.0,
) -> dict[str, float]:
    """When each audience's next read-back should start, given the quota and the turns.

    Today has ``room_today`` exports left until ``window_ends_at``; each later day has
    ``per_day``. Read-backs run one after another, ``export_seconds`` each; whenever one
    can start, the due audience whose turn it is goes (:func:`turn_order`). A
    lower bound: failures and a busy tenant only delay it.
    """
    waiting = {f.audience_id: f for f in facts if due_at(f, settings) is not None}
    due = {key: due_at(f, settings) or 0.0 for key, f in waiting.items()}
    predicted: dict[str, float] = {}
    at, left, window_end = now, room_today, window_ends_at
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
        turn = min(ready, key=priority)
        predicted[turn.audience_id] = at
        del waiting[turn.audience_id], due[turn.audience_id]
        left -= 1
        at += export_seconds
    return predicted

"""Retry waits: capped exponential with full jitter; a 429 waits at most 60 s."""

from __future__ import annotations

import random

from dbsync.actor import backoff_seconds


def test_waits_double_from_a_second_up_to_five_minutes() -> None:
    rng = random.Random(5)
    for attempt, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (8, 16)]):
        assert low <= backoff_seconds(rng, attempt) <= high
    assert all(150 <= backoff_seconds(rng, attempt) <= 300 for attempt in range(9, 40))


def test_a_throttled_call_waits_at_most_a_minute() -> None:
    """Demandbase's per-minute window has turned by then; waiting minutes more after a
    long 429 storm would only stall delivery (the pace already slowed down)."""
    rng = random.Random(5)
    assert all(
        30 <= backoff_seconds(rng, attempt, throttled=True) <= 60 for attempt in range(6, 40)
    )

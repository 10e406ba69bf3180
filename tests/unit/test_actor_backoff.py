"""The actor's retry waits: capped exponential with full jitter; a 429 waits at most 60 s."""

from __future__ import annotations

import random
from typing import Any

from dbsync.actor import ActorSettings, AudienceActor
from dbsync.clock import FakeClock


def actor() -> AudienceActor:
    settings = ActorSettings(audience_id="a", destination="d", name="A", list_name="A")
    none: Any = None  # the waits need neither a destination nor a store
    return AudienceActor(
        settings, destination=none, store=none, clock=FakeClock(), rng=random.Random(5)
    )


def test_waits_double_from_a_second_up_to_five_minutes() -> None:
    a = actor()
    for attempt, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (8, 16)]):
        assert low <= a._backoff(attempt) <= high
    assert all(150 <= a._backoff(attempt) <= 300 for attempt in range(9, 40))


def test_a_throttled_call_waits_at_most_a_minute() -> None:
    """Demandbase's per-minute window has turned by then; waiting minutes more after a
    long 429 storm would only stall delivery (the pace already slowed down)."""
    a = actor()
    assert all(30 <= a._backoff(attempt, longest=60) <= 60 for attempt in range(6, 40))

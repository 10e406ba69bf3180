"""The retry policy every caller of Demandbase shares (dbsync.retry).

Waits are capped exponential with full jitter, and a 429 waits at most 60 s. The cap
once held for actors only, because the reconciler had its own copy of the loop; both
now call :func:`call_with_retries`, so these tests pin it for both.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from dbsync.clock import FakeClock
from dbsync.demandbase.wire import Endpoint
from dbsync.errors import (
    AuthError,
    BadRequestError,
    DemandbaseError,
    ThrottledError,
    TransientError,
)
from dbsync.retry import (
    GIVE_UP_AFTER,
    LearnedDuration,
    OnRefused,
    RetryPolicy,
    backoff_seconds,
    call_with_retries,
    poll_until,
    retry_delay,
)

ENDPOINT = Endpoint.IMPORT_UPLOAD


def test_waits_double_from_a_second_up_to_five_minutes() -> None:
    rng = random.Random(5)
    for attempt, (low, high) in enumerate([(0.5, 1), (1, 2), (2, 4), (4, 8), (8, 16)]):
        assert low <= backoff_seconds(rng, attempt) <= high
    assert all(150 <= backoff_seconds(rng, attempt) <= 300 for attempt in range(9, 40))


def test_a_throttled_call_waits_at_most_a_minute() -> None:
    """Demandbase's per-minute window has turned by then; waiting minutes more after a
    long 429 storm would only stall delivery (the pace already slowed down)."""
    rng = random.Random(5)
    throttled = ThrottledError("throttled", status=429)
    assert all(30 <= retry_delay(rng, attempt, throttled) <= 60 for attempt in range(6, 40))
    # A longer Retry-After, should Demandbase ever send one, is honoured.
    told = ThrottledError("throttled", status=429, retry_after=90.0)
    assert retry_delay(rng, 30, told) == 90.0


class Highest(random.Random):
    """Full jitter at its top: every backoff is its cap."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Hooks:
    """Records what call_with_retries asked of its caller, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    async def before_attempt(self, endpoint: Endpoint) -> None:
        self.calls.append(("before_attempt", endpoint))

    async def refused(self, endpoint: Endpoint, error: DemandbaseError) -> None:
        self.calls.append(("refused", error.status))

    async def throttled(self, endpoint: Endpoint, error: ThrottledError) -> None:
        self.calls.append(("throttled", error.status))

    async def retrying(
        self, endpoint: Endpoint, error: DemandbaseError, attempt: int, delay: float
    ) -> None:
        self.calls.append(("retrying", attempt))
        self.delays.append(delay)

    async def succeeded(self, endpoint: Endpoint) -> None:
        self.calls.append(("succeeded", endpoint))

    delays: list[float]


def scripted(*outcomes: Exception | str) -> tuple[list[int], object]:
    """A request that raises or returns each outcome in turn; and how often it ran."""
    ran: list[int] = []
    queue = list(outcomes)

    async def request() -> str:
        ran.append(1)
        outcome = queue.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return ran, request


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(give_up_after=None, on_refused=OnRefused.STOP_DESTINATION),  # actors
        RetryPolicy(give_up_after=GIVE_UP_AFTER, on_refused=OnRefused.RAISE),  # reconcilers
    ],
)
async def test_a_429_storm_never_waits_more_than_a_minute_whoever_calls(
    policy: RetryPolicy,
) -> None:
    clock = FakeClock()
    hooks = Hooks()
    hooks.delays = []
    storm = [ThrottledError("throttled", status=429) for _ in range(GIVE_UP_AFTER - 1)]
    ran, request = scripted(*storm, "ok")
    call = asyncio.create_task(
        call_with_retries(
            ENDPOINT,
            request,  # type: ignore[arg-type]
            policy=policy,
            hooks=hooks,
            clock=clock,
            rng=Highest(),
        )
    )
    # Each wait ends within the cap, so every step of a minute wakes the call.
    for _ in storm:
        if call.done():
            break
        await clock.wait_for_sleepers()
        await clock.advance(60.0)
    assert await call == "ok"
    assert len(ran) == GIVE_UP_AFTER
    # At the top of their jitter: doubling from 1 s, then the 60 s cap (not 64).
    assert hooks.delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0]
    assert hooks.calls[:3] == [
        ("before_attempt", ENDPOINT),
        ("throttled", 429),
        ("retrying", 1),
    ]
    assert hooks.calls[-2:] == [("before_attempt", ENDPOINT), ("succeeded", ENDPOINT)]


async def test_a_reconciler_gives_up_and_an_actor_does_not() -> None:
    clock = FakeClock()
    for policy, gives_up in (
        (RetryPolicy(give_up_after=3), True),
        (RetryPolicy(give_up_after=None), False),
    ):
        hooks = Hooks()
        hooks.delays = []
        failures = [TransientError("server error", status=503) for _ in range(3)]
        ran, request = scripted(*failures, "ok")
        call = asyncio.create_task(
            call_with_retries(
                ENDPOINT,
                request,  # type: ignore[arg-type]
                policy=policy,
                hooks=hooks,
                clock=clock,
                rng=random.Random(1),
            )
        )
        while not call.done():
            await clock.advance(300.0)
        if gives_up:
            with pytest.raises(TransientError):
                await call
            assert len(ran) == 3
        else:
            assert await call == "ok"
            assert len(ran) == 4


async def test_not_retriable_errors_and_refusals_go_back_to_the_caller() -> None:
    clock = FakeClock()
    hooks = Hooks()
    _, request = scripted(BadRequestError("bad", status=400))
    with pytest.raises(BadRequestError):
        await call_with_retries(
            ENDPOINT,
            request,  # type: ignore[arg-type]
            policy=RetryPolicy(),
            hooks=hooks,
            clock=clock,
            rng=random.Random(1),
        )
    _, request = scripted(AuthError("token rejected", status=401))
    with pytest.raises(AuthError):
        await call_with_retries(
            ENDPOINT,
            request,  # type: ignore[arg-type]
            policy=RetryPolicy(on_refused=OnRefused.RAISE),
            hooks=hooks,
            clock=clock,
            rng=random.Random(1),
        )
    assert ("refused", 401) not in hooks.calls


async def test_a_refusal_that_stops_the_destination_is_not_a_failed_attempt() -> None:
    clock = FakeClock()
    hooks = Hooks()
    _, request = scripted(AuthError("token rejected", status=401), "ok")
    answer = await call_with_retries(
        ENDPOINT,
        request,  # type: ignore[arg-type]
        policy=RetryPolicy(give_up_after=1, on_refused=OnRefused.STOP_DESTINATION),
        hooks=hooks,
        clock=clock,
        rng=random.Random(1),
    )
    assert answer == "ok"
    assert [name for name, _ in hooks.calls] == [
        "before_attempt",
        "refused",
        "before_attempt",
        "succeeded",
    ]


async def test_poll_until_waits_longer_each_time_up_to_the_maximum() -> None:
    clock = FakeClock()
    answers = iter(["processing", "processing", "processing", "processing", "completed"])
    asked_at: list[float] = []

    async def fetch() -> str:
        asked_at.append(clock.monotonic())
        return next(answers)

    poll = asyncio.create_task(
        poll_until(
            fetch, lambda s: s == "completed", clock=clock, initial_seconds=2, maximum_seconds=5
        )
    )
    await clock.wait_for_sleepers()
    # Polls are due after waits of 2, 4, then 5 at most: count them second by second.
    polls_by_second = []
    while not poll.done():
        await clock.advance(1.0)
        polls_by_second.append(len(asked_at))
    assert await poll == "completed"
    assert polls_by_second == [0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4, 5]


def test_a_learned_duration_follows_the_jobs_within_its_bounds() -> None:
    learned = LearnedDuration(initial_seconds=2.0, maximum_seconds=10.0)
    learned.learn(12.0)
    assert learned.seconds == pytest.approx(0.7 * 2 + 0.3 * 12)
    for _ in range(50):
        learned.learn(1_000.0)
    assert learned.seconds == 10.0
    for _ in range(200):
        learned.learn(0.0)
    assert learned.seconds == 0.05

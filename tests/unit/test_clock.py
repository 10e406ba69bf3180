"""What waits on the clock: a per-period pace and an event with a timeout, in virtual time."""

from __future__ import annotations

import asyncio

from dbsync.clock import FakeClock, PaceLimiter, wait_event


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_pace_lets_a_burst_through_then_spaces_requests_evenly() -> None:
    clock = FakeClock()
    limiter = PaceLimiter(2, 60.0, clock)  # two a minute: one every 30 s once full
    granted: list[int] = []

    async def ask(n: int) -> None:
        await limiter.acquire()
        granted.append(n)

    tasks = [asyncio.create_task(ask(n)) for n in range(4)]
    await settle()
    assert granted == [0, 1]
    await clock.advance(29.0)
    await settle()
    assert len(granted) == 2
    await clock.advance(1.0)
    await settle()
    assert len(granted) == 3
    await clock.advance(30.0)
    await settle()
    assert sorted(granted) == [0, 1, 2, 3]
    await asyncio.gather(*tasks)


async def test_wait_event_ends_on_the_event_on_unless_or_on_the_clock() -> None:
    clock = FakeClock()
    event, unless = asyncio.Event(), asyncio.Event()
    waiting = asyncio.create_task(wait_event(event, clock, 10.0, unless=unless))
    await settle()
    unless.set()
    assert await waiting is False
    unless.clear()
    waiting = asyncio.create_task(wait_event(event, clock, 10.0))
    await clock.wait_for_sleepers()
    await clock.advance(10.0)
    assert await waiting is False
    event.set()
    assert await wait_event(event, clock, None) is True

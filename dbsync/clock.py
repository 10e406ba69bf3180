"""The one clock through which production code reads time and sleeps.

Tests inject :class:`FakeClock` and advance it instead of sleeping; the demo and the
emulator use the system clock, with Demandbase's "day" shortened by configuration.
What waits on time is built on the clock too, so that a FakeClock drives it:
:func:`wait_event` (an event, or a timeout) and :class:`PaceLimiter` (a per-period
pace; aiolimiter's bucket runs on the event loop's own time, which no test can move).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "Limiter", "PaceLimiter", "SystemClock", "wait_event"]


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the Unix epoch (wall time, for timestamps and daily windows)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for durations and deadlines)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Sleep for ``seconds`` (returns at once when ``seconds <= 0``)."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when a test calls :meth:`advance`.

    ``sleep`` parks the caller on a future due at a virtual instant; ``advance``
    resolves the due ones in order and lets them run before it returns.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._start = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._parked = asyncio.Condition()

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now - self._start

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        async with self._parked:
            self._parked.notify_all()
        await future

    @property
    def sleepers(self) -> int:
        return sum(1 for _, _, f in self._sleepers if not f.done())

    async def wait_for_sleepers(self, count: int = 1) -> None:
        """Wait until at least ``count`` tasks are parked in :meth:`sleep`."""
        async with self._parked:
            await self._parked.wait_for(lambda: self.sleepers >= count)

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper due on the way, in order."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            due, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, due)
            if not future.done():
                future.set_result(None)
            # Let the woken task run (it may sleep again before the next sleeper is due).
            for _ in range(5):
                await asyncio.sleep(0)
        self._now = target
        await asyncio.sleep(0)


async def wait_event(
    event: asyncio.Event,
    clock: Clock,
    seconds: float | None,
    *,
    unless: asyncio.Event | None = None,
) -> bool:
    """Wait until ``event`` (or ``unless``) is set or ``seconds`` pass on ``clock``.

    True if ``event`` was set.
    """
    events = [e for e in (event, unless) if e is not None]
    if any(e.is_set() for e in events):
        return event.is_set()
    waiters: list[asyncio.Future[object]] = [asyncio.ensure_future(e.wait()) for e in events]
    if seconds is not None and seconds != float("inf"):
        waiters.append(asyncio.ensure_future(clock.sleep(seconds)))
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in waiters:
            pending.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return event.is_set()


class Limiter(Protocol):
    """A pace: :meth:`acquire` returns when one more request may go."""

    async def acquire(self) -> None: ...


class PaceLimiter:
    """At most ``rate`` requests per ``period_seconds``, timed on a :class:`Clock`.

    aiolimiter's leaky bucket, on the injected clock: the bucket holds ``rate``
    requests and drains at ``rate / period_seconds`` a second, so a quiet limiter lets
    a burst of ``rate`` through and then paces them evenly.
    """

    def __init__(self, rate: float, period_seconds: float, clock: Clock) -> None:
        if rate <= 0 or period_seconds <= 0:
            raise ValueError(
                f"a pace needs a positive rate and period, not {rate}/{period_seconds}"
            )
        # A bucket smaller than one request would never let one through.
        self._capacity = max(rate, 1.0)
        self._per_second = rate / period_seconds
        self._clock = clock
        self._level = 0.0
        self._checked_at = clock.monotonic()

    async def acquire(self) -> None:
        while True:
            now = self._clock.monotonic()
            self._level = max(0.0, self._level - (now - self._checked_at) * self._per_second)
            self._checked_at = now
            if self._level + 1 <= self._capacity:
                self._level += 1
                return
            await self._clock.sleep((self._level + 1 - self._capacity) / self._per_second)

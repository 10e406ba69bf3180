"""A destination's budget: Demandbase's limits, tracked on our side and shared fairly.

Demandbase sends no rate-limit headers and no Retry-After, so dbsync keeps count
itself (ARCHITECTURE invariant 5, quotas are spent, never overdrawn):

* **Daily quotas per endpoint** (1,200 job creations, 1,200 uploads, 3,600 status
  calls, ... a day). Every request is charged *before* it is sent, and the charge is
  committed to the store first, so a crash or a restart loop cannot spend a day twice.
  Windows are ``day_seconds`` long and aligned to the epoch (86,400 s: midnight UTC,
  as Demandbase resets). No quota-counted request starts in the last moments of a
  window (the *edge*, 5 s): it could land on either side of Demandbase's midnight, and
  whichever day we charged, the other could be overdrawn. It waits for the new window.
  A share of each quota (``quota_safety_margin``) stays in reserve for the clock skew
  we cannot see.
* **Concurrent import jobs.** An actor holds a job slot from job creation until the
  job is completed or failed.
* **Per-minute pace**, a leaky bucket on the injected clock
  (:class:`~dbsync.clock.PaceLimiter`) whose rate follows AIMD: a 429 halves it,
  every quiet period (a minute by default) gives back a tenth of the configured rate,
  and the learned rate is persisted so that a restart does not burst into 429s
  again. A Retry-After, if Demandbase ever sends one, holds every request of the
  destination until it passes.

Fairness: when several actors wait for a job slot (or for the day's room for a job),
the one that has waited longest goes first. An actor asks with ``priority``, the
epoch time of its oldest pending change (smaller is older; a time in the future
counts as now), and names its ``audience``: an audience's job slot is its turn, and
its next request counts from that turn, not from its backlog. So an audience waiting
since before another's turn is served before that other one's next job, whatever
their backlogs' sizes: with N audiences waiting, each gets one job before any gets a
second, and no audience waits for more than N - 1 other grants (docs/architecture.md,
"Fair turns", states the bound in time). A priority is taken when the request is
made and kept while it waits: changes arriving meanwhile do not move it back. The
calls of a job already granted (its upload, its status reads) wait, when a daily
quota is spent, oldest backlog first.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Protocol

import msgspec

from dbsync.clock import Clock, PaceLimiter
from dbsync.demandbase.wire import Endpoint

__all__ = ["BudgetLimits", "BudgetSnapshot", "DestinationBudget", "QuotaStore"]

log = logging.getLogger(__name__)

# The pace never falls below this share of the configured rate, so that a storm of
# 429s slows delivery down without stopping it.
_MIN_PACE_SHARE = 0.02
_DECREASE_FACTOR = 0.5
_RECOVERY_SHARE = 0.1


class BudgetLimits(msgspec.Struct, frozen=True, kw_only=True):
    """The limits one destination lives under (from its ``[destinations.limits]``)."""

    requests_per_minute: float
    daily: Mapping[Endpoint, int]  # endpoint -> calls per day; endpoints absent are unlimited
    concurrent_import_jobs: int
    day_seconds: float = 86_400.0
    quota_safety_margin: float = 0.02
    pace_recovery_seconds: float = 60.0


class BudgetSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What ``status`` and ``quota`` show: used and left per endpoint today, pace, slots."""

    window: int
    window_ends_at: float
    used: dict[str, int]
    allowed: dict[str, int]
    pace_per_minute: float
    jobs_in_flight: int
    job_slots: int
    throttled: int


class QuotaStore(Protocol):
    async def quota_usage(self, destination: str, window: int) -> dict[str, int]: ...

    async def spend_quota(
        self, destination: str, endpoint: str, window: int, count: int = 1
    ) -> None: ...

    async def load_pace(self, destination: str) -> float | None: ...

    async def save_pace(self, destination: str, requests_per_minute: float) -> None: ...


class _Waiter:
    """One request in a :class:`_Queue`: served by ``(priority, order)``, smallest first."""

    __slots__ = ("audience", "order", "priority")

    def __init__(self, priority: float, order: int, audience: str | None) -> None:
        self.priority = priority
        self.order = order
        self.audience = audience

    def __lt__(self, other: _Waiter) -> bool:
        return (self.priority, self.order) < (other.priority, other.order)


class _Queue:
    """Waiters served in priority order: only the head may pass, and only when ``ready``."""

    def __init__(self, changed: asyncio.Condition) -> None:
        self._changed = changed
        self._heap: list[_Waiter] = []
        self._order = itertools.count()

    async def wait_turn(
        self, priority: float, ready: Callable[[], bool], audience: str | None = None
    ) -> None:
        waiter = _Waiter(priority, next(self._order), audience)
        heapq.heappush(self._heap, waiter)
        try:
            async with self._changed:
                await self._changed.wait_for(lambda: self._heap[0] is waiter and ready())
        finally:
            self._heap.remove(waiter)
            heapq.heapify(self._heap)
            async with self._changed:
                self._changed.notify_all()

    def defer(self, audience: str, until: float) -> None:
        """``audience`` just had its turn: its other waiters now count from ``until``."""
        moved = False
        for waiter in self._heap:
            if waiter.audience == audience and waiter.priority < until:
                waiter.priority = until
                moved = True
        if moved:
            heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)


class DestinationBudget:
    """Grants one destination's requests within its limits; shared by its actors."""

    def __init__(
        self, destination: str, limits: BudgetLimits, store: QuotaStore, clock: Clock
    ) -> None:
        self.destination = destination
        self.limits = limits
        self._store = store
        self._clock = clock
        self._changed = asyncio.Condition()
        self._job_queue = _Queue(self._changed)
        # One queue per endpoint: a creation waiting for tomorrow's quota must not hold
        # back the uploads and status reads of jobs already running, which have room.
        self._quota_queues = {endpoint: _Queue(self._changed) for endpoint in limits.daily}
        self._window = self._current_window()
        self._used: dict[str, int] = {}
        self._jobs_in_flight = 0
        self._pace = limits.requests_per_minute
        self._limiter = PaceLimiter(max(self._pace, 1.0), 60, clock)
        # Per audience, the epoch time of its last job slot: its next request counts
        # from there (the fairness rule in the module's docstring).
        self._turns: dict[str, float] = {}
        self._hold_until = 0.0
        self._last_throttle = -math.inf
        self._last_recovery = clock.monotonic()
        self._stopping = False
        self._task: asyncio.Task[object] | None = None
        self.throttled = 0

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load today's spending and the learned pace from the store (before :meth:`run`)."""
        self._window = self._current_window()
        self._used = await self._store.quota_usage(self.destination, self._window)
        pace = await self._store.load_pace(self.destination)
        if pace is not None:
            self._set_pace(min(pace, self.limits.requests_per_minute))

    def stop(self) -> None:
        """Ask :meth:`run` to end, at once: it holds nothing that needs finishing."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        """Roll the daily window at each boundary and recover the pace, until :meth:`stop`."""
        self._task = asyncio.current_task()
        while not self._stopping:
            now = self._clock.time()
            window_end = (self._window + 1) * self.limits.day_seconds
            await self._clock.sleep(
                min(max(window_end - now, 0.0), self.limits.pace_recovery_seconds)
            )
            self._maybe_roll()
            await self._recover_pace()
            async with self._changed:
                self._changed.notify_all()

    # --- grants ----------------------------------------------------------------------

    async def spend(self, endpoint: Endpoint, *, priority: float = 0.0) -> None:
        """Wait for the pace and room in ``endpoint``'s daily quota, then charge one call.

        The charge comes last, so that the request follows it at once: a request that
        waited for the pace after being charged to today could reach Demandbase after
        its midnight, in a day we did not count it in.
        """
        await self._pace_gate()
        if endpoint in self.limits.daily:
            await self._quota_queues[endpoint].wait_turn(priority, lambda: self._room(endpoint) > 0)
            await self._charge(endpoint)

    @asynccontextmanager
    async def job(self, *, priority: float, audience: str | None = None) -> AsyncIterator[None]:
        """Hold a concurrent-job slot, granted only with room for a creation and an upload.

        The slot is held until the block exits, i.e. until the job is completed or failed.
        ``audience``'s request counts from the later of ``priority`` and its last slot;
        ``math.inf`` asks only for what no other request waits for, and is no turn.
        """

        def ready() -> bool:
            return (
                self._jobs_in_flight < self.limits.concurrent_import_jobs
                and self._room(Endpoint.IMPORT_CREATE_JOB) > 0
                and self._room(Endpoint.IMPORT_UPLOAD) > 0
            )

        turn = self._turn_priority(priority, audience)
        await self._job_queue.wait_turn(turn, ready, audience)
        if audience is not None and turn != math.inf:
            granted = self._clock.time()
            self._turns[audience] = granted
            self._job_queue.defer(audience, granted)
        async with self._slot():
            yield

    @asynccontextmanager
    async def resumed_job(self) -> AsyncIterator[None]:
        """A slot for a job that was already running when the daemon started.

        It is taken without waiting (Demandbase already counts that job), so the
        destination may briefly hold more than its cap; new jobs wait until it drains.
        """
        async with self._slot():
            yield

    @asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        self._jobs_in_flight += 1
        try:
            yield
        finally:
            self._jobs_in_flight -= 1
            async with self._changed:
                self._changed.notify_all()

    # --- feedback --------------------------------------------------------------------

    async def on_throttled(self, retry_after: float | None) -> None:
        """A 429: halve the pace (once per burst) and honour a Retry-After if one came."""
        self.throttled += 1
        now = self._clock.monotonic()
        if retry_after is not None and retry_after > 0:
            self._hold_until = max(self._hold_until, now + retry_after)
        # Several requests in flight often meet the same burst; one halving per second
        # keeps a single burst from collapsing the pace to its floor. Note the throttle
        # before awaiting the store: the others of the burst arrive during that await.
        decrease = now - self._last_throttle >= 1.0
        self._last_throttle = now
        self._last_recovery = now
        if decrease:
            floor = self.limits.requests_per_minute * _MIN_PACE_SHARE
            self._set_pace(max(floor, self._pace * _DECREASE_FACTOR))
            await self._store.save_pace(self.destination, self._pace)
            log.warning(
                "pace_decreased",
                extra={"destination": self.destination, "requests_per_minute": self._pace},
            )

    @property
    def jobs_waiting(self) -> int:
        """Requests waiting for a job slot (or for the room a job needs)."""
        return len(self._job_queue)

    def snapshot(self) -> BudgetSnapshot:
        self._maybe_roll()  # a new day shows as one, with or without run() beside it
        used = self._used
        return BudgetSnapshot(
            window=self._window,
            window_ends_at=(self._window + 1) * self.limits.day_seconds,
            used={str(e): used.get(e, 0) for e in self.limits.daily},
            allowed={str(e): self._allowed(e) for e in self.limits.daily},
            pace_per_minute=round(self._pace, 3),
            jobs_in_flight=self._jobs_in_flight,
            job_slots=self.limits.concurrent_import_jobs,
            throttled=self.throttled,
        )

    def last_turn(self, audience: str) -> float | None:
        """When ``audience`` last had a job slot (epoch seconds), if it had one: where
        its next request counts from (the forecast takes turns as this budget does)."""
        return self._turns.get(audience)

    # --- internals -------------------------------------------------------------------

    def _turn_priority(self, priority: float, audience: str | None) -> float:
        """The priority a request waits with: its backlog's age, never in the future,
        and never older than its audience's last turn."""
        if priority == math.inf:
            return priority
        priority = min(priority, self._clock.time())
        if audience is None:
            return priority
        return max(priority, self._turns.get(audience, -math.inf))

    def _current_window(self) -> int:
        return int(self._clock.time() // self.limits.day_seconds)

    @property
    def pace_recovery_step(self) -> float:
        """Requests a minute a quiet ``pace_recovery_seconds`` gives back after a 429."""
        return self.limits.requests_per_minute * _RECOVERY_SHARE

    @property
    def edge_seconds(self) -> float:
        """The end of each window in which no quota-counted request starts."""
        # The time a request may take to reach Demandbase: 5 s, less for short test days.
        return min(5.0, self.limits.day_seconds * 0.05)

    def _in_edge(self) -> bool:
        return (
            self._window + 1
        ) * self.limits.day_seconds - self._clock.time() <= self.edge_seconds

    def _allowed(self, endpoint: Endpoint) -> int:
        limit = self.limits.daily[endpoint]
        return max(1, math.floor(limit * (1.0 - self.limits.quota_safety_margin)))

    def _room(self, endpoint: Endpoint) -> int:
        if endpoint not in self.limits.daily:
            return 1
        self._maybe_roll()
        if self._in_edge():
            return 0  # wait for the new window; run() wakes the waiters when it starts
        return self._allowed(endpoint) - self._used.get(endpoint, 0)

    async def _charge(self, endpoint: Endpoint) -> None:
        # Count in memory before awaiting the store, so that concurrent callers see it.
        self._used[endpoint] = self._used.get(endpoint, 0) + 1
        await self._store.spend_quota(self.destination, endpoint, self._window)

    def _maybe_roll(self) -> None:
        window = self._current_window()
        if window > self._window:
            self._used = {}
            self._window = window
            log.info(
                "quota_window_started", extra={"destination": self.destination, "window": window}
            )

    async def _pace_gate(self) -> None:
        hold = self._hold_until - self._clock.monotonic()
        if hold > 0:
            await self._clock.sleep(hold)
        await self._limiter.acquire()

    async def _recover_pace(self) -> None:
        now = self._clock.monotonic()
        configured = self.limits.requests_per_minute
        period = self.limits.pace_recovery_seconds
        if self._pace >= configured or now - self._last_recovery < period:
            return
        periods = (now - self._last_recovery) // period
        self._last_recovery += periods * period  # whole periods only: wakes do not drift it
        self._set_pace(min(configured, self._pace + configured * _RECOVERY_SHARE * periods))
        await self._store.save_pace(self.destination, self._pace)
        log.info(
            "pace_recovered",
            extra={"destination": self.destination, "requests_per_minute": self._pace},
        )

    def _set_pace(self, requests_per_minute: float) -> None:
        self._pace = requests_per_minute
        # A bucket's rate is fixed at construction: a new one, on the same clock.
        self._limiter = PaceLimiter(max(requests_per_minute, 1.0), 60, self._clock)

"""Demandbase's limits, counted in fixed windows on the emulator's clock.

Windows
    A "minute" and a "day" are fixed windows aligned to the Unix epoch: window ``n``
    covers ``[n * length, (n + 1) * length)``. With ``day_seconds=86400`` a day window
    resets at midnight UTC, as Demandbase's daily quotas do [3P]; a test shortens the
    day and advances a fake clock past the boundary. Nothing is swept: a counter
    belongs to a window index and is replaced when the clock reaches the next one.

What counts
    Every request that reaches a Demandbase route counts toward the per-minute rate,
    refused ones included [ASSUMED], so a client that hammers a throttled API stays
    throttled. A daily quota is *reserved* before the route runs and given back if the
    answer is a 429, because [ASSUMED] a request refused with 429 does not spend the
    daily quota (:data:`REFUSED_REQUESTS_SPEND_QUOTA`); reserving first keeps
    concurrent requests from overdrawing it. Export volume [ASSUMED: Demandbase
    documents the 10 GB a day, not how it is measured] is the size of the result files
    that exports produced in the day window, checked when an export is created.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from typing import Final

import msgspec

from dbsync.clock import Clock
from dbsync.demandbase.emulator.settings import EmulatorSettings
from dbsync.demandbase.wire import Endpoint

__all__ = ["REFUSED_REQUESTS_SPEND_QUOTA", "Limits", "QuotaUse", "ThrottleKind"]

# [ASSUMED] (contract, "Limits" is silent): a request answered 429 does not spend its
# endpoint's daily quota; any other answer after authentication does, 4xx included.
REFUSED_REQUESTS_SPEND_QUOTA: Final = False


class ThrottleKind(enum.StrEnum):
    """Why a request was answered 429, as counted in the statistics."""

    MINUTE = "minute"  # the per-minute request rate (429-100)
    DAILY = "daily"  # an endpoint's daily quota (429-100)
    CONCURRENT = "concurrent"  # the running-jobs cap (429-102)
    VOLUME = "volume"  # the daily export volume (429-101)
    INJECTED = "injected"  # a fault asked for it


class EndpointUse(msgspec.Struct, frozen=True):
    used: int
    limit: int


class QuotaUse(msgspec.Struct, frozen=True, kw_only=True):
    """Use of every limit in the current windows."""

    day: int  # index of the day window
    day_started_at: float
    minute: int
    minute_requests: int
    requests_per_minute: int
    endpoints: dict[str, EndpointUse]
    export_bytes: EndpointUse


def _window(now: float, length: float) -> int:
    return math.floor(now / length)


class Limits:
    """Counters for the per-minute rate, the daily quotas and the daily export volume."""

    def __init__(self, settings: EmulatorSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._minute = _window(clock.time(), settings.minute_seconds)
        self._minute_requests = 0
        self._day = _window(clock.time(), settings.day_seconds)
        self._used: Counter[Endpoint] = Counter()
        self._export_bytes = 0

    def admit(self) -> bool:
        """Count one request toward the per-minute rate; ``False`` when it is over the rate."""
        minute = _window(self._clock.time(), self._settings.minute_seconds)
        if minute != self._minute:
            self._minute, self._minute_requests = minute, 0
        self._minute_requests += 1
        return self._minute_requests <= self._settings.requests_per_minute

    def reserve(self, endpoint: Endpoint) -> int | None:
        """Take one request of ``endpoint``'s daily quota.

        Returns the day window it was taken from (for :meth:`give_back`), or ``None``
        when the quota is spent. Endpoints without a daily quota always succeed.
        """
        day = self._roll_day()
        limit = self._settings.daily_quota(endpoint)
        if limit is None:
            return day
        if self._used[endpoint] >= limit:
            return None
        self._used[endpoint] += 1
        return day

    def give_back(self, endpoint: Endpoint, day: int) -> None:
        """Return a request reserved in window ``day`` (its answer was a 429)."""
        if REFUSED_REQUESTS_SPEND_QUOTA or self._roll_day() != day:
            return
        if self._settings.daily_quota(endpoint) is not None and self._used[endpoint] > 0:
            self._used[endpoint] -= 1

    def spend_export_bytes(self, at: float, size: int) -> None:
        """An export produced a ``size``-byte result at time ``at``."""
        if _window(at, self._settings.day_seconds) == self._roll_day():
            self._export_bytes += size

    def export_volume_spent(self) -> bool:
        self._roll_day()
        return self._export_bytes >= self._settings.export_bytes_per_day

    def use(self) -> QuotaUse:
        day = self._roll_day()
        minute = _window(self._clock.time(), self._settings.minute_seconds)
        endpoints = {
            endpoint.value: EndpointUse(self._used[endpoint], limit)
            for endpoint in Endpoint
            if (limit := self._settings.daily_quota(endpoint)) is not None
        }
        return QuotaUse(
            day=day,
            day_started_at=day * self._settings.day_seconds,
            minute=minute,
            minute_requests=self._minute_requests if minute == self._minute else 0,
            requests_per_minute=self._settings.requests_per_minute,
            endpoints=endpoints,
            export_bytes=EndpointUse(self._export_bytes, self._settings.export_bytes_per_day),
        )

    def _roll_day(self) -> int:
        day = _window(self._clock.time(), self._settings.day_seconds)
        if day != self._day:
            self._day = day
            self._used.clear()
            self._export_bytes = 0
        return self._day

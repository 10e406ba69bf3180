"""How every caller of Demandbase waits and tries again: one policy, one copy.

Actors and reconcilers used to carry their own retry loop, job-poll loop and learned
job duration; a fix made to one copy (the 60 s cap on the wait after a 429) once
missed the other. Each now lives here once:

* :func:`backoff_seconds`: capped exponential backoff with full jitter;
* :class:`RetryPolicy` and :func:`call_with_retries`: one call, repeated while its
  failure is retriable. A 429 always waits the throttled backoff (at most a minute),
  or the Retry-After if Demandbase ever sends a longer one; what differs between
  callers is the policy (whether to give up after some attempts, whether a 401/403
  stops the destination or goes back to the caller) and the :class:`RetryHooks`
  (what to wait for before an attempt, what to count and log);
* :func:`poll_until`: ask for a job's state, sparingly, until it is final;
* :class:`LearnedDuration`: how long jobs take, so that the first poll comes when a
  job is likely done rather than at once.

Nothing here logs or sleeps on its own: sleeping goes through the injected
:class:`~dbsync.clock.Clock`, logging through the hooks, whose events keep the
callers' names (``api_retry``, ``reconcile_retry``).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec

from dbsync.clock import Clock
from dbsync.demandbase.wire import Endpoint
from dbsync.errors import AuthError, DemandbaseError, PermissionDeniedError, ThrottledError

__all__ = [
    "BACKOFF_BASE_SECONDS",
    "BACKOFF_MAX_SECONDS",
    "GIVE_UP_AFTER",
    "THROTTLED_BACKOFF_MAX_SECONDS",
    "LearnedDuration",
    "OnRefused",
    "RetryHooks",
    "RetryPolicy",
    "backoff_seconds",
    "call_with_retries",
    "poll_until",
    "retry_delay",
]

T = TypeVar("T")

BACKOFF_BASE_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
# After a 429, by when Demandbase's per-minute window has turned: the destination's
# pace, halved by the 429, does the slowing down, not a long wait.
THROTTLED_BACKOFF_MAX_SECONDS = 60.0
# Consecutive failed attempts after which a caller gives up (a reconciler) or reports
# ``failed`` and goes on at the longest backoff (an actor).
GIVE_UP_AFTER = 8
# Learned durations: an exponentially weighted moving average, never below this.
_LEARNING_WEIGHT = 0.3
_SHORTEST_SECONDS = 0.05


def backoff_seconds(rng: random.Random, attempt: int, *, throttled: bool = False) -> float:
    """How long to wait before retrying a call that failed ``attempt + 1`` times in a row.

    Full jitter (a random share of a capped exponential) spreads retries out: 1 s,
    doubling, at most 5 minutes; at most a minute after a 429.
    """
    longest = THROTTLED_BACKOFF_MAX_SECONDS if throttled else BACKOFF_MAX_SECONDS
    cap = min(longest, BACKOFF_BASE_SECONDS * 2**attempt)
    return rng.uniform(cap / 2, cap)


def retry_delay(rng: random.Random, attempt: int, error: DemandbaseError) -> float:
    """The wait before the next attempt after ``error``, the ``attempt``-th failure in a row."""
    if isinstance(error, ThrottledError):
        return max(backoff_seconds(rng, attempt, throttled=True), error.retry_after or 0.0)
    return backoff_seconds(rng, attempt)


class OnRefused(enum.Enum):
    """What a 401 that a fresh token did not cure, or a 403, does to a call."""

    RAISE = "raise"  # back to the caller: a reconciler's read-back fails, nothing else
    STOP_DESTINATION = "stop_destination"  # the hooks stop it; the call waits and probes


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What differs between callers of :func:`call_with_retries`."""

    give_up_after: int | None = None  # failed attempts in a row; None: never give up
    on_refused: OnRefused = OnRefused.RAISE


class RetryHooks(Protocol):
    """A caller's part in :func:`call_with_retries`."""

    async def before_attempt(self, endpoint: Endpoint) -> None:
        """Wait until an attempt may go (destination running, pace, budget spent)."""
        ...

    async def refused(self, endpoint: Endpoint, error: DemandbaseError) -> None:
        """A 401/403 under :attr:`OnRefused.STOP_DESTINATION`: stop the destination."""
        ...

    async def throttled(self, endpoint: Endpoint, error: ThrottledError) -> None:
        """A 429: slow the destination down, count it."""
        ...

    async def retrying(
        self, endpoint: Endpoint, error: DemandbaseError, attempt: int, delay: float
    ) -> None:
        """The ``attempt``-th failure in a row; the next attempt in ``delay`` seconds."""
        ...

    async def succeeded(self, endpoint: Endpoint) -> None:
        """An attempt went through."""
        ...


async def call_with_retries(
    endpoint: Endpoint,
    request: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    hooks: RetryHooks,
    clock: Clock,
    rng: random.Random,
) -> T:
    """``request()``'s answer, trying again while its failure is retriable.

    Errors that are not retriable (400, 404) go back to the caller at once, and so
    does the last error once ``policy.give_up_after`` attempts failed in a row.
    """
    attempt = 0
    while True:
        await hooks.before_attempt(endpoint)
        try:
            result = await request()
        except (AuthError, PermissionDeniedError) as exc:
            if policy.on_refused is OnRefused.RAISE:
                raise
            # Not a failure of this call: the destination stops, and the next
            # attempt waits for it to run again (or probes it, now and then).
            await hooks.refused(endpoint, exc)
            continue
        except DemandbaseError as exc:
            if isinstance(exc, ThrottledError):
                await hooks.throttled(endpoint, exc)
            elif not exc.retriable:
                raise
            delay = retry_delay(rng, attempt, exc)
            attempt += 1
            if policy.give_up_after is not None and attempt >= policy.give_up_after:
                raise
            await hooks.retrying(endpoint, exc, attempt, delay)
            await clock.sleep(delay)
        else:
            await hooks.succeeded(endpoint)
            return result


async def poll_until(
    fetch: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    *,
    clock: Clock,
    initial_seconds: float,
    maximum_seconds: float,
) -> T:
    """Wait ``initial_seconds``, then ``fetch()`` until ``done`` holds; the final answer.

    Each wait is twice the last, up to ``maximum_seconds``: status reads have a daily
    quota too, and a job that is not done soon is likely to take a while.
    """
    delay = initial_seconds
    while True:
        await clock.sleep(delay)
        answer = await fetch()
        if done(answer):
            return answer
        delay = min(delay * 2, maximum_seconds)


class LearnedDuration:
    """How long a kind of job takes: a moving average of the last ones, within bounds."""

    def __init__(self, initial_seconds: float, maximum_seconds: float) -> None:
        self.seconds = initial_seconds
        self._maximum_seconds = maximum_seconds

    def learn(self, seconds: float) -> None:
        """One more job took ``seconds``."""
        blended = (1 - _LEARNING_WEIGHT) * self.seconds + _LEARNING_WEIGHT * seconds
        self.seconds = max(_SHORTEST_SECONDS, min(blended, self._maximum_seconds))

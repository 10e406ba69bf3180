"""One actor's calls to Demandbase: the retry policy's hooks and the state they keep.

:func:`dbsync.retry.call_with_retries` owns the loop (one copy for actors and
reconcilers); what an *actor* does around each attempt lives here, apart from the
actor's delivery loop (:mod:`dbsync.actor.audience`):

* before an attempt: wait for the destination to run (a stop while it does not
  raises :class:`HeldBack`: the batch stays open for the next start), then the
  audience's own pace, then the destination's budget, in that order, so that nothing
  waits between the budget's charge and the request;
* 429: the destination's pace halves and the ledger counts a throttled call; the
  call is tried again, never dropped;
* 401/403: the destination stops; the audience reports ``stopped`` and its calls
  wait (or probe) until it runs again;
* retriable failures (5xx, timeouts, resets) are logged as ``api_retry``; after
  :data:`~dbsync.retry.GIVE_UP_AFTER` in a row the audience reports ``failed`` and
  goes on at the longest backoff, so it recovers by itself; the first success puts
  it back to ``active`` (or ``paused``).

:class:`ReportedState` is the audience's state as the actor reports it (checked
against its machine in :mod:`dbsync.states`, logged, stored), the last error and why
its contract broke; the actor's loop and these hooks both move it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from dbsync.clock import Clock, Limiter
from dbsync.demandbase.wire import Endpoint
from dbsync.destination import Destination
from dbsync.errors import AuthError, DemandbaseError, ThrottledError
from dbsync.logs import AudienceLogger
from dbsync.model import AudienceState
from dbsync.retry import GIVE_UP_AFTER, OnRefused, RetryPolicy, call_with_retries
from dbsync.states import DestinationState, check_transition

__all__ = ["ActorCalls", "CallsStore", "HeldBack", "ReportedState"]

T = TypeVar("T")

# An actor never gives up a call: it holds its work until Demandbase takes it.
_POLICY = RetryPolicy(give_up_after=None, on_refused=OnRefused.STOP_DESTINATION)


class CallsStore(Protocol):
    """The part of :class:`~dbsync.store.Store` the calls and the status write to."""

    async def add_to_ledger(self, audience_id: str, **deltas: int) -> None: ...
    async def set_audience_state(
        self, audience_id: str, state: AudienceState, reason: str = ""
    ) -> None: ...


class HeldBack(Exception):
    """A delivery waited for a stopped destination when its actor was told to stop.

    Nothing runs at Demandbase for it that a drain could wait for: its batch stays open
    in the store, and the next start resumes it.
    """


class ReportedState:
    """The audience's state as its actor reports it, and the last error it met."""

    def __init__(
        self, audience_id: str, state: AudienceState, store: CallsStore, log: AudienceLogger
    ) -> None:
        self._audience_id = audience_id
        self._store = store
        self._log = log
        self.state = state
        self.last_error = ""
        # Why the contract broke (a job fed another list); "" while it holds.
        self.contract_breach = ""

    async def set(self, state: AudienceState, reason: str = "", *, persist: bool = False) -> None:
        """Move to ``state`` (checked against its machine) and store it.

        ``persist``: store it even if it is the state already (a new reason, a new run).
        """
        if state is self.state:
            if persist:
                await self._store.set_audience_state(self._audience_id, state, reason)
            return
        previous, self.state = self.state, check_transition(self.state, state)
        level = logging.ERROR if state is AudienceState.FAILED else logging.INFO
        self._log.log(
            level,
            "actor_state_changed",
            extra={"from": previous, "to": state, "reason": reason},
        )
        await self._store.set_audience_state(self._audience_id, state, reason)

    async def break_contract(
        self, reason: str, *, job_id: int, list_id: int | None, expected_list_id: int | None
    ) -> None:
        """A job fed another list: ``contract_broken`` until the operator's resume."""
        if not self.contract_breach:
            self.contract_breach = reason
            self._log.error(
                "contract_broken",
                extra={
                    "job_id": job_id,
                    "list_id": list_id,
                    "expected_list_id": expected_list_id,
                    "reason": reason,
                },
            )
        await self.set(AudienceState.CONTRACT_BROKEN, reason)

    def clear_breach(self) -> None:
        """The operator's word (``ctl resume``) that a broken contract was looked at."""
        if self.contract_breach:
            self._log.warning("contract_breach_cleared", extra={"reason": self.contract_breach})
            self.contract_breach = ""


class ActorCalls:
    """The :class:`~dbsync.retry.RetryHooks` of one actor, and its way to make a call."""

    def __init__(
        self,
        audience_id: str,
        *,
        destination: Destination,
        store: CallsStore,
        clock: Clock,
        rng: random.Random,
        limiter: Limiter,
        status: ReportedState,
        stopping: asyncio.Event,
        priority: Callable[[], float],
        is_paused: Callable[[], bool],
        log: AudienceLogger,
    ) -> None:
        self._audience_id = audience_id
        self._destination = destination
        self._store = store
        self._clock = clock
        self._rng = rng
        self._limiter = limiter
        self._status = status
        self._stopping = stopping
        self._priority = priority
        self._is_paused = is_paused
        self._log = log
        self._failures = 0

    async def call(self, endpoint: Endpoint, request: Callable[[], Awaitable[T]]) -> T:
        """Spend budget, make the request, retry what is retriable; never drop the work.

        401/403 stop the destination; the call then waits for it to run again.
        Errors that are not retriable (400, 404) go back to the caller.
        """
        return await call_with_retries(
            endpoint, request, policy=_POLICY, hooks=self, clock=self._clock, rng=self._rng
        )

    async def reflect_destination(self) -> None:
        """Another call's 401/403 stopped the destination: this audience is held too,
        and its state says so (not ACTIVE) until a probe goes through (``succeeded``)."""
        if not self._destination.is_running:
            await self._status.set(AudienceState.STOPPED, self._destination.state)

    async def before_attempt(self, endpoint: Endpoint) -> None:
        await self.reflect_destination()
        await self._destination.wait_running(self._clock, unless=self._stopping)
        if self._stopping.is_set() and not self._destination.is_running:
            raise HeldBack
        # The audience's own pace first: between the destination's charge and the
        # request nothing should wait, or a request charged to today could reach
        # Demandbase tomorrow.
        await self._limiter.acquire()
        await self._destination.budget.spend(endpoint, priority=self._priority())

    async def refused(self, endpoint: Endpoint, error: DemandbaseError) -> None:
        reason = (
            DestinationState.AUTH_FAILED
            if isinstance(error, AuthError)
            else DestinationState.PERMISSION_DENIED
        )
        self._destination.stop(reason, error)
        await self._status.set(AudienceState.STOPPED, reason)

    async def throttled(self, endpoint: Endpoint, error: ThrottledError) -> None:
        await self._destination.budget.on_throttled(error.retry_after)
        await self._store.add_to_ledger(self._audience_id, throttled=1)

    async def retrying(
        self, endpoint: Endpoint, error: DemandbaseError, attempt: int, delay: float
    ) -> None:
        self._failures += 1
        self._status.last_error = str(error)
        self._log.warning(
            "api_retry",
            extra={
                "endpoint": endpoint,
                "status": error.status,
                "error_code": error.error_code,
                "failures": self._failures,
                "retry_in_seconds": round(delay, 3),
            },
        )
        if self._failures >= GIVE_UP_AFTER and self._status.state is not AudienceState.FAILED:
            await self._status.set(AudienceState.FAILED, str(error))

    async def succeeded(self, endpoint: Endpoint) -> None:
        self._failures = 0
        self._destination.restart()  # a probe of a stopped destination went through
        if self._status.state in (AudienceState.FAILED, AudienceState.STOPPED):
            paused = self._is_paused()
            await self._status.set(AudienceState.PAUSED if paused else AudienceState.ACTIVE)

"""Restarting a crashed service, within a budget: the supervisor's policy for its actors.

An actor or a reconciler that raises is a bug in that one service (ARCHITECTURE
invariant 6): the others go on, and it is started again after a backoff, since many
bugs are a rare input that the next run does not meet. A bug that the next run meets
at once would crash it forever, so restarts have a budget (Supervisor's ``startretries``,
mode's restart limits): the backoff doubles with each crash, a quiet
``window_seconds`` forgets the crashes before it, and the ``max_crashes``-th crash
within the window gives up with :class:`RestartBudgetSpent`, whose reason the
operator reads in ``dbsync ctl status``.

The policy comes from the ``restart_*`` keys of ``[daemon]`` and the time from the
injected clock, so that a test sets both instead of patching constants. A service
asked to stop is never restarted, and a stop never waits out a backoff.

A store that fails is shared infrastructure, so its ``StoreError`` stops the daemon,
except while the file system refuses writes (a full disk, :mod:`dbsync.store.engine`):
then the crash is a crash like another, and the restart also waits until the store
takes writes again, so that a long outage costs each service one crash, not its
budget, and delivery and read-backs resume by themselves once space returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from dbsync.clock import Clock, wait_event
from dbsync.config import DaemonSettings
from dbsync.demandbase.http import describe_transport_error, is_transport_error
from dbsync.errors import StoreError

__all__ = [
    "RestartBudgetSpent",
    "RestartPolicy",
    "WritableStore",
    "describe",
    "run_with_restarts",
]

log = logging.getLogger(__name__)


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a crashed actor or reconciler is restarted, and when that stops.

    The n-th crash within ``window_seconds`` waits ``backoff_seconds * 2**(n-1)``, at
    most ``backoff_max_seconds``; the ``max_crashes``-th gives up. Crashes older than
    the window are forgotten, so a service that crashes once a day restarts at once.
    """

    max_crashes: int = 5
    window_seconds: float = 600.0
    backoff_seconds: float = 1.0
    backoff_max_seconds: float = 300.0

    @classmethod
    def from_config(cls, daemon: DaemonSettings) -> RestartPolicy:
        return cls(
            max_crashes=daemon.restart_max_crashes,
            window_seconds=daemon.restart_window_seconds,
            backoff_seconds=daemon.restart_backoff_seconds,
            backoff_max_seconds=daemon.restart_backoff_max_seconds,
        )

    def delay(self, crashes: int) -> float:
        """The wait before restarting after the ``crashes``-th crash in the window."""
        doubled: float = self.backoff_seconds * 2.0 ** max(0, crashes - 1)
        return min(self.backoff_max_seconds, doubled)


class WritableStore(Protocol):
    """Whether the store takes writes: the part of the Store the restarts read."""

    @property
    def writable(self) -> bool: ...

    async def wait_writable(self) -> None: ...


class RestartBudgetSpent(Exception):
    """A service crashed past its restart budget; ``reason`` says how, for the operator."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def run_with_restarts(
    run: Callable[[], Awaitable[None]],
    *,
    policy: RestartPolicy,
    clock: Clock,
    stopping: asyncio.Event,
    unless: asyncio.Event | None = None,
    event: str,
    fields: dict[str, object],
    on_crash: Callable[[Exception], Awaitable[None]] | None = None,
    store: WritableStore | None = None,
) -> None:
    """``run`` until it returns; after a crash, log ``event`` and run it again after the
    policy's backoff, unless ``stopping`` (this service's) or ``unless`` (everyone's) is
    set meanwhile.

    Raises:
        RestartBudgetSpent: the policy's ``max_crashes``-th crash within its window.
        StoreError: not a crash of ``run`` but of the shared store: it stops the daemon
            (unless ``store`` says that it cannot write for now: see the module).
    """
    crashes: collections.deque[float] = collections.deque()
    while True:
        try:
            await run()
            return
        except Exception as exc:
            if isinstance(exc, StoreError) and (store is None or store.writable):
                raise
            now = clock.monotonic()
            # A quiet window forgets the crashes before it.
            while crashes and now - crashes[0] >= policy.window_seconds:
                crashes.popleft()
            crashes.append(now)
            giving_up = len(crashes) >= policy.max_crashes
            delay = policy.delay(len(crashes))
            log.error(
                event,
                # The traceback too, unless it holds an error of the HTTP stack, whose
                # own words may carry the request's secrets (demandbase/http.py).
                exc_info=None if _holds_transport_error(exc) else exc,
                extra={
                    **fields,
                    "crashes": len(crashes),
                    "window_seconds": policy.window_seconds,
                    "restart_in_seconds": None if giving_up else delay,
                    "error": describe(exc),
                },
            )
            if giving_up:
                raise RestartBudgetSpent(
                    f"crashed {len(crashes)} times within {policy.window_seconds:g} s;"
                    f" restarts given up until resumed: {describe(exc)}"
                ) from exc
            if on_crash is not None:
                await on_crash(exc)
            # A graceful stop never waits out a restart backoff.
            await wait_event(stopping, clock, delay, unless=unless)
            if stopping.is_set() or (unless is not None and unless.is_set()):
                return
            if store is not None and not store.writable:
                await _until_writable(store, stopping, unless)
                if stopping.is_set() or (unless is not None and unless.is_set()):
                    return


async def _until_writable(
    store: WritableStore, stopping: asyncio.Event, unless: asyncio.Event | None
) -> None:
    """Until the store takes writes again, or a stop is asked (which never waits)."""
    waits = [asyncio.ensure_future(store.wait_writable()), asyncio.ensure_future(stopping.wait())]
    if unless is not None:
        waits.append(asyncio.ensure_future(unless.wait()))
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def describe(exc: BaseException) -> str:
    """An exception as an operator reads it: its class and message, not its repr.

    A TaskGroup wraps what its tasks raised: the operator wants those, not the wrapper.
    An error of the HTTP stack that escaped the transport is put into words by the
    transport's one function for them, never by its own message.
    """
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(inner) for inner in exc.exceptions)
    if is_transport_error(exc):
        return describe_transport_error(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _holds_transport_error(exc: BaseException) -> bool:
    """Whether ``exc``, its group or its chain holds an error of the HTTP stack."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if is_transport_error(current):
            return True
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        # As a traceback shows them: the cause, and the context unless suppressed.
        if current.__cause__ is not None:
            pending.append(current.__cause__)
        if current.__context__ is not None and not current.__suppress_context__:
            pending.append(current.__context__)
    return False

"""The restart budget, in virtual time: backoff, a quiet window, giving up, stopping."""

from __future__ import annotations

import asyncio

import pytest

from dbsync.clock import FakeClock
from dbsync.errors import StoreError
from dbsync.restarts import RestartBudgetSpent, RestartPolicy, describe, run_with_restarts

POLICY = RestartPolicy(
    max_crashes=3, window_seconds=100.0, backoff_seconds=1.0, backoff_max_seconds=3.0
)


class Service:
    """A run() that crashes while ``crashing``, else returns; counts its runs."""

    def __init__(self) -> None:
        self.runs = 0
        self.crashing = True

    async def run(self) -> None:
        self.runs += 1
        if self.crashing:
            raise RuntimeError(f"bug {self.runs}")


def test_the_backoff_doubles_up_to_its_maximum() -> None:
    assert [POLICY.delay(n) for n in range(1, 5)] == [1.0, 2.0, 3.0, 3.0]


async def runs_after(clock: FakeClock, service: Service, seconds: float) -> int:
    """Runs once ``seconds`` passed and what they woke has had its turns of the loop."""
    await clock.advance(seconds)
    for _ in range(20):
        await asyncio.sleep(0)
    return service.runs


async def test_the_budget_is_spent_by_crashes_within_the_window() -> None:
    clock = FakeClock()
    service = Service()
    crashed: list[str] = []

    async def on_crash(exc: Exception) -> None:
        crashed.append(describe(exc))

    keeping = asyncio.create_task(
        run_with_restarts(
            service.run,
            policy=POLICY,
            clock=clock,
            stopping=asyncio.Event(),
            event="test_crashed",
            fields={},
            on_crash=on_crash,
        )
    )
    await clock.wait_for_sleepers()
    assert service.runs == 1
    # Restarted after 1 s, then after 2 s more: the third crash gives up.
    assert await runs_after(clock, service, 0.9) == 1
    assert await runs_after(clock, service, 0.1) == 2
    assert await runs_after(clock, service, 1.9) == 2
    assert await runs_after(clock, service, 0.1) == 3
    with pytest.raises(RestartBudgetSpent, match=r"crashed 3 times within 100 s.*bug 3"):
        await keeping
    assert crashed == ["RuntimeError: bug 1", "RuntimeError: bug 2"]


async def test_a_quiet_window_forgets_the_crashes_before_it() -> None:
    clock = FakeClock()
    service = Service()

    async def run() -> None:
        # Crash twice quickly, then twice more after a long quiet run, then run well.
        if service.runs == 2:
            await clock.sleep(150.0)
        service.crashing = service.runs < 4
        await service.run()

    keeping = asyncio.create_task(
        run_with_restarts(
            run,
            policy=POLICY,
            clock=clock,
            stopping=asyncio.Event(),
            event="test_crashed",
            fields={},
        )
    )
    while not keeping.done():
        await clock.advance(1.0)
    # Without the window's forgetting, the third crash would have given up.
    await keeping
    assert service.runs == 5


async def test_a_stop_never_waits_out_a_backoff() -> None:
    clock = FakeClock()
    service = Service()
    stopping = asyncio.Event()
    everyone = asyncio.Event()
    long_backoff = RestartPolicy(max_crashes=10, backoff_seconds=300.0, backoff_max_seconds=300.0)
    keeping = asyncio.create_task(
        run_with_restarts(
            service.run,
            policy=long_backoff,
            clock=clock,
            stopping=stopping,
            unless=everyone,
            event="test_crashed",
            fields={},
        )
    )
    await clock.wait_for_sleepers()
    everyone.set()
    await keeping  # with no clock advance at all
    assert service.runs == 1


async def test_a_store_error_is_not_contained() -> None:
    async def run() -> None:
        raise StoreError("disk full")

    with pytest.raises(StoreError):
        await run_with_restarts(
            run, policy=POLICY, clock=FakeClock(), stopping=asyncio.Event(), event="x", fields={}
        )


def test_a_reason_names_what_a_task_group_wrapped() -> None:
    group = ExceptionGroup("unhandled errors in a TaskGroup", [ValueError("bad row")])
    assert describe(group) == "ValueError: bad row"
    assert describe(KeyError()) == "KeyError"

"""The destination budget: daily windows, job slots, fairness, AIMD pace."""

from __future__ import annotations

import asyncio

import pytest

from dbsync.budget import BudgetLimits, DestinationBudget
from dbsync.clock import FakeClock
from dbsync.demandbase.wire import Endpoint

DAY = 100.0


class MemoryQuotaStore:
    """The store's quota methods, kept in dicts (the real ones are tested with SQLite)."""

    def __init__(self) -> None:
        self.used: dict[tuple[str, str, int], int] = {}
        self.pace: dict[str, float] = {}

    async def quota_usage(self, destination: str, window: int) -> dict[str, int]:
        return {e: n for (d, e, w), n in self.used.items() if d == destination and w == window}

    async def spend_quota(
        self, destination: str, endpoint: str, window: int, count: int = 1
    ) -> None:
        key = (destination, endpoint, window)
        self.used[key] = self.used.get(key, 0) + count

    async def load_pace(self, destination: str) -> float | None:
        return self.pace.get(destination)

    async def save_pace(self, destination: str, requests_per_minute: float) -> None:
        self.pace[destination] = requests_per_minute


def limits(**overrides: object) -> BudgetLimits:
    values: dict[str, object] = {
        "requests_per_minute": 10_000.0,
        "daily": {Endpoint.IMPORT_CREATE_JOB: 5, Endpoint.IMPORT_UPLOAD: 5},
        "concurrent_import_jobs": 2,
        "day_seconds": DAY,
        "quota_safety_margin": 0.0,
    }
    values.update(overrides)
    return BudgetLimits(**values)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    # 10 s into a window, so that the edge of the window is far.
    return FakeClock(start=1_000 * DAY + 10.0)


async def opened(budget: DestinationBudget) -> DestinationBudget:
    await budget.start()
    return budget


async def test_spending_stops_at_the_daily_quota_and_resumes_next_window(clock: FakeClock) -> None:
    store = MemoryQuotaStore()
    budget = await opened(DestinationBudget("d", limits(), store, clock))
    for _ in range(5):
        await budget.spend(Endpoint.IMPORT_CREATE_JOB)
    sixth = asyncio.create_task(budget.spend(Endpoint.IMPORT_CREATE_JOB))
    keeper = asyncio.create_task(budget.run())
    await clock.wait_for_sleepers(1)
    assert not sixth.done()
    assert store.used[("d", "import.create_job", 1000)] == 5
    await clock.advance(DAY - 10.0 + 0.1)  # into the next window
    await asyncio.wait_for(sixth, 30)
    assert store.used[("d", "import.create_job", 1001)] == 1
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)


async def test_an_endpoint_waiting_for_tomorrow_does_not_hold_back_another(
    clock: FakeClock,
) -> None:
    """Job creations are spent for today; a status read of a running job must still
    pass, or the job could never complete and free its slot."""
    daily = {Endpoint.IMPORT_CREATE_JOB: 1, Endpoint.IMPORT_JOB_STATUS: 5}
    budget = await opened(DestinationBudget("d", limits(daily=daily), MemoryQuotaStore(), clock))
    await budget.spend(Endpoint.IMPORT_CREATE_JOB)
    tomorrow = asyncio.create_task(budget.spend(Endpoint.IMPORT_CREATE_JOB, priority=0.0))
    await asyncio.sleep(0)
    await asyncio.wait_for(budget.spend(Endpoint.IMPORT_JOB_STATUS, priority=1.0), 30)
    assert not tomorrow.done()
    tomorrow.cancel()
    await asyncio.gather(tomorrow, return_exceptions=True)


async def test_spending_is_persisted_before_the_request_and_survives_a_restart(
    clock: FakeClock,
) -> None:
    store = MemoryQuotaStore()
    first = await opened(DestinationBudget("d", limits(), store, clock))
    for _ in range(3):
        await first.spend(Endpoint.IMPORT_UPLOAD)
    second = await opened(DestinationBudget("d", limits(), store, clock))
    assert second.snapshot().used["import.upload"] == 3
    await second.spend(Endpoint.IMPORT_UPLOAD)
    await second.spend(Endpoint.IMPORT_UPLOAD)
    blocked = asyncio.create_task(second.spend(Endpoint.IMPORT_UPLOAD))
    await asyncio.sleep(0)
    assert not blocked.done()  # 3 + 2 = the quota of 5, across the "restart"
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)


async def test_safety_margin_keeps_a_share_in_reserve(clock: FakeClock) -> None:
    budget = await opened(
        DestinationBudget(
            "d",
            limits(daily={Endpoint.IMPORT_UPLOAD: 100}, quota_safety_margin=0.05),
            MemoryQuotaStore(),
            clock,
        )
    )
    assert budget.snapshot().allowed["import.upload"] == 95


async def test_no_request_starts_at_the_edge_of_a_window(clock: FakeClock) -> None:
    """A request started in the last second of a window (the edge) could land on either
    side of Demandbase's midnight: it waits for the new window and is charged to it. A
    job slot, which needs room for a creation, waits too."""
    store = MemoryQuotaStore()
    budget = await opened(DestinationBudget("d", limits(), store, clock))
    keeper = asyncio.create_task(budget.run())
    await clock.advance(DAY - 10.0 - 0.5)  # 0.5 s before the window ends (edge = 1 s)
    upload = asyncio.create_task(budget.spend(Endpoint.IMPORT_UPLOAD))
    granted: list[str] = []

    async def job() -> None:
        async with budget.job(priority=0.0):
            granted.append("job")

    slot = asyncio.create_task(job())
    for _ in range(20):  # let both run until they wait; no real time passes
        await asyncio.sleep(0)
    assert not upload.done()
    assert granted == []
    assert store.used == {}
    await clock.advance(0.6)  # into the next window
    await asyncio.wait_for(asyncio.gather(upload, slot), 30)
    assert store.used == {("d", "import.upload", 1001): 1}
    assert granted == ["job"]
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)


async def test_job_slots_are_capped_and_go_to_the_oldest_backlog_first(clock: FakeClock) -> None:
    budget = await opened(DestinationBudget("d", limits(), MemoryQuotaStore(), clock))
    granted: list[str] = []
    release = asyncio.Event()

    async def job(name: str, priority: float) -> None:
        async with budget.job(priority=priority):
            granted.append(name)
            await release.wait()

    holders = [asyncio.create_task(job(f"holder{i}", 0.0)) for i in range(2)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert budget.snapshot().jobs_in_flight == 2
    young = asyncio.create_task(job("young", 500.0))
    old = asyncio.create_task(job("old", 100.0))
    for _ in range(3):
        await asyncio.sleep(0)
    assert granted == ["holder0", "holder1"]
    release.set()
    await asyncio.wait_for(asyncio.gather(*holders, young, old), 30)
    assert granted[2:] == ["old", "young"]


async def test_a_job_slot_needs_room_for_creation_and_upload(clock: FakeClock) -> None:
    budget = await opened(
        DestinationBudget(
            "d",
            limits(daily={Endpoint.IMPORT_CREATE_JOB: 5, Endpoint.IMPORT_UPLOAD: 1}),
            MemoryQuotaStore(),
            clock,
        )
    )
    await budget.spend(Endpoint.IMPORT_UPLOAD)
    waiting = asyncio.create_task(budget.job(priority=0.0).__aenter__())
    await asyncio.sleep(0)
    assert not waiting.done()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


async def test_a_429_halves_the_pace_and_quiet_minutes_restore_it(clock: FakeClock) -> None:
    store = MemoryQuotaStore()
    budget = await opened(DestinationBudget("d", limits(requests_per_minute=1000.0), store, clock))
    await budget.on_throttled(None)
    assert budget.snapshot().pace_per_minute == 500.0
    assert store.pace["d"] == 500.0
    # A burst: several 429s within a second halve once.
    await budget.on_throttled(None)
    assert budget.snapshot().pace_per_minute == 500.0
    keeper = asyncio.create_task(budget.run())
    await clock.wait_for_sleepers(1)
    await clock.advance(61.0)
    assert budget.snapshot().pace_per_minute == 600.0
    await clock.advance(300.0)
    assert budget.snapshot().pace_per_minute == 1000.0
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)
    assert budget.throttled == 2


async def test_the_learned_pace_survives_a_restart(clock: FakeClock) -> None:
    store = MemoryQuotaStore()
    first = await opened(DestinationBudget("d", limits(requests_per_minute=1000.0), store, clock))
    await first.on_throttled(None)
    second = await opened(DestinationBudget("d", limits(requests_per_minute=1000.0), store, clock))
    assert second.snapshot().pace_per_minute == 500.0


async def test_retry_after_holds_every_request(clock: FakeClock) -> None:
    budget = await opened(DestinationBudget("d", limits(), MemoryQuotaStore(), clock))
    await budget.on_throttled(30.0)
    held = asyncio.create_task(budget.spend(Endpoint.IMPORT_JOB_STATUS))
    await clock.wait_for_sleepers(1)
    assert not held.done()
    await clock.advance(30.0)
    await asyncio.wait_for(held, 30)


# --- fair turns: every audience waiting gets a job before any gets a second ----------


class Turns:
    """Audiences asking the budget for job slots again and again, in virtual time.

    Each holds its slot for ``hold`` seconds, spending a creation and an upload, and
    asks again at once while it has batches left; ``granted`` is the order of grants.
    ``since(name)`` is the priority it asks with: its oldest pending change.
    """

    def __init__(self, budget: DestinationBudget, clock: FakeClock, hold: float = 10.0) -> None:
        self.budget = budget
        self.clock = clock
        self.hold = hold
        self.granted: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, batches: int, since: float | None = None) -> None:
        async def audience() -> None:
            for _ in range(batches):
                priority = self.clock.time() if since is None else since
                async with self.budget.job(priority=priority, audience=name):
                    self.granted.append(name)
                    await self.budget.spend(Endpoint.IMPORT_CREATE_JOB, priority=priority)
                    await self.budget.spend(Endpoint.IMPORT_UPLOAD, priority=priority)
                    await self.clock.sleep(self.hold)

        self.tasks.append(asyncio.create_task(audience(), name=f"audience:{name}"))

    async def run_until_done(self, step: float = 1.0, limit: float = 100 * DAY) -> None:
        keeper = asyncio.create_task(self.budget.run())
        try:
            while not all(task.done() for task in self.tasks):
                assert self.clock.monotonic() < limit, f"still waiting: {self.granted}"
                await self.clock.advance(step)
            await asyncio.gather(*self.tasks)
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)


def rounds(granted: list[str]) -> list[list[str]]:
    """The grants cut into rounds: a round ends just before an audience's second grant."""
    cut: list[list[str]] = [[]]
    for name in granted:
        if name in cut[-1]:
            cut.append([])
        cut[-1].append(name)
    return cut


async def test_each_audience_waiting_gets_a_job_before_any_gets_a_second(
    clock: FakeClock,
) -> None:
    # 12 audiences, 5 job creations a window, 2 slots. Three hold large backlogs whose
    # oldest change is far older than the others' (four batches each): oldest-first
    # alone would give them all twelve of their jobs before the small ones had one.
    store = MemoryQuotaStore()
    budget = await opened(DestinationBudget("d", limits(), store, clock))
    turns = Turns(budget, clock)
    for i in range(3):
        turns.start(f"large{i}", batches=4, since=clock.time() - 3_600.0)
    for i in range(9):
        turns.start(f"small{i}", batches=1, since=clock.time() - 60.0 + i)
    await turns.run_until_done()

    first_round = turns.granted[:12]
    everyone = [f"large{i}" for i in range(3)] + [f"small{i}" for i in range(9)]
    assert sorted(first_round) == sorted(everyone)
    # Within a round the oldest waiting goes first; later rounds hold the large ones only.
    assert first_round[:3] == ["large0", "large1", "large2"]
    assert first_round[3:] == [f"small{i}" for i in range(9)]
    assert rounds(turns.granted)[1:] == [["large0", "large1", "large2"]] * 3
    # Never more than the window's quota: 5 a window, 21 jobs over five windows.
    per_window = [n for (_, e, _), n in store.used.items() if e == "import.create_job"]
    assert max(per_window) == 5
    assert sum(per_window) == 21


async def test_an_audience_whose_backlog_is_always_fresh_is_not_starved(
    clock: FakeClock,
) -> None:
    # Its oldest pending change is always the newest of all (new changes keep coming
    # and each batch takes the oldest): by age alone every other backlog, older and
    # larger, would go first until all of them were sent.
    budget = await opened(DestinationBudget("d", limits(), MemoryQuotaStore(), clock))
    turns = Turns(budget, clock)
    for i in range(4):
        turns.start(f"large{i}", batches=6, since=clock.time() - 3_600.0)
    turns.start("fresh", batches=6)  # asks with "now" every time
    await turns.run_until_done()

    assert turns.granted.index("fresh") < 5
    # Round after round, each audience once: the fresh one's k-th job comes before any
    # other's (k + 1)-th.
    for cut in rounds(turns.granted):
        assert sorted(cut) == sorted(["fresh", "large0", "large1", "large2", "large3"])


async def test_a_second_request_waiting_with_the_first_counts_from_the_first_grant(
    clock: FakeClock,
) -> None:
    # One audience queues two deliveries at once (it may have two jobs in flight): the
    # second does not keep the old priority both shared, it waits behind the others.
    budget = await opened(
        DestinationBudget("d", limits(concurrent_import_jobs=1), MemoryQuotaStore(), clock)
    )
    turns = Turns(budget, clock)
    turns.start("blocker", batches=1)
    await asyncio.sleep(0)
    turns.start("twice", batches=1, since=clock.time() - 100.0)
    turns.start("twice", batches=1, since=clock.time() - 100.0)
    turns.start("other", batches=1, since=clock.time() - 50.0)
    await turns.run_until_done()
    assert turns.granted == ["blocker", "twice", "other", "twice"]


async def test_a_backlog_stamped_in_the_future_waits_as_if_it_were_now(clock: FakeClock) -> None:
    budget = await opened(
        DestinationBudget("d", limits(concurrent_import_jobs=1), MemoryQuotaStore(), clock)
    )
    turns = Turns(budget, clock)
    turns.start("blocker", batches=1)
    await asyncio.sleep(0)
    turns.start("ahead", batches=1, since=clock.time() + 10 * DAY)  # a CDP clock ahead
    await clock.advance(1.0)
    turns.start("later", batches=1)  # asked after it, with a true "now"
    await turns.run_until_done()
    assert turns.granted == ["blocker", "ahead", "later"]


async def test_the_pace_runs_on_the_injected_clock(clock: FakeClock) -> None:
    budget = await opened(
        DestinationBudget("d", limits(requests_per_minute=2.0), MemoryQuotaStore(), clock)
    )
    for _ in range(2):  # a quiet bucket lets its rate through at once
        await budget.spend(Endpoint.IMPORT_JOB_STATUS)
    third = asyncio.create_task(budget.spend(Endpoint.IMPORT_JOB_STATUS))
    await clock.wait_for_sleepers(1)
    assert not third.done()
    await clock.advance(29.0)
    assert not third.done()
    await clock.advance(1.0)
    await asyncio.wait_for(third, 30)


async def test_a_snapshot_shows_a_new_window_without_run(clock: FakeClock) -> None:
    budget = await opened(DestinationBudget("d", limits(), MemoryQuotaStore(), clock))
    await budget.spend(Endpoint.IMPORT_CREATE_JOB)
    assert budget.snapshot().used["import.create_job"] == 1
    await clock.advance(DAY)
    snapshot = budget.snapshot()
    assert (snapshot.window, snapshot.used["import.create_job"]) == (1_001, 0)

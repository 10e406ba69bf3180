"""Fair turns under one budget: real actors, store and emulator, in virtual time.

Ten audiences share a destination of 2 job slots and 6 job creations a window: three
hold large backlogs (four batches each) older than anyone's, six a batch each, and
one keeps receiving changes, so that its oldest pending change is always the newest.
Everything is real but the clock: the actors call the emulator over HTTP, the store is
SQLite, the budget counts the quota; a FakeClock moves the windows and the jobs. The
assertions are on the order of the jobs Demandbase created and on counts, never on
durations: every audience gets its first job before any gets a second, the one kept
fresh is never left behind, and no window creates more jobs than its quota. A paused
audience neither sends nor spends a turn while it waits, and keeps a batch left open.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from dbsync.actor import ActorSettings, AudienceActor
from dbsync.budget import BudgetLimits, DestinationBudget
from dbsync.clock import FakeClock
from dbsync.demandbase.auth import LegacyToken
from dbsync.demandbase.client import DemandbaseClient
from dbsync.demandbase.emulator import EmulatorSettings
from dbsync.demandbase.wire import Endpoint
from dbsync.destination import Destination
from dbsync.model import Account, AudienceSpec, Change, ListAction
from dbsync.store import Store
from dbsync.testing import TOKEN, EmulatorApi, running_emulator

DAY = 100.0
JOBS_PER_WINDOW = 6
BATCH = 5
LARGE = [f"large{i}" for i in range(3)]
SMALL = [f"small{i}" for i in range(6)]
FRESH = "fresh"
EVERYONE = [*LARGE, *SMALL, FRESH]
pytestmark = pytest.mark.timeout(120)


class Run:
    """The actors of one destination and the means to move their time."""

    def __init__(
        self, api: EmulatorApi, store: Store, destination: Destination, clock: FakeClock
    ) -> None:
        self.api = api
        self.store = store
        self.destination = destination
        self.budget = destination.budget
        self.clock = clock
        self.actors: dict[str, AudienceActor] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.accounts = api.accounts(0, 100)
        self._fresh = 0

    async def give(self, audience: str, accounts: list[Account], *, age: float) -> None:
        """Changes for ``audience`` decided ``age`` seconds ago, folded at once."""
        ts = self.clock.time() - age
        await self.store.append_changes(
            [Change(audience_id=audience, account=a, member=True, ts=ts) for a in accounts]
        )
        await self.store.fold_pending()
        if audience in self.actors:
            self.actors[audience].wake()

    async def refresh(self) -> None:
        """One more account for the fresh audience, decided now."""
        self._fresh += 1
        await self.give(FRESH, [self.accounts[50 + self._fresh % 50]], age=0.0)

    async def step(self, seconds: float = 0.5) -> None:
        """Virtual time on, then real time for the HTTP and SQLite work it started."""
        await self.clock.advance(seconds)
        for _ in range(5):
            await asyncio.sleep(0.002)

    def jobs(self) -> list[str]:
        """The audiences of the jobs Demandbase created, in creation order."""
        jobs = sorted(self.api.emulator.tenant.import_jobs, key=lambda job: job.id)
        return [job.data_import_name.removeprefix("List ") for job in jobs]

    def jobs_per_window(self) -> Counter[int]:
        return Counter(int(job.created_at // DAY) for job in self.api.emulator.tenant.import_jobs)


@pytest.fixture
async def run(tmp_path: Path) -> AsyncIterator[Run]:
    # 3 s before a window ends: inside its edge, where no job starts, so that every
    # audience has asked before the first slot is granted.
    clock = FakeClock(start=1_000 * DAY + DAY - 3.0)
    settings = EmulatorSettings(accounts=100, job_delay_seconds=2.0, day_seconds=DAY)
    async with (
        running_emulator(settings, clock=clock) as api,
        Store.open(tmp_path / "dbsync.sqlite3", clock=clock) as store,
        aiohttp.ClientSession() as session,
    ):
        await store.sync_audiences(
            [
                AudienceSpec(audience_id=a, destination="dest", name=a, list_name=f"List {a}")
                for a in EVERYONE
            ]
        )
        limits = BudgetLimits(
            requests_per_minute=100_000.0,
            daily={
                Endpoint.IMPORT_CREATE_JOB: JOBS_PER_WINDOW,
                Endpoint.IMPORT_UPLOAD: JOBS_PER_WINDOW,
            },
            concurrent_import_jobs=2,
            day_seconds=DAY,
            quota_safety_margin=0.0,
        )
        budget = DestinationBudget("dest", limits, store, clock)
        await budget.start()
        client = DemandbaseClient(session, api.url, LegacyToken(TOKEN))
        destination = Destination("dest", client, budget)
        keeper = asyncio.create_task(budget.run())
        state = Run(api, store, destination, clock)
        try:
            yield state
        finally:
            for actor in state.actors.values():
                actor.stop()
            while not all(task.done() for task in state.tasks):
                await state.step(5.0)
            await asyncio.gather(*state.tasks)
            budget.stop()
            await asyncio.gather(keeper, return_exceptions=True)


def start(run: Run) -> None:
    for audience in EVERYONE:
        settings = ActorSettings(
            audience_id=audience,
            destination="dest",
            name=audience,
            list_name=f"List {audience}",
            requests_per_minute=100_000.0,
            max_records=BATCH,
            max_age_seconds=1.0,
            max_jobs_in_flight=2,
            job_poll_initial_seconds=2.0,
            job_poll_max_seconds=10.0,
        )
        actor = AudienceActor(
            settings, destination=run.destination, store=run.store, clock=run.clock
        )
        run.actors[audience] = actor
        run.tasks.append(asyncio.create_task(actor.run(), name=f"actor:{audience}"))


async def test_every_audience_gets_a_job_before_any_gets_a_second(run: Run) -> None:
    accounts = run.accounts
    # The large backlogs are the oldest by far: four batches each.
    for i, audience in enumerate(LARGE):
        await run.give(audience, accounts[i * 4 * BATCH : (i + 1) * 4 * BATCH], age=3_600.0)
    for i, audience in enumerate(SMALL):
        await run.give(audience, accounts[i * BATCH : (i + 1) * BATCH], age=60.0)
    await run.give(FRESH, accounts[50:51], age=2.0)  # due, and the youngest backlog
    start(run)
    # Every audience asks for a slot while the window's edge holds them all.
    for _ in range(200):
        if run.budget.jobs_waiting == len(EVERYONE):
            break
        await asyncio.sleep(0.01)
    assert run.budget.jobs_waiting == len(EVERYONE)
    assert run.jobs() == []

    # Time goes on; the fresh audience keeps receiving changes, one every 2 s.
    steps = 0
    while Counter(run.jobs())[FRESH] < 4 or any(
        Counter(run.jobs())[audience] < 4 for audience in LARGE
    ):
        steps += 1
        assert steps < 4_000, f"jobs so far: {run.jobs()}"
        if steps % 4 == 0:
            await run.refresh()
        await run.step()

    jobs = run.jobs()
    # The first round: each audience once, the oldest backlogs first.
    assert sorted(jobs[: len(EVERYONE)]) == sorted(EVERYONE)
    assert jobs[:3] == LARGE
    # The fresh one is not starved: its k-th job comes before anyone's (k + 1)-th.
    seen: Counter[str] = Counter()
    for audience in jobs:
        seen[audience] += 1
        if audience != FRESH:
            assert seen[audience] <= seen[FRESH] + 1, jobs
    # The quota holds in every window, and the round spanned more than one.
    per_window = run.jobs_per_window()
    assert max(per_window.values()) <= JOBS_PER_WINDOW
    assert len(per_window) >= 3


async def test_a_paused_audience_sends_nothing_and_resumed_gets_its_turn(run: Run) -> None:
    # Three audiences, each with one batch; the middle one is paused while it waits
    # for a slot. Granted one, it must not send; resumed, it gets its turn at once,
    # before the other two's next batches.
    accounts = run.accounts
    for i, audience in enumerate(SMALL[:3]):
        await run.give(audience, accounts[i * BATCH : (i + 1) * BATCH], age=60.0 - i)
    start(run)
    for _ in range(200):
        if run.budget.jobs_waiting == 3:
            break
        await asyncio.sleep(0.01)
    assert run.budget.jobs_waiting == 3
    paused = run.actors[SMALL[1]]
    paused.pause()
    for _ in range(40):  # 20 s: the new window, the other two's jobs done
        await run.step()
    assert run.jobs() == [SMALL[0], SMALL[2]]
    # Into the next window's edge, where all three wait: more for the two others, and
    # the paused one resumed. It never had a turn: it goes first.
    while DAY - run.clock.time() % DAY > 3.0:
        await run.step()
    await run.give(SMALL[0], accounts[50:55], age=30.0)
    await run.give(SMALL[2], accounts[55:60], age=30.0)
    paused.resume()
    for _ in range(200):
        if run.budget.jobs_waiting == 3:
            break
        await asyncio.sleep(0.01)
    assert run.budget.jobs_waiting == 3
    while len(run.jobs()) < 5:
        await run.step()
    assert run.jobs() == [SMALL[0], SMALL[2], SMALL[1], SMALL[0], SMALL[2]]


async def test_a_pause_keeps_a_batch_left_open_by_a_previous_run(run: Run) -> None:
    # A batch planned by a run that stopped before sending it: the next run resumes
    # it. Paused while that waits for a slot, the audience keeps the batch, and
    # resumed, sends it (its accounts are in flight: nothing else would send them).
    audience = SMALL[0]
    await run.give(audience, run.accounts[:BATCH], age=60.0)
    left_open = await run.store.plan_batch(audience, ListAction.INSERT, BATCH)
    assert left_open is not None
    start(run)
    for _ in range(200):
        if run.budget.jobs_waiting == 1:
            break
        await asyncio.sleep(0.01)
    assert run.budget.jobs_waiting == 1
    actor = run.actors[audience]
    actor.pause()
    for _ in range(20):
        await run.step()
    actor.resume()
    while not run.jobs():
        await run.step()
    for _ in range(20):
        await run.step()
    assert run.jobs() == [audience]
    assert (await run.store.backlog(audience)).pending == 0
    assert [b.batch_id for b in await run.store.open_batches(audience)] == []

"""One AudienceActor alone, in virtual time, against a scripted Demandbase and store.

Nothing here is the emulator or SQLite: the client answers from a script and records
each call, the store keeps an audience's dirty set in memory, and a FakeClock moves
only when a test advances it. So each test says, in order, what the actor asked of
Demandbase and when it checkpointed, and never measures a duration.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections.abc import AsyncIterator, Sequence

import msgspec
import pytest

from dbsync.actor import REFUSED_HOLD_SECONDS, ActorSettings, AudienceActor
from dbsync.budget import BudgetLimits, DestinationBudget
from dbsync.clock import FakeClock
from dbsync.demandbase.wire import ImportJob
from dbsync.destination import STOPPED_PROBE_SECONDS, Destination
from dbsync.errors import (
    AuthError,
    BadRequestError,
    DemandbaseError,
    PermissionDeniedError,
    ThrottledError,
)
from dbsync.model import (
    Account,
    AudienceRecord,
    AudienceState,
    Backlog,
    Batch,
    BatchState,
    ListAction,
)
from dbsync.states import DestinationState
from dbsync.triage import MAX_JOBS_PER_BATCH
from tests.unit.test_budget import MemoryQuotaStore

AUDIENCE = "aud-1"
POLL_SECONDS = 2.0


class ScriptedClient:
    """Demandbase's Data Import API, answering from a script; ``calls`` records each call.

    ``uploads`` holds what the next uploads do (an error to raise, or None to accept);
    ``job_states`` the states the next status reads answer (then "completed").
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.uploads: list[DemandbaseError | None] = []
        self.job_states: list[str] = []
        # The accountListId of the next completed jobs (then 7).
        self.list_ids: list[int] = []
        self._ids = itertools.count(101)

    def _job(self, job_id: int, state: str) -> ImportJob:
        return ImportJob(
            id=job_id,
            data_import_name="List 1",
            entity_type="Account",
            state=state,
            created_at="",
            updated_at="",
            account_list_id=7,
        )

    async def create_import_job(self, data_import_name: str) -> ImportJob:
        job_id = next(self._ids)
        self.calls.append(f"create {job_id}")
        return self._job(job_id, "new")

    async def upload_import_data(self, job_id: int, data: bytes, *, list_action: str) -> ImportJob:
        self.calls.append(f"upload {job_id} {list_action}")
        if self.uploads and (error := self.uploads.pop(0)) is not None:
            raise error
        return self._job(job_id, "processing")

    async def get_import_job(self, job_id: int) -> ImportJob:
        state = self.job_states.pop(0) if self.job_states else "completed"
        self.calls.append(f"status {job_id} {state}")
        job = self._job(job_id, state)
        if state.lower() == "completed" and self.list_ids:
            job = msgspec.structs.replace(job, account_list_id=self.list_ids.pop(0))
        return job


class MemoryDeliveryStore:
    """An audience's dirty set and batches, in dicts; ``events`` records the checkpoints."""

    def __init__(self, accounts: list[Account], clock: FakeClock) -> None:
        self.dirty = {a.external_id: a for a in accounts}
        self.batches: dict[int, Batch] = {}
        self.events: list[str] = []
        self.ledger: dict[str, int] = {}
        self.states: list[AudienceState] = []
        self._clock = clock
        self._changed_at = clock.time()
        self._ids = itertools.count(1)

    def _in_flight(self) -> set[str]:
        return {a.external_id for b in self.batches.values() if b.state.is_open for a in b.accounts}

    async def backlog(self, audience_id: str) -> Backlog:
        pending = len(set(self.dirty) - self._in_flight())
        return Backlog(
            inserts=pending,
            deletes=0,
            oldest_changed_at=self._changed_at if pending else None,
            in_flight=len(self._in_flight()),
        )

    async def plan_batch(self, audience_id: str, action: ListAction, max_rows: int) -> Batch | None:
        free = [a for key, a in self.dirty.items() if key not in self._in_flight()]
        if action is not ListAction.INSERT or not free:
            return None
        batch = Batch(
            batch_id=next(self._ids),
            audience_id=audience_id,
            action=action,
            state=BatchState.PLANNED,
            accounts=tuple(free[:max_rows]),
            created_at=self._clock.time(),
        )
        self.batches[batch.batch_id] = batch
        return batch

    def _move(self, batch_id: int, state: BatchState, **changes: object) -> None:
        self.batches[batch_id] = msgspec.structs.replace(
            self.batches[batch_id], state=state, **changes
        )

    async def open_batches(self, audience_id: str) -> list[Batch]:
        return [b for b in self.batches.values() if b.state.is_open]

    async def mark_created(self, batch_id: int, job_id: int) -> None:
        self._move(batch_id, BatchState.CREATED, job_id=job_id)

    async def mark_uploaded(self, batch_id: int) -> None:
        self._move(batch_id, BatchState.UPLOADED)

    async def complete_batch(self, batch_id: int, *, list_id: int | None) -> int:
        batch = self.batches[batch_id]
        for account in batch.accounts:
            self.dirty.pop(account.external_id, None)
        self._move(batch_id, BatchState.COMPLETED)
        self.events.append(f"checkpoint {batch_id}")
        return len(batch.accounts)

    async def fail_batch(self, batch_id: int, reason: str) -> None:
        self._move(batch_id, BatchState.FAILED)
        self.events.append(f"failed {batch_id}")

    async def abandon_batch(self, batch_id: int, reason: str) -> None:
        self._move(batch_id, BatchState.ABANDONED)

    async def renew_batch(self, batch_id: int, reason: str) -> Batch:
        old = self.batches[batch_id]
        self._move(batch_id, BatchState.FAILED)
        self.events.append(f"failed {batch_id}")
        batch = msgspec.structs.replace(
            old, batch_id=next(self._ids), state=BatchState.PLANNED, job_id=None
        )
        self.batches[batch.batch_id] = batch
        return batch

    async def audience(self, audience_id: str) -> AudienceRecord | None:
        return None

    async def split_batch(self, batch_id: int) -> tuple[Batch, Batch]:
        old = self.batches[batch_id]
        self._move(batch_id, BatchState.ABANDONED)
        middle = len(old.accounts) // 2
        halves = []
        for part in (old.accounts[:middle], old.accounts[middle:]):
            batch = msgspec.structs.replace(
                old, batch_id=next(self._ids), state=BatchState.PLANNED, accounts=part, job_id=None
            )
            self.batches[batch.batch_id] = batch
            halves.append(batch)
        return halves[0], halves[1]

    async def reject_batch(self, batch_id: int, reason: str) -> None:
        batch = self.batches[batch_id]
        for account in batch.accounts:
            self.dirty.pop(account.external_id, None)
        self._move(batch_id, BatchState.ABANDONED)
        self.events.append(f"set aside {batch_id}: {reason}")

    async def resync(self, audience_id: str) -> int:
        return 0

    async def adoption_pending(self, audience_id: str) -> bool:
        return False

    async def add_to_ledger(self, audience_id: str, **deltas: int) -> None:
        for name, count in deltas.items():
            self.ledger[name] = self.ledger.get(name, 0) + count

    async def set_audience_state(
        self, audience_id: str, state: AudienceState, reason: str = ""
    ) -> None:
        self.states.append(state)


class Highest(random.Random):
    """Full jitter at its top: every backoff is its cap, so a test knows each wait."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Harness:
    def __init__(
        self,
        clock: FakeClock,
        client: ScriptedClient,
        store: MemoryDeliveryStore,
        destination: Destination,
    ) -> None:
        self.clock = clock
        self.client = client
        self.store = store
        self.destination = destination

    async def settle(self) -> None:
        """Let every task run until it waits on the clock or an event."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        await self.clock.advance(seconds)
        await self.settle()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_000 * 86_400.0 + 3_600.0)


@pytest.fixture
async def running(clock: FakeClock) -> AsyncIterator[tuple[Harness, AudienceActor]]:
    """An actor of 3 pending accounts (a full batch), running; stopped at the end."""
    client = ScriptedClient()
    accounts = [Account(external_id=f"A{i}", name=f"Co {i}") for i in range(3)]
    store = MemoryDeliveryStore(accounts, clock)
    limits = BudgetLimits(
        requests_per_minute=1_000_000.0,
        daily={},
        concurrent_import_jobs=4,
        quota_safety_margin=0.0,
    )
    budget = DestinationBudget("dest", limits, MemoryQuotaStore(), clock)
    await budget.start()
    settings = ActorSettings(
        audience_id=AUDIENCE,
        destination="dest",
        name="List 1",
        list_name="List 1",
        requests_per_minute=6_000.0,
        max_records=3,
        max_age_seconds=60.0,
        max_jobs_in_flight=1,
        job_poll_initial_seconds=POLL_SECONDS,
        job_poll_max_seconds=30.0,
    )
    destination = Destination("dest", client, budget)
    actor = AudienceActor(
        settings,
        destination=destination,
        store=store,
        clock=clock,
        rng=Highest(),
    )
    harness = Harness(clock, client, store, destination)
    task = asyncio.create_task(actor.run(), name=f"actor:{AUDIENCE}")
    await harness.settle()
    try:
        yield harness, actor
    finally:
        actor.stop()
        # Jobs in flight are let finish: time goes on until the actor has returned.
        while not task.done():
            await harness.advance(60.0)
        await task


async def test_a_batch_is_checkpointed_only_once_its_job_completed(
    running: tuple[Harness, AudienceActor],
) -> None:
    h, actor = running
    h.client.job_states = ["processing"]
    assert h.client.calls == ["create 101", "upload 101 insert"]
    assert h.store.events == []
    # The first poll comes after the initial poll delay; the job still processes.
    await h.advance(POLL_SECONDS)
    assert h.client.calls[-1] == "status 101 processing"
    assert h.store.events == []  # no checkpoint before the acknowledgment
    # The next poll comes after twice the delay, and finds the job completed.
    await h.advance(POLL_SECONDS)
    assert h.client.calls[-1] == "status 101 processing"
    await h.advance(POLL_SECONDS)
    assert h.client.calls == [
        "create 101",
        "upload 101 insert",
        "status 101 processing",
        "status 101 completed",
    ]
    assert h.store.events == ["checkpoint 1"]
    assert h.store.dirty == {}
    assert actor.jobs_completed == 1
    assert actor.state is AudienceState.ACTIVE


async def test_a_429_waits_at_most_a_minute_each_time_and_loses_nothing(
    running: tuple[Harness, AudienceActor],
) -> None:
    h, actor = running
    # The actor already made its first upload; script the next ones before it retries.
    storm = 10  # past GIVE_UP_AFTER, and long enough that an uncapped backoff shows
    h.client.uploads = [ThrottledError("throttled", status=429) for _ in range(storm)]
    h.client.calls.clear()
    # Start again with a fresh batch: the first upload went through, so complete it.
    await h.advance(POLL_SECONDS)
    assert h.store.events == ["checkpoint 1"]
    # Three more accounts: the next batch meets the storm.
    h.store.dirty = {f"B{i}": Account(external_id=f"B{i}") for i in range(3)}
    actor.wake()
    await h.settle()
    assert [c for c in h.client.calls if c.startswith("upload")] == ["upload 102 insert"]
    # Backoffs of 1, 2, 4 ... 32 s, then the cap: never more than a minute after a 429.
    uploads_by_minute = []
    for _ in range(storm - 3):
        await h.advance(60.0)
        uploads_by_minute.append(len([c for c in h.client.calls if c.startswith("upload")]))
    assert uploads_by_minute == [6, 7, 8, 9, 10, 11, 11]
    assert h.store.ledger == {"throttled": storm}
    # The same job, never a second one: a 429 is not a reason to start over.
    assert [c for c in h.client.calls if c.startswith("create")] == ["create 102"]
    await h.advance(60.0)
    assert h.store.events == ["checkpoint 1", "checkpoint 2"]
    assert h.store.dirty == {}
    # Eight failures in a row report failed; the first success reports active again.
    assert h.store.states[-2:] == [AudienceState.FAILED, AudienceState.ACTIVE]


async def test_a_failed_job_puts_its_accounts_back_and_they_are_sent_again(
    running: tuple[Harness, AudienceActor],
) -> None:
    h, _ = running
    h.client.job_states = ["failed"]
    await h.advance(POLL_SECONDS)
    assert h.store.events == ["failed 1"]
    # Still dirty: a new batch, a new job, and this one completes.
    assert set(h.store.dirty) == {"A0", "A1", "A2"}
    await h.advance(POLL_SECONDS)
    assert h.client.calls == [
        "create 101",
        "upload 101 insert",
        "status 101 failed",
        "create 102",
        "upload 102 insert",
        "status 102 completed",
    ]
    assert h.store.events == ["failed 1", "checkpoint 2"]
    assert h.store.dirty == {}


async def test_a_refused_token_stops_the_destination_and_holds_the_work(
    running: tuple[Harness, AudienceActor],
) -> None:
    h, actor = running
    await h.advance(POLL_SECONDS)
    h.store.dirty = {"C0": Account(external_id="C0")}
    h.client.uploads = [AuthError("token rejected", status=401)]
    actor.flush()
    await h.settle()
    destination = h.destination
    assert destination.state is DestinationState.AUTH_FAILED
    assert actor.state is AudienceState.STOPPED
    assert h.store.dirty == {"C0": Account(external_id="C0")}  # nothing dropped
    # The destination is probed again later; the upload then goes through.
    await h.advance(900.0)
    assert destination.state is DestinationState.RUNNING
    assert actor.state is AudienceState.ACTIVE
    await h.advance(POLL_SECONDS)
    assert h.store.dirty == {}


async def test_a_destination_stopped_by_another_call_stops_this_audience_too(
    running: tuple[Harness, AudienceActor],
) -> None:
    """Another audience's call was refused (403) first: this actor's next call waits
    for the destination, and its state says STOPPED meanwhile, not ACTIVE."""
    h, actor = running
    await h.advance(POLL_SECONDS)
    assert h.store.dirty == {}
    h.destination.stop(DestinationState.PERMISSION_DENIED, PermissionDeniedError("no", status=403))
    h.store.dirty = {"C0": Account(external_id="C0")}
    actor.flush()
    await h.settle()
    assert actor.state is AudienceState.STOPPED
    assert h.store.dirty == {"C0": Account(external_id="C0")}  # held, not sent
    # A probe goes through (the delivery waits one probe period for the destination,
    # its first call another): the destination runs, and so does the audience.
    for _ in range(2):
        await h.advance(STOPPED_PROBE_SECONDS)
    assert h.destination.state is DestinationState.RUNNING
    assert actor.state is AudienceState.ACTIVE
    await h.advance(POLL_SECONDS)
    assert h.store.dirty == {}


async def test_states_in_another_case_are_the_same_states(
    running: tuple[Harness, AudienceActor],
) -> None:
    h, _ = running
    h.client.job_states = ["PROCESSING", "Completed"]
    await h.advance(POLL_SECONDS)
    await h.advance(2 * POLL_SECONDS)
    assert h.store.events == ["checkpoint 1"]
    assert h.store.dirty == {}


async def test_a_state_nobody_knows_is_polled_until_the_deadline_then_counts_as_failed(
    running: tuple[Harness, AudienceActor], caplog: pytest.LogCaptureFixture
) -> None:
    h, actor = running
    h.client.job_states = ["queued"] * 10_000
    await h.advance(POLL_SECONDS)
    assert h.store.events == []
    # Polled (at most every 30 s) for the hour of the deadline, never given up before.
    waited = POLL_SECONDS
    while not h.store.events:
        await h.advance(30.0)
        waited += 30.0
        assert waited < actor.settings.unknown_state_deadline_seconds + 120.0
    assert waited >= actor.settings.unknown_state_deadline_seconds
    assert h.store.events == ["failed 1"]
    assert "job_state_unknown" in [r.getMessage() for r in caplog.records]
    status_reads = sum(1 for c in h.client.calls if c.startswith("status 101"))
    assert status_reads <= actor.settings.unknown_state_deadline_seconds / 30.0 + 10


async def test_a_batch_that_every_job_fails_is_split_then_set_aside_within_the_bound(
    running: tuple[Harness, AudienceActor],
) -> None:
    h, _ = running
    h.client.job_states = ["failed"] * 1_000
    for _ in range(100):
        await h.advance(30.0)
        if not h.store.dirty:
            break
    # Every account set aside with the reason, none delivered, the jobs bounded.
    assert h.store.dirty == {}
    set_aside = [e for e in h.store.events if e.startswith("set aside")]
    assert set_aside
    assert all("Demandbase failed job" in e and "2 jobs failed" in e for e in set_aside)
    assert not any(e.startswith("checkpoint") for e in h.store.events)
    creates = [c for c in h.client.calls if c.startswith("create")]
    assert len(creates) <= MAX_JOBS_PER_BATCH
    # 3 accounts: 2 jobs whole, then halves of 1 and 2 (2 jobs each), the 2 in halves of 1.
    assert len(creates) == 2 + 2 + 2 + 2 + 2


async def test_a_job_failed_once_is_sent_again_whole(
    running: tuple[Harness, AudienceActor],
) -> None:
    h, _ = running
    h.client.job_states = ["failed"]
    await h.advance(POLL_SECONDS)
    await h.advance(POLL_SECONDS)
    assert h.store.events == ["failed 1", "checkpoint 2"]
    assert [c for c in h.client.calls if c.startswith("upload")] == [
        "upload 101 insert",
        "upload 102 insert",
    ]


@pytest.mark.parametrize("status", [409, 413, 415])
async def test_409_413_415_on_an_upload_do_not_split_the_batch(
    running: tuple[Harness, AudienceActor], status: int
) -> None:
    h, actor = running
    await h.advance(POLL_SECONDS)  # the first batch completes
    h.store.dirty = {f"B{i}": Account(external_id=f"B{i}", name=f"Co {i}") for i in range(3)}
    h.client.uploads = [BadRequestError("refused", endpoint="import.upload", status=status)]
    h.client.job_states = ["new"]  # the job never took the data
    actor.flush()
    await h.settle()
    assert [c for c in h.client.calls if c.startswith("create")] == ["create 101", "create 102"]
    assert h.store.batches[2].state is BatchState.ABANDONED
    assert actor.state is AudienceState.FAILED
    assert str(status) in actor.last_error
    assert set(h.store.dirty) == {"B0", "B1", "B2"}  # held, not set aside, not lost
    # Held for the hold, not sent again in a loop; then tried once more.
    await h.advance(REFUSED_HOLD_SECONDS - 60.0)
    assert [c for c in h.client.calls if c.startswith("create")] == ["create 101", "create 102"]
    await h.advance(120.0)
    await h.advance(POLL_SECONDS)
    assert h.store.dirty == {}


async def test_a_job_that_fed_another_list_stops_the_audience_until_resumed(
    running: tuple[Harness, AudienceActor], caplog: pytest.LogCaptureFixture
) -> None:
    h, actor = running
    h.client.list_ids = [7, 8]
    await h.advance(POLL_SECONDS)
    assert h.store.events == ["checkpoint 1"]
    # New changes; the next job reports list 8, not the audience's list 7.
    h.store.dirty = {f"B{i}": Account(external_id=f"B{i}", name=f"Co {i}") for i in range(3)}
    actor.flush()
    await h.settle()
    await h.advance(30.0)
    assert h.store.events == ["checkpoint 1", "failed 2"]
    assert actor.state is AudienceState.CONTRACT_BROKEN
    assert "list 8" in actor.contract_breach
    assert h.store.states[-1] is AudienceState.CONTRACT_BROKEN
    assert "contract_broken" in [r.getMessage() for r in caplog.records]
    # Nothing more is sent, however long and however many flushes.
    calls = list(h.client.calls)
    actor.flush()
    await h.advance(600.0)
    assert h.client.calls == calls
    assert set(h.store.dirty) == {"B0", "B1", "B2"}
    # The operator looked and resumes: sending goes on (to list 7 again).
    actor.resume()
    await h.settle()
    await h.advance(30.0)
    assert actor.state is AudienceState.ACTIVE
    assert h.store.dirty == {}


class RetryingStore(MemoryDeliveryStore):
    """No pending account; ``set_aside`` accounts are due for a retry now."""

    def __init__(self, set_aside: list[Account], clock: FakeClock) -> None:
        super().__init__([], clock)
        self.set_aside = {a.external_id: a for a in set_aside}

    async def retry_due_in(self, audience_id: str, delays: Sequence[float]) -> float:
        return 0.0 if self.set_aside else math.inf

    async def release_retries(
        self, audience_id: str, delays: Sequence[float], max_rows: int
    ) -> int:
        released = len(self.set_aside)
        self.dirty.update(self.set_aside)
        self.set_aside.clear()
        self.events.append(f"released {released}")
        return released


async def test_a_due_retry_takes_only_a_job_slot_no_other_batch_waits_for(
    clock: FakeClock,
) -> None:
    """One job slot, held by another audience's job. The actor's set-aside account is due
    for a retry: it asks for the slot; then a third audience, whose backlog is younger,
    asks too. When the slot is freed it goes to the third audience, not to the retry;
    the retry is sent once nobody else waits."""
    client = ScriptedClient()
    store = RetryingStore([Account(external_id="U1", name="Unmatched Co")], clock)
    limits = BudgetLimits(requests_per_minute=1_000_000.0, daily={}, concurrent_import_jobs=1)
    budget = DestinationBudget("dest", limits, MemoryQuotaStore(), clock)
    await budget.start()
    harness = Harness(clock, client, store, Destination("dest", client, budget))
    release_first, release_second = asyncio.Event(), asyncio.Event()
    granted: list[str] = []

    async def other(name: str, priority: float, release: asyncio.Event) -> None:
        async with budget.job(priority=priority):
            granted.append(name)
            await release.wait()

    first = asyncio.create_task(other("first", clock.time(), release_first))
    await harness.settle()
    actor = AudienceActor(
        ActorSettings(
            audience_id=AUDIENCE,
            destination="dest",
            name="List 1",
            list_name="List 1",
            requests_per_minute=6_000.0,
            job_poll_initial_seconds=POLL_SECONDS,
            retry_delays=(86_400.0,),
        ),
        destination=harness.destination,
        store=store,
        clock=clock,
        rng=Highest(),
    )
    running = asyncio.create_task(actor.run())
    await harness.settle()
    second = asyncio.create_task(other("younger", clock.time() + 3_600.0, release_second))
    await harness.settle()
    assert (granted, client.calls) == (["first"], [])

    release_first.set()
    await harness.settle()
    assert (granted, client.calls) == (["first", "younger"], []), "the retry waits"

    release_second.set()
    await harness.advance(POLL_SECONDS)
    assert store.events[0] == "released 1"
    assert client.calls[:2] == ["create 101", "upload 101 insert"]
    actor.stop()
    while not running.done():
        await harness.advance(60.0)
    await asyncio.gather(first, second, running)
    budget.stop()

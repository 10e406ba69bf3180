"""One Reconciler alone, in virtual time, against a scripted Data Export API and store.

Nothing here is the emulator or SQLite: the export client answers from a script and
records each call, the store keeps each audience's accounts and read-back runs in
memory (judging with :mod:`dbsync.judgment`, the rule the real store applies),
and a FakeClock moves only when a test advances it. So each test says, in order, what
the reconciler asked of Demandbase and what it told the store, and never measures a
duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from dbsync.budget import BudgetLimits, DestinationBudget
from dbsync.clock import FakeClock
from dbsync.config import ReconcileSettings
from dbsync.demandbase.wire import Endpoint, ExportJobDetails, ExportJobStatus, ImportJob
from dbsync.destination import Destination
from dbsync.errors import DemandbaseError, StoreError, ThrottledError
from dbsync.judgment import Judgment, Listing, MemberRow, judge_chunk, match_listed
from dbsync.model import (
    LedgerCheck,
    LedgerCounts,
    ListedAccount,
    LossTally,
    ReadbackVerdict,
    ReconcileFacts,
    ReconcileRun,
)
from dbsync.reconcile import ReconcilePlan, Reconciler
from dbsync.reconcile.readback import job_seconds
from dbsync.retry import THROTTLED_BACKOFF_MAX_SECONDS
from tests.unit.test_budget import MemoryQuotaStore

DAY = 86_400.0
# An hour into a quota day (windows are aligned to the epoch, like Demandbase's).
START = 1_000 * DAY + 3_600.0
WINDOW_END = 1_001 * DAY
POLL_SECONDS = 30.0
LAG_SECONDS = 600.0
SETTINGS = ReconcileSettings(
    visibility_lag_seconds=LAG_SECONDS,
    interval_seconds=DAY,
    repair_limit=1,
    export_poll_initial_seconds=POLL_SECONDS,
    export_poll_max_seconds=120.0,
)


# --- the scripted Data Export API -----------------------------------------------------------


class ScriptedExportClient:
    """Demandbase's Data Export API, answering from a script; ``calls`` records each call.

    ``creates`` holds what the next job creations do (an error to raise, or None to
    accept); ``job_states`` the states the next status reads answer (then "finished");
    ``members`` what each list holds, by list id. A results file is read (after
    ``before_reading``, as the real client does) once ``parsing`` is set.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.creates: list[DemandbaseError | None] = []
        self.job_states: list[str] = []
        self.members: dict[int, list[ListedAccount]] = {}
        self._ids = itertools.count(1)
        self._lists: dict[str, int] = {}
        self.parsing = asyncio.Event()
        self.parsing.set()
        self.reads: list[str] = []  # the jobs whose file was read, in order

    async def create_account_list_export(
        self, job_name: str, account_list_id: int
    ) -> ExportJobDetails:
        self.calls.append(f"create {account_list_id}")
        if self.creates and (error := self.creates.pop(0)) is not None:
            raise error
        job_id = f"job{next(self._ids)}"
        self._lists[job_id] = account_list_id
        return ExportJobDetails(
            job_id=job_id,
            job_status="accepted",
            entity_type="account",
            job_name=job_name,
            created_at="",
        )

    async def get_export_job(self, job_id: str) -> ExportJobStatus:
        state = self.job_states.pop(0) if self.job_states else "finished"
        self.calls.append(f"status {job_id} {state}")
        return ExportJobStatus(
            job_id=job_id,
            job_status=state,
            results_url=f"https://results.example/{job_id}" if state == "finished" else "",
            message="export failed: internal error" if state == "failed" else None,
        )

    async def read_export_accounts(
        self, results_url: str, *, before_reading: Callable[[], Awaitable[None]] | None = None
    ) -> list[ListedAccount]:
        job_id = results_url.rsplit("/", 1)[-1]
        self.calls.append(f"download {job_id}")
        if before_reading is not None:
            await before_reading()
        await self.parsing.wait()
        self.reads.append(job_id)
        return list(self.members.get(self._lists[job_id], []))

    def creates_made(self) -> list[str]:
        return [c for c in self.calls if c.startswith("create")]


class ScriptedMultiListClient(ScriptedExportClient):
    """The same, with exports of many lists in one job whose rows name their list [A5]."""

    def __init__(self) -> None:
        super().__init__()
        self._many: dict[str, list[int]] = {}

    async def create_account_lists_export(
        self, job_name: str, account_list_ids: list[int]
    ) -> ExportJobDetails:
        self.calls.append(f"create {' '.join(map(str, account_list_ids))}")
        job_id = f"job{next(self._ids)}"
        self._many[job_id] = list(account_list_ids)
        return ExportJobDetails(
            job_id=job_id,
            job_status="accepted",
            entity_type="account",
            job_name=job_name,
            created_at="",
        )

    async def read_export_accounts_by_list(
        self, results_url: str, *, before_reading: Callable[[], Awaitable[None]] | None = None
    ) -> tuple[dict[int, list[ListedAccount]], int]:
        job_id = results_url.rsplit("/", 1)[-1]
        self.calls.append(f"download {job_id}")
        if before_reading is not None:
            await before_reading()
        await self.parsing.wait()
        self.reads.append(job_id)
        by_list = {i: list(self.members.get(i, [])) for i in self._many[job_id]}
        return by_list, 100 * sum(len(members) for members in by_list.values())


class NoImports:
    """The destination's import client: a reconciler must never import anything."""

    async def create_import_job(self, data_import_name: str) -> ImportJob:
        raise AssertionError("a reconciler created an import job")

    async def upload_import_data(self, job_id: int, data: bytes, *, list_action: str) -> ImportJob:
        raise AssertionError("a reconciler uploaded import data")

    async def get_import_job(self, job_id: int) -> ImportJob:
        raise AssertionError("a reconciler read an import job")


# --- the store, in memory -------------------------------------------------------------------


@dataclass
class Member:
    """One of an audience's accounts, with the columns the judgment reads."""

    external_id: str
    desired: int = 1
    delivered: int = 1
    rejected: int = 0
    acked_at: float | None = START - DAY
    ack_batch: int | None = 1
    changed_at: float = START - DAY
    repairs: int = 0

    def row(self) -> MemberRow:
        name, domain = f"Co {self.external_id}", f"{self.external_id.lower()}.example"
        return (
            self.external_id,
            name,
            domain,
            self.desired,
            self.delivered,
            None,
            self.rejected,
            self.acked_at,
            self.ack_batch,
            self.changed_at,
            self.repairs,
        )

    def listed(self) -> ListedAccount:
        key, name, domain = self.row()[:3]
        return ListedAccount(external_id=key, name=name, domain=domain)


@dataclass
class Run:
    run: ReconcileRun
    state: str = "exporting"
    finished_at: float | None = None
    reason: str = ""


@dataclass
class Audience:
    list_id: int | None
    first_acked_at: float | None = START - 2 * DAY
    members: dict[str, Member] = field(default_factory=dict)


class MemoryReadbackStore:
    """The store's read-back methods, in dicts; ``events`` records what it was told.

    ``apply_readback`` judges with :func:`~dbsync.judgment.judge_chunk` (one chunk)
    and applies the insert side of its decision as the SQLite store does: a lost member
    is marked to send again with one more repair, or set aside past the repair limit.
    Only members are modelled: a test here never removes an account.
    """

    def __init__(self, clock: FakeClock) -> None:
        self.audiences: dict[str, Audience] = {}
        self.runs: dict[int, Run] = {}
        self.events: list[str] = []
        self.facts_reads = 0  # how often the reconciler looked whose turn it is
        self.volume: dict[tuple[str, int], int] = {}  # export bytes by destination, window
        self._clock = clock
        self._ids = itertools.count(1)

    def add(self, audience_id: str, list_id: int | None, members: Iterable[str] = ()) -> Audience:
        audience = Audience(list_id, members={key: Member(key) for key in members})
        self.audiences[audience_id] = audience
        return audience

    def read_back_before(self, audience_id: str, started_at: float) -> None:
        """A completed read-back of the audience, started at ``started_at``."""
        run = self._new_run(audience_id, f"old{audience_id}", started_at)
        run.state, run.finished_at = "completed", started_at + POLL_SECONDS

    def deliver(self, audience_id: str, *, batch: int) -> None:
        """What the audience's actor does: send the accounts marked to send, acknowledged."""
        for member in self.audiences[audience_id].members.values():
            if member.desired != member.delivered and not member.rejected:
                member.delivered = member.desired
                member.acked_at = member.changed_at = self._clock.time()
                member.ack_batch = batch

    def _new_run(self, audience_id: str, export_job_id: str, started_at: float) -> Run:
        audience = self.audiences[audience_id]
        assert audience.list_id is not None
        run = Run(
            ReconcileRun(
                run_id=next(self._ids),
                audience_id=audience_id,
                list_id=audience.list_id,
                export_job_id=export_job_id,
                started_at=started_at,
            )
        )
        self.runs[run.run.run_id] = run
        return run

    # ReadbackStore

    async def reconcile_facts(self, audience_ids: Iterable[str]) -> list[ReconcileFacts]:
        self.facts_reads += 1
        facts = []
        for audience_id in sorted(set(audience_ids)):
            audience = self.audiences[audience_id]
            runs = [r for r in self.runs.values() if r.run.audience_id == audience_id]
            completed = [r.finished_at for r in runs if r.state == "completed" and r.finished_at]
            facts.append(
                ReconcileFacts(
                    audience_id=audience_id,
                    list_id=audience.list_id,
                    first_acked_at=audience.first_acked_at,
                    last_started_at=max((r.run.started_at for r in runs), default=None),
                    last_completed_at=max(completed, default=None),
                )
            )
        return facts

    async def last_reconcile_reports(self, audience_ids: Iterable[str]) -> dict[str, bytes]:
        return {}

    async def export_volume(self, destination: str, window: int) -> int:
        return self.volume.get((destination, window), 0)

    async def spend_export_volume(self, destination: str, window: int, size: int) -> None:
        self.volume[destination, window] = self.volume.get((destination, window), 0) + size

    async def open_reconcile_runs(self, audience_ids: Iterable[str]) -> list[ReconcileRun]:
        wanted = set(audience_ids)
        return [
            r.run
            for r in self.runs.values()
            if r.state == "exporting" and r.run.audience_id in wanted
        ]

    async def start_reconcile_run(
        self, audience_id: str, list_id: int, export_job_id: str, started_at: float
    ) -> ReconcileRun:
        assert list_id == self.audiences[audience_id].list_id
        self.events.append(f"start {audience_id} {export_job_id}")
        return self._new_run(audience_id, export_job_id, started_at).run

    async def apply_readback(
        self,
        run_id: int,
        listed: Sequence[ListedAccount],
        *,
        judged_before: float,
        repair_limit: int,
    ) -> ReadbackVerdict | None:
        run = self.runs[run_id]
        if run.state != "exporting":
            return None
        members = self.audiences[run.run.audience_id].members
        rows = [m.row() for _, m in sorted(members.items())]
        present, strangers, nameless = match_listed([r[:3] for r in rows], listed)
        decision = judge_chunk(
            rows, present, judged_before=judged_before, repair_limit=repair_limit
        )
        # Members only: nothing to remove.
        assert not decision.resend_deletes
        assert not decision.extras
        assert not strangers
        for key in decision.cleared:
            members[key].ack_batch, members[key].repairs = None, 0
        for key in decision.resend_inserts:
            member = members[key]
            member.delivered, member.ack_batch, member.repairs = 0, None, member.repairs + 1
        for account, _ in decision.unmatched:
            member = members[account.external_id]
            member.delivered, member.rejected, member.ack_batch = 0, 1, None
        judgment = Judgment()
        judgment.add(decision)
        run.state = "applied"
        verdict = judgment.verdict(
            Listing(
                listed=len(listed),
                strangers=strangers,
                nameless=nameless,
                judged_before=judged_before,
                repair_limit=repair_limit,
                now=self._clock.time(),
            )
        )
        self.events.append(
            f"judged {run.run.audience_id}: verified {verdict.verified},"
            f" lost {sum(verdict.lost.values())}, repaired {verdict.repaired},"
            f" unmatched {[a.external_id for a in verdict.unmatched]},"
            f" too young {verdict.too_young}"
        )
        return verdict

    async def ledger_check(self, audience_id: str, *, recount: bool = True) -> LedgerCheck:
        members = self.audiences[audience_id].members.values()
        pending = sum(1 for m in members if m.desired != m.delivered and not m.rejected)
        return LedgerCheck(
            counts=LedgerCounts(), processing=0, awaiting=0, pending=pending, imbalances={}
        )

    async def finish_reconcile_run(self, run_id: int, report: bytes) -> None:
        run = self.runs[run_id]
        assert run.state == "applied", "a report kept for a read-back that was never judged"
        run.state, run.finished_at = "completed", self._clock.time()
        self.events.append(f"finish {run.run.audience_id}")

    async def fail_reconcile_run(self, run_id: int, reason: str) -> None:
        run = self.runs[run_id]
        run.state, run.reason, run.finished_at = "failed", reason, self._clock.time()
        self.events.append(f"fail {run.run.audience_id}: {reason}")

    async def loss_tallies(self, destination: str, since: float = 0.0) -> list[LossTally]:
        return []


# --- the harness ----------------------------------------------------------------------------


class Highest(random.Random):
    """Full jitter at its top: every backoff is its cap, so a test knows each wait."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Harness:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.client: ScriptedExportClient = ScriptedExportClient()
        self.store = MemoryReadbackStore(clock)
        self.woken: list[str] = []
        self.budget: DestinationBudget | None = None
        self.reconciler: Reconciler | None = None
        self.task: asyncio.Task[None] | None = None
        self._budget_task: asyncio.Task[None] | None = None

    async def start(
        self,
        *,
        daily: dict[Endpoint, int] | None = None,
        settings: ReconcileSettings = SETTINGS,
        multi_list: bool = False,
    ) -> Reconciler:
        """Run a reconciler over the store's audiences (and its budget's window keeper)."""
        limits = BudgetLimits(
            requests_per_minute=1_000_000.0,
            daily=daily or {},
            concurrent_import_jobs=1,
            day_seconds=DAY,
            quota_safety_margin=0.0,
        )
        self.budget = DestinationBudget("dest", limits, MemoryQuotaStore(), self.clock)
        await self.budget.start()
        self._budget_task = asyncio.create_task(self.budget.run(), name="budget:dest")
        self.reconciler = Reconciler(
            Destination("dest", NoImports(), self.budget),
            self.client,
            ReconcilePlan(settings=settings, concurrent_export_jobs=1, multi_list=multi_list),
            store=self.store,
            clock=self.clock,
            audience_ids=lambda: list(self.store.audiences),
            wake=self.woken.extend,
            rng=Highest(),
        )
        self.task = asyncio.create_task(self.reconciler.run(), name="reconciler:dest")
        await self.settle()
        return self.reconciler

    async def settle(self) -> None:
        """Let every task run until it waits on the clock or an event."""
        for _ in range(50):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        await self.clock.advance(seconds)
        await self.settle()

    async def advance_until(self, when: float, *, step: float = 60.0) -> None:
        while self.clock.time() < when:
            await self.advance(min(step, when - self.clock.time()))

    async def close(self) -> None:
        for stop, task in (
            (self.reconciler.stop if self.reconciler else None, self.task),
            (self.budget.stop if self.budget else None, self._budget_task),
        ):
            if stop is None or task is None:
                continue
            stop()
            await self.settle()
            ended = task.done()
            task.cancel()  # a stop that did not end the task must not hang the test
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert ended, f"{task.get_name()} did not end on stop()"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=START)


@pytest.fixture
async def h(clock: FakeClock) -> AsyncIterator[Harness]:
    harness = Harness(clock)
    try:
        yield harness
    finally:
        await harness.close()


def read_back(list_id: int, job: str, *states: str) -> list[str]:
    """The calls of one read-back whose job reads ``states`` (then finished)."""
    return [
        f"create {list_id}",
        *(f"status {job} {s}" for s in states),
        f"status {job} finished",
        f"download {job}",
    ]


# --- (1) turns, and the judgment's decisions ------------------------------------------------


async def test_due_read_backs_run_one_at_a_time_in_turn_order_and_not_again_before_due(
    h: Harness,
) -> None:
    # a was read back two days ago, b never, c three days ago: all due; b's turn first
    # (never read back), then the one read back longest ago.
    for audience_id, list_id in (("a", 11), ("b", 12), ("c", 13)):
        audience = h.store.add(audience_id, list_id, members=[f"{audience_id.upper()}1"])
        h.client.members[list_id] = [m.listed() for m in audience.members.values()]
    h.store.read_back_before("a", START - 2 * DAY)
    h.store.read_back_before("c", START - 3 * DAY)
    await h.start()
    # One export at a time: the first is polled before the second is created.
    assert h.client.calls == ["create 12"]
    await h.advance(POLL_SECONDS)
    assert h.client.calls == [*read_back(12, "job1"), "create 13"]
    await h.advance_until(START + 3_600.0)
    assert h.client.calls == [
        *read_back(12, "job1"),
        *read_back(13, "job2"),
        *read_back(11, "job3"),
    ]
    assert h.store.events == [
        "start b job1",
        "judged b: verified 1, lost 0, repaired 0, unmatched [], too young 0",
        "finish b",
        "start c job2",
        "judged c: verified 1, lost 0, repaired 0, unmatched [], too young 0",
        "finish c",
        "start a job3",
        "judged a: verified 1, lost 0, repaired 0, unmatched [], too young 0",
        "finish a",
    ]
    # Each is due again a day after its last read-back started, in the same order.
    assert h.reconciler is not None
    report, next_at = h.reconciler.state("b")
    assert report is not None
    assert (report.expected, report.verified, report.lost_total) == (1, 1, 0)
    assert next_at == START + DAY
    await h.advance_until(START + DAY - 60.0)
    assert len(h.client.creates_made()) == 3
    await h.advance_until(START + DAY + 3_600.0)
    assert h.client.creates_made()[3:] == ["create 12", "create 13", "create 11"]


async def test_a_lost_account_is_sent_again_then_set_aside_after_the_repair_limit(
    h: Harness,
) -> None:
    audience = h.store.add("a", 11, members=["A1", "A2", "A3"])
    # A3 was acknowledged within the visibility lag: missing, it is too young to judge.
    audience.members["A3"].acked_at = START - LAG_SECONDS / 2
    # Demandbase holds A1 only: A2 was dropped (repair_limit is 1).
    h.client.members[11] = [audience.members["A1"].listed()]
    await h.start()
    await h.advance(POLL_SECONDS)
    assert h.store.events == [
        "start a job1",
        "judged a: verified 1, lost 1, repaired 1, unmatched [], too young 1",
        "finish a",
    ]
    # The lost account is marked to send again, and its actor is woken to send it.
    a2 = audience.members["A2"]
    assert (a2.delivered, a2.repairs, a2.rejected) == (0, 1, 0)
    assert audience.members["A3"].delivered == 1  # not judged, so not touched
    assert h.woken == ["a"]
    # The actor sends it again and Demandbase acknowledges it; still missing a day later.
    h.store.deliver("a", batch=2)
    await h.advance_until(START + DAY + 3_600.0)
    assert h.client.creates_made() == ["create 11", "create 11"]
    assert h.store.events[3:] == [
        "start a job2",
        "judged a: verified 1, lost 2, repaired 1, unmatched ['A2'], too young 0",
        "finish a",
    ]
    # Past the repair limit it is set aside, not sent forever; A3, old enough now and
    # missing, is lost for the first time: sent again.
    assert (a2.delivered, a2.repairs, a2.rejected) == (0, 1, 1)
    a3 = audience.members["A3"]
    assert (a3.delivered, a3.repairs, a3.rejected) == (0, 1, 0)
    assert h.woken == ["a", "a"]
    assert h.reconciler is not None
    report, _ = h.reconciler.state("a")
    assert report is not None
    assert [a.external_id for a in report.unmatched] == ["A2"]


# --- (2) the export quota -------------------------------------------------------------------


@pytest.mark.parametrize(
    "quota",
    [
        # 2 export jobs a day.
        pytest.param(Endpoint.EXPORT_CREATE_JOB, id="export-jobs"),
        # Room for jobs, but 2 status reads a day (one each here): a job created
        # without a status read left to follow it would wait, unread, till tomorrow.
        pytest.param(Endpoint.EXPORT_JOB_STATUS, id="status-reads"),
    ],
)
async def test_exports_beyond_the_day_quota_wait_for_the_next_window(
    h: Harness, quota: Endpoint
) -> None:
    for audience_id, list_id in (("a", 11), ("b", 12), ("c", 13)):
        h.store.add(audience_id, list_id, members=[])
    # Export jobs allow 10 a day unless they are the quota under test: only it binds.
    await h.start(daily={Endpoint.EXPORT_CREATE_JOB: 10, quota: 2})
    await h.advance(POLL_SECONDS)
    await h.advance(POLL_SECONDS)
    # Two read-backs today; the third waits for tomorrow, however long today lasts.
    assert h.client.calls == [*read_back(11, "job1"), *read_back(12, "job2")]
    assert h.reconciler is not None
    assert h.reconciler.state("c")[1] == WINDOW_END
    looked = h.store.facts_reads
    await h.advance_until(WINDOW_END - 1.0)
    assert h.client.creates_made() == ["create 11", "create 12"]
    assert h.budget is not None
    assert h.budget.snapshot().used[quota] == 2
    # It waited for the window's end, not looking again and again while it lasted.
    assert h.store.facts_reads - looked <= 2
    # The window turns: the third goes at once, then a is due again (a day after its
    # first), and the quota is spent again before b's turn.
    await h.advance_until(WINDOW_END + 60.0)
    assert h.client.creates_made() == ["create 11", "create 12", "create 13"]
    await h.advance_until(START + DAY + 3_600.0)
    assert h.client.creates_made() == ["create 11", "create 12", "create 13", "create 11"]
    assert h.budget.snapshot().used[quota] == 2
    assert h.reconciler.state("b")[1] == WINDOW_END + DAY
    await h.advance_until(WINDOW_END + DAY - 1.0)
    assert len(h.client.creates_made()) == 4
    # Then b, waiting since yesterday, goes before c, due since the window turned.
    await h.advance_until(WINDOW_END + DAY + 3_600.0)
    # Every read-back was read once and judged: none created to wait unread.
    assert h.client.calls == [
        *read_back(11, "job1"),
        *read_back(12, "job2"),
        *read_back(13, "job3"),
        *read_back(11, "job4"),
        *read_back(12, "job5"),
        *read_back(13, "job6"),
    ]
    assert h.store.events.count("finish a") == 2
    assert [e for e in h.store.events if e.startswith("fail")] == []


# --- (3) a 429 on create --------------------------------------------------------------------


async def test_a_429_on_create_waits_the_capped_backoff_before_the_next_attempt(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.store.add("a", 11, members=["A1"])
    h.client.members[11] = [h.store.audiences["a"].members["A1"].listed()]
    # Seven 429s (one fewer than the reconciler gives up after), then accepted.
    h.client.creates = [ThrottledError("throttled", status=429) for _ in range(7)]
    caplog.set_level(logging.INFO, logger="dbsync.reconcile")
    await h.start()
    assert h.client.calls == ["create 11"]
    # Backoffs of 1, 2, 4 ... 32 s, then the cap of a minute (not 64 s): no attempt
    # before its backoff has passed, the next one as soon as it has.
    waits = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, THROTTLED_BACKOFF_MAX_SECONDS]
    for attempt, wait in enumerate(waits, start=1):
        await h.advance(wait - 0.5)
        assert len(h.client.creates_made()) == attempt, f"attempt {attempt + 1} came early"
        await h.advance(0.5)
        assert len(h.client.creates_made()) == attempt + 1, f"attempt {attempt + 1} is late"
    retries = [r for r in caplog.records if r.getMessage() == "reconcile_retry"]
    assert [r.__dict__["retry_in_seconds"] for r in retries] == waits
    # The same read-back goes on: one run, polled and judged; no read-back failed.
    await h.advance(POLL_SECONDS)
    assert h.client.calls == ["create 11"] * 7 + read_back(11, "job1")
    assert h.store.events == [
        "start a job1",
        "judged a: verified 1, lost 0, repaired 0, unmatched [], too young 0",
        "finish a",
    ]
    assert h.budget is not None
    assert h.budget.throttled == 7
    assert "reconcile_failed" not in [r.getMessage() for r in caplog.records]


# --- (4) a failed export --------------------------------------------------------------------


async def test_an_export_that_fails_is_reported_and_the_next_turn_proceeds(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    for audience_id, list_id in (("a", 11), ("b", 12)):
        audience = h.store.add(audience_id, list_id, members=[f"{audience_id.upper()}1"])
        h.client.members[list_id] = [m.listed() for m in audience.members.values()]
    h.client.job_states = ["processing", "failed"]
    await h.start()
    await h.advance(POLL_SECONDS)
    await h.advance(2 * POLL_SECONDS)
    assert h.client.calls == [
        "create 11",
        "status job1 processing",
        "status job1 failed",
        "create 12",
    ]
    assert h.store.events == [
        "start a job1",
        "fail a: Demandbase failed the export: export failed: internal error",
        "start b job2",
    ]
    failed = [r for r in caplog.records if r.getMessage() == "reconcile_failed"]
    assert [(r.__dict__["audience"], r.__dict__["export_job_id"]) for r in failed] == [
        ("a", "job1")
    ]
    assert h.woken == []  # nothing was judged, so nothing was marked to send again
    # b's read-back completes; a waits for its next turn instead of trying at once.
    await h.advance_until(START + 3_600.0)
    assert h.client.calls[4:] == ["status job2 finished", "download job2"]
    assert h.store.events[3:] == [
        "judged b: verified 1, lost 0, repaired 0, unmatched [], too young 0",
        "finish b",
    ]
    assert h.reconciler is not None
    assert h.reconciler.state("a") == (None, START + DAY)
    await h.advance_until(START + DAY + 3_600.0)
    assert h.client.creates_made()[2:] == ["create 11", "create 12"]
    assert h.store.events[5:] == [
        "start a job3",
        "judged a: verified 1, lost 0, repaired 0, unmatched [], too young 0",
        "finish a",
        "start b job4",
        "judged b: verified 1, lost 0, repaired 0, unmatched [], too young 0",
        "finish b",
    ]


# --- (5) a stop during a wait ---------------------------------------------------------------


@pytest.mark.parametrize("waiting_for", ["export", "window"])
async def test_a_stop_during_a_wait_ends_the_reconciler_at_once_and_leaves_no_task(
    h: Harness, waiting_for: str
) -> None:
    h.store.add("a", 11, members=[])
    h.store.add("b", 12, members=[])
    if waiting_for == "export":
        # Polling a's export, which still processes.
        h.client.job_states = ["processing"] * 10
        await h.start()
        await h.advance(POLL_SECONDS)
        assert h.client.calls == ["create 11", "status job1 processing"]
    else:
        # Today's quota spent: b waits for the next window.
        await h.start(daily={Endpoint.EXPORT_CREATE_JOB: 1})
        await h.advance(POLL_SECONDS)
        assert h.client.creates_made() == ["create 11"]
    assert h.task is not None
    assert h.reconciler is not None
    assert not h.task.done()
    calls, events = list(h.client.calls), list(h.store.events)
    h.reconciler.stop()
    await h.settle()  # no time passes
    assert h.task.done()
    assert h.task.cancelled()
    # Nothing runs or sleeps for it any more: only the budget's window keeper is left.
    current = asyncio.current_task()
    left = [t.get_name() for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert left == ["budget:dest"]
    assert h.clock.sleepers == 1
    # Time passing changes nothing; an export left running stays open, to be resumed.
    await h.advance(DAY)
    assert (h.client.calls, h.store.events) == (calls, events)
    if waiting_for == "export":
        assert await h.store.open_reconcile_runs(["a"]) != []


@pytest.mark.parametrize(
    ("created_at", "updated_at", "seconds"),
    [
        ("2026-12-05T00:00:00.000Z", "2026-12-05T00:01:30.500Z", 90.5),
        ("2026-12-05T00:00:00+00:00", "2026-12-05T00:00:00+00:00", 0.0),
        ("", "2026-12-05T00:01:30Z", None),  # missing: our own observation is learned
        ("yesterday", "today", None),
        ("2026-12-05T00:00:00", "2026-12-05T00:01:00Z", None),  # naive and aware
        ("2026-12-05T00:01:00Z", "2026-12-05T00:00:00Z", None),  # backwards
    ],
)
def test_an_exports_duration_is_read_from_demandbases_stamps(
    created_at: str, updated_at: str, seconds: float | None
) -> None:
    status = ExportJobStatus(
        job_id="j", job_status="finished", created_at=created_at, updated_at=updated_at
    )
    assert job_seconds(status) == seconds


def twelve_lists(h: Harness) -> ScriptedMultiListClient:
    """12 audiences of one member, never read: each list is guessed at 10,000 rows, so
    the cap (100,000 rows) puts 10 in the first job and the other 2 in the next."""
    h.client = ScriptedMultiListClient()
    for n in range(12):
        audience = h.store.add(f"a{n:02d}", 100 + n, members=[f"K{n}"])
        h.client.members[100 + n] = [m.listed() for m in audience.members.values()]
    return h.client


# Both jobs of twelve_lists created, polled and downloaded.
TWO_JOBS = [
    f"create {' '.join(str(100 + n) for n in range(10))}",
    "status job1 finished",
    "download job1",
    "create 110 111",
    "status job2 finished",
    "download job2",
]


async def test_a_jobs_lists_are_judged_while_the_next_job_is_exported(h: Harness) -> None:
    client = twelve_lists(h)
    gate = asyncio.Event()
    judge = h.store.apply_readback

    async def held(run_id: int, listed: Sequence[ListedAccount], **kw: Any) -> Any:
        await gate.wait()  # the first job's lists wait to be judged
        return await judge(run_id, listed, **kw)

    h.store.apply_readback = held  # type: ignore[method-assign]
    await h.start(multi_list=True)
    await h.advance(POLL_SECONDS)
    # The second job is created, polled and downloaded while no list is judged; a
    # third waits for the judging (none is due anyway).
    await h.advance(POLL_SECONDS)
    assert client.calls == TWO_JOBS
    assert all(run.state == "exporting" for run in h.store.runs.values())
    # The second file is not read while the first job's lists are judged.
    assert client.reads == ["job1"]
    gate.set()
    await h.settle()
    assert client.reads == ["job1", "job2"]
    assert [r.state for r in h.store.runs.values()] == ["completed"] * 12
    assert all(h.reconciler and h.reconciler.state(f"a{n:02d}")[0] for n in range(12))


async def test_the_next_job_is_exported_while_a_file_is_still_being_read(h: Harness) -> None:
    # Reading a results file is our work, not Demandbase's: the export slot is free
    # once the file has arrived, before its millions of rows are parsed.
    client = twelve_lists(h)
    client.parsing.clear()
    await h.start(multi_list=True)
    await h.advance(POLL_SECONDS)
    await h.advance(POLL_SECONDS)
    assert client.calls == TWO_JOBS
    assert all(run.state == "exporting" for run in h.store.runs.values())
    client.parsing.set()
    await h.settle()
    assert [r.state for r in h.store.runs.values()] == ["completed"] * 12


async def test_a_store_error_in_a_multi_list_read_back_ends_the_reconciler_as_itself(
    h: Harness,
) -> None:
    # The supervisor stops the daemon on a StoreError (shared infrastructure): the
    # task running the read-back must not hide it in an exception group.
    h.client = ScriptedMultiListClient()
    for n in range(3):
        audience = h.store.add(f"a{n}", 100 + n, members=[f"K{n}"])
        h.client.members[100 + n] = [m.listed() for m in audience.members.values()]

    async def broken(run_id: int, listed: Sequence[ListedAccount], **kw: Any) -> Any:
        raise StoreError("disk I/O error")

    h.store.apply_readback = broken  # type: ignore[method-assign]
    await h.start(multi_list=True)
    await h.advance(POLL_SECONDS)
    assert h.task is not None
    assert h.task.done()
    with pytest.raises(StoreError, match="disk I/O error"):
        h.task.result()
    h.task = None  # ended already: nothing for close() to stop

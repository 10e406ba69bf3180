"""The store: every durable fact dbsync keeps, behind one facade. The only package with SQL.

:class:`Store` is the one interface through which the rest of dbsync reaches its
state: it takes and returns the Structs of :mod:`dbsync.model` and nothing of SQLite,
so that a second backend (PostgreSQL, for high availability across machines) can
implement the same methods. Each method is a short delegation to the module that
owns its noun:

=============  ===============================================================
engine         the SQLite file: the writer thread and its transactions, the reader
schema         the tables, their migrations, and the invariant each table keeps
audiences      configured audiences, their state and an operator's pause
journal        ingest's appends and their group commit, snapshots, the fold
queue          the dirty set's counters, backlog and summaries, checkpoint,
               requeue, resync
batches        plan, create, upload, complete, fail, abandon, split, reject
ledger         the per-audience counters and the sums they must keep
readback       read-back runs; applies the judgment of :mod:`dbsync.judgment`
retries        accounts set aside as unmatched, tried again on a slow schedule
adoption       lists that already exist: listed members taken as delivered, unsent
quota          daily quota use and the learned pace, per destination
snapshots      complete memberships and AEP file runs: staged in chunks, judged by
               the removal guard, applied set-based; the file runs decided
=============  ===============================================================

Two services run beside the store, each in the daemon's TaskGroup: the
:class:`~dbsync.store.journal.GroupCommitter` (:attr:`Store.committer`) and the
folder (:class:`dbsync.folder.Folder`), which folds what ingest appends into desired
state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path

from dbsync.clock import Clock
from dbsync.errors import StoreError
from dbsync.model import (
    Account,
    AudienceRecord,
    AudienceSpec,
    AudienceState,
    Backlog,
    Batch,
    BatchSummary,
    Change,
    FileRun,
    FileRunInfo,
    HeldSnapshot,
    LedgerCheck,
    LedgerCounts,
    ListAction,
    ListedAccount,
    LossTally,
    PeekedBatch,
    ReadbackVerdict,
    ReconcileFacts,
    ReconcileRun,
    RejectedAccount,
    SnapshotOutcome,
    SnapshotResult,
    SyncResult,
)
from dbsync.store import (
    adoption,
    audiences,
    batches,
    journal,
    ledger,
    queue,
    quota,
    readback,
    retries,
    snapshots,
)
from dbsync.store.engine import Engine
from dbsync.store.journal import FOLD_CHUNK_ROWS, GroupCommitter
from dbsync.store.readback import JUDGE_CHUNK_ROWS
from dbsync.store.retries import next_retry_at
from dbsync.store.snapshots import SnapshotRow

__all__ = [
    "FOLD_CHUNK_ROWS",
    "JUDGE_CHUNK_ROWS",
    "AudienceRecord",
    "AudienceSpec",
    "BatchSummary",
    "LossTally",
    "ReadbackVerdict",
    "ReconcileFacts",
    "ReconcileRun",
    "RejectedAccount",
    "SnapshotResult",
    "SnapshotRow",
    "Store",
    "SyncResult",
    "next_retry_at",
]


class Store:
    """The store. Open with ``async with Store.open(path, clock=clock) as store``."""

    def __init__(self, path: Path, clock: Clock) -> None:
        self.path = path
        self._engine = Engine(path, clock)
        self._journal = journal.Journal(self._engine)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, *, clock: Clock) -> AsyncIterator[Store]:
        store = cls(path, clock)
        try:
            # Closed on a failed open too: its writer thread must not outlive it.
            await store._engine.open()
            await store._journal.open()
            await snapshots.drop_unfinished(store._engine)
            yield store
        finally:
            await store._engine.close()

    @property
    def transactions(self) -> int:
        """Write transactions committed since the store opened, for tests and stats."""
        return self._engine.transactions

    @property
    def committer(self) -> GroupCommitter:
        """The group-commit service: run it (``committer.run()``) in a TaskGroup."""
        return self._journal.committer

    @property
    def writable(self) -> bool:
        """False while the file system refuses writes (a full disk): see engine.py."""
        return self._engine.writable

    async def wait_writable(self) -> None:
        """Until the store takes writes again (at once if it does)."""
        await self._engine.wait_writable()

    async def ping(self) -> None:
        """Read one row of the file: raises StoreError if the store cannot be read."""
        await audiences.ping(self._engine)

    # --- audiences ---------------------------------------------------------------------

    async def sync_audiences(self, specs: Sequence[AudienceSpec]) -> SyncResult:
        return await audiences.sync_audiences(self._engine, specs)

    async def audiences(self) -> dict[str, AudienceRecord]:
        return await audiences.audiences(self._engine)

    async def audience(self, audience_id: str) -> AudienceRecord | None:
        return await audiences.audience(self._engine, audience_id)

    async def set_audience_state(
        self, audience_id: str, state: AudienceState, reason: str = ""
    ) -> None:
        await audiences.set_audience_state(self._engine, audience_id, state, reason)

    async def set_operator_paused(self, audience_id: str, paused: bool) -> None:
        await audiences.set_operator_paused(self._engine, audience_id, paused)

    # --- the journal -------------------------------------------------------------------

    async def append_changes(self, changes: Sequence[Change]) -> int:
        """Append ``changes`` to the journal; durable when this returns."""
        return await self._journal.append(changes)

    async def pending_journal_rows(self) -> int:
        return await self._journal.pending_rows()

    async def replace_members(
        self, audience_id: str, accounts: Sequence[Account], *, ts: float
    ) -> SnapshotResult:
        return await self._journal.replace_members(audience_id, accounts, ts=ts)

    async def fold_pending(self, *, max_rows: int = FOLD_CHUNK_ROWS) -> dict[str, int]:
        """Fold up to ``max_rows`` journal rows into desired state; {audience: rows}."""
        return await self._journal.fold(max_rows)

    async def wait_appended(self) -> None:
        await self._journal.wait_appended()

    def take_folded_elsewhere(self) -> set[str]:
        return self._journal.take_folded_elsewhere()

    # --- snapshots and AEP file runs ----------------------------------------------------

    async def apply_snapshot(
        self,
        audience_id: str,
        chunks: AsyncIterable[Sequence[SnapshotRow]],
        *,
        source: str,
        mode: str = "full",
        max_removal_percent: float | None = 20.0,
        run: Callable[[], FileRunInfo] | None = None,
    ) -> SnapshotOutcome:
        """Stage ``chunks`` (one transaction each), then judge and apply them in one.

        ``mode`` "full": the chunks are the audience's complete membership, guarded by
        ``max_removal_percent`` (None: not guarded); "incremental": member rows join,
        exited rows leave. An exception while reading the chunks drops what was staged.
        ``run``, called once the chunks are read, is the AEP file run they came from: it
        is recorded in the transaction that applies (or holds) them.
        """
        # The first chunk before anything is written: input refused at once (a bad row
        # of a small body) leaves the store untouched, not even a dropped snapshot.
        iterator = aiter(chunks)
        first = await anext(iterator, None)
        snapshot_id = await snapshots.begin(
            self._engine,
            audience_id,
            first or (),
            source=source,
            mode=mode,
            ts=self._engine.now(),
        )
        try:
            async for chunk in iterator:
                await snapshots.stage(self._engine, snapshot_id, chunk)
        except BaseException as exc:
            # A store refusing writes keeps what it staged until the next start drops
            # it: a drop now would be a write that succeeds (it frees pages) and would
            # declare the disk usable again.
            if not (isinstance(exc, StoreError) and exc.unwritable):
                # Shielded: a cancelled sender must not leave its rows behind either.
                await asyncio.shield(snapshots.drop(self._engine, snapshot_id))
            raise
        outcome, folded = await snapshots.finish(
            self._engine,
            snapshot_id,
            max_removal_percent=max_removal_percent if mode == "full" else None,
            fold=journal.fold_all,
            run=run() if run is not None else None,
        )
        self._journal.note_folded(folded)
        return outcome

    async def approve_snapshot(self, audience_id: str) -> SnapshotOutcome | None:
        """Apply the snapshot the removal guard holds for ``audience_id``; None if none."""
        outcome, folded = await snapshots.approve(self._engine, audience_id, fold=journal.fold_all)
        self._journal.note_folded(folded)
        return outcome

    async def discard_snapshot(self, audience_id: str) -> HeldSnapshot | None:
        """Drop the snapshot the removal guard holds for ``audience_id``; None if none."""
        return await snapshots.discard(self._engine, audience_id)

    async def held_snapshots(self, audience_id: str | None = None) -> list[HeldSnapshot]:
        return await snapshots.held(self._engine, audience_id)

    async def file_run_decided(self, run: FileRunInfo) -> str | None:
        return await snapshots.file_run_decided(self._engine, run)

    async def record_file_run(self, run: FileRunInfo, outcome: str, reason: str) -> None:
        await snapshots.record_file_run(self._engine, run, outcome, reason)

    async def file_runs(self, limit: int = 50) -> list[FileRun]:
        return await snapshots.file_runs(self._engine, limit)

    async def file_runs_to_clean(self, decided_before: float) -> list[FileRun]:
        return await snapshots.runs_to_clean(self._engine, decided_before)

    async def mark_files_deleted(self, run_ids: Sequence[int]) -> None:
        await snapshots.mark_files_deleted(self._engine, run_ids)

    # --- the queue ---------------------------------------------------------------------

    async def backlog(self, audience_id: str) -> Backlog:
        return await queue.backlog(self._engine, audience_id)

    async def summaries(
        self, audience_ids: Sequence[str]
    ) -> dict[str, tuple[Backlog, LedgerCheck]]:
        return await queue.summaries(self._engine, audience_ids)

    async def peek_batches(
        self, audience_id: str, action: ListAction, max_rows: int, batches: int
    ) -> list[PeekedBatch]:
        return await queue.peek_batches(self._engine, audience_id, action, max_rows, batches)

    async def checkpoint(self, audience_id: str) -> int:
        return await queue.checkpoint(self._engine, audience_id)

    async def rejected(self, audience_id: str | None = None) -> list[RejectedAccount]:
        return await queue.rejected(self._engine, audience_id)

    async def requeue(self, audience_id: str) -> int:
        return await queue.requeue(self._engine, audience_id)

    async def resync(self, audience_id: str) -> int:
        return await queue.resync(self._engine, audience_id)

    async def request_first_adoptions(self, audience_ids: Iterable[str]) -> list[str]:
        return await adoption.request_first_adoptions(self._engine, audience_ids)

    async def request_adoption(self, audience_id: str) -> None:
        await adoption.request_adoption(self._engine, audience_id)

    async def adoption_pending(self, audience_id: str) -> bool:
        return await adoption.adoption_pending(self._engine, audience_id)

    async def adoptions_pending(self, audience_ids: Iterable[str]) -> list[str]:
        return await adoption.adoptions_pending(self._engine, audience_ids)

    async def adopt_listed(self, audience_id: str, listed: Sequence[ListedAccount]) -> int | None:
        return await adoption.adopt_listed(self._engine, audience_id, listed)

    async def abandon_adoption(self, audience_id: str) -> bool:
        return await adoption.abandon_adoption(self._engine, audience_id)

    async def retry_due_in(self, audience_id: str, delays: Sequence[float]) -> float:
        return await retries.retry_due_in(self._engine, audience_id, delays)

    async def release_retries(
        self, audience_id: str, delays: Sequence[float], max_rows: int
    ) -> int:
        return await retries.release_retries(self._engine, audience_id, delays, max_rows)

    async def desired_members(self, audience_id: str) -> set[str]:
        return await queue.desired_members(self._engine, audience_id)

    async def mark_undelivered(
        self, audience_id: str, external_ids: Iterable[str], *, member: bool
    ) -> int:
        return await queue.mark_undelivered(self._engine, audience_id, external_ids, member=member)

    # --- batches -----------------------------------------------------------------------

    async def plan_batch(self, audience_id: str, action: ListAction, max_rows: int) -> Batch | None:
        return await batches.plan_batch(self._engine, audience_id, action, max_rows)

    async def last_batch(self, audience_id: str) -> BatchSummary | None:
        return await batches.last_batch(self._engine, audience_id)

    async def open_batches(self, audience_id: str) -> list[Batch]:
        return await batches.open_batches(self._engine, audience_id)

    async def mark_created(self, batch_id: int, job_id: int) -> None:
        await batches.mark_created(self._engine, batch_id, job_id)

    async def mark_uploaded(self, batch_id: int) -> None:
        await batches.mark_uploaded(self._engine, batch_id)

    async def complete_batch(self, batch_id: int, *, list_id: int | None) -> int:
        return await batches.complete_batch(self._engine, batch_id, list_id=list_id)

    async def fail_batch(self, batch_id: int, reason: str) -> None:
        await batches.fail_batch(self._engine, batch_id, reason)

    async def abandon_batch(self, batch_id: int, reason: str) -> None:
        await batches.abandon_batch(self._engine, batch_id, reason)

    async def renew_batch(self, batch_id: int, reason: str) -> Batch:
        return await batches.renew_batch(self._engine, batch_id, reason)

    async def split_batch(self, batch_id: int) -> tuple[Batch, Batch]:
        return await batches.split_batch(self._engine, batch_id)

    async def reject_batch(self, batch_id: int, reason: str) -> None:
        await batches.reject_batch(self._engine, batch_id, reason)

    # --- the ledger --------------------------------------------------------------------

    async def ledger(self, audience_id: str) -> LedgerCounts:
        return await ledger.ledger(self._engine, audience_id)

    async def ledger_imbalance(self, audience_id: str) -> int:
        return await ledger.ledger_imbalance(self._engine, audience_id)

    async def add_to_ledger(self, audience_id: str, **deltas: int) -> None:
        await ledger.add_to_ledger(self._engine, audience_id, **deltas)

    async def ledger_check(self, audience_id: str, *, recount: bool = True) -> LedgerCheck:
        return await ledger.ledger_check(self._engine, audience_id, recount=recount)

    # --- read-back ---------------------------------------------------------------------

    async def reconcile_facts(self, audience_ids: Iterable[str]) -> list[ReconcileFacts]:
        return await readback.reconcile_facts(self._engine, audience_ids)

    async def start_reconcile_run(
        self, audience_id: str, list_id: int, export_job_id: str, started_at: float
    ) -> ReconcileRun:
        return await readback.start_reconcile_run(
            self._engine, audience_id, list_id, export_job_id, started_at
        )

    async def open_reconcile_runs(self, audience_ids: Iterable[str]) -> list[ReconcileRun]:
        return await readback.open_reconcile_runs(self._engine, audience_ids)

    async def fail_reconcile_run(self, run_id: int, reason: str) -> None:
        await readback.fail_reconcile_run(self._engine, run_id, reason)

    async def finish_reconcile_run(self, run_id: int, report: bytes) -> None:
        await readback.finish_reconcile_run(self._engine, run_id, report)

    async def last_reconcile_reports(self, audience_ids: Iterable[str]) -> dict[str, bytes]:
        return await readback.last_reconcile_reports(self._engine, audience_ids)

    async def apply_readback(
        self,
        run_id: int,
        listed: Sequence[ListedAccount],
        *,
        judged_before: float,
        repair_limit: int,
    ) -> ReadbackVerdict | None:
        return await readback.apply_readback(
            self._engine, run_id, listed, judged_before=judged_before, repair_limit=repair_limit
        )

    async def loss_tallies(self, destination: str, since: float = 0.0) -> list[LossTally]:
        return await readback.loss_tallies(self._engine, destination, since)

    # --- destination budget ------------------------------------------------------------

    async def quota_usage(self, destination: str, window: int) -> dict[str, int]:
        return await quota.quota_usage(self._engine, destination, window)

    async def spend_quota(
        self, destination: str, endpoint: str, window: int, count: int = 1
    ) -> None:
        await quota.spend_quota(self._engine, destination, endpoint, window, count)

    async def export_volume(self, destination: str, window: int) -> int:
        return await quota.export_volume(self._engine, destination, window)

    async def spend_export_volume(self, destination: str, window: int, size: int) -> None:
        await quota.spend_export_volume(self._engine, destination, window, size)

    async def load_pace(self, destination: str) -> float | None:
        return await quota.load_pace(self._engine, destination)

    async def save_pace(self, destination: str, requests_per_minute: float) -> None:
        await quota.save_pace(self._engine, destination, requests_per_minute)

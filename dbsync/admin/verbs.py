"""What each admin verb does to the running daemon, and what it answers.

:func:`perform` takes a decoded request whose role was already checked and returns
its reply, or raises :class:`AdminFault`. It reads and acts only through
:class:`Controls` (the supervisor, its actors and destinations, the store's read and
queue methods, and the daemon's reload and drain), so it holds no state of its own.

Mutating verbs wait until their effect shows, within the request's
``timeout_seconds``: ``pause`` until the actor reports ``paused``, ``resume`` until it
no longer does, ``flush`` until a batch has been planned from the backlog. A wait
that times out answers ``timeout`` and leaves the request in effect (the actor will
pause, the flush stays asked for). These waits are on the event loop's real time,
not the injected clock: they bound how long an operator waits. A reload that runs out
of time is not cut: half a reload would be worse than a late one; it goes on and the
answer says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import assert_never

import msgspec

from dbsync import __version__
from dbsync.actor import AudienceActor
from dbsync.admin.protocol import (
    Adopt,
    AdoptReply,
    AnyRequest,
    Approve,
    ApproveReply,
    AudienceView,
    BatchView,
    DaemonView,
    DestinationView,
    Discard,
    DiscardReply,
    Drain,
    DrainReply,
    FaultCode,
    FileRunView,
    Files,
    FilesReply,
    Flush,
    FlushReply,
    HeldView,
    LastBatchView,
    LossEstimateView,
    Pause,
    PauseReply,
    Quota,
    QuotaLine,
    QuotaReply,
    Reconcile,
    ReconcileReply,
    ReconcileView,
    Rejected,
    RejectedReply,
    RejectedView,
    Reload,
    ReloadReply,
    Reply,
    Requeue,
    RequeueReply,
    Resume,
    ResumeReply,
    Resync,
    ResyncReply,
    Role,
    Status,
    StatusReply,
    WaitingRunView,
)
from dbsync.clock import Clock
from dbsync.config import Config
from dbsync.contract.record import read_records
from dbsync.files.watcher import Watcher
from dbsync.model import AudienceRecord, AudienceState, HeldSnapshot, RejectedAccount
from dbsync.reconcile import ReconcileDeferred, ReconcileReport
from dbsync.store import Store, next_retry_at
from dbsync.supervisor import Supervisor

log = logging.getLogger(__name__)

__all__ = ["AdminFault", "Controls", "perform"]

# How often a waiting verb looks again at the state it waits for.
_POLL_SECONDS = 0.01


class AdminFault(Exception):
    """A request that was not done: its stable code and a message for the operator."""

    def __init__(self, code: FaultCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, kw_only=True)
class Controls:
    """What the daemon lets the admin socket see and do."""

    supervisor: Supervisor
    store: Store
    clock: Clock
    config: Callable[[], Config]  # the configuration in force (a reload replaces it)
    config_path: Path
    started_at: float  # clock.time() at start
    reload: Callable[[], Awaitable[str | None]]  # None: applied; else why it was rejected
    drain: Callable[[], None]
    draining: Callable[[], bool]
    watcher: Watcher | None = None  # the watched folder, when [ingest.files] is set


async def perform(controls: Controls, request: AnyRequest) -> Reply:
    """Do what ``request`` asks, within its ``timeout_seconds``."""
    if request.role is Role.OPERATOR and controls.draining() and not isinstance(request, Drain):
        raise AdminFault(FaultCode.DRAINING, "the daemon is draining: it changes nothing more")
    try:
        async with asyncio.timeout(request.timeout_seconds):
            return await _perform(controls, request)
    except TimeoutError:
        raise AdminFault(
            FaultCode.TIMEOUT, _timed_out(request) + f" within {request.timeout_seconds:g} s"
        ) from None


async def _perform(c: Controls, request: AnyRequest) -> Reply:
    match request:
        case Status(audience=audience):
            return await _status(c, audience)
        case Pause(audience=audience):
            return await _pause(c, audience)
        case Resume(audience=audience):
            return await _resume(c, audience)
        case Flush(audience=audience):
            return await _flush(c, audience)
        case Resync(audience=audience):
            actor = _actor(c, audience)
            count = await actor.resync()
            return ResyncReply(audience=audience, accounts=count, paused=actor.is_paused)
        case Rejected(audience=audience, limit=limit):
            return await _rejected(c, audience, limit)
        case Requeue(audience=audience):
            _actor(c, audience)
            count = await c.store.requeue(audience)
            c.supervisor.wake([audience])
            return RequeueReply(audience=audience, accounts=count)
        case Reconcile(audience=audience):
            return await _reconcile(c, audience)
        case Adopt(audience=audience):
            return await _adopt(c, audience)
        case Quota():
            return QuotaReply(destinations=await _destinations(c))
        case Files(limit=limit):
            return await _files(c, limit)
        case Approve(audience=audience):
            return await _approve(c, audience)
        case Discard(audience=audience):
            return await _discard(c, audience)
        case Drain():
            c.drain()
            return DrainReply(draining=True, drain_seconds=c.config().daemon.drain_seconds)
        case Reload():
            return await _reload(c)
        case _:
            assert_never(request)


def _timed_out(request: AnyRequest) -> str:
    match request:
        case Pause(audience=audience):
            return f"the pause of {audience} stays asked for; its actor did not report paused"
        case Resume(audience=audience):
            return f"the resume of {audience} stays asked for; its actor did not leave paused"
        case Flush(audience=audience):
            return (
                f"the flush of {audience} stays asked for; no batch was planned (its jobs"
                " in flight or the destination's budget hold it back)"
            )
        case Reload():
            return (
                "the reload goes on, and its outcome will be logged (config_reloaded or"
                " config_reload_rejected); it did not finish"
            )
        case Reconcile(audience=audience):
            return (
                f"the read-back of {audience} goes on, and its report will be logged"
                " (reconcile_completed) and shown by status; it did not finish"
            )
        case Adopt(audience=audience):
            return (
                f"the adoption of {audience}'s list goes on, and will be logged"
                " (list_adopted, reconcile_completed); it did not finish"
            )
    return f"{type(request).__name__.lower()} did not complete"


# --- the verbs -------------------------------------------------------------------------------


def _actor(c: Controls, audience: str) -> AudienceActor:
    actor = c.supervisor.actor(audience)
    if actor is None:
        raise AdminFault(
            FaultCode.UNKNOWN_AUDIENCE,
            f"no active audience {audience!r} (active: {', '.join(c.supervisor.audience_ids())})",
        )
    return actor


async def _until(condition: Callable[[], bool | Awaitable[bool]]) -> float:
    """Seconds until ``condition`` held (the caller's timeout bounds the wait)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        held = condition()
        if not isinstance(held, bool):
            held = await held
        if held:
            return round(loop.time() - start, 3)
        await asyncio.sleep(_POLL_SECONDS)


async def _pause(c: Controls, audience: str) -> PauseReply:
    actor = _actor(c, audience)
    await c.store.set_operator_paused(audience, True)
    actor.pause()
    waited = await _until(lambda: actor.state is AudienceState.PAUSED)
    return PauseReply(audience=audience, state=actor.state, waited_seconds=waited)


async def _resume(c: Controls, audience: str) -> ResumeReply:
    _actor(c, audience)
    await c.store.set_operator_paused(audience, False)
    # An actor that crashed past its restart budget is started again (a new one).
    await c.supervisor.resume(audience)
    actor = _actor(c, audience)
    actor.resume()
    waited = await _until(
        lambda: actor.state not in (AudienceState.PAUSED, AudienceState.CONTRACT_BROKEN)
    )
    return ResumeReply(audience=audience, state=actor.state, waited_seconds=waited)


async def _flush(c: Controls, audience: str) -> FlushReply:
    actor = _actor(c, audience)
    if actor.is_paused:
        raise AdminFault(
            FaultCode.AUDIENCE_PAUSED, f"{audience} is paused: resume it first; nothing flushed"
        )
    destination = c.supervisor.destination(actor.settings.destination)
    if destination is not None and not destination.is_running:
        raise AdminFault(
            FaultCode.DESTINATION_STOPPED,
            f"destination {destination.name} is stopped ({destination.stopped_reason}):"
            " nothing can be sent until it runs again; nothing flushed",
        )
    before = await c.store.backlog(audience)
    if before.pending == 0:
        return FlushReply(
            audience=audience, pending_before=0, pending=0, in_flight=before.in_flight
        )
    actor.flush()

    async def planned() -> bool:
        return (await c.store.backlog(audience)).pending < before.pending

    await _until(planned)
    after = await c.store.backlog(audience)
    return FlushReply(
        audience=audience,
        pending_before=before.pending,
        pending=after.pending,
        in_flight=after.in_flight,
    )


async def _rejected(c: Controls, audience: str | None, limit: int) -> RejectedReply:
    if audience is not None:
        await _record(c, audience)
    rows = await c.store.rejected(audience)
    delays = {
        a.id: tuple(days * d.limits.day_seconds for days in d.reconcile.retry_unmatched_days)
        for d in c.config().destinations
        for a in d.audiences
    }

    def next_retry(row: RejectedAccount) -> float | None:
        if row.retrying or not row.member or not row.reason.startswith("unmatched"):
            return None
        return next_retry_at(row.rejected_at, row.retries, delays.get(row.audience_id, ()))

    return RejectedReply(
        total=len(rows),
        accounts=[
            RejectedView(
                audience=row.audience_id,
                external_id=row.account.external_id,
                name=row.account.name,
                domain=row.account.domain,
                member=row.member,
                reason=row.reason,
                rejected_at=row.rejected_at,
                attempts=row.attempts,
                retries=row.retries,
                retrying=row.retrying,
                next_retry_at=next_retry(row),
            )
            for row in rows[:limit]
        ],
    )


async def _reconcile(c: Controls, audience: str) -> ReconcileReply:
    _actor(c, audience)
    # Shielded: the export job runs at Demandbase whatever the caller's patience; the
    # read-back finishes and its report is logged and kept for status.
    try:
        report = await asyncio.shield(c.supervisor.reconcile_now(audience))
    except ReconcileDeferred as exc:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exc.retry_at))
        raise AdminFault(
            FaultCode.RECONCILE_DEFERRED, f"{audience}: {exc.reason}; it can run at {when}"
        ) from None
    return ReconcileReply(report=_report(report))


async def _adopt(c: Controls, audience: str) -> AdoptReply:
    _actor(c, audience)
    # Shielded like reconcile: the export runs at Demandbase whatever the caller's
    # patience; a deferred adoption stays asked for and runs when it can.
    try:
        report, adopted = await asyncio.shield(c.supervisor.adopt_now(audience))
    except ReconcileDeferred as exc:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(exc.retry_at))
        raise AdminFault(
            FaultCode.RECONCILE_DEFERRED,
            f"{audience}: {exc.reason}; the adoption stays asked for and can run at {when}",
        ) from None
    return AdoptReply(adopted=adopted, report=_report(report))


def _report(report: ReconcileReport) -> ReconcileView:
    return msgspec.convert(msgspec.to_builtins(report), ReconcileView)


async def _reload(c: Controls) -> ReloadReply:
    # Shielded: a reload cut half-way by the timeout would leave some actors on the old
    # plan. The daemon serialises reloads, so one still running delays the next.
    rejected = await asyncio.shield(c.reload())
    if rejected is not None:
        raise AdminFault(
            FaultCode.REJECTED_CONFIG,
            f"configuration rejected, the running one is kept: {rejected}",
        )
    return ReloadReply(accepted=True, audiences=c.supervisor.audience_ids())


# --- AEP files and the removal guard ---------------------------------------------------------


def _held(snapshot: HeldSnapshot) -> HeldView:
    return HeldView(
        audience=snapshot.audience_id,
        source=snapshot.source,
        received_at=snapshot.received_at,
        members=snapshot.members,
        current=snapshot.current,
        removed=snapshot.removed,
        reason=snapshot.reason,
    )


async def _files(c: Controls, limit: int) -> FilesReply:
    waiting = c.watcher.waiting() if c.watcher is not None else []
    return FilesReply(
        directory=str(c.watcher.directory) if c.watcher is not None else None,
        waiting=[
            WaitingRunView(
                audience=w.audience_id,
                run=w.run_key,
                files=list(w.files),
                reason=w.reason,
                since=w.since,
            )
            for w in waiting
        ],
        held=[_held(h) for h in await c.store.held_snapshots()],
        runs=[
            FileRunView(
                audience=r.audience_id,
                run=r.run_key,
                run_time=r.run_time,
                outcome=r.outcome,
                reason=r.reason,
                files=list(r.files),
                rows=r.rows,
                invalid=r.invalid,
                duplicates=r.duplicates,
                conflicts=r.conflicts,
                added=r.added,
                removed=r.removed,
                decided_at=r.decided_at,
                files_deleted=r.files_deleted,
            )
            for r in await c.store.file_runs(limit)
        ],
    )


async def _approve(c: Controls, audience: str) -> ApproveReply:
    await _record(c, audience)
    outcome = await c.store.approve_snapshot(audience)
    if outcome is None:
        raise AdminFault(
            FaultCode.NOTHING_HELD, f"the removal guard holds no snapshot of {audience}"
        )
    log.info(
        "snapshot_approved",
        extra={"audience": audience, "added": outcome.added, "removed": outcome.removed},
    )
    c.supervisor.wake([audience])
    return ApproveReply(
        audience=audience, added=outcome.added, removed=outcome.removed, members=outcome.members
    )


async def _discard(c: Controls, audience: str) -> DiscardReply:
    await _record(c, audience)
    dropped = await c.store.discard_snapshot(audience)
    if dropped is None:
        raise AdminFault(
            FaultCode.NOTHING_HELD, f"the removal guard holds no snapshot of {audience}"
        )
    log.info(
        "snapshot_discarded",
        extra={"audience": audience, "members": dropped.members, "removed": dropped.removed},
    )
    return DiscardReply(audience=audience, members=dropped.members, removed=dropped.removed)


# --- status ----------------------------------------------------------------------------------


async def _record(c: Controls, audience: str) -> AudienceRecord:
    records = await c.store.audiences()
    if audience not in records:
        raise AdminFault(
            FaultCode.UNKNOWN_AUDIENCE,
            f"no audience {audience!r} (known: {', '.join(records)})",
        )
    return records[audience]


async def _status(c: Controls, audience: str | None) -> StatusReply:
    now = c.clock.time()
    if audience is not None:
        records = {audience: await _record(c, audience)}
    else:
        records = await c.store.audiences()
    audiences = [
        await _audience(c, record, now, batches=audience is not None) for record in records.values()
    ]
    destinations = await _destinations(c)
    if audience is not None:
        destinations = [d for d in destinations if d.destination == records[audience].destination]
    return StatusReply(
        daemon=DaemonView(
            version=__version__,
            pid=os.getpid(),
            config=str(c.config_path),
            started_at=c.started_at,
            uptime_seconds=round(now - c.started_at, 3),
            draining=c.draining(),
        ),
        audiences=audiences,
        destinations=destinations,
    )


async def _audience(
    c: Controls, record: AudienceRecord, now: float, *, batches: bool
) -> AudienceView:
    audience = record.audience_id
    backlog = await c.store.backlog(audience)
    check = await c.store.ledger_check(audience, recount=False)
    last_batch = await c.store.last_batch(audience)
    last_reconcile, next_reconcile_at = c.supervisor.reconcile_state(audience)
    actor = c.supervisor.actor(audience)
    state, reason = record.state, record.state_reason
    requests_per_minute = pace = None
    if actor is not None:
        state = actor.state
        reason = ""
        destination = c.supervisor.destination(actor.settings.destination)
        if state is AudienceState.FAILED:
            reason = actor.last_error or record.state_reason
        elif state is AudienceState.STOPPED and destination is not None:
            reason = destination.stopped_reason
        requests_per_minute = actor.settings.requests_per_minute
        pace = requests_per_minute
        if destination is not None:
            pace = min(pace, destination.budget.snapshot().pace_per_minute)
    held = await c.store.held_snapshots(audience)
    open_batches = None
    if batches:
        open_batches = [
            BatchView(
                batch_id=b.batch_id,
                action=b.action,
                state=b.state,
                rows=len(b.accounts),
                job_id=b.job_id,
                age_seconds=round(now - b.created_at, 3),
            )
            for b in await c.store.open_batches(audience)
        ]
    return AudienceView(
        audience=audience,
        name=record.name,
        destination=record.destination,
        list_name=record.list_name,
        list_id=record.list_id,
        state=state,
        reason=reason,
        paused=actor.is_paused if actor is not None else False,
        pending_inserts=backlog.inserts,
        pending_deletes=backlog.deletes,
        oldest_pending_age_seconds=(
            round(now - backlog.oldest_changed_at, 3)
            if backlog.oldest_changed_at is not None
            else None
        ),
        in_flight=backlog.in_flight,
        rejected=backlog.rejected,
        jobs_in_flight=actor.jobs_in_flight if actor is not None else 0,
        jobs_completed=actor.jobs_completed if actor is not None else 0,
        checkpoint_seq=record.checkpoint_seq,
        requests_per_minute=requests_per_minute,
        pace_per_minute=pace,
        ledger=msgspec.structs.asdict(check.counts),
        ledger_balanced=check.balanced,
        open_batches=open_batches,
        last_batch=(
            msgspec.convert(msgspec.to_builtins(last_batch), LastBatchView)
            if last_batch is not None
            else None
        ),
        last_reconcile=_report(last_reconcile) if last_reconcile is not None else None,
        next_reconcile_at=next_reconcile_at,
        held_snapshot=_held(held[-1]) if held else None,
    )


async def _destinations(c: Controls) -> list[DestinationView]:
    """Each configured destination's budget and auth state; never a credential."""
    views = []
    probes = read_records(c.config().daemon.state_dir)
    for configured in c.config().destinations:
        destination = c.supervisor.destination(configured.name)
        if destination is None:
            continue
        probe = probes.get(configured.name)
        contract = probe.state if probe is not None else "not probed"
        broken = [
            actor.settings.audience_id
            for audience_id in c.supervisor.audience_ids()
            if (actor := c.supervisor.actor(audience_id)) is not None
            and actor.settings.destination == configured.name
            and actor.contract_breach
        ]
        if broken:
            contract = f"broken at run time ({', '.join(broken)})"
        budget = destination.budget
        snapshot = budget.snapshot()
        limits = {str(endpoint): limit for endpoint, limit in budget.limits.daily.items()}
        views.append(
            DestinationView(
                destination=configured.name,
                auth_mode="token" if configured.credentials.token is not None else "api_key_set",
                auth_state="ok" if destination.is_running else destination.stopped_reason,
                contract=contract,
                probed_at=probe.probed_at if probe is not None else None,
                running=destination.is_running,
                pace_per_minute=snapshot.pace_per_minute,
                jobs_in_flight=snapshot.jobs_in_flight,
                job_slots=snapshot.job_slots,
                throttled=snapshot.throttled,
                window_ends_at=snapshot.window_ends_at,
                quota=[
                    QuotaLine(
                        endpoint=endpoint,
                        limit=limits[endpoint],
                        allowed=snapshot.allowed[endpoint],
                        used=used,
                        left=max(0, snapshot.allowed[endpoint] - used),
                    )
                    for endpoint, used in snapshot.used.items()
                ],
                loss_estimate=await _loss_estimate(c, configured.name),
            )
        )
    return views


async def _loss_estimate(c: Controls, destination: str) -> LossEstimateView | None:
    estimate = await c.supervisor.loss_estimate(destination)
    if estimate is None or estimate.overall.judged == 0:
        return None
    return msgspec.convert(msgspec.to_builtins(estimate), LossEstimateView)

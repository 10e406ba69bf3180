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
import time
from collections.abc import Awaitable, Callable
from typing import assert_never

from dbsync.actor import AudienceActor
from dbsync.admin.controls import AdminFault, Controls, audience_record
from dbsync.admin.plan import plan
from dbsync.admin.protocol import (
    Adopt,
    AdoptReply,
    AnyRequest,
    Approve,
    ApproveReply,
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
    Pause,
    PauseReply,
    Plan,
    Quota,
    QuotaReply,
    Reconcile,
    ReconcileReply,
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
    WaitingRunView,
)
from dbsync.admin.status import destinations, held_view, report_view, status
from dbsync.model import AudienceState, RejectedAccount
from dbsync.reconcile import ReconcileDeferred
from dbsync.store import next_retry_at

log = logging.getLogger(__name__)

__all__ = ["AdminFault", "Controls", "perform"]

# How often a waiting verb looks again at the state it waits for.
_POLL_SECONDS = 0.01


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
            return await status(c, audience)
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
        case Plan(audience=audience, limit=limit):
            return await plan(c, audience, limit)
        case Quota():
            return QuotaReply(destinations=await destinations(c))
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
        await audience_record(c, audience)
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
    return ReconcileReply(report=report_view(report))


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
    return AdoptReply(adopted=adopted, report=report_view(report))


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
        held=[held_view(h) for h in await c.store.held_snapshots()],
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


def _nothing_held(audience: str) -> AdminFault:
    return AdminFault(FaultCode.NOTHING_HELD, f"the removal guard holds no snapshot of {audience}")


async def _approve(c: Controls, audience: str) -> ApproveReply:
    await audience_record(c, audience)
    outcome = await c.store.approve_snapshot(audience)
    if outcome is None:
        raise _nothing_held(audience)
    log.info(
        "snapshot_approved",
        extra={"audience": audience, "added": outcome.added, "removed": outcome.removed},
    )
    c.supervisor.wake([audience])
    return ApproveReply(
        audience=audience, added=outcome.added, removed=outcome.removed, members=outcome.members
    )


async def _discard(c: Controls, audience: str) -> DiscardReply:
    await audience_record(c, audience)
    dropped = await c.store.discard_snapshot(audience)
    if dropped is None:
        raise _nothing_held(audience)
    log.info(
        "snapshot_discarded",
        extra={"audience": audience, "members": dropped.members, "removed": dropped.removed},
    )
    return DiscardReply(audience=audience, members=dropped.members, removed=dropped.removed)

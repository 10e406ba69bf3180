"""``status`` and ``quota``: what the daemon shows of its audiences and destinations.

Read-only: each audience's backlog, ledger, batches and read-back schedule from the
store and its running actor; each destination's budget, auth state and contract
verdict; never a credential. The views are :mod:`dbsync.admin.views`'s Structs.
"""

from __future__ import annotations

import os

import msgspec

from dbsync import __version__
from dbsync.admin.controls import Controls, audience_record
from dbsync.admin.protocol import (
    AudienceView,
    BatchView,
    DaemonView,
    DestinationView,
    HeldView,
    LastBatchView,
    LossEstimateView,
    QuotaLine,
    ReconcileView,
    StatusReply,
)
from dbsync.contract.record import read_records
from dbsync.forecast import DestinationEta
from dbsync.model import AudienceRecord, AudienceState, HeldSnapshot
from dbsync.reconcile import ReconcileReport
from dbsync.summaries import forecasts, read_figures

__all__ = ["destinations", "etas", "held_view", "report_view", "status"]


async def status(c: Controls, audience: str | None) -> StatusReply:
    """``status [AUDIENCE]``: the daemon, each audience (with its open batches when one
    is named) and the destinations it feeds."""
    now = c.clock.time()
    if audience is not None:
        records = {audience: await audience_record(c, audience)}
    else:
        records = await c.store.audiences()
    forecast = await etas(c)
    audiences = [
        await _audience(c, record, now, forecast, batches=audience is not None)
        for record in records.values()
    ]
    shown = await destinations(c, forecast)
    if audience is not None:
        shown = [d for d in shown if d.destination == records[audience].destination]
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
        destinations=shown,
    )


async def etas(c: Controls, *, starts_wanted: int = 0) -> dict[str, DestinationEta]:
    """Each destination's backlog forecast, over all its running audiences (the share
    of one depends on the others)."""
    statuses = c.supervisor.statuses()
    figures = await read_figures(c.store, [s.audience_id for s in statuses])
    running = {
        name: destination
        for name in {s.destination for s in statuses}
        if (destination := c.supervisor.destination(name)) is not None
    }
    backlogs = {audience: backlog for audience, (backlog, _) in figures.items()}
    return forecasts(statuses, running, backlogs, c.clock.time(), starts_wanted=starts_wanted)


async def _audience(
    c: Controls,
    record: AudienceRecord,
    now: float,
    forecast: dict[str, DestinationEta],
    *,
    batches: bool,
) -> AudienceView:
    audience = record.audience_id
    destination_eta = forecast.get(record.destination)
    eta = destination_eta.of(audience) if destination_eta is not None else None
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
        last_reconcile=report_view(last_reconcile) if last_reconcile is not None else None,
        next_reconcile_at=next_reconcile_at,
        held_snapshot=held_view(held[-1]) if held else None,
        backlog_jobs=eta.jobs if eta is not None else None,
        backlog_eta=eta.eta if eta is not None else None,
    )


async def destinations(
    c: Controls, forecast: dict[str, DestinationEta] | None = None
) -> list[DestinationView]:
    """Each configured destination's budget, auth state and backlog forecast; never a
    credential."""
    if forecast is None:
        forecast = await etas(c)
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
        eta = forecast.get(configured.name)
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
                backlog_jobs=eta.jobs
                if (eta := forecast.get(configured.name)) is not None
                else None,
                backlog_eta=eta.eta if eta is not None else None,
            )
        )
    return views


async def _loss_estimate(c: Controls, destination: str) -> LossEstimateView | None:
    estimate = await c.supervisor.loss_estimate(destination)
    if estimate is None or estimate.overall.judged == 0:
        return None
    return msgspec.convert(msgspec.to_builtins(estimate), LossEstimateView)


def report_view(report: ReconcileReport) -> ReconcileView:
    return msgspec.convert(msgspec.to_builtins(report), ReconcileView)


def held_view(snapshot: HeldSnapshot) -> HeldView:
    return HeldView(
        audience=snapshot.audience_id,
        source=snapshot.source,
        received_at=snapshot.received_at,
        members=snapshot.members,
        current=snapshot.current,
        removed=snapshot.removed,
        reason=snapshot.reason,
    )

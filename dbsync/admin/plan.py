"""``plan AUDIENCE``: what the audience would send next, and its planned read-backs.

A dry run: nothing is sent, planned or marked. The batches are the store's peek at
the rows ``plan_batch`` would take (:func:`dbsync.store.queue.peek_batches`), cut at
the actor's ``max_records`` and alternating inserts and deletes from the action the
actor tries next, as its own planning does. Each batch's earliest start is the
forecast's (:mod:`dbsync.forecast`): when the destination's job slots, pace and daily
quota let its job start, taking turns with the other audiences as the budget does. The
read-back is the reconciler's plan: when the next is due and, with multi-list
exports, which audiences that export job reads together (those the reconciler planned
for the same moment: due by then, in turn order, under its cap of rows; the day's
export volume may still split them).
"""

from __future__ import annotations

from dbsync.admin.controls import Controls, audience_record
from dbsync.admin.protocol import PlannedBatchView, PlannedReadBackView, PlanReply
from dbsync.admin.status import etas
from dbsync.model import AudienceState, ListAction, PeekedBatch

__all__ = ["plan"]


async def plan(c: Controls, audience: str, limit: int) -> PlanReply:
    record = await audience_record(c, audience)
    actor = c.supervisor.actor(audience)
    backlog = await c.store.backlog(audience)
    forecast = (await etas(c, starts_wanted=limit)).get(record.destination)
    eta = forecast.of(audience) if forecast is not None else None
    batches: list[PeekedBatch] = []
    if actor is not None:
        rows = actor.settings.max_records
        inserts = await c.store.peek_batches(audience, ListAction.INSERT, rows, limit)
        deletes = await c.store.peek_batches(audience, ListAction.DELETE, rows, limit)
        batches = _alternate(actor.next_action, inserts, deletes)[:limit]
    starts = eta.starts if eta is not None else ()
    state = actor.state if actor is not None else record.state
    return PlanReply(
        audience=audience,
        destination=record.destination,
        state=state,
        held=actor.is_held if actor is not None else state is not AudienceState.ACTIVE,
        pending_inserts=backlog.inserts,
        pending_deletes=backlog.deletes,
        in_flight=backlog.in_flight,
        jobs_in_flight=actor.jobs_in_flight if actor is not None else 0,
        backlog_jobs=eta.jobs if eta is not None else None,
        backlog_eta=eta.eta if eta is not None else None,
        batches=[
            PlannedBatchView(
                action=b.action,
                accounts=b.accounts,
                oldest_changed_at=b.oldest_changed_at,
                earliest_start_at=starts[i] if i < len(starts) else None,
            )
            for i, b in enumerate(batches)
        ],
        more_batches=max(0, (eta.jobs if eta is not None else 0) - len(batches)),
        read_back=await _read_back(c, audience, record.destination),
    )


def _alternate(
    first: ListAction, inserts: list[PeekedBatch], deletes: list[PeekedBatch]
) -> list[PeekedBatch]:
    """The order the actor plans them: one action, then the other, as long as both last."""
    queues = {ListAction.INSERT: list(inserts), ListAction.DELETE: list(deletes)}
    turn, order = first, []
    while queues[ListAction.INSERT] or queues[ListAction.DELETE]:
        other = ListAction.DELETE if turn is ListAction.INSERT else ListAction.INSERT
        order.append((queues[turn] or queues[other]).pop(0))
        turn = other
    return order


async def _read_back(c: Controls, audience: str, destination: str) -> PlannedReadBackView:
    _, next_at = c.supervisor.reconcile_state(audience)
    destination_plan = c.supervisor.plan_of(destination)
    multi = destination_plan is not None and destination_plan.reconcile.multi_list
    group: list[str] = []
    if multi and next_at is not None:
        # The reconciler plans its jobs (the audiences due, in turn order, under the cap
        # of rows): those planned at the same moment are read by the same job.
        group = sorted(
            audience_id
            for audience_id in c.supervisor.audience_ids()
            if (actor := c.supervisor.actor(audience_id)) is not None
            and actor.settings.destination == destination
            and c.supervisor.reconcile_state(audience_id)[1] == next_at
        )
    return PlannedReadBackView(next_reconcile_at=next_at, multi_list=multi, export_group=group)

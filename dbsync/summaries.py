"""The periodic summary lines: one per audience and one per destination, every interval.

Logs are events, not one line per account (ARCHITECTURE, logs): every
``summary_interval_seconds`` the supervisor asks :func:`log_summaries` for an
``audience_summary`` line per audience (backlog, jobs in flight, the ledger, the
read-back schedule) and a ``destination_summary`` line per destination (whether it
runs, its budget, its loss estimate). The totals come back as :class:`SummaryTotals`,
which the daemon turns into systemd's ``STATUS=`` line.

The figures of many audiences are read a chunk at a time (:data:`_SUMMARY_CHUNK`), so
that 10,000 audiences do not hold the store's reader for long.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import msgspec

from dbsync.clock import Clock
from dbsync.destination import Destination
from dbsync.model import AudienceState, Backlog, LedgerCheck
from dbsync.reconcile import LossEstimate, ReconcileReport, log_ledger_imbalance

__all__ = ["AudienceStatus", "SummaryStore", "SummaryTotals", "log_summaries"]

log = logging.getLogger(__name__)

# Audiences whose summary figures are read in one statement: a few milliseconds of the
# reader's thread each, so that other reads are not held up behind 10,000.
_SUMMARY_CHUNK = 500


class AudienceStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One running audience as the supervisor sees it."""

    audience_id: str
    name: str
    destination: str
    list_name: str
    state: AudienceState
    paused: bool
    jobs_in_flight: int
    last_error: str


class SummaryTotals(msgspec.Struct, frozen=True, kw_only=True):
    """What one round of summary lines adds up to."""

    audiences: int
    pending: int  # accounts waiting to be sent, all audiences
    failed: int  # audiences whose actor reports failed
    stopped_destinations: list[str]


class SummaryStore(Protocol):
    """The part of :class:`~dbsync.store.Store` the summaries read."""

    async def summaries(
        self, audience_ids: Sequence[str]
    ) -> Mapping[str, tuple[Backlog, LedgerCheck]]: ...


async def log_summaries(
    statuses: Sequence[AudienceStatus],
    destinations: Mapping[str, Destination],
    *,
    store: SummaryStore,
    clock: Clock,
    reconcile_state: Callable[[str], tuple[ReconcileReport | None, float | None]],
    loss_estimate: Callable[[str], LossEstimate | None],
) -> SummaryTotals:
    """One ``audience_summary`` line per audience, one ``destination_summary`` each;
    returns their totals (what systemd's ``STATUS=`` shows)."""
    pending = 0
    figures: dict[str, tuple[Backlog, LedgerCheck]] = {}
    for start in range(0, len(statuses), _SUMMARY_CHUNK):
        chunk = statuses[start : start + _SUMMARY_CHUNK]
        # Without the pending recount: that one is a reconciliation's price.
        figures.update(await store.summaries([s.audience_id for s in chunk]))
    for status in statuses:
        backlog, check = figures[status.audience_id]
        pending += backlog.pending
        if not check.balanced:
            # Rows that no verdict, acknowledgment or failure accounts for: something
            # lost track of them. Never silence.
            log_ledger_imbalance(status.audience_id, check, checked_by="summary")
        report, next_due = reconcile_state(status.audience_id)
        log.info(
            "audience_summary",
            extra={
                "audience": status.audience_id,
                "destination": status.destination,
                "state": status.state,
                "pending_inserts": backlog.inserts,
                "pending_deletes": backlog.deletes,
                "oldest_pending_age_seconds": (
                    round(clock.time() - backlog.oldest_changed_at, 3)
                    if backlog.oldest_changed_at is not None
                    else None
                ),
                "in_flight": backlog.in_flight,
                "rejected": backlog.rejected,
                "jobs_in_flight": status.jobs_in_flight,
                "ledger": msgspec.structs.asdict(check.counts),
                "ledger_balanced": check.balanced,
                "last_reconciled_at": report.finished_at if report is not None else None,
                "next_reconcile_at": next_due,
            },
        )
    for name, destination in sorted(destinations.items()):
        estimate = loss_estimate(name)
        log.info(
            "destination_summary",
            extra={
                "destination": name,
                "running": destination.is_running,
                "stopped_reason": destination.stopped_reason,
                "budget": msgspec.structs.asdict(destination.budget.snapshot()),
                "loss_estimate": msgspec.to_builtins(estimate) if estimate is not None else None,
            },
        )
    return SummaryTotals(
        audiences=len(statuses),
        pending=pending,
        failed=sum(s.state is AudienceState.FAILED for s in statuses),
        stopped_destinations=sorted(name for name, d in destinations.items() if not d.is_running),
    )

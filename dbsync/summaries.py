"""The periodic summary lines: one per audience and one per destination, every interval.

Logs are events, not one line per account (ARCHITECTURE, logs): every
``summary_interval_seconds`` the supervisor asks :func:`log_summaries` for an
``audience_summary`` line per audience (backlog, jobs in flight, the ledger, the
read-back schedule) and a ``destination_summary`` line per destination (whether it
runs, its budget, its loss estimate). The totals come back as :class:`SummaryTotals`,
which the daemon turns into systemd's ``STATUS=`` line.

Each line carries the backlog's forecast (:mod:`dbsync.forecast`): by when the accounts
pending now will be delivered under the destination's budget (``backlog_eta``), and
:class:`EtaWatch` says once when an audience's forecast passes its destination's
``backlog_eta_warn_hours`` (``backlog_eta_exceeded``) and once when it falls back
(``backlog_eta_recovered``). :func:`forecasts` gathers the forecast's inputs from the
running actors, their backlogs and the budgets; ``dbsync ctl status`` and ``plan`` use
it too.

The figures of many audiences are read a chunk at a time (:data:`_SUMMARY_CHUNK`), so
that 10,000 audiences do not hold the store's reader for long.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import msgspec

from dbsync.budget import DestinationBudget
from dbsync.clock import Clock
from dbsync.demandbase.wire import Endpoint
from dbsync.destination import Destination
from dbsync.forecast import STATUS_READS_PER_JOB, Capacity, DestinationEta, Load, forecast
from dbsync.model import AudienceState, Backlog, LedgerCheck
from dbsync.reconcile import LossEstimate, ReconcileReport, log_ledger_imbalance

__all__ = [
    "AudienceStatus",
    "EtaWatch",
    "SummaryStore",
    "SummaryTotals",
    "capacity",
    "forecasts",
    "log_summaries",
    "read_figures",
]

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
    # What the forecast needs of its actor (its settings, its learned job duration).
    rows_per_job: int = 10_000
    max_jobs_in_flight: int = 2
    requests_per_minute: float = math.inf
    max_age_seconds: float = 60.0
    job_seconds: float = 5.0
    held: bool = False  # paused or its contract broken: nothing is sent


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


# A quota absent from the limits is no limit.
_UNLIMITED_JOBS = 1_000_000_000


def capacity(budget: DestinationBudget, now: float) -> Capacity:
    """The destination's room for import jobs now, today and on a whole day."""
    snapshot = budget.snapshot()
    day = budget.limits.day_seconds
    # The budget rolls its window when asked for room; a day may have begun since.
    used = snapshot.used if snapshot.window >= math.floor(now / day) else {}

    def jobs(room: Callable[[str], int]) -> int:
        per_endpoint = [
            room(Endpoint.IMPORT_CREATE_JOB),
            room(Endpoint.IMPORT_UPLOAD),
            room(Endpoint.IMPORT_JOB_STATUS) // STATUS_READS_PER_JOB,
        ]
        return max(0, min(per_endpoint))

    def allowed(endpoint: str) -> int:
        return snapshot.allowed.get(endpoint, _UNLIMITED_JOBS)

    return Capacity(
        now=now,
        day_seconds=day,
        jobs_left_today=jobs(lambda e: allowed(e) - used.get(e, 0)),
        jobs_per_day=jobs(allowed),
        pace_per_minute=snapshot.pace_per_minute,
        pace_limit_per_minute=budget.limits.requests_per_minute,
        pace_recovery_step=budget.pace_recovery_step,
        pace_recovery_seconds=budget.limits.pace_recovery_seconds,
        job_slots=snapshot.job_slots,
        edge_seconds=budget.edge_seconds,
    )


def forecasts(
    statuses: Sequence[AudienceStatus],
    destinations: Mapping[str, Destination],
    backlogs: Mapping[str, Backlog],
    now: float,
    *,
    starts_wanted: int = 0,
) -> dict[str, DestinationEta]:
    """Each destination's forecast (:func:`dbsync.forecast.forecast`) for its running
    audiences' ``backlogs`` (audiences without one are left out)."""
    loads: dict[str, list[Load]] = {name: [] for name in destinations}
    for status in statuses:
        backlog = backlogs.get(status.audience_id)
        if backlog is None or status.destination not in loads:
            continue
        loads[status.destination].append(
            Load(
                audience_id=status.audience_id,
                inserts=backlog.inserts,
                deletes=backlog.deletes,
                in_flight=backlog.in_flight,
                # Its open batches hold slots (a delivery still waiting for one does
                # not): each carries at most rows_per_job accounts.
                jobs_in_flight=min(
                    status.max_jobs_in_flight,
                    math.ceil(backlog.in_flight / max(1, status.rows_per_job)),
                ),
                oldest_changed_at=backlog.oldest_changed_at,
                last_turn=destinations[status.destination].budget.last_turn(status.audience_id),
                rows_per_job=status.rows_per_job,
                max_jobs_in_flight=status.max_jobs_in_flight,
                requests_per_minute=status.requests_per_minute,
                max_age_seconds=status.max_age_seconds,
                job_seconds=status.job_seconds,
                held=status.held,
            )
        )
    return {
        name: forecast(capacity(destination.budget, now), loads[name], starts_wanted=starts_wanted)
        for name, destination in destinations.items()
    }


class EtaWatch:
    """Says once when an audience's forecast passes the hours its destination allows,
    and once when it falls back below them (or its backlog is gone)."""

    def __init__(self) -> None:
        self._over: set[str] = set()

    def observe(
        self,
        audience: str,
        destination: str,
        eta: float | None,
        *,
        jobs: int,
        held: bool,
        now: float,
        warn_hours: float,
    ) -> None:
        if held:
            return  # paused or stopped by a broken contract: its status says so already
        # No time for a backlog that is not held: no quota at all will carry it.
        over = (eta is None and jobs > 0) or (eta is not None and eta - now > warn_hours * 3600)
        fields = {
            "audience": audience,
            "destination": destination,
            "backlog_eta": eta,
            "backlog_eta_hours": _hours(eta, now),
            "backlog_jobs": jobs,
            "warn_hours": warn_hours,
        }
        if over and audience not in self._over:
            self._over.add(audience)
            log.warning("backlog_eta_exceeded", extra=fields)
        elif not over and audience in self._over:
            self._over.discard(audience)
            log.info("backlog_eta_recovered", extra=fields)

    def forget(self, keep: Sequence[str]) -> None:
        """Audiences no longer running start afresh if they come back."""
        self._over &= set(keep)


def _hours(eta: float | None, now: float) -> float | None:
    return round(max(0.0, eta - now) / 3600, 3) if eta is not None else None


async def read_figures(
    store: SummaryStore, audience_ids: Sequence[str]
) -> dict[str, tuple[Backlog, LedgerCheck]]:
    """Each audience's backlog and ledger, :data:`_SUMMARY_CHUNK` audiences a read."""
    figures: dict[str, tuple[Backlog, LedgerCheck]] = {}
    for start in range(0, len(audience_ids), _SUMMARY_CHUNK):
        # Without the pending recount: that one is a reconciliation's price.
        figures.update(await store.summaries(audience_ids[start : start + _SUMMARY_CHUNK]))
    return figures


async def log_summaries(
    statuses: Sequence[AudienceStatus],
    destinations: Mapping[str, Destination],
    *,
    store: SummaryStore,
    clock: Clock,
    reconcile_state: Callable[[str], tuple[ReconcileReport | None, float | None]],
    loss_estimate: Callable[[str], LossEstimate | None],
    eta_watch: EtaWatch | None = None,
    warn_hours: Mapping[str, float] | None = None,
) -> SummaryTotals:
    """One ``audience_summary`` line per audience, one ``destination_summary`` each;
    returns their totals (what systemd's ``STATUS=`` shows). ``eta_watch`` judges each
    audience's forecast against its destination's ``warn_hours``."""
    pending = 0
    figures = await read_figures(store, [s.audience_id for s in statuses])
    now = clock.time()
    etas = forecasts(statuses, destinations, {a: f[0] for a, f in figures.items()}, now)
    for status in statuses:
        backlog, check = figures[status.audience_id]
        destination_eta = etas.get(status.destination)
        eta = destination_eta.of(status.audience_id) if destination_eta is not None else None
        bound = (warn_hours or {}).get(status.destination)
        if eta_watch is not None and eta is not None and bound is not None:
            eta_watch.observe(
                status.audience_id,
                status.destination,
                eta.eta,
                jobs=eta.jobs,
                held=eta.held,
                now=now,
                warn_hours=bound,
            )
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
                "backlog_jobs": eta.jobs if eta is not None else None,
                "backlog_eta": eta.eta if eta is not None else None,
                "backlog_eta_hours": _hours(eta.eta, now) if eta is not None else None,
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
                "backlog_jobs": etas[name].jobs if name in etas else None,
                "backlog_eta": etas[name].eta if name in etas else None,
            },
        )
    if eta_watch is not None:
        eta_watch.forget([s.audience_id for s in statuses])
    return SummaryTotals(
        audiences=len(statuses),
        pending=pending,
        failed=sum(s.state is AudienceState.FAILED for s in statuses),
        stopped_destinations=sorted(name for name, d in destinations.items() if not d.is_running),
    )

"""``dbsync ctl``'s human output: each reply as a sentence or aligned tables.

``--json`` prints the reply itself; this is for people. Values go through
:mod:`dbsync.admin.cells` (never a Python repr). Imports: msgspec, the standard library
and the admin protocol only, because ``dbsync ctl`` imports this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import assert_never

from dbsync.admin import cells
from dbsync.admin.protocol import (
    AdoptReply,
    AnyReply,
    ApproveReply,
    AudienceView,
    DestinationView,
    DiscardReply,
    DrainReply,
    Fault,
    FilesReply,
    FlushReply,
    LastBatchView,
    PauseReply,
    PlanReply,
    QuotaReply,
    ReconcileReply,
    ReconcileView,
    RejectedReply,
    ReloadReply,
    RequeueReply,
    ResumeReply,
    ResyncReply,
    StatusReply,
)
from dbsync.logs import text_value

__all__ = ["render"]


def render(reply: AnyReply) -> str:
    """A reply as people read it: a sentence, or aligned tables."""
    match reply:
        case StatusReply():
            return _status(reply)
        case PauseReply(audience=audience, state=state, waited_seconds=waited):
            return f"{audience}: {state} (after {waited:g} s; until resume or restart)"
        case ResumeReply(audience=audience, state=state, waited_seconds=waited):
            return f"{audience}: {state} (after {waited:g} s)"
        case FlushReply():
            return (
                f"{reply.audience}: flushed; pending {reply.pending_before} -> {reply.pending},"
                f" {reply.in_flight} accounts in flight"
            )
        case ResyncReply(audience=audience, accounts=accounts, paused=paused):
            line = f"{audience}: {accounts} desired members will be sent again"
            return line + (" once resumed (the audience is paused)" if paused else "")
        case RequeueReply(audience=audience, accounts=accounts):
            return f"{audience}: {accounts} rejected accounts put back in the queue"
        case RejectedReply():
            return _rejected(reply)
        case PlanReply():
            return _plan(reply)
        case QuotaReply(destinations=destinations):
            return _destinations(destinations)
        case ReconcileReply(report=report):
            return _report(report)
        case AdoptReply(adopted=adopted, report=report):
            return (
                f"{report.audience_id}: {adopted} members already in list {report.list_id}"
                " taken as delivered; only the difference is sent\n" + _report(report)
            )
        case ReloadReply(audiences=audiences):
            return f"configuration reloaded: {len(audiences)} audiences active"
        case DrainReply(drain_seconds=seconds):
            return f"draining: the daemon finishes its jobs in flight (at most {seconds:g} s)"
        case FilesReply():
            return _files(reply)
        case ApproveReply(audience=audience, added=added, removed=removed):
            return f"{audience}: held snapshot applied: {added} accounts added, {removed} removed"
        case DiscardReply(audience=audience, members=members, removed=removed):
            return (
                f"{audience}: held snapshot of {members} members dropped"
                f" (it would have removed {removed}); desired state unchanged"
            )
        case Fault():
            return f"{reply.code}: {reply.message}"
        case _:
            assert_never(reply)


def _status(reply: StatusReply) -> str:
    d = reply.daemon
    head = (
        f"dbsync {d.version}  pid {d.pid}  up {cells.duration(d.uptime_seconds)}  config {d.config}"
        + ("  DRAINING" if d.draining else "")
    )
    parts = [
        head,
        _audiences(reply.audiences),
        _ledgers(reply.audiences),
        _reconciles(reply.audiences),
    ]
    reasons = [
        f"{a.audience}: {a.state}: {cells.safe(a.reason)}" for a in reply.audiences if a.reason
    ]
    if reasons:
        parts.append("\n".join(reasons))
    held = [
        f"{a.audience}: snapshot HELD ({a.held_snapshot.source}, {a.held_snapshot.members}"
        f" members): {cells.safe(a.held_snapshot.reason)}; dbsync ctl approve|discard {a.audience}"
        for a in reply.audiences
        if a.held_snapshot is not None
    ]
    if held:
        parts.append("\n".join(held))
    for audience in reply.audiences:
        if audience.open_batches:
            parts.append(
                cells.table(
                    ["BATCH", "ACTION", "STATE", "ROWS", "JOB", "AGE"],
                    [
                        [
                            b.batch_id,
                            b.action,
                            b.state,
                            b.rows,
                            b.job_id,
                            cells.duration(b.age_seconds),
                        ]
                        for b in audience.open_batches
                    ],
                )
            )
    parts.append(_destinations(reply.destinations))
    return "\n\n".join(p for p in parts if p)


def _audiences(audiences: Sequence[AudienceView]) -> str:
    if not audiences:
        return "no audiences"
    return cells.table(
        [
            "AUDIENCE",
            "STATE",
            "PENDING",
            "INS/DEL",
            "OLDEST",
            "IN FLIGHT",
            "JOBS",
            "REJECTED",
            "PACE/MIN",
            "LAST BATCH",
            "ETA",
            "LIST",
        ],
        [
            [
                a.audience,
                a.state,
                a.pending_inserts + a.pending_deletes,
                f"{a.pending_inserts}/{a.pending_deletes}",
                cells.duration(a.oldest_pending_age_seconds),
                a.in_flight,
                a.jobs_in_flight,
                a.rejected,
                a.pace_per_minute,
                _last_batch(a.last_batch),
                _eta(a.backlog_eta, a.paused),
                f"{a.destination}:{a.list_name}",
            ]
            for a in audiences
        ],
    )


def _plan(reply: PlanReply) -> str:
    """The dry run: the audience's backlog, its next batches, its next read-back."""
    pending = reply.pending_inserts + reply.pending_deletes
    head = (
        f"{reply.audience} ({reply.destination}): {reply.state}; pending {pending}"
        f" ({reply.pending_inserts} to add, {reply.pending_deletes} to remove),"
        f" {reply.in_flight} accounts in flight"
    )
    if reply.held:
        head += "; nothing is sent until resume"
    elif reply.backlog_eta is not None:
        head += f"; {reply.backlog_jobs} jobs, delivered by {cells.timestamp(reply.backlog_eta)}"
    parts = [head + " (nothing was sent)"]
    if reply.batches:
        table = cells.table(
            ["BATCH", "ACTION", "ACCOUNTS", "OLDEST CHANGE", "EARLIEST START"],
            [
                [
                    n,
                    b.action,
                    b.accounts,
                    cells.timestamp(b.oldest_changed_at),
                    _eta(b.earliest_start_at),
                ]
                for n, b in enumerate(reply.batches, start=1)
            ],
        )
        more = f"\n... and {reply.more_batches} more batches" if reply.more_batches else ""
        parts.append(table + more)
    else:
        parts.append("no batch to send")
    r = reply.read_back
    if r.next_reconcile_at is None:
        parts.append("read-back: none planned (no list id yet, nothing acknowledged, or off)")
    else:
        line = f"read-back: next at {cells.timestamp(r.next_reconcile_at)}"
        if r.multi_list and r.export_group:
            others = [a for a in r.export_group if a != reply.audience]
            line += f", in one export job with {len(others)} other audiences"
            if others:
                line += ": " + ", ".join(cells.safe(a) for a in others[:20])
                line += " ..." if len(others) > 20 else ""
        parts.append(line)
    return "\n\n".join(parts)


def _eta(eta: float | None, paused: bool = False) -> str | None:
    """By when the backlog is delivered, as forecast; "paused" rather than none."""
    if eta is None:
        return "paused" if paused else None
    return cells.timestamp(eta)


def _last_batch(batch: LastBatchView | None) -> str | None:
    if batch is None:
        return None
    return f"{batch.state} {batch.action} {batch.rows} {cells.timestamp(batch.finished_at)}"


def _ledgers(audiences: Sequence[AudienceView]) -> str:
    """The counters as a table; their breakdowns by cause, where any, as lines after it."""
    counters: list[str] = []
    for audience in audiences:
        counters += [
            c for c, v in audience.ledger.items() if isinstance(v, int) and c not in counters
        ]
    if not counters:
        return ""
    table = cells.table(
        ["LEDGER", *(c.upper() for c in counters), "BALANCED"],
        [
            [a.audience, *(a.ledger.get(c, 0) for c in counters), cells.yes(a.ledger_balanced)]
            for a in audiences
        ],
    )
    breakdowns = [
        f"{a.audience} {name}: " + ", ".join(f"{k} {n}" for k, n in sorted(value.items()))
        for a in audiences
        for name, value in a.ledger.items()
        if isinstance(value, dict) and value
    ]
    return "\n".join([table, *breakdowns])


def _reconciles(audiences: Sequence[AudienceView]) -> str:
    """When each list was last read back, what it found, and when the next read-back is."""
    rows = []
    for a in audiences:
        last = a.last_reconcile
        rows.append(
            [
                a.audience,
                cells.timestamp(last.finished_at) if last else None,
                last.verified if last else None,
                last.lost_total if last else None,
                last.repaired if last else None,
                len(last.unmatched) if last else None,
                last.too_young if last else None,
                cells.timestamp(a.next_reconcile_at) if a.next_reconcile_at is not None else None,
            ]
        )
    return cells.table(
        ["READ BACK", "LAST", "VERIFIED", "LOST", "REPAIRED", "UNMATCHED", "TOO YOUNG", "NEXT"],
        rows,
    )


def _report(r: ReconcileView) -> str:
    """``reconcile``'s answer: the numbers, then every account set aside, by name."""
    lines = [
        f"{r.audience_id}: list {r.list_id} read back ({r.listed} accounts listed),"
        f" export job {r.export_job_id}, {cells.timestamp(r.started_at)} to"
        f" {cells.timestamp(r.finished_at)}",
        f"judged {r.expected} members acknowledged before {cells.timestamp(r.judged_before)}:"
        f" {r.verified} verified, {r.lost_total} lost, {r.repaired} sent again",
        f"not judged: {r.too_young} within the visibility lag, {r.unsettled} pending or in flight",
        f"listed but not desired: {r.extra_removed}, being removed",
    ]
    if r.extra_kept:
        lines.append(
            f"listed but not desired, with no External Account ID: {r.extra_kept}, left"
            " (no delete row can name them; remove them in Demandbase if they should go)"
        )
    if r.lost:
        lines.append("lost by cause: " + ", ".join(f"{k} {n}" for k, n in sorted(r.lost.items())))
    lines.append(
        "ledger balanced" if r.ledger_balanced else f"LEDGER IMBALANCE: {text_value(r.imbalances)}"
    )
    set_aside = (
        ("unmatched: Demandbase has no account that matches them", r.unmatched),
        ("not removable: still listed after every repair", r.not_removable),
    )
    for reason, accounts in set_aside:
        if accounts:
            lines.append(f"\nset aside as {reason}")
            lines.append(
                cells.table(
                    ["EXTERNAL ID", "DOMAIN", "NAME"],
                    [[a.external_id, a.domain, a.name] for a in accounts],
                )
            )
    return "\n".join(lines)


def _destinations(destinations: Sequence[DestinationView]) -> str:
    if not destinations:
        return "no destinations"
    summary = cells.table(
        [
            "DESTINATION",
            "AUTH",
            "AUTH STATE",
            "PACE/MIN",
            "JOBS",
            "THROTTLED",
            "QUOTA DAY ENDS",
            "BACKLOG JOBS",
            "BACKLOG ETA",
            "CONTRACT",
            "PROBED",
        ],
        [
            [
                d.destination,
                d.auth_mode,
                d.auth_state,
                d.pace_per_minute,
                f"{d.jobs_in_flight}/{d.job_slots}",
                d.throttled,
                cells.timestamp(d.window_ends_at),
                d.backlog_jobs,
                _eta(d.backlog_eta),
                d.contract,
                cells.timestamp(d.probed_at) if d.probed_at is not None else "never",
            ]
            for d in destinations
        ],
    )
    quota = cells.table(
        ["DESTINATION", "ENDPOINT", "USED", "LEFT", "ALLOWED", "LIMIT"],
        [
            [d.destination, q.endpoint, q.used, q.left, q.allowed, q.limit]
            for d in destinations
            for q in d.quota
        ],
    )
    losses = cells.table(
        ["LOSSES", "SINCE", "JUDGED", "LOST", "PER 1000", "THROTTLED: PER 1000", "ELSE: PER 1000"],
        [
            [
                d.destination,
                cells.timestamp(e.since) if e.since > 0 else "first run",
                e.overall.judged,
                e.overall.lost,
                e.overall.lost_per_thousand,
                e.throttled.lost_per_thousand,
                e.unthrottled.lost_per_thousand,
            ]
            for d in destinations
            if (e := d.loss_estimate) is not None
        ],
    )
    has_losses = any(d.loss_estimate is not None for d in destinations)
    return f"{summary}\n\n{quota}" + (f"\n\n{losses}" if has_losses else "")


def _files(reply: FilesReply) -> str:
    if reply.directory is None:
        return "no watched folder: set [ingest.files] in the configuration"
    parts = [f"watching {reply.directory}"]
    if reply.held:
        parts.append(
            "held by the removal guard (dbsync ctl approve|discard AUDIENCE):\n"
            + cells.table(
                ["AUDIENCE", "SOURCE", "RECEIVED", "MEMBERS", "NOW", "WOULD REMOVE", "REASON"],
                [
                    [
                        h.audience,
                        h.source,
                        cells.timestamp(h.received_at),
                        h.members,
                        h.current,
                        h.removed,
                        h.reason,
                    ]
                    for h in reply.held
                ],
            )
        )
    if reply.waiting:
        parts.append(
            "waiting:\n"
            + cells.table(
                ["AUDIENCE", "RUN", "FILES", "SINCE", "REASON"],
                [
                    [w.audience, w.run, len(w.files), cells.timestamp(w.since), w.reason]
                    for w in reply.waiting
                ],
            )
        )
    if reply.runs:
        parts.append(
            cells.table(
                [
                    "AUDIENCE",
                    "RUN",
                    "OUTCOME",
                    "FILES",
                    "ROWS",
                    "ADDED",
                    "REMOVED",
                    "LEFT OUT",
                    "DECIDED",
                    "REASON",
                ],
                [
                    [
                        r.audience,
                        r.run,
                        r.outcome,
                        len(r.files),
                        r.rows,
                        r.added,
                        r.removed,
                        r.invalid,
                        cells.timestamp(r.decided_at),
                        r.reason,
                    ]
                    for r in reply.runs
                ],
            )
        )
    else:
        parts.append("no runs decided yet")
    return "\n\n".join(parts)


def _rejected(reply: RejectedReply) -> str:
    if not reply.accounts:
        return "no rejected accounts"
    table = cells.table(
        [
            "AUDIENCE",
            "EXTERNAL ID",
            "ACTION",
            "DOMAIN",
            "ATTEMPTS",
            "REJECTED AT",
            "NEXT RETRY",
            "REASON",
        ],
        [
            [
                r.audience,
                r.external_id,
                "insert" if r.member else "delete",
                r.domain,
                r.attempts,
                cells.timestamp(r.rejected_at),
                "now (sent again)"
                if r.retrying
                else (cells.timestamp(r.next_retry_at) if r.next_retry_at is not None else "never"),
                r.reason,
            ]
            for r in reply.accounts
        ],
    )
    if reply.total > len(reply.accounts):
        table += f"\n({len(reply.accounts)} of {reply.total}; --limit shows more, --json all)"
    return table

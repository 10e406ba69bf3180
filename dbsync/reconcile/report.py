"""One read-back's report, the one shape it has, and the events that tell it.

:class:`ReconcileReport` *is* the store's :class:`~dbsync.model.ReadbackVerdict` (what
the judgment found and did) plus the run around it (which list and export, when, and
whether the ledger balanced after): it extends the verdict instead of copying it
field by field. It is kept in the store as JSON and shown by ``dbsync ctl`` (whose
protocol view mirrors it, so that ``ctl`` imports only the protocol).
"""

from __future__ import annotations

import logging

import msgspec

from dbsync.model import LedgerCheck, ReadbackVerdict

__all__ = [
    "ReconcileReport",
    "decode_report",
    "encode_report",
    "log_ledger_imbalance",
    "log_report",
    "make_report",
]

# Every module of the package logs as ``dbsync.reconcile``: the name is in each event.
log = logging.getLogger("dbsync.reconcile")

_SAMPLE_ACCOUNTS = 20  # accounts named in one log line


class ReconcileReport(ReadbackVerdict, frozen=True, kw_only=True):
    """One read-back of one audience's list: what was judged, found and done.

    ``expected`` members were judged (settled, acknowledged before ``judged_before``);
    ``verified`` of them were in the list. ``lost`` counts, by cause, the accounts found
    wrong (``dropped``: an acknowledged insert missing; ``not_removed``: an acknowledged
    delete still listed; ``vanished``: a member seen before, missing now); each was
    ``repaired`` (sent again) or set aside: ``unmatched`` (missing after the repair
    limit: Demandbase has no account matching its external id, domain or name) or
    ``not_removable``. ``extra_removed`` listed accounts should not be there and are
    being removed; ``extra_kept`` neither, but they have no External Account ID for a
    delete row to name (added in Demandbase, most likely), so they stay. ``too_young``
    were not judged: changed within the visibility lag; ``unsettled`` neither: pending,
    in flight or set aside.
    """

    audience_id: str
    destination: str
    list_id: int
    export_job_id: str
    started_at: float  # the export job was created (epoch seconds)
    finished_at: float  # the verdict was committed
    judged_before: float  # only changes acknowledged before this instant were judged
    lost_total: int
    ledger_balanced: bool
    imbalances: dict[str, int]


def make_report(
    verdict: ReadbackVerdict,
    check: LedgerCheck,
    *,
    audience_id: str,
    destination: str,
    list_id: int,
    export_job_id: str,
    started_at: float,
    finished_at: float,
    judged_before: float,
) -> ReconcileReport:
    """The report of ``verdict``, with the run's facts and the ledger ``check`` after it."""
    return ReconcileReport(
        **msgspec.structs.asdict(verdict),
        audience_id=audience_id,
        destination=destination,
        list_id=list_id,
        export_job_id=export_job_id,
        started_at=started_at,
        finished_at=finished_at,
        judged_before=judged_before,
        lost_total=sum(verdict.lost.values()),
        ledger_balanced=check.balanced,
        imbalances=check.imbalances,
    )


encode_report = msgspec.json.Encoder().encode
decode_report = msgspec.json.Decoder(ReconcileReport).decode


def log_report(report: ReconcileReport, check: LedgerCheck, *, repair_limit: int) -> None:
    """The events of one read-back: ``reconcile_completed``, and ``loss_detected``,
    ``accounts_set_aside``, ``ledger_imbalance`` when they apply."""
    base = {"audience": report.audience_id, "destination": report.destination}
    log.info(
        "reconcile_completed",
        extra={
            **base,
            "list_id": report.list_id,
            "export_job_id": report.export_job_id,
            "listed": report.listed,
            "expected": report.expected,
            "verified": report.verified,
            "lost": report.lost,
            "lost_total": report.lost_total,
            "repaired": report.repaired,
            "extra_removed": report.extra_removed,
            "extra_kept": report.extra_kept,
            "unmatched": len(report.unmatched),
            "not_removable": len(report.not_removable),
            "too_young": report.too_young,
            "unsettled": report.unsettled,
            "judged_before": report.judged_before,
            "duration_seconds": round(report.finished_at - report.started_at, 3),
            "ledger_balanced": report.ledger_balanced,
        },
    )
    if report.lost_total:
        log.warning(
            "loss_detected",
            extra={
                **base,
                "lost": report.lost,
                "lost_total": report.lost_total,
                "repaired": report.repaired,
                "unmatched": len(report.unmatched),
                "not_removable": len(report.not_removable),
            },
        )
    for reason, accounts in (
        ("unmatched", report.unmatched),
        ("not_removable", report.not_removable),
    ):
        if accounts:
            log.warning(
                "accounts_set_aside",
                extra={
                    **base,
                    "reason": reason,
                    "count": len(accounts),
                    "repair_limit": repair_limit,
                    "accounts": [msgspec.structs.asdict(a) for a in accounts[:_SAMPLE_ACCOUNTS]],
                },
            )
    if not check.balanced:
        log_ledger_imbalance(report.audience_id, check, checked_by="reconcile")


def log_ledger_imbalance(audience_id: str, check: LedgerCheck, *, checked_by: str) -> None:
    """The ``ledger_imbalance`` error event: which sums do not hold, and the numbers."""
    log.error(
        "ledger_imbalance",
        extra={
            "audience": audience_id,
            "checked_by": checked_by,
            "imbalances": check.imbalances,
            "unaccounted_rows": check.imbalances.get("delivery", 0),
            "ledger": msgspec.structs.asdict(check.counts),
            "processing": check.processing,
            "awaiting": check.awaiting,
            "pending": check.pending,
        },
    )

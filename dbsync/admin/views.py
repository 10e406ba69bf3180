"""The parts of the admin socket's replies: one Struct per thing a reply shows.

``dbsync ctl --json`` prints replies as they came, so these Structs are what scripts
read: add fields, never rename one. :mod:`dbsync.admin.protocol` holds the requests
and replies that carry them (and re-exports these names).

Imports: msgspec and the standard library only, because ``dbsync ctl`` imports this.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "AccountView",
    "AudienceView",
    "BatchView",
    "DaemonView",
    "DestinationView",
    "FileRunView",
    "HeldView",
    "LastBatchView",
    "LossEstimateView",
    "LossRateView",
    "PlannedBatchView",
    "PlannedReadBackView",
    "QuotaLine",
    "ReconcileView",
    "RejectedView",
    "WaitingRunView",
]


class DaemonView(msgspec.Struct, frozen=True, kw_only=True):
    version: str
    pid: int
    config: str
    started_at: float
    uptime_seconds: float
    draining: bool


class BatchView(msgspec.Struct, frozen=True, kw_only=True):
    """A batch in flight: planned, its job created, or uploaded and processing."""

    batch_id: int
    action: str
    state: str
    rows: int
    job_id: int | None
    age_seconds: float


class LastBatchView(msgspec.Struct, frozen=True, kw_only=True):
    """The audience's newest batch whose job Demandbase completed or failed."""

    batch_id: int
    action: str
    state: str  # completed or failed
    rows: int
    job_id: int | None
    finished_at: float


class AccountView(msgspec.Struct, frozen=True, kw_only=True):
    external_id: str
    name: str
    domain: str


class ReconcileView(msgspec.Struct, frozen=True, kw_only=True):
    """One read-back's report (see :class:`dbsync.reconcile.ReconcileReport`)."""

    audience_id: str
    destination: str
    list_id: int
    export_job_id: str
    started_at: float
    finished_at: float
    judged_before: float  # only changes acknowledged before this were judged
    listed: int  # accounts the list held
    expected: int  # members judged
    verified: int
    lost: dict[str, int]  # by cause: dropped, not_removed, vanished, reported
    lost_total: int
    repaired: int  # sent again
    extra_removed: int  # listed but not desired: being removed
    unmatched: list[AccountView]  # set aside: Demandbase matches nothing to them
    not_removable: list[AccountView]
    too_young: int  # within the visibility lag: not judged
    unsettled: int  # pending, in flight or set aside: not judged
    ledger_balanced: bool
    imbalances: dict[str, int]
    extra_kept: int = 0  # listed, not desired, no external id to remove them by


class LossRateView(msgspec.Struct, frozen=True, kw_only=True):
    batches: int
    acknowledged: int
    judged: int
    lost: int
    lost_per_thousand: float | None


class LossEstimateView(msgspec.Struct, frozen=True, kw_only=True):
    """Accounts lost per thousand judged, overall and in batches that met a 429."""

    since: float
    overall: LossRateView
    throttled: LossRateView
    unthrottled: LossRateView


class HeldView(msgspec.Struct, frozen=True, kw_only=True):
    """A complete membership the removal guard holds (approve applies it, discard drops it)."""

    audience: str
    source: str  # put or files
    received_at: float
    members: int  # in the held snapshot
    current: int  # the audience's members when it was judged
    removed: int  # what applying it would remove
    reason: str


class AudienceView(msgspec.Struct, frozen=True, kw_only=True):
    audience: str
    name: str
    destination: str
    list_name: str
    list_id: int | None
    state: str  # AudienceState: active, paused, failed, stopped, deactivated
    reason: str  # why failed or stopped (an error message, never a secret)
    paused: bool
    pending_inserts: int
    pending_deletes: int
    oldest_pending_age_seconds: float | None
    in_flight: int  # accounts in open batches
    rejected: int
    jobs_in_flight: int
    jobs_completed: int  # by the running actor, since it started
    checkpoint_seq: int
    requests_per_minute: float | None  # the audience's own limit (None: not running)
    pace_per_minute: float | None  # what it gets now: its limit or its destination's pace
    # LedgerCounts as it stands: counters, and breakdowns of some of them by cause
    # (``{"lost_by_cause": {"dropped": 3}}``); new counters show up without a change here.
    ledger: dict[str, int | dict[str, int]]
    ledger_balanced: bool
    open_batches: list[BatchView] | None = None  # only for ``status AUDIENCE``
    last_batch: LastBatchView | None = None
    last_reconcile: ReconcileView | None = None
    next_reconcile_at: float | None = None  # None: not scheduled (no list id yet, or off)
    held_snapshot: HeldView | None = None  # held by the removal guard
    # The forecast (dbsync.forecast): import jobs its backlog needs, and by when
    # (epoch seconds) they are delivered; None: not running, nothing pending, or paused.
    backlog_jobs: int | None = None
    backlog_eta: float | None = None


class QuotaLine(msgspec.Struct, frozen=True, kw_only=True):
    endpoint: str
    limit: int  # per day, as configured
    allowed: int  # what dbsync lets itself use (limit less the safety margin)
    used: int
    left: int


class DestinationView(msgspec.Struct, frozen=True, kw_only=True):
    destination: str
    auth_mode: str  # token (legacy API token) or api_key_set
    auth_state: str  # ok, or why it stopped: auth_failed, permission_denied
    running: bool
    pace_per_minute: float
    jobs_in_flight: int
    job_slots: int
    throttled: int
    window_ends_at: float
    quota: list[QuotaLine]
    loss_estimate: LossEstimateView | None = None  # None before the first read-back
    # The Demandbase contract (docs/demandbase-contract.md): the last probe's verdict
    # (holds, degraded, broken, incomplete), "not probed", or "broken at run time (...)"
    # naming the audiences a job that fed another list stopped.
    contract: str = "not probed"
    probed_at: float | None = None  # when `dbsync probe` ran, epoch seconds
    # Its audiences' backlogs: the jobs they need, by when the last is delivered.
    backlog_jobs: int | None = None
    backlog_eta: float | None = None


class RejectedView(msgspec.Struct, frozen=True, kw_only=True):
    audience: str
    external_id: str
    name: str
    domain: str
    member: bool
    reason: str
    rejected_at: float
    attempts: int
    retries: int = 0  # times sent again on the retry schedule
    retrying: bool = False  # sent again now, awaiting a read-back's verdict
    next_retry_at: float | None = None  # None: not retried (or retrying now)


class FileRunView(msgspec.Struct, frozen=True, kw_only=True):
    """One AEP file run decided: applied, held, discarded, replaced, skipped or refused."""

    audience: str
    run: str  # the run key: the file name without part suffix and extension
    run_time: float
    outcome: str  # applied, held, discarded, replaced, skipped_late, skipped_duplicate, refused
    reason: str
    files: list[str]
    rows: int
    invalid: int  # rows left out: no external id, or no name or domain
    duplicates: int
    conflicts: int
    added: int
    removed: int
    decided_at: float
    files_deleted: bool


class WaitingRunView(msgspec.Struct, frozen=True, kw_only=True):
    audience: str
    run: str
    files: list[str]
    reason: str  # a manifest's part missing or of the wrong size, or still being written
    since: float


class PlannedBatchView(msgspec.Struct, frozen=True, kw_only=True):
    """A batch ``dbsync ctl plan`` shows: what the actor would send, nothing sent."""

    action: str  # insert (add to the list) or delete (remove from it)
    accounts: int
    oldest_changed_at: float  # epoch seconds of its oldest change
    # When the budget lets its job start, as forecast; None: held, or not forecast.
    earliest_start_at: float | None


class PlannedReadBackView(msgspec.Struct, frozen=True, kw_only=True):
    """The audience's next read-back as its destination's reconciler plans it."""

    next_reconcile_at: float | None  # None: not scheduled (no list id yet, or off)
    multi_list: bool  # the destination reads many lists in one export job
    # With multi_list: the audiences due by then, read in that same export job, in turn
    # order (this one included); empty otherwise.
    export_group: list[str]

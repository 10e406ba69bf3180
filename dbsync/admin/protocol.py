"""The admin socket's language: requests, replies, fault codes and their exit codes.

A request is one JSON object on one line whose ``verb`` selects its Struct; fields a
verb does not know are refused (``bad_request``), as for every input of ours. A reply
is one JSON object on one line whose ``reply`` is the verb it answers, or ``fault``.
``dbsync ctl --json`` prints the reply as it came, so these Structs are also what
scripts read: add fields, never rename one.

Each request class carries the role it needs (``role``): read verbs need a viewer,
everything that changes something an operator. Adding a verb is: a request Struct and
its reply Struct here (both in their unions), a ``case`` in
:func:`dbsync.admin.verbs.perform`, and a renderer in :mod:`dbsync.admin.ctl`; the command
line is derived from :data:`REQUESTS`.

Imports: msgspec and the standard library only, because ``dbsync ctl`` imports this.
"""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar

import msgspec

from dbsync.exitcodes import ExitCode

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "MAX_REQUEST_BYTES",
    "RECONCILE_TIMEOUT_SECONDS",
    "REQUESTS",
    "AccountView",
    "Adopt",
    "AdoptReply",
    "AnyReply",
    "AnyRequest",
    "Approve",
    "ApproveReply",
    "AudienceView",
    "BatchView",
    "DaemonView",
    "DestinationView",
    "Discard",
    "DiscardReply",
    "Drain",
    "DrainReply",
    "Fault",
    "FaultCode",
    "FileRunView",
    "Files",
    "FilesReply",
    "Flush",
    "FlushReply",
    "HeldView",
    "LastBatchView",
    "LossEstimateView",
    "LossRateView",
    "Pause",
    "PauseReply",
    "Quota",
    "QuotaLine",
    "QuotaReply",
    "Reconcile",
    "ReconcileReply",
    "ReconcileView",
    "Rejected",
    "RejectedReply",
    "RejectedView",
    "Reload",
    "ReloadReply",
    "Reply",
    "Request",
    "Requeue",
    "RequeueReply",
    "Resume",
    "ResumeReply",
    "Resync",
    "ResyncReply",
    "Role",
    "Status",
    "StatusReply",
    "WaitingRunView",
    "decode_reply",
    "decode_request",
    "encode",
]

# Long enough for a reload that stops actors (each waits at most drain_seconds, 20 s
# by default) and well inside systemd's 90 s for an ExecReload.
DEFAULT_TIMEOUT_SECONDS = 30.0
# A read-back is an export job at Demandbase: it takes minutes there.
RECONCILE_TIMEOUT_SECONDS = 1800.0
MAX_REQUEST_BYTES = 64 * 1024

AudienceId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
TimeoutSeconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]


class Role(enum.IntEnum):
    """What a caller may do; each role includes the ones below it."""

    NONE = 0
    VIEWER = 1  # read verbs
    OPERATOR = 2  # every verb


class FaultCode(enum.StrEnum):
    """Why a request was not done. Stable: scripts match on them."""

    BAD_REQUEST = "bad_request"  # not a request of this protocol (names the field)
    UNKNOWN_AUDIENCE = "unknown_audience"  # no such audience (or not active, for a change)
    PERMISSION_DENIED = "permission_denied"  # the caller's role does not allow the verb
    TIMEOUT = "timeout"  # the effect was not seen in time; the request stays in effect
    REJECTED_CONFIG = "rejected_config"  # reload: the new file is invalid; the old one runs
    AUDIENCE_PAUSED = "audience_paused"  # flush of a paused audience: resume it first
    DESTINATION_STOPPED = "destination_stopped"  # flush while the destination's auth fails
    DRAINING = "draining"  # the daemon is stopping and changes nothing more
    RECONCILE_DEFERRED = "reconcile_deferred"  # the export quota says later (and when)
    NOTHING_HELD = "nothing_held"  # approve or discard: the guard holds no snapshot
    INTERNAL = "internal"  # the daemon failed to answer (its log says why)
    # Raised by the client itself, never sent by the daemon:
    UNREACHABLE = "unreachable"  # no daemon answers on the socket
    CONFIG_INVALID = "config_invalid"  # the configuration that names the socket

    @property
    def exit_code(self) -> ExitCode:
        return _EXIT_CODES.get(self, ExitCode.FAULT)


_EXIT_CODES = {
    FaultCode.BAD_REQUEST: ExitCode.USAGE,
    FaultCode.PERMISSION_DENIED: ExitCode.NOPERM,
    FaultCode.TIMEOUT: ExitCode.TEMPFAIL,
    # 75: try again later, at the time the message gives.
    FaultCode.RECONCILE_DEFERRED: ExitCode.TEMPFAIL,
    # 78, not 1: the reload failed because of the file, exactly what check-config
    # reports with 78, and systemd's `reload` then tells the operator to look at it.
    FaultCode.REJECTED_CONFIG: ExitCode.CONFIG,
    FaultCode.UNREACHABLE: ExitCode.UNAVAILABLE,
    FaultCode.CONFIG_INVALID: ExitCode.CONFIG,
}


# --- requests ------------------------------------------------------------------------------


class Request(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="verb"
):
    """Base of every request; ``timeout_seconds`` bounds the wait for the effect."""

    role: ClassVar[Role] = Role.OPERATOR
    timeout_seconds: TimeoutSeconds = DEFAULT_TIMEOUT_SECONDS


class Status(Request, frozen=True, tag="status"):
    """daemon and per-audience state, backlog, ledger, pace, quotas"""

    role: ClassVar[Role] = Role.VIEWER
    audience: AudienceId | None = None


class Pause(Request, frozen=True, tag="pause"):
    """stop sending for one audience (until resume or restart); waits until paused"""

    audience: AudienceId


class Resume(Request, frozen=True, tag="resume"):
    """restart sending for one audience, after a crash loop too; waits until not paused"""

    audience: AudienceId


class Flush(Request, frozen=True, tag="flush"):
    """send what is pending now, within budget; waits until a batch is planned"""

    audience: AudienceId


class Resync(Request, frozen=True, tag="resync"):
    """push the whole desired membership again"""

    audience: AudienceId


class Rejected(Request, frozen=True, tag="rejected"):
    """list accounts set aside with their reason"""

    role: ClassVar[Role] = Role.VIEWER
    audience: AudienceId | None = None
    limit: Annotated[int, msgspec.Meta(ge=1)] = 1000


class Requeue(Request, frozen=True, tag="requeue"):
    """put an audience's rejected accounts back in its queue"""

    audience: AudienceId


class Quota(Request, frozen=True, tag="quota"):
    """per destination: used and left of each limit"""

    role: ClassVar[Role] = Role.VIEWER


class Reconcile(Request, frozen=True, kw_only=True, tag="reconcile"):
    """read the list back now (within the export quota) and print the report"""

    audience: AudienceId
    timeout_seconds: TimeoutSeconds = RECONCILE_TIMEOUT_SECONDS


class Files(Request, frozen=True, tag="files"):
    """recent AEP file runs and their outcome (applied, waiting, held, skipped, refused)"""

    role: ClassVar[Role] = Role.VIEWER
    limit: Annotated[int, msgspec.Meta(ge=1)] = 50


class Approve(Request, frozen=True, tag="approve"):
    """apply the snapshot the removal guard held for an audience"""

    audience: AudienceId


class Discard(Request, frozen=True, tag="discard"):
    """drop the snapshot the removal guard held for an audience"""

    audience: AudienceId


class Adopt(Request, frozen=True, kw_only=True, tag="adopt"):
    """read the list back and take the members it holds as delivered; send the rest"""

    audience: AudienceId
    timeout_seconds: TimeoutSeconds = RECONCILE_TIMEOUT_SECONDS


class Reload(Request, frozen=True, tag="reload"):
    """re-read the config; non-zero (78) when the new one is rejected"""


class Drain(Request, frozen=True, tag="drain"):
    """graceful stop: answers, then the daemon drains and exits"""


AnyRequest = (
    Status
    | Pause
    | Resume
    | Flush
    | Resync
    | Rejected
    | Requeue
    | Reconcile
    | Adopt
    | Quota
    | Files
    | Approve
    | Discard
    | Reload
    | Drain
)
# In the order ``dbsync ctl --help`` lists them.
REQUESTS: tuple[type[Request], ...] = (
    Status,
    Pause,
    Resume,
    Flush,
    Resync,
    Rejected,
    Requeue,
    Reconcile,
    Adopt,
    Quota,
    Files,
    Approve,
    Discard,
    Reload,
    Drain,
)


# --- replies -------------------------------------------------------------------------------


class Reply(msgspec.Struct, frozen=True, kw_only=True, tag_field="reply"):
    """Base of every reply. Clients ignore fields they do not know (newer daemons)."""


class Fault(Reply, frozen=True, tag="fault"):
    code: FaultCode
    message: str


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


class StatusReply(Reply, frozen=True, tag="status"):
    daemon: DaemonView
    audiences: list[AudienceView]
    destinations: list[DestinationView]


class PauseReply(Reply, frozen=True, tag="pause"):
    audience: str
    state: str
    waited_seconds: float


class ResumeReply(Reply, frozen=True, tag="resume"):
    audience: str
    state: str
    waited_seconds: float


class FlushReply(Reply, frozen=True, tag="flush"):
    audience: str
    pending_before: int
    pending: int
    in_flight: int


class ResyncReply(Reply, frozen=True, tag="resync"):
    audience: str
    accounts: int  # desired members marked to be sent again
    paused: bool  # if so they wait for a resume


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


class RejectedReply(Reply, frozen=True, tag="rejected"):
    total: int
    accounts: list[RejectedView]  # the first ``limit`` of ``total``


class RequeueReply(Reply, frozen=True, tag="requeue"):
    audience: str
    accounts: int


class QuotaReply(Reply, frozen=True, tag="quota"):
    destinations: list[DestinationView]


class ReconcileReply(Reply, frozen=True, tag="reconcile"):
    report: ReconcileView


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


class FilesReply(Reply, frozen=True, tag="files"):
    directory: str | None  # None: no [ingest.files] configured
    waiting: list[WaitingRunView]
    held: list[HeldView]
    runs: list[FileRunView]  # newest first


class ApproveReply(Reply, frozen=True, tag="approve"):
    audience: str
    added: int
    removed: int
    members: int


class DiscardReply(Reply, frozen=True, tag="discard"):
    audience: str
    members: int
    removed: int


class AdoptReply(Reply, frozen=True, tag="adopt"):
    adopted: int  # pending members the list held, taken as delivered and not sent
    report: ReconcileView  # the read-back that followed


class ReloadReply(Reply, frozen=True, tag="reload"):
    accepted: bool
    audiences: list[str]


class DrainReply(Reply, frozen=True, tag="drain"):
    draining: bool
    drain_seconds: float


AnyReply = (
    Fault
    | StatusReply
    | PauseReply
    | ResumeReply
    | FlushReply
    | ResyncReply
    | RejectedReply
    | RequeueReply
    | ReconcileReply
    | AdoptReply
    | QuotaReply
    | FilesReply
    | ApproveReply
    | DiscardReply
    | ReloadReply
    | DrainReply
)


# --- the wire ------------------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(AnyRequest)
_reply_decoder = msgspec.json.Decoder(AnyReply)


def encode(message: Request | Reply) -> bytes:
    """One line: JSON never holds a raw newline, so the newline frames the message."""
    return _encoder.encode(message) + b"\n"


def decode_request(line: bytes) -> AnyRequest:
    """Raises msgspec.DecodeError (ValidationError names the field) on a bad request."""
    request: AnyRequest = _request_decoder.decode(line)
    return request


def decode_reply(line: bytes) -> AnyReply:
    reply: AnyReply = _reply_decoder.decode(line)
    return reply

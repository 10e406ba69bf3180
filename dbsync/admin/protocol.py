"""The admin socket's language: requests, replies, fault codes and their exit codes.

A request is one JSON object on one line whose ``verb`` selects its Struct; fields a
verb does not know are refused (``bad_request``), as for every input of ours. A reply
is one JSON object on one line whose ``reply`` is the verb it answers, or ``fault``.
``dbsync ctl --json`` prints the reply as it came, so these Structs are also what
scripts read: add fields, never rename one.

Each request class carries the role it needs (``role``): read verbs need a viewer,
everything that changes something an operator. Adding a verb is: a request Struct and
its reply Struct here (both in their unions; the Structs a reply carries live in
:mod:`dbsync.admin.views`), a ``case`` in :func:`dbsync.admin.verbs.perform`, and a
renderer in :mod:`dbsync.admin.render`; the command line is derived from
:data:`REQUESTS`.

Imports: msgspec and the standard library only, because ``dbsync ctl`` imports this.
"""

from __future__ import annotations

import enum
from typing import Annotated, ClassVar

import msgspec

from dbsync.admin.views import (
    AccountView,
    AudienceView,
    BatchView,
    DaemonView,
    DestinationView,
    FileRunView,
    HeldView,
    LastBatchView,
    LossEstimateView,
    LossRateView,
    PlannedBatchView,
    PlannedReadBackView,
    QuotaLine,
    ReconcileView,
    RejectedView,
    WaitingRunView,
)
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
    "Plan",
    "PlanReply",
    "PlannedBatchView",
    "PlannedReadBackView",
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


class Plan(Request, frozen=True, tag="plan"):
    """the batches one audience would send next, and its planned read-backs; sends nothing"""

    role: ClassVar[Role] = Role.VIEWER
    audience: AudienceId
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10


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
    | Plan
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
    Plan,
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


class RejectedReply(Reply, frozen=True, tag="rejected"):
    total: int
    accounts: list[RejectedView]  # the first ``limit`` of ``total``


class RequeueReply(Reply, frozen=True, tag="requeue"):
    audience: str
    accounts: int


class PlanReply(Reply, frozen=True, tag="plan"):
    audience: str
    destination: str
    state: str
    held: bool  # paused or its contract broken: nothing is sent until resume
    pending_inserts: int
    pending_deletes: int
    in_flight: int  # accounts in open batches
    jobs_in_flight: int
    backlog_jobs: int | None  # import jobs the backlog needs (None: not running)
    backlog_eta: float | None  # by when it is delivered, as forecast (dbsync.forecast)
    batches: list[PlannedBatchView]  # the next ones, in the order the actor plans them
    more_batches: int  # beyond ``limit``
    read_back: PlannedReadBackView


class QuotaReply(Reply, frozen=True, tag="quota"):
    destinations: list[DestinationView]


class ReconcileReply(Reply, frozen=True, tag="reconcile"):
    report: ReconcileView


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
    | PlanReply
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

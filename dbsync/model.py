"""The Structs that cross boundaries between parts: accounts and membership changes.

Everything here is a frozen msgspec Struct with no behaviour beyond validation, so
that ingest, store, actors and reconciler speak one shape. The store's answers live
here too (:class:`AudienceRecord`, :class:`ReadbackVerdict`, ...): the store's facade
returns nothing else, so a second backend can return the same.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec

# The state machines live in dbsync.states; re-exported here, where they used to be.
from dbsync.states import AudienceState, BatchState

__all__ = [
    "Account",
    "AccountKey",
    "AudienceRecord",
    "AudienceSpec",
    "AudienceState",
    "Backlog",
    "Batch",
    "BatchState",
    "BatchSummary",
    "Change",
    "LedgerCheck",
    "LedgerCounts",
    "ListAction",
    "ListedAccount",
    "LossCause",
    "LossTally",
    "PeekedBatch",
    "ReadbackVerdict",
    "ReconcileFacts",
    "ReconcileRun",
    "RejectReason",
    "RejectedAccount",
    "SnapshotResult",
    "SyncResult",
]

# 256: dbsync.demandbase.wire.EXTERNAL_ID_MAX_CHARS (the model may not import wire).
AccountKey = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


# Account, ListedAccount and Change hold only strings, numbers and each other, so they
# can never be part of a reference cycle: ``gc=False`` keeps the garbage collector from
# tracking them, which matters when one ingest body or read-back makes a million.


class Account(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, gc=False):
    """A company as the CDP knows it; ``external_id`` is the CDP's key."""

    external_id: AccountKey
    name: str = ""
    domain: str = ""


class ListedAccount(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A member of a Demandbase list, as a read-back (an account-list export) gives it.

    ``external_id`` is empty when Demandbase holds none for the account (it matched an
    import row by domain and name, or was added in Demandbase): such a member can only
    be matched to an audience's account by domain and name.
    """

    external_id: str
    name: str
    domain: str


class Change(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """``account`` should (``member``) or should not be in ``audience_id``'s list.

    ``ts`` is when dbsync received it (epoch seconds): ingest checks a ``ts`` the CDP
    sends (:func:`dbsync.ingest.bodies.received_ts`) but records the receipt, so that
    no sender's clock reorders the queue.
    """

    audience_id: str
    account: Account
    member: bool
    ts: float


class ListAction(enum.StrEnum):
    """What a batch does to its list; Demandbase's default ``replace`` is never used here."""

    INSERT = "insert"
    DELETE = "delete"


class Batch(msgspec.Struct, frozen=True, kw_only=True):
    """Accounts of one audience going to Demandbase in one import job, all one action."""

    batch_id: int
    audience_id: str
    action: ListAction
    state: BatchState
    accounts: tuple[Account, ...]
    job_id: int | None = None
    created_at: float = 0.0
    uploaded_at: float | None = None
    attempts: int = 0


class Backlog(msgspec.Struct, frozen=True, kw_only=True):
    """An audience's dirty accounts not yet in flight, and how old the oldest change is."""

    inserts: int
    deletes: int
    oldest_changed_at: float | None  # epoch seconds; None when nothing is pending
    in_flight: int = 0  # accounts in open batches
    rejected: int = 0  # accounts set aside with a reason

    @property
    def pending(self) -> int:
        return self.inserts + self.deletes


class PeekedBatch(msgspec.Struct, frozen=True, kw_only=True):
    """A batch the actor would plan next (nothing marked): its action and accounts."""

    action: ListAction
    accounts: int
    oldest_changed_at: float  # epoch seconds of its oldest change
    newest_changed_at: float


class LedgerCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Per-audience account accounting (ARCHITECTURE invariant 4); counts are rows.

    received      changes accepted by ingest (committed)
    superseded    changes replaced by a later change to the same account before folding
    exported      rows uploaded with a 2xx
    acknowledged  rows of jobs Demandbase completed
    failed        rows of jobs Demandbase failed (sent again)
    rejected      rows set aside with a reason (``rejected_by_reason``)
    requeued      rejected rows put back by the operator
    retried       rows set aside as unmatched, sent again on their retry schedule
    adopted       pending members taken as delivered, unsent, because their list held
                  them when it was adopted (outside every sum: nothing was exported)
    verified      acknowledged rows that a read-back found as acknowledged (each
                  acknowledgment is judged once: verified, lost or overtaken)
    lost          rows a read-back found wrong (``lost_by_cause``); each is repaired or,
                  past the repair limit, set aside
    repaired      lost rows marked to send again
    extra         accounts found in a list that dbsync never put or kept there,
                  marked for removal
    overtaken     acknowledged rows that a later acknowledgment replaced before any
                  read-back judged them (and those acknowledged before read-backs existed)
    throttled     429 answers met while delivering this audience

    ``lost_by_cause``: ``dropped`` (an acknowledged insert missing from the list: what
    Adobe calls throttling), ``not_removed`` (an acknowledged delete still there),
    ``vanished`` (a member seen before, missing now: removed outside dbsync),
    ``reported`` (marked wrong by hand, ``Store.mark_undelivered``).
    ``rejected_by_reason``: ``refused`` (Demandbase answered 400 for the row),
    ``unmatched`` (still missing after the repair limit: Demandbase has no account that
    matches it), ``not_removable`` (still in the list after the repair limit).
    """

    received: int = 0
    superseded: int = 0
    exported: int = 0
    acknowledged: int = 0
    failed: int = 0
    rejected: int = 0
    requeued: int = 0
    retried: int = 0
    adopted: int = 0
    verified: int = 0
    lost: int = 0
    repaired: int = 0
    extra: int = 0
    overtaken: int = 0
    throttled: int = 0
    lost_by_cause: dict[str, int] = msgspec.field(default_factory=dict)
    rejected_by_reason: dict[str, int] = msgspec.field(default_factory=dict)


class LossCause(enum.StrEnum):
    """Why a read-back found an account wrong (``LedgerCounts.lost_by_cause``)."""

    DROPPED = "dropped"
    NOT_REMOVED = "not_removed"
    VANISHED = "vanished"
    REPORTED = "reported"


class RejectReason(enum.StrEnum):
    """Why an account was set aside (``LedgerCounts.rejected_by_reason``)."""

    REFUSED = "refused"
    UNMATCHED = "unmatched"
    NOT_REMOVABLE = "not_removable"


class LedgerCheck(msgspec.Struct, frozen=True, kw_only=True):
    """The ledger of one audience and the sums that must balance, read in one snapshot.

    ``imbalances`` names each sum that does not hold, with ``left - right``::

        delivery   exported     = acknowledged + failed + processing
        verdicts   acknowledged = verified + lost[dropped] + lost[not_removed]
                                  + overtaken + awaiting
        repairs    lost         = repaired + rejected[unmatched] + rejected[not_removable]
        causes     lost         = sum of lost_by_cause
        reasons    rejected     = sum of rejected_by_reason
        pending    pending      = accounts that differ, not in flight, not set aside
    """

    counts: LedgerCounts
    processing: int  # rows of jobs Demandbase is processing
    awaiting: int  # acknowledged rows no read-back has judged yet
    pending: int  # the queue's counter
    imbalances: dict[str, int]

    @property
    def balanced(self) -> bool:
        return not self.imbalances


# --- what the store takes and answers -----------------------------------------------------


class AudienceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A configured audience, as :meth:`~dbsync.store.Store.sync_audiences` takes it."""

    audience_id: str
    destination: str
    name: str
    list_name: str
    list_id: int | None = None


class AudienceRecord(msgspec.Struct, frozen=True, kw_only=True):
    audience_id: str
    destination: str
    name: str
    list_name: str
    list_id: int | None
    state: AudienceState
    state_reason: str
    checkpoint_seq: int
    updated_at: float
    operator_paused: bool  # by ``dbsync ctl pause``, until ``ctl resume``


class BatchSummary(msgspec.Struct, frozen=True, kw_only=True):
    """A finished batch, as ``status`` shows the last one."""

    batch_id: int
    action: ListAction
    state: BatchState  # completed or failed
    rows: int
    job_id: int | None
    created_at: float
    finished_at: float


class SyncResult(msgspec.Struct, frozen=True, kw_only=True):
    added: list[str]
    renamed: list[tuple[str, str, str]]  # (audience id, old name, new name)
    deactivated: list[str]
    reactivated: list[str]


class SnapshotResult(msgspec.Struct, frozen=True, kw_only=True):
    members: int
    added: int
    removed: int
    unchanged: int


class RejectedAccount(msgspec.Struct, frozen=True, kw_only=True):
    audience_id: str
    account: Account
    member: bool
    reason: str
    rejected_at: float
    attempts: int
    retries: int = 0  # times it was sent again on the retry schedule (unmatched only)
    retrying: bool = False  # sent again now, awaiting a read-back's verdict


class ReconcileRun(msgspec.Struct, frozen=True, kw_only=True):
    """A read-back whose Data Export job was created and not yet judged."""

    run_id: int
    audience_id: str
    list_id: int
    export_job_id: str
    started_at: float


class ReadbackVerdict(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`~dbsync.store.Store.apply_readback` found in one list and did about it."""

    listed: int  # accounts in the list
    expected: int  # accounts judged that must be in the list
    verified: int  # of those, in it
    lost: dict[str, int]  # by cause (LossCause)
    repaired: int  # lost accounts marked to send again
    extra_removed: int  # accounts in the list that should not be: marked for removal
    unmatched: tuple[Account, ...]  # set aside: still missing after the repair limit
    not_removable: tuple[Account, ...]  # set aside: still there after the repair limit
    too_young: int  # not judged: acknowledged (or changed) within the visibility lag
    unsettled: int  # not judged: pending, in flight or already set aside
    # Listed, not ours, no external id: no delete row can name them. Reports kept
    # before it was counted decode as 0.
    extra_kept: int = 0


class ReconcileFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What scheduling needs to know of one audience."""

    audience_id: str
    list_id: int | None
    first_acked_at: float | None
    last_started_at: float | None  # the last read-back attempt, whatever its outcome
    last_completed_at: float | None


class LossTally(msgspec.Struct, frozen=True, kw_only=True):
    """Completed batches of a destination, throttled or not, and the verdicts on their rows."""

    throttled: bool
    batches: int
    acknowledged: int
    verified: int
    lost: int


class SnapshotOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What judging a staged snapshot (or run of AEP files) did with it.

    ``state`` is ``applied`` (its changes are in the journal) or ``held`` (the removal
    guard stopped it: ``reason`` says why; ``dbsync ctl approve`` applies it).
    ``members`` counts member rows, ``exited`` exited ones (incremental runs only);
    ``current`` the audience's members before it; ``added``/``removed`` what it changes
    (or would change, when held).
    """

    snapshot_id: int
    audience_id: str
    state: str
    mode: str
    rows: int
    members: int
    exited: int
    duplicates: int
    conflicts: int
    current: int
    added: int
    removed: int
    unchanged: int
    reason: str = ""


class HeldSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """A complete membership the removal guard held, waiting for approve or discard."""

    snapshot_id: int
    audience_id: str
    source: str  # "put" or "files"
    received_at: float
    members: int
    current: int
    removed: int
    reason: str


class FileRun(msgspec.Struct, frozen=True, kw_only=True):
    """One decided run of AEP files: its outcome and counts, as ``ctl files`` shows it.

    ``outcome``: applied, held, discarded, replaced (a newer snapshot came while held),
    skipped_late, skipped_duplicate or refused.
    """

    run_id: int
    audience_id: str
    run_key: str
    run_time: float
    content_hash: str
    files: tuple[str, ...]
    outcome: str
    reason: str
    rows: int
    invalid: int
    duplicates: int
    conflicts: int
    added: int
    removed: int
    decided_at: float
    files_deleted: bool


class FileRunInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A run of AEP files as the watcher read it, recorded with the store's decision."""

    audience_id: str
    run_key: str  # the run's name without its part suffix and extension
    run_time: float  # the date-time in its name (else the manifest's, else the files')
    content_hash: str  # SHA-256 over its parts, in part order
    files: tuple[str, ...]
    invalid: int = 0  # rows without an external id, nor a domain and a name

"""The tenant: account lists, import and export jobs, and the clock they run on.

Time, lazily
    Nothing runs in the background. A job is given the instant it falls due (an
    upload plus ``job_delay_seconds``), and that instant goes into one timeline, a heap
    ordered by due time then by arrival. Whenever anybody looks (every HTTP request,
    and every public accessor here) :meth:`Tenant.catch_up` plays the timeline up to
    ``clock.time()``, stamping each event with its own due time, not with the time it
    was noticed. So a :class:`~dbsync.clock.FakeClock` drives the emulator without a
    task, list changes are applied in completion order, and a job's ``updatedAt`` is
    when it completed, however late someone asks.

Lists [ASSUMED A1]
    A job feeds the list whose name equals its ``dataImportName``. At completion its
    matched rows, minus the rows a ``drop_ratio`` fault drops, change the list:
    ``insert`` adds them and creates the list if it is missing, ``replace`` empties it
    first (and creates it too), ``delete`` removes them, ``noop`` touches nothing.
    The completed job then carries ``accountListId`` [ASSUMED A2]. List ids count from
    1 and import job ids from :data:`FIRST_IMPORT_JOB_ID`, far apart, so that a client
    that confuses the two fails at once.

Visibility lag [ASSUMED A4]
    Each list keeps, beside its members, the changes younger than
    ``visibility_lag_seconds``: (when, account, joined). An export that finishes at
    ``t`` shows the members at ``t - lag``, found by undoing the younger changes from
    the current members. Changes older than the lag can never be undone again and are
    forgotten at the end of each catch-up.

Uploads
    :func:`read_import_file` holds every rule an upload's file must pass ([ASSUMED]:
    the documentation gives the columns but no validation rules), so that they can
    change in one place. An accepted file's rows are matched to accounts at once (the
    account database never changes); rows that match none are kept on the job as
    unmatched. Whether a job fails, and which matched rows a ``drop_ratio`` fault
    drops, is drawn when it falls due, under the faults in force then.

Exports
    An account-list export is ``accepted`` for the first half of ``job_delay_seconds``,
    ``processing`` for the second, then ``finished`` with its results file [ASSUMED
    A3]: a CSV of :data:`~dbsync.demandbase.wire.EXPORT_RESULT_COLUMNS`, one row per
    member of the lists it names, in Account ID order.
"""

from __future__ import annotations

import csv
import enum
import heapq
import io
import itertools
import logging
import random
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final

import msgspec

from dbsync.clock import Clock
from dbsync.demandbase.csvfile import encode_cells, encode_rows, read_rows
from dbsync.demandbase.emulator.accounts import AccountDatabase
from dbsync.demandbase.emulator.faults import FaultState
from dbsync.demandbase.emulator.settings import EmulatorSettings
from dbsync.demandbase.wire import (
    EXPORT_LIST_ID_COLUMN,
    EXPORT_RESULT_COLUMNS,
    import_row_problem,
)

__all__ = [
    "FIRST_IMPORT_JOB_ID",
    "LIST_CREATING_ACTIONS",
    "REQUIRED_IMPORT_COLUMNS",
    "AccountList",
    "ExportJob",
    "ExportState",
    "ImportJob",
    "ImportRow",
    "ImportState",
    "RowCounts",
    "Tenant",
    "UploadRejected",
    "read_import_file",
]

_log = logging.getLogger(__name__)

# [ASSUMED A1] the list actions that create the job's list when it does not exist:
# "insert" [DOC], and "replace", which is "empty it, then insert".
LIST_CREATING_ACTIONS: Final = frozenset({"insert", "replace"})

# Columns every import file must have, non-empty on every row [DOC: both required by
# the current developer documentation]; the External Account ID is optional.
REQUIRED_IMPORT_COLUMNS: Final = ("Account Name", "Account Domain")
_EXTERNAL_ID_COLUMN: Final = "External Account ID"

FIRST_IMPORT_JOB_ID: Final = 70_001
_FIRST_LIST_ID: Final = 1
_LOW_32: Final = (1 << 32) - 1  # a list id, in an export row's sort key

# [ASSUMED] the export's entityType for an account-list job, and the text of a failed one.
_EXPORT_ENTITY_TYPE: Final = "account"
_EXPORT_FAILED_MESSAGE: Final = "Export job failed while processing; create a new job."


class ImportState(enum.StrEnum):
    NEW = "new"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"


class ExportState(enum.StrEnum):
    ACCEPTED = "accepted"
    PROCESSING = "processing"
    FINISHED = "finished"
    FAILED = "failed"


class ImportRow(msgspec.Struct, frozen=True):
    """One data row of an import file; ``row`` counts data rows from 1 (the header is 0)."""

    row: int
    external_id: str
    name: str
    domain: str


class UploadRejected(Exception):
    """An import file that Demandbase would refuse with 400; ``message`` says where."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def read_import_file(
    data: bytes,
    *,
    reject_external_ids: frozenset[str],
    refused: list[ImportRow] | None = None,
) -> list[ImportRow]:
    """The rows of an account import file, or :class:`UploadRejected` naming what is wrong.

    [ASSUMED] rules: the file is UTF-8 CSV (a byte-order mark is tolerated); its
    header names every :data:`REQUIRED_IMPORT_COLUMNS`; no row breaks
    :func:`~dbsync.demandbase.wire.import_row_problem` (an empty or over-long name or
    domain, an id of only spaces); and no row carries an External Account ID that a
    ``reject_external_ids`` fault names. The first broken row is named by its number and column.
    Given a ``refused`` list, broken rows go there instead (a tenant that processes
    its files later, dialects ``skip-silently`` and ``content-fails``).
    """
    try:
        records = list(read_rows(data))
    except ValueError as exc:
        raise UploadRejected(f"the file is not a UTF-8 CSV file: {exc}") from None
    header = records[0].keys() if records else _header(data)
    if header is None:
        raise UploadRejected("the file is empty: a header row is required")
    for column in REQUIRED_IMPORT_COLUMNS:
        if column not in header:
            raise UploadRejected(f"the header lacks the column {column!r}")
    rows: list[ImportRow] = []
    for number, record in enumerate(records, start=1):
        # The same rule ingest applies, so that what ingest accepts this accepts.
        problem = import_row_problem(
            record["Account Name"], record["Account Domain"], record.get(_EXTERNAL_ID_COLUMN, "")
        )
        external_id = record.get(_EXTERNAL_ID_COLUMN, "").strip()
        row = ImportRow(number, external_id, record["Account Name"], record["Account Domain"])
        if refused is not None and (problem is not None or external_id in reject_external_ids):
            refused.append(row)
            continue
        if problem is not None:
            column, detail = problem
            raise UploadRejected(f"row {number}: column {column!r} {detail}")
        if external_id in reject_external_ids:
            raise UploadRejected(f"row {number}: account {external_id!r} cannot be imported")
        rows.append(row)
    return rows


def _header(data: bytes) -> list[str] | None:
    """The header of a file with no data rows (``read_rows`` yields data rows only)."""
    first = next(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")), None)
    return [cell.strip() for cell in first] if first else None


class ImportJob(msgspec.Struct, kw_only=True):
    """A Data Import job as the emulator keeps it; accounts are named by external id."""

    id: int
    data_import_name: str
    entity_type: str
    source: str
    state: ImportState = ImportState.NEW
    created_at: float
    updated_at: float
    list_action: str | None = None
    rows: int = 0
    matched: list[str] = msgspec.field(default_factory=list)  # external ids, file order
    unmatched: list[ImportRow] = msgspec.field(default_factory=list)
    dropped: list[str] = msgspec.field(default_factory=list)
    # Rows Demandbase will not take, accepted at upload (dialects skip-silently and
    # content-fails); at completion they fail the job or join the unmatched rows.
    refused: list[ImportRow] = msgspec.field(default_factory=list)
    account_list_id: int | None = None


class ExportJob(msgspec.Struct, kw_only=True):
    """A Data Export account-list job; ``result`` is its CSV once finished."""

    job_id: str
    job_name: str
    entity_type: str
    list_ids: tuple[int, ...]
    # Named through accountListIds (a multi-list export), not accountListId.
    multi: bool = False
    state: ExportState = ExportState.ACCEPTED
    created_at: float
    updated_at: float
    finished_at: float | None = None
    result: bytes = b""
    rows: int = 0
    message: str | None = None


class RowCounts(msgspec.Struct, frozen=True, kw_only=True):
    """Import rows since start: received in uploads, matched, unmatched, dropped by faults."""

    received: int
    matched: int
    unmatched: int
    dropped: int


class AccountList:
    """A Demandbase account list: its members now, and the changes younger than the lag."""

    def __init__(self, list_id: int, name: str, created_at: float) -> None:
        self.id = list_id
        self.name = name
        self.created_at = created_at
        self._members: set[str] = set()
        self._changes: deque[tuple[float, str, bool]] = deque()  # (when, account, joined)
        self.version = 0  # one more at each change: what a cache of the members checks

    def __repr__(self) -> str:
        return f"AccountList(id={self.id}, name={self.name!r}, members={len(self._members)})"

    @property
    def members(self) -> frozenset[str]:
        """External ids of the members now (no lag)."""
        return frozenset(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, external_id: object) -> bool:
        return external_id in self._members

    def change(self, at: float, *, joined: Iterable[str] = (), left: Iterable[str] = ()) -> None:
        """Apply a completed job's change at time ``at`` (never earlier than the last one)."""
        self.version += 1
        for account in left:
            if account in self._members:
                self._members.discard(account)
                self._changes.append((at, account, False))
        for account in joined:
            if account not in self._members:
                self._members.add(account)
                self._changes.append((at, account, True))

    def changed_after(self, at: float) -> bool:
        """Whether a change younger than ``at`` is remembered (then the members at ``at``
        differ from :attr:`members`)."""
        return bool(self._changes) and self._changes[-1][0] > at

    def members_at(self, at: float) -> set[str]:
        """The members as they were at time ``at`` (after :meth:`forget_before` ``at``)."""
        members = set(self._members)
        for when, account, joined in reversed(self._changes):
            if when <= at:
                break
            if joined:
                members.discard(account)
            else:
                members.add(account)
        return members

    def forget_before(self, at: float) -> None:
        """Forget changes at or before ``at``: no export will look that far back again."""
        while self._changes and self._changes[0][0] <= at:
            self._changes.popleft()


class _Event(enum.Enum):
    IMPORT_DONE = "import_done"
    EXPORT_STARTED = "export_started"
    EXPORT_DONE = "export_done"


class Tenant:
    """Accounts, lists and jobs of one Demandbase tenant, on the emulator's clock."""

    def __init__(
        self,
        settings: EmulatorSettings,
        clock: Clock,
        faults: FaultState,
        *,
        export_finished: Callable[[float, int], None],
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._faults = faults
        self._export_finished = export_finished
        self.accounts = AccountDatabase(settings.accounts, settings.seed)
        self._lists: dict[str, AccountList] = {}
        self._lists_by_id: dict[int, AccountList] = {}
        self._import_jobs: dict[int, ImportJob] = {}
        self._export_jobs: dict[str, ExportJob] = {}
        self._next_import_id = itertools.count(FIRST_IMPORT_JOB_ID)
        self._next_list_id = itertools.count(_FIRST_LIST_ID)
        self._lines: list[str] | None = None  # results cells by account (_result_lines)
        self._indexes: dict[int, tuple[int, list[int]]] = {}  # list -> (version, members)
        self._export_ids = random.Random(f"{settings.seed}:export-ids")
        self._timeline: list[tuple[float, int, _Event, int | str]] = []
        self._arrivals = itertools.count()
        self._rows_received = 0
        self._rows_matched = 0
        self._rows_unmatched = 0
        self._rows_dropped = 0

    # --- looking (each look first catches up with the clock) ---------------------------

    @property
    def lists(self) -> dict[str, AccountList]:
        """Lists by name, true contents now."""
        self.catch_up()
        return dict(self._lists)

    def list_by_id(self, list_id: int) -> AccountList | None:
        self.catch_up()
        return self._lists_by_id.get(list_id)

    @property
    def import_jobs(self) -> list[ImportJob]:
        self.catch_up()
        return list(self._import_jobs.values())

    @property
    def export_jobs(self) -> list[ExportJob]:
        self.catch_up()
        return list(self._export_jobs.values())

    def import_job(self, job_id: int) -> ImportJob | None:
        self.catch_up()
        return self._import_jobs.get(job_id)

    def export_job(self, job_id: str) -> ExportJob | None:
        self.catch_up()
        return self._export_jobs.get(job_id)

    @property
    def unmatched(self) -> list[tuple[int, ImportRow]]:
        """(job id, row) of every uploaded row that matched no account."""
        self.catch_up()
        return [(job.id, row) for job in self._import_jobs.values() for row in job.unmatched]

    @property
    def dropped(self) -> list[tuple[int, str]]:
        """(job id, external id) of every matched row that a ``drop_ratio`` fault dropped."""
        self.catch_up()
        return [(job.id, account) for job in self._import_jobs.values() for account in job.dropped]

    def row_counts(self) -> RowCounts:
        self.catch_up()
        return RowCounts(
            received=self._rows_received,
            matched=self._rows_matched,
            unmatched=self._rows_unmatched,
            dropped=self._rows_dropped,
        )

    def imports_processing(self) -> int:
        self.catch_up()
        return sum(1 for job in self._import_jobs.values() if job.state is ImportState.PROCESSING)

    def exports_running(self) -> int:
        self.catch_up()
        return sum(
            1
            for job in self._export_jobs.values()
            if job.state in (ExportState.ACCEPTED, ExportState.PROCESSING)
        )

    # --- changing ------------------------------------------------------------------------

    def create_import_job(self, data_import_name: str, entity_type: str, source: str) -> ImportJob:
        now = self._clock.time()
        job = ImportJob(
            id=next(self._next_import_id),
            data_import_name=data_import_name,
            entity_type=entity_type,
            source=source,
            created_at=now,
            updated_at=now,
        )
        self._import_jobs[job.id] = job
        return job

    def start_import(
        self,
        job: ImportJob,
        rows: list[ImportRow],
        list_action: str,
        refused: list[ImportRow] | None = None,
    ) -> None:
        """Match an accepted upload's rows; the job processes until ``job_delay_seconds`` pass."""
        now = self._clock.time()
        job.refused = list(refused or ())
        for row in rows:
            index = self.accounts.match(row.external_id, row.domain, row.name)
            if index is None:
                job.unmatched.append(row)
            else:
                job.matched.append(self.accounts.external_id(index))
        job.rows = len(rows) + len(job.refused)
        job.list_action = list_action
        job.state = ImportState.PROCESSING
        job.updated_at = now
        self._rows_received += len(rows)
        self._rows_matched += len(job.matched)
        self._rows_unmatched += len(job.unmatched)
        self._schedule(now + self._settings.job_delay_seconds, _Event.IMPORT_DONE, job.id)

    def create_export_job(
        self, job_name: str, list_ids: tuple[int, ...], *, multi: bool = False
    ) -> ExportJob:
        """An account-list export of ``list_ids`` (all known): accepted, processing, finished."""
        now = self._clock.time()
        job = ExportJob(
            job_id=str(uuid.UUID(int=self._export_ids.getrandbits(128), version=4)),
            job_name=job_name,
            entity_type=_EXPORT_ENTITY_TYPE,
            list_ids=list_ids,
            multi=multi,
            created_at=now,
            updated_at=now,
        )
        self._export_jobs[job.job_id] = job
        # Accepted for the first half of the delay, processing for the second half.
        delay = self._settings.job_delay_seconds
        self._schedule(now + delay / 2, _Event.EXPORT_STARTED, job.job_id)
        self._schedule(now + delay, _Event.EXPORT_DONE, job.job_id)
        return job

    def catch_up(self) -> None:
        """Play every event due by now, in due order, each at its own due time."""
        now = self._clock.time()
        while self._timeline and self._timeline[0][0] <= now:
            at, _, event, key = heapq.heappop(self._timeline)
            match event:
                case _Event.IMPORT_DONE:
                    self._complete_import(self._import_jobs[int(key)], at)
                case _Event.EXPORT_STARTED:
                    export = self._export_jobs[str(key)]
                    export.state, export.updated_at = ExportState.PROCESSING, at
                case _Event.EXPORT_DONE:
                    self._finish_export(self._export_jobs[str(key)], at)
        horizon = now - self._settings.visibility_lag_seconds
        for account_list in self._lists.values():
            account_list.forget_before(horizon)

    def _schedule(self, at: float, event: _Event, key: int | str) -> None:
        heapq.heappush(self._timeline, (at, next(self._arrivals), event, key))

    def _complete_import(self, job: ImportJob, at: float) -> None:
        job.updated_at = at
        if self._faults.import_fails(job.id) or (
            job.refused and self._faults.speaks("content-fails")
        ):
            job.state = ImportState.FAILED
        else:
            # Skipped silently: ignored like rows that match no account.
            job.unmatched.extend(job.refused)
            self._rows_unmatched += len(job.refused)
            self._change_list(job, at)
            job.state = ImportState.COMPLETED
        _log.debug(
            "emulator_import_job_done",
            extra={
                "job_id": job.id,
                "state": job.state.value,
                "list_action": job.list_action,
                "account_list_id": job.account_list_id,
                "rows": job.rows,
                "matched": len(job.matched),
                "dropped": len(job.dropped),
            },
        )

    def _change_list(self, job: ImportJob, at: float) -> None:
        """Apply a completing job's matched rows, less the dropped ones, to its list [A1]."""
        action = job.list_action
        if self._faults.speaks("list-per-job"):
            # Nothing associates a fresh job with a list: insert makes a new one [A1 differs].
            account_list = None
        else:
            account_list = self._lists.get(job.data_import_name)
        if action == "noop" or (account_list is None and action not in LIST_CREATING_ACTIONS):
            return
        if account_list is None:
            account_list = self._create_list(job.data_import_name, at)
        drops = self._faults.dropped(job.id, len(job.matched))
        kept = [a for a, drop in zip(job.matched, drops, strict=True) if not drop]
        job.dropped = [a for a, drop in zip(job.matched, drops, strict=True) if drop]
        self._rows_dropped += len(job.dropped)
        match action:
            case "insert":
                account_list.change(at, joined=kept)
            case "replace":
                account_list.change(at, left=account_list.members - set(kept), joined=kept)
            case "delete":
                account_list.change(at, left=kept)
        job.account_list_id = account_list.id

    def _create_list(self, name: str, at: float) -> AccountList:
        account_list = AccountList(next(self._next_list_id), name, at)
        # Demandbase may hold several lists of one name (dialect list-per-job): the
        # control route shows the later ones with their id.
        key = name if name not in self._lists else f"{name} [{account_list.id}]"
        self._lists[key] = account_list
        self._lists_by_id[account_list.id] = account_list
        return account_list

    def _finish_export(self, job: ExportJob, at: float) -> None:
        job.updated_at = at
        if self._faults.export_fails(job.job_id):
            job.state, job.message = ExportState.FAILED, _EXPORT_FAILED_MESSAGE
        else:
            self._write_results(job, at)
            job.state, job.finished_at = ExportState.FINISHED, at
            self._export_finished(at, len(job.result))
        _log.debug(
            "emulator_export_job_done",
            extra={
                "job_id": job.job_id,
                "state": job.state.value,
                "list_ids": list(job.list_ids),
                "rows": job.rows,
            },
        )

    def _write_results(self, job: ExportJob, at: float) -> None:
        """The members of the job's lists as they were ``visibility_lag_seconds`` ago [A4].

        One row per member, ordered by account (then list); with ``multi-list-column``,
        one per list that holds the account, naming it. Each account's cells are
        CSV-encoded once per tenant, so an export of millions of rows is only joined.
        """
        seen = at - self._settings.visibility_lag_seconds
        by_list = job.multi and self._faults.speaks("multi-list-column")
        header = (*EXPORT_RESULT_COLUMNS, *((EXPORT_LIST_ID_COLUMN,) if by_list else ()))
        # Rows as integers, (account index << 32) | list id (0 without the list column):
        # sorted, they are ordered by account, then list.
        if by_list:  # a row per list and member: no two alike
            ordered = sorted(
                [
                    (index << 32) | list_id
                    for list_id in dict.fromkeys(job.list_ids)  # a list named twice: once
                    for index in self._member_indexes(list_id, seen)
                ]
            )
        else:  # a row per account on any of the lists
            ordered = sorted(
                {
                    index << 32
                    for list_id in dict.fromkeys(job.list_ids)  # a list named twice: once
                    for index in self._member_indexes(list_id, seen)
                }
            )
        job.rows = len(ordered)
        if self._faults.speaks("results-columns"):
            job.result = self._reordered_results(header, ordered, by_list)
            return
        lines = self._result_lines()
        if by_list:
            body = "".join([f"{lines[k >> 32]},{k & _LOW_32}\r\n" for k in ordered])
        else:
            body = "".join([f"{lines[k >> 32]}\r\n" for k in ordered])
        job.result = encode_rows(header, ()) + body.encode("utf-8")

    def _reordered_results(
        self, header: tuple[str, ...], ordered: list[int], by_list: bool
    ) -> bytes:
        """Dialect ``results-columns``: another case, another order, a column dbsync does
        not read, and a BOM."""
        accounts = self.accounts
        cells = [
            (
                str(accounts.demandbase_id(k >> 32)),
                accounts.name(k >> 32),
                accounts.domain(k >> 32),
                accounts.external_id(k >> 32),
                *((str(k & _LOW_32),) if by_list else ()),
            )
            for k in ordered
        ]
        order = [3, 2, 1, 0, *range(4, len(header))]
        header = tuple(
            [header[k].upper() if k % 2 else header[k].lower() for k in order] + ["Industry"]
        )
        rows = [tuple([row[k] for k in order] + ["Software"]) for row in cells]
        return b"\xef\xbb\xbf" + encode_rows(header, rows)

    def _member_indexes(self, list_id: int, seen: float) -> list[int]:
        """The account indexes of the list's members at ``seen``, ascending; kept per list
        while it does not change, since lists are exported again and again unchanged."""
        account_list = self._lists_by_id[list_id]
        if account_list.changed_after(seen):
            members: Iterable[str] = account_list.members_at(seen)
        else:
            kept = self._indexes.get(list_id)
            if kept is not None and kept[0] == account_list.version:
                return kept[1]
            members = account_list.members_at(seen)
        index_of = self.accounts.index_of
        indexes = sorted(i for m in members if (i := index_of(m)) is not None)
        if not account_list.changed_after(seen):
            self._indexes[list_id] = (account_list.version, indexes)
        return indexes

    def _result_lines(self) -> list[str]:
        """Each account's results cells (Account ID, name, domain, External Account ID),
        CSV-encoded without a line end, by account index; encoded once per tenant."""
        if self._lines is None:
            accounts = self.accounts
            self._lines = encode_cells(
                (
                    str(accounts.demandbase_id(i)),
                    accounts.name(i),
                    accounts.domain(i),
                    accounts.external_id(i),
                )
                for i in range(len(accounts))
            )
        return self._lines

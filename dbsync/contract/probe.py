"""``dbsync probe``: ask the tenant, once and cheaply, which of dbsync's assumptions hold.

The conversation (each step's spend is in :data:`PLAN`, announced before anything is
sent, and counted as it is spent by a :class:`SpendCounter` on the client)::

    0. auth       GET /import/v1/jobs?perPage=1          the credentials and their mode
    1. A1, A2     two import jobs named LIST, each inserting one row that matches no
                  account (domain probe.dbsync.invalid): do both report the same
                  accountListId (A1), do they report one at all (A2)?
    2. rows       a third job whose one row has no domain: refused at upload (400),
                  failed job, or completed with the row skipped?
    3. A3         an export of the list: resultsUrl while running, states, the
                  results file's host, authentication and columns
    4. A5         an export naming the list(s) in ``accountListIds``: does the file
                  say which list each row belongs to?
    A4            the visibility lag cannot be seen without adding a real account to a
                  list, which the probe never does: "could not tell".

Every answer's job state and optional fields are looked at on the way (states in
another case or unknown; import-job answers lacking fields). A step that cannot be
made (an error, a job still running after :data:`MAX_POLLS` reads) makes the verdicts
that depend on it "could not tell", never a guess.

What stays in the tenant: the list(s) named LIST (``dbsync probe YYYY-MM-DD``), empty,
and the probe's jobs in the job history. Nothing else is written.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec

from dbsync.contract.record import ContractRecord, Verdict
from dbsync.contract.watch import UNKNOWN_STATE_DEADLINE_SECONDS
from dbsync.demandbase import wire
from dbsync.demandbase.client import DemandbaseClient
from dbsync.demandbase.csvfile import encode_rows, read_header
from dbsync.demandbase.wire import EXPORT_LIST_ID_COLUMN, EXPORT_RESULT_COLUMNS, Endpoint
from dbsync.errors import AuthError, DemandbaseError, PermissionDeniedError
from dbsync.states import ExportJobState, ImportJobState, export_job_state, import_job_state

__all__ = [
    "MAX_POLLS",
    "PLAN",
    "ContractProbe",
    "ProbeAborted",
    "SpendCounter",
    "contract_state",
    "make_record",
    "probe_list_name",
]

#: Status reads per job at most; a job not done after them is "could not tell".
MAX_POLLS: Final = 20
_IMPORT_JOBS: Final = 3
_EXPORTS: Final = 2

#: The most the probe spends, by endpoint: announced first, never exceeded.
PLAN: Final[dict[Endpoint, int]] = {
    Endpoint.IMPORT_JOB_LIST: 1,
    Endpoint.IMPORT_CREATE_JOB: _IMPORT_JOBS,
    Endpoint.IMPORT_UPLOAD: _IMPORT_JOBS,
    Endpoint.IMPORT_JOB_STATUS: _IMPORT_JOBS * MAX_POLLS,
    Endpoint.EXPORT_CREATE_JOB: _EXPORTS,
    Endpoint.EXPORT_JOB_STATUS: _EXPORTS * MAX_POLLS,
    # Each results file at most twice: without the token, then with it after a 401.
    Endpoint.EXPORT_DOWNLOAD: _EXPORTS * 2,
}

_PROBE_ROW: Final = ("dbsync probe", "probe.dbsync.invalid", "dbsync-probe")
# A row Demandbase will not take: the Account Domain is required [DOC].
_REFUSED_ROW: Final = ("dbsync probe, no domain", "", "dbsync-probe-refused")
_OPTIONAL_FIELDS: Final = ("dataImportName", "entityType", "createdAt", "updatedAt")
_KNOWN_CASE: Final = frozenset(s.value for s in (*ImportJobState, *ExportJobState))


class ProbeAborted(Exception):
    """Demandbase refused the credentials or a permission: nothing more can be asked."""

    def __init__(self, error: DemandbaseError) -> None:
        super().__init__(str(error))
        self.error = error


def probe_list_name(now: float) -> str:
    """The list the probe leaves, named so that nobody mistakes it for an audience."""
    return f"dbsync probe {time.strftime('%Y-%m-%d', time.gmtime(now))}"


class SpendCounter:
    """A request observer: every attempt per endpoint (token mints cost no quota)."""

    def __init__(self) -> None:
        self.spent: Counter[Endpoint] = Counter()
        self.statuses: list[tuple[Endpoint, int]] = []

    def request_finished(self, endpoint: Endpoint, status: int, elapsed_seconds: float) -> None:
        self.statuses.append((endpoint, status))
        if endpoint is not Endpoint.AUTH_TOKEN:
            self.spent[endpoint] += 1

    def within_plan(self) -> bool:
        return all(count <= PLAN.get(endpoint, 0) for endpoint, count in self.spent.items())


def contract_state(verdicts: list[Verdict]) -> str:
    """broken (A1 differs), degraded (read-back impossible), incomplete, or holds."""
    by_check = {v.check: v for v in verdicts}
    a1, a2, a3 = (by_check.get(c) for c in ("A1", "A2", "A3"))
    if a1 is not None and a1.outcome == "differs":
        return "broken"
    unreadable = a3 is not None and a3.outcome == "differs" and "cannot" in a3.action
    if (a2 is not None and a2.outcome == "differs") or unreadable:
        return "degraded"
    if any(v is None or v.outcome == "could not tell" for v in (a1, a2, a3)):
        return "incomplete"
    return "holds"


class ContractProbe:
    """One probe of one destination, through a client whose observer is ``counter``."""

    def __init__(
        self,
        client: DemandbaseClient,
        counter: SpendCounter,
        *,
        list_name: str,
        auth_mode: str,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        poll_initial_seconds: float = 1.0,
        poll_max_seconds: float = 30.0,
    ) -> None:
        self._client = client
        self._counter = counter
        self._list_name = list_name
        self._auth_mode = auth_mode
        self._sleep = sleep
        self._poll_initial = poll_initial_seconds
        self._poll_max = poll_max_seconds
        self._states: list[str] = []
        self._missing: set[str] = set()
        self._null_url = False
        self._verdicts: dict[str, Verdict] = {}

    async def run(self) -> list[Verdict]:
        """Every check's verdict, in the order of the contract document."""
        try:
            await self._client.list_import_jobs(per_page=1)
        except (AuthError, PermissionDeniedError) as exc:
            raise ProbeAborted(exc) from exc
        self._say("auth", "holds", f"the {self._auth_mode} was accepted", "none")
        list_ids = await self._lists()
        await self._refused_rows()
        await self._exports(list_ids)
        self._say(
            "A4",
            "could not tell",
            "the probe adds no real account to a list, so no change can be seen late",
            "read-back judges only changes older than visibility_lag_seconds (configured)",
        )
        self._say_answers()
        order = ("auth", "A1", "A2", "A3", "A4", "A5")
        return sorted(
            self._verdicts.values(),
            key=lambda v: (order.index(v.check) if v.check in order else len(order), v.check),
        )

    def _say(self, check: str, outcome: str, finding: str, action: str, dialect: str = "") -> None:
        self._verdicts[check] = Verdict(
            check=check, outcome=outcome, finding=finding, action=action, dialect=dialect
        )

    # --- steps 1 and 2: import jobs ------------------------------------------------------

    async def _import(self, row: tuple[str, str, str]) -> wire.ImportJob | DemandbaseError | None:
        """One job of one row: its final answer, the error that stopped it, or None."""
        try:
            job = await self._client.create_import_job(self._list_name)
            self._seen_import(job)
            data = encode_rows(wire.IMPORT_COLUMNS, [row])
            self._seen_import(
                await self._client.upload_import_data(job.id, data, list_action="insert")
            )
        except DemandbaseError as exc:
            return exc
        delay = self._poll_initial
        for _ in range(MAX_POLLS):
            await self._sleep(delay)
            try:
                job = await self._client.get_import_job(job.id)
            except DemandbaseError as exc:
                return exc
            self._seen_import(job)
            if import_job_state(job.state) in (ImportJobState.COMPLETED, ImportJobState.FAILED):
                return job
            delay = min(delay * 2, self._poll_max)
        return None

    def _seen_import(self, job: wire.ImportJob) -> None:
        self._states.append(job.state)
        answer = msgspec.structs.asdict(job)
        for name in _OPTIONAL_FIELDS:
            if answer[_snake(name)] is None:
                self._missing.add(name)

    async def _lists(self) -> list[int]:
        """A1 and A2 from two jobs of one name; the list ids they reported."""
        jobs = [await self._import(_PROBE_ROW) for _ in range(2)]
        done = [j for j in jobs if isinstance(j, wire.ImportJob)]
        completed = [j for j in done if import_job_state(j.state) is ImportJobState.COMPLETED]
        if len(completed) < 2:
            why = next((str(j) for j in jobs if isinstance(j, DemandbaseError)), "")
            finding = f"the probe's jobs did not both complete{': ' + why if why else ''}"
            self._say("A1", "could not tell", finding, "run the probe again later")
            self._say("A2", "could not tell", finding, "run the probe again later")
            return []
        ids = [j.account_list_id for j in completed]
        if None in ids:
            self._say(
                "A2",
                "differs",
                "completed import jobs carry no accountListId",
                "read-back needs list_id in each audience's configuration; without it the"
                " run-time list check cannot see a job that fed another list",
                "no-list-id",
            )
            self._say(
                "A1",
                "could not tell",
                "no job says which list it fed",
                "look in Demandbase: one list named by the audience, not one per job",
            )
            return []
        self._say("A2", "holds", f"completed jobs carry accountListId ({ids[0]})", "none")
        first, second = ids[0], ids[1]
        assert first is not None
        assert second is not None
        if first == second:
            self._say(
                "A1",
                "holds",
                f"two jobs named {self._list_name!r} fed the same list {first}",
                "none: one audience, one list, one job name",
            )
            return [first]
        self._say(
            "A1",
            "differs",
            f"two jobs named {self._list_name!r} fed lists {first} and {second}:"
            " each insert job creates a list",
            "do not run dbsync against this tenant as it is: every batch would create a"
            " list. The run-time check stops each audience at the first job that feeds"
            " another list (contract_broken)",
            "list-per-job",
        )
        return [first, second]

    async def _refused_rows(self) -> None:
        job = await self._import(_REFUSED_ROW)
        if isinstance(job, DemandbaseError):
            if job.status == 400:
                self._say(
                    "refused_rows",
                    "holds",
                    "a row without a domain was refused at upload (400)",
                    "a refused row is isolated by halving the batch and set aside with the"
                    " reason (ctl rejected)",
                )
            else:
                self._say("refused_rows", "could not tell", str(job), "run the probe again")
            return
        if job is None:
            self._say("refused_rows", "could not tell", "the job did not finish", "run it again")
            return
        if import_job_state(job.state) is ImportJobState.FAILED:
            self._say(
                "refused_rows",
                "differs",
                "a row without a domain was accepted at upload and failed its job",
                "a failed job is sent once more, then halved; what still fails is set aside"
                " with its reason after at most 30 jobs per batch",
                "content-fails",
            )
        else:
            self._say(
                "refused_rows",
                "differs",
                "a row without a domain was accepted and its job completed: the row is"
                " skipped silently",
                "ingest refuses such rows before they are stored; read-back finds accounts"
                " that never join and sets them aside after repair_limit repairs",
                "skip-silently",
            )

    # --- steps 3 and 4: exports ----------------------------------------------------------

    async def _export(self, list_ids: list[int]) -> tuple[bytes, bool] | str:
        """The results file of an export of ``list_ids`` and whether it needed the
        token; or why there is none."""
        name = self._list_name[: wire.EXPORT_JOB_NAME_MAX_CHARS]
        try:
            if len(list_ids) == 1 and not self._counter.spent[Endpoint.EXPORT_CREATE_JOB]:
                job = await self._client.create_account_list_export(name, list_ids[0])
            else:
                job = await self._client.create_account_lists_export(name, list_ids)
            delay = self._poll_initial
            for _ in range(MAX_POLLS):
                await self._sleep(delay)
                status = await self._client.get_export_job(job.job_id)
                self._states.append(status.job_status)
                state = export_job_state(status.job_status)
                if status.results_url is None:
                    self._null_url = True
                if state is ExportJobState.FAILED:
                    return f"Demandbase failed the export: {status.message or ''}"
                if state is ExportJobState.FINISHED:
                    break
                delay = min(delay * 2, self._poll_max)
            else:
                return "the export did not finish"
            before = len(self._counter.statuses)
            data = await self._client.download_export_results(status.results_url or "")
            attempts = self._counter.statuses[before:]
            needed_token = any(e is Endpoint.EXPORT_DOWNLOAD and s == 401 for e, s in attempts)
            return data, needed_token
        except DemandbaseError as exc:
            return str(exc)

    async def _exports(self, list_ids: list[int]) -> None:
        if not list_ids:
            for check in ("A3", "A5"):
                self._say(check, "could not tell", "no list id to export", "none")
            return
        result = await self._export(list_ids[:1])
        if isinstance(result, str):
            self._say("A3", "could not tell", result, "run the probe again later")
        else:
            self._judge_results(*result)
        result = await self._export(list_ids)
        if isinstance(result, str):
            self._say("A5", "could not tell", result, "dbsync reads one list per export job")
            return
        header = [h.casefold() for h in read_header(result[0])]
        if EXPORT_LIST_ID_COLUMN.casefold() in header:
            self._say(
                "A5",
                "holds",
                f"a multi-list export has the column {EXPORT_LIST_ID_COLUMN!r}",
                "none yet: dbsync still reads one list per export job",
                "multi-list-column",
            )
        else:
            self._say(
                "A5",
                "differs",
                "a multi-list export has no column saying which list a row belongs to",
                "dbsync reads one list per export job",
            )

    def _judge_results(self, data: bytes, needed_token: bool) -> None:
        try:
            header = read_header(data)
        except ValueError as exc:
            self._say("A3", "differs", f"the results file is not CSV: {exc}", _NO_READBACK)
            return
        wanted = {c.casefold() for c in EXPORT_RESULT_COLUMNS}
        present = {h.casefold() for h in header}
        missing = [c for c in EXPORT_RESULT_COLUMNS if c.casefold() not in present]
        notes = []
        if needed_token:
            notes.append("the results URL answered 401 without the bearer token")
        if data.startswith(b"\xef\xbb\xbf"):
            notes.append("the file starts with a byte-order mark")
        if missing:
            self._say(
                "A3",
                "differs",
                f"the results file lacks {missing} (has {header})",
                _NO_READBACK,
                "results-columns",
            )
            return
        exact = list(header) == list(EXPORT_RESULT_COLUMNS)
        if not exact:
            extra = sorted(present - wanted)
            notes.append(
                f"columns {header}: other case or order" + (f", extra {extra}" if extra else "")
            )
        if not notes:
            self._say(
                "A3",
                "holds",
                f"the results file has exactly {list(EXPORT_RESULT_COLUMNS)}, no token needed",
                "none",
            )
            return
        dialect = "results-need-bearer" if needed_token else "results-columns"
        self._say(
            "A3",
            "differs",
            "; ".join(notes),
            "tolerated: columns are matched by name; the token is sent to the API's own host only",
            dialect,
        )

    # --- what every answer said ------------------------------------------------------------

    def _say_answers(self) -> None:
        other_case = sorted(
            {
                s
                for s in self._states
                if s and s not in _KNOWN_CASE and (import_job_state(s) or export_job_state(s))
            }
        )
        unknown = sorted(
            {s for s in self._states if import_job_state(s) is None and export_job_state(s) is None}
        )
        if unknown:
            self._say(
                "states",
                "differs",
                f"states nobody documented: {unknown}",
                f"polled like processing for {UNKNOWN_STATE_DEADLINE_SECONDS:.0f} s, then the"
                " job counts as failed",
                "state-unknown",
            )
        elif other_case:
            self._say(
                "states",
                "differs",
                f"states in another case: {other_case}",
                "none: states are compared whatever their case",
                "states-upper",
            )
        else:
            self._say("states", "holds", "job states as documented", "none")
        if self._missing:
            self._say(
                "job_answers",
                "differs",
                f"import-job answers lack {sorted(self._missing)}",
                "none: dbsync needs only id and state",
                "sparse-jobs",
            )
        else:
            self._say("job_answers", "holds", "import-job answers carry every field", "none")
        if self._null_url:
            self._say(
                "results_url",
                "differs",
                "resultsUrl is null while an export runs",
                "none: read as not ready yet",
                "results-url-null",
            )
        elif "A3" in self._verdicts and self._verdicts["A3"].outcome != "could not tell":
            self._say("results_url", "holds", "resultsUrl is a string while running", "none")


_NO_READBACK: Final = (
    "read-back cannot work: set reconcile.scheduled = false; dbsync ctl reconcile will fail too"
)


def _snake(camel: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel)


def make_record(
    destination: str,
    *,
    probed_at: float,
    list_name: str,
    verdicts: list[Verdict],
    counter: SpendCounter,
) -> ContractRecord:
    return ContractRecord(
        destination=destination,
        probed_at=probed_at,
        state=contract_state(verdicts),
        list_name=list_name,
        verdicts=verdicts,
        spent={e.value: n for e, n in sorted(counter.spent.items())},
    )

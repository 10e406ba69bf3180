"""The Demandbase client: the Data Import and Data Export calls dbsync makes.

How a call goes
    Each public method names its call with an :class:`~dbsync.demandbase.wire.Endpoint`
    and hands it to one private helper, :meth:`DemandbaseClient._call`. The helper
    takes a bearer token from the :class:`~dbsync.demandbase.auth.TokenSource` and
    makes one HTTP attempt through :func:`dbsync.demandbase.http.send`, the transport
    every request of the package goes through (token mints included), which turns
    anything but a 2xx answer into a typed error.

What the client repeats, and what it does not
    One thing only: a 401 under an API Key Set means that the cached token expired or
    was revoked, so the helper invalidates it, takes a fresh one (minted once however
    many calls wait for it) and repeats the request once; a second 401 is an
    ``AuthError``. A legacy token cannot be re-minted, so its 401 is an ``AuthError`` at
    once. A 403 names a missing permission, which no token cures: it never causes a
    mint. Everything else goes to the caller, because only the engine knows whether a
    repeat is safe: Demandbase has no idempotency keys, and a job-creating POST that
    timed out may have created the job and spent the quota already.

Bodies
    Requests are encoded from, and answers decoded into, the Structs of
    :mod:`dbsync.demandbase.wire` with module-level msgspec coders; a 2xx whose body
    does not decode is a ``PayloadError``.

Secrets
    The token travels only in the Authorization header, the client secret only in the
    token request's body, and a signed results URL only in its own GET; the transport
    never puts the request into an error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import operator
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar
from urllib.parse import quote, urljoin

import aiohttp
import msgspec
import yarl

from dbsync.demandbase import wire
from dbsync.demandbase.auth import TokenSource
from dbsync.demandbase.csvfile import read_results
from dbsync.demandbase.http import RequestObserver, decode_answer, send
from dbsync.demandbase.wire import EXPORT_JOB_NAME_MAX_CHARS, Endpoint
from dbsync.errors import AuthError, PayloadError
from dbsync.model import ListedAccount

__all__ = ["DemandbaseClient"]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

_encoder = msgspec.json.Encoder()
_import_job = msgspec.json.Decoder(wire.ImportJob)
_import_jobs = msgspec.json.Decoder(wire.ImportJobs)
_export_job_details = msgspec.json.Decoder(wire.ExportJobDetails)
_export_job_status = msgspec.json.Decoder(wire.ExportJobStatus)


class DemandbaseClient:
    """Demandbase's Data Import and Data Export APIs, over a session the caller owns."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        auth: TokenSource,
        *,
        timeout_seconds: float = 30.0,
        observer: RequestObserver | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be positive, not {timeout_seconds}")
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._auth = auth
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._observer = observer

    # Data Import API

    async def create_import_job(self, data_import_name: str) -> wire.ImportJob:
        """A new account import job (``state`` "new"); its name selects the list [A1]."""
        request = wire.CreateImportJob(data_import_name=data_import_name)
        return await self._call(
            Endpoint.IMPORT_CREATE_JOB,
            "POST",
            "/import/v1/job",
            _import_job,
            data=_encoder.encode(request),
            content_type="application/json",
        )

    async def upload_import_data(
        self, job_id: int, data: bytes, *, list_action: str
    ) -> wire.ImportJob:
        """Upload a CSV (``csvfile.encode_accounts``) to job ``job_id``; it starts processing.

        ``list_action`` has no default on purpose: Demandbase's own, ``replace``,
        empties the list before adding the file's accounts.
        """
        if list_action not in wire.LIST_ACTIONS:
            raise ValueError(f"list_action must be one of {wire.LIST_ACTIONS}, not {list_action!r}")
        if not data:
            raise ValueError("data is empty; an import file has at least its header")
        return await self._call(
            Endpoint.IMPORT_UPLOAD,
            "PUT",
            f"/import/v1/job/{job_id}/data",
            _import_job,
            params={"listAction": list_action},
            data=data,
            content_type="application/octet-stream",
        )

    async def get_import_job(self, job_id: int) -> wire.ImportJob:
        """Job ``job_id`` as it is now; ``completed`` is the only acknowledgment there is."""
        return await self._call(
            Endpoint.IMPORT_JOB_STATUS, "GET", f"/import/v1/job/{job_id}", _import_job
        )

    async def list_import_jobs(
        self, *, state: str | None = None, page: int | None = None, per_page: int | None = None
    ) -> wire.ImportJobs:
        """Account import jobs, optionally only those in ``state``, a page at a time."""
        params = {"entityType": "Account"}
        if state is not None:
            params["state"] = state
        if page is not None:
            params["page"] = str(page)
        if per_page is not None:
            params["perPage"] = str(per_page)
        return await self._call(
            Endpoint.IMPORT_JOB_LIST, "GET", "/import/v1/jobs", _import_jobs, params=params
        )

    # Data Export API

    async def create_account_list_export(
        self, job_name: str, account_list_id: int
    ) -> wire.ExportJobDetails:
        """Start exporting list ``account_list_id``'s members (Demandbase runs one at a time)."""
        request = wire.AccountListExportRequest(job_name=job_name, account_list_id=account_list_id)
        return await self._create_export(request)

    async def create_account_lists_export(
        self, job_name: str, account_list_ids: list[int]
    ) -> wire.ExportJobDetails:
        """Start exporting the members of several lists in one job [A5]."""
        request = wire.AccountListExportRequest(
            job_name=job_name, account_list_ids=list(account_list_ids)
        )
        return await self._create_export(request)

    async def _create_export(self, request: wire.AccountListExportRequest) -> wire.ExportJobDetails:
        """Start the export ``request`` asks for, one list or several."""
        job_name = request.job_name
        if not 1 <= len(job_name) <= EXPORT_JOB_NAME_MAX_CHARS:
            raise ValueError(
                f"job_name must have 1 to {EXPORT_JOB_NAME_MAX_CHARS} characters,"
                f" not {len(job_name)}"
            )
        return await self._call(
            Endpoint.EXPORT_CREATE_JOB,
            "POST",
            "/data/export/v1/accountList/job",
            _export_job_details,
            data=_encoder.encode(request),
            content_type="application/json",
        )

    async def get_export_job(self, job_id: str) -> wire.ExportJobStatus:
        """Export job ``job_id`` as it is now; ``results_url`` is set once it is finished."""
        return await self._call(
            Endpoint.EXPORT_JOB_STATUS,
            "GET",
            f"/data/export/v1/job/{quote(job_id, safe='')}",
            _export_job_status,
        )

    async def download_export_results(self, results_url: str) -> bytes:
        """The results file behind a finished export's ``results_url``.

        The URL is expected to carry its own signature, so it is first requested without
        a token [A3]. If it answers 401 and points at the API's own host (or is
        relative), it is requested once more with the bearer token: the token is never
        sent to any other host. It is requested exactly as given, since re-encoding its
        query would break a signature.
        """
        url = yarl.URL(urljoin(f"{self._base_url}/", results_url), encoded=True)
        try:
            return await send(
                self._session,
                Endpoint.EXPORT_DOWNLOAD,
                "GET",
                url,
                client_timeout=self._timeout,
                observer=self._observer,
            )
        except AuthError:
            if url.origin() != yarl.URL(self._base_url).origin():
                raise
        token = await self._auth.token()
        return await send(
            self._session,
            Endpoint.EXPORT_DOWNLOAD,
            "GET",
            url,
            client_timeout=self._timeout,
            observer=self._observer,
            headers={"Authorization": f"Bearer {token}"},
        )

    async def read_export_accounts(
        self, results_url: str, *, before_reading: Callable[[], Awaitable[None]] | None = None
    ) -> list[ListedAccount]:
        """The list members in a finished export's results file [A3], every row.

        Columns are found by name, whatever their case, order or neighbours (a BOM and
        CRLF line ends are read too). Members without an External Account ID (matched
        by domain and name, or added in Demandbase) keep an empty one, and are counted
        in a log line. The file is read in a thread: it may hold millions of rows, and
        the event loop serves ingest and the actors meanwhile. ``before_reading`` is
        awaited once the file has arrived (Demandbase's part is done then), and the
        file is read when it returns.
        """
        data = await self.download_export_results(results_url)
        if before_reading is not None:
            await before_reading()
        try:
            accounts = await asyncio.to_thread(_listed_accounts, data)
        except ValueError as exc:
            raise PayloadError(
                f"results file unreadable: {exc}", endpoint=Endpoint.EXPORT_DOWNLOAD
            ) from exc
        self._log_without_external_id(sum(1 for a in accounts if not a.external_id), len(accounts))
        return accounts

    async def read_export_accounts_by_list(
        self, results_url: str, *, before_reading: Callable[[], Awaitable[None]] | None = None
    ) -> tuple[dict[int, list[ListedAccount]], int]:
        """The members of each list of a finished multi-list export [A5], and the file's
        size in bytes (Demandbase counts a daily export volume).

        Each row names its list in an ``Account List ID`` column; a file without it is
        a :class:`PayloadError` (the tenant does not say which list a row is on). Read
        in a thread, after ``before_reading``, as :meth:`read_export_accounts`.
        """
        data = await self.download_export_results(results_url)
        if before_reading is not None:
            await before_reading()
        try:
            by_list, without = await asyncio.to_thread(_listed_by_list, data)
        except ValueError as exc:
            raise PayloadError(
                f"multi-list results file unreadable: {exc}", endpoint=Endpoint.EXPORT_DOWNLOAD
            ) from exc
        self._log_without_external_id(without, sum(len(members) for members in by_list.values()))
        return by_list, len(data)

    def _log_without_external_id(self, without: int, rows: int) -> None:
        if without:
            _log.info(
                "demandbase_export_rows_without_external_id",
                extra={"rows": rows, "without_external_id": without},
            )

    # The one request helper

    async def _call(
        self,
        endpoint: Endpoint,
        method: str,
        path: str,
        decoder: msgspec.json.Decoder[_T],
        *,
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        content_type: str | None = None,
    ) -> _T:
        """Call ``endpoint`` with a bearer token; after a 401, once more with a fresh one."""
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        url = f"{self._base_url}{path}"

        async def attempt(token: str) -> bytes:
            return await send(
                self._session,
                endpoint,
                method,
                url,
                client_timeout=self._timeout,
                observer=self._observer,
                headers={**headers, "Authorization": f"Bearer {token}"},
                params=params,
                data=data,
            )

        token = await self._auth.token()
        try:
            body = await attempt(token)
        except AuthError:
            if not await self._auth.invalidate(token):
                raise
            _log.warning(
                "demandbase_token_rejected",
                extra={"endpoint": endpoint.value, "auth_mode": self._auth.mode},
            )
            body = await attempt(await self._auth.token())
        return decode_answer(decoder, body, endpoint)


def _listed_accounts(data: bytes) -> list[ListedAccount]:
    """The rows of a results file; ``ValueError`` if it is not one."""
    return [
        ListedAccount(external_id=external_id, name=name, domain=domain)
        for _, name, domain, external_id in read_results(data)
    ]


def _listed_by_list(data: bytes) -> tuple[dict[int, list[ListedAccount]], int]:
    """The rows of a multi-list results file by list, and how many rows have no external
    id; ``ValueError`` if it is not one. One pass: the file holds millions of rows."""
    rows = read_results(data, (*wire.EXPORT_RESULT_COLUMNS, wire.EXPORT_LIST_ID_COLUMN))
    # Rows of one list arrive together or interleaved: group by the cell as read, a run
    # of rows of one list at a time.
    by_cell: dict[str, list[ListedAccount]] = {}
    without = 0
    for cell, run in itertools.groupby(rows, operator.itemgetter(4)):
        members = [
            ListedAccount(external_id=external_id, name=name, domain=domain)
            for _, name, domain, external_id, _ in run
        ]
        without += sum(1 for member in members if not member.external_id)
        by_cell.setdefault(cell, []).extend(members)
    by_list: dict[int, list[ListedAccount]] = {}
    for cell, members in by_cell.items():
        by_list.setdefault(int(cell), []).extend(members)
    return by_list, without

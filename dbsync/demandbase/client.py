"""The Demandbase client: the Data Import and Data Export calls dbsync makes.

How a call goes
    Each public method names its call with an :class:`~dbsync.demandbase.wire.Endpoint`
    and hands it to one private helper, :meth:`DemandbaseClient._call`. The helper
    takes a bearer token from the :class:`~dbsync.demandbase.auth.TokenSource` and
    makes one HTTP attempt through :func:`send`, which every request of the package
    goes through (token mints included): it bounds the attempt with a timeout, reports
    it to the :class:`RequestObserver` (the engine's quota accounting counts every
    attempt, 429s and mints too) and turns anything but a 2xx answer into a typed
    error. A status becomes an error class in :func:`error_for`, and only there; no
    answer at all (a reset, a timeout, a body cut short) is a ``TransientError``.

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
    does not decode is a ``PayloadError``. Error bodies differ per API (``{"message"}``
    or ``{"status"}`` on the Import API, ``ErrorDto`` on the Export API and for 429s);
    whichever is present is read, and junk such as a proxy's HTML page still gives the
    class that the status calls for.

Secrets
    The token travels only in the Authorization header, the client secret only in the
    token request's body, and a signed results URL only in its own GET. Errors are built
    from the endpoint's name, the status, the answer's body and headers, never from the
    request, and name a network failure by its class only (aiohttp puts URLs in some
    messages), so none of the three can reach an error or a log line.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypedDict, TypeVar
from urllib.parse import quote, urljoin

import aiohttp
import msgspec
import yarl

from dbsync.demandbase import wire
from dbsync.demandbase.csvfile import read_rows
from dbsync.demandbase.wire import Endpoint
from dbsync.errors import (
    AuthError,
    BadRequestError,
    DemandbaseError,
    NotFoundError,
    PayloadError,
    PermissionDeniedError,
    ThrottledError,
    TransientError,
)
from dbsync.model import ListedAccount

if TYPE_CHECKING:
    from dbsync.demandbase.auth import TokenSource

__all__ = [
    "EXPORT_JOB_NAME_MAX_CHARS",
    "DemandbaseClient",
    "RequestObserver",
    "decode_answer",
    "error_for",
    "send",
]

_log = logging.getLogger(__name__)

# Longer job names are refused with 400-126 [DOC]; checked before spending a request.
EXPORT_JOB_NAME_MAX_CHARS = 50

# Error messages quote Demandbase's own text, but never more than this of it.
_QUOTED_TEXT_MAX_CHARS = 200

# The Data Import API's permission, as named in its 403 descriptions, and the Data
# Export API's, as named in the API Key Set settings.
_PERMISSIONS = {"import": "Import Data", "export": "Data Export"}

_T = TypeVar("_T")

_encoder = msgspec.json.Encoder()
_import_job = msgspec.json.Decoder(wire.ImportJob)
_import_jobs = msgspec.json.Decoder(wire.ImportJobs)
_export_job_details = msgspec.json.Decoder(wire.ExportJobDetails)
_export_job_status = msgspec.json.Decoder(wire.ExportJobStatus)
_error_dto = msgspec.json.Decoder(wire.ErrorDto)
_message_body = msgspec.json.Decoder(wire.MessageBody)
_status_body = msgspec.json.Decoder(wire.StatusBody)


class RequestObserver(Protocol):
    """Told of every HTTP attempt, for quota accounting and statistics."""

    def request_finished(self, endpoint: Endpoint, status: int, elapsed_seconds: float) -> None:
        """One attempt at ``endpoint`` ended with ``status`` (0: no answer came)."""
        ...


# --- From an answer to an error ----------------------------------------------------


class _Identifiers(TypedDict):
    endpoint: str
    status: int
    error_code: str | None
    diagnostic_code: str | None


class _Reason(NamedTuple):
    text: str
    error_code: str | None = None
    diagnostic_code: str | None = None


def error_for(
    endpoint: Endpoint, status: int, body: bytes, headers: Mapping[str, str]
) -> DemandbaseError:
    """The error that a non-2xx answer to ``endpoint`` stands for (contract: retry classes)."""
    reason = _reason(body)
    ids = _Identifiers(
        endpoint=endpoint,
        status=status,
        error_code=reason.error_code,
        diagnostic_code=reason.diagnostic_code,
    )
    match status:
        case 400 if endpoint is Endpoint.AUTH_TOKEN:
            # The token endpoint answers 400 to wrong credentials. Its body is built from
            # the configuration and always well formed, so the credentials are at fault:
            # the destination must stop as auth_failed, not be split and retried as a
            # malformed request would be.
            return AuthError(f"client credentials rejected: {reason.text}", **ids)
        case 400:
            return BadRequestError(f"request rejected: {reason.text}", **ids)
        case 401:
            return AuthError(f"token rejected: {reason.text}", **ids)
        case 403 if endpoint is Endpoint.EXPORT_DOWNLOAD:
            # The results URL is signed and carries no token: a 403 says that its
            # signature expired, not that a permission is missing. Export again.
            return NotFoundError(f"results URL refused: {reason.text}", **ids)
        case 403:
            permission = _PERMISSIONS.get(endpoint.partition(".")[0], "")
            return PermissionDeniedError(
                f"permission {permission or 'unknown'!r} missing: {reason.text}",
                permission=permission,
                **ids,
            )
        case 404:
            return NotFoundError(f"not found: {reason.text}", **ids)
        case 429:
            return ThrottledError(
                f"throttled: {reason.text}", retry_after=_retry_after_seconds(headers), **ids
            )
        case 408:
            return TransientError(f"request timed out: {reason.text}", **ids)
        case _ if status >= 500:
            return TransientError(f"server error: {reason.text}", **ids)
        case _:
            return BadRequestError(f"unexpected status: {reason.text}", **ids)


def _reason(body: bytes) -> _Reason:
    """Demandbase's explanation, from whichever of its error envelopes ``body`` is."""
    if (dto := _decode_or_none(_error_dto, body)) is not None:
        return _Reason(
            _quoted(dto.error_message), dto.error_code or None, dto.diagnostic_code or None
        )
    if (message := _decode_or_none(_message_body, body)) is not None:
        return _Reason(_quoted(message.message))
    if (status := _decode_or_none(_status_body, body)) is not None:
        return _Reason(_quoted(status.status))
    return _Reason(_quoted(body.decode("utf-8", errors="replace")) or "(no explanation)")


def _decode_or_none(decoder: msgspec.json.Decoder[_T], body: bytes) -> _T | None:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError:
        return None


def _quoted(text: str) -> str:
    """``text`` on one line and cut short, for an error message."""
    return " ".join(text.split())[:_QUOTED_TEXT_MAX_CHARS]


def _retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Retry-After in seconds, from delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    value = headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    retry_at = _epoch_seconds(value)
    if retry_at is None:
        return None
    # Against the server's own Date when it sent one, so that our clock's skew does not
    # lengthen or shorten the wait; Demandbase documents no Retry-After at all, so this
    # is the one place that reads the wall clock directly rather than through a Clock.
    now = _epoch_seconds(headers.get("Date", "")) or time.time()
    return max(0.0, retry_at - now)


def _epoch_seconds(http_date: str) -> float | None:
    try:
        moment = email.utils.parsedate_to_datetime(http_date)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC by RFC 5322
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()


# --- One HTTP attempt ---------------------------------------------------------------


async def send(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    method: str,
    url: str | yarl.URL,
    *,
    client_timeout: aiohttp.ClientTimeout,
    observer: RequestObserver | None,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    data: bytes | None = None,
) -> bytes:
    """Make one attempt at ``endpoint``: the body of a 2xx answer, else a ``DemandbaseError``.

    The attempt is timed on the event loop's clock, the one that its timeout runs on.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = 0
    try:
        async with session.request(
            method, url, headers=headers, params=params, data=data, timeout=client_timeout
        ) as response:
            status = response.status
            body = await response.read()
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
        raise TransientError(
            f"no complete answer: {type(exc).__name__}", endpoint=endpoint, status=status
        ) from exc
    finally:
        elapsed_seconds = loop.time() - started
        _log.debug(
            "demandbase_request_finished",
            extra={
                "endpoint": endpoint.value,
                "status": status,
                "elapsed_seconds": elapsed_seconds,
            },
        )
        if observer is not None:
            observer.request_finished(endpoint, status, elapsed_seconds)
    if not 200 <= status < 300:
        raise error_for(endpoint, status, body, response.headers)
    return body


def decode_answer(decoder: msgspec.json.Decoder[_T], body: bytes, endpoint: Endpoint) -> _T:
    """A 2xx answer's body as the contract's Struct, else a ``PayloadError``."""
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise PayloadError(f"answer does not match the contract: {exc}", endpoint=endpoint) from exc


# --- The client ---------------------------------------------------------------------


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
        if not 1 <= len(job_name) <= EXPORT_JOB_NAME_MAX_CHARS:
            raise ValueError(
                f"job_name must have 1 to {EXPORT_JOB_NAME_MAX_CHARS} characters,"
                f" not {len(job_name)}"
            )
        request = wire.AccountListExportRequest(job_name=job_name, account_list_id=account_list_id)
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
        """The results file behind a finished export's signed ``results_url``.

        The URL carries its own signature, so no token is sent with it; a relative URL
        is resolved against the base URL. It is requested exactly as given, since
        re-encoding its query would break the signature.
        """
        url = yarl.URL(urljoin(f"{self._base_url}/", results_url), encoded=True)
        return await send(
            self._session,
            Endpoint.EXPORT_DOWNLOAD,
            "GET",
            url,
            client_timeout=self._timeout,
            observer=self._observer,
        )

    async def read_export_accounts(self, results_url: str) -> list[ListedAccount]:
        """The list members in a finished export's results file [A3], every row.

        Members without an External Account ID (matched by domain and name, or added
        in Demandbase) keep an empty one, and are counted in a log line.
        """
        data = await self.download_export_results(results_url)
        try:
            rows = list(read_rows(data))
        except ValueError as exc:
            raise PayloadError(
                f"results file is not CSV: {exc}", endpoint=Endpoint.EXPORT_DOWNLOAD
            ) from exc
        missing = set(wire.EXPORT_RESULT_COLUMNS).difference(rows[0] if rows else ())
        if rows and missing:
            raise PayloadError(
                f"results file lacks the columns {sorted(missing)}",
                endpoint=Endpoint.EXPORT_DOWNLOAD,
            )
        accounts = [
            ListedAccount(
                external_id=row["External Account ID"],
                name=row["Account Name"],
                domain=row["Account Domain"],
            )
            for row in rows
        ]
        without = sum(1 for a in accounts if not a.external_id)
        if without:
            _log.info(
                "demandbase_export_rows_without_external_id",
                extra={"rows": len(rows), "without_external_id": without},
            )
        return accounts

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

"""The transport to Demandbase: one HTTP attempt, and what its answer means.

Every request of the package goes through :func:`send`, the client's calls and the
token mints of :mod:`~dbsync.demandbase.auth` alike, so that there is one place that
bounds an attempt with a timeout, tells a :class:`RequestObserver` of it, and turns
anything but a 2xx answer into a typed error. A status becomes an error class in
:func:`error_for`, and only there; no answer at all (a reset, a timeout, a body cut
short) is a ``TransientError``. :func:`decode_answer` turns a 2xx body into the
contract's Struct, or a ``PayloadError``.

This module sits under both the client and the token source, so that neither imports
the other: ``auth`` -> ``http`` <- ``client``.

Error bodies
    They differ per API (``{"message"}`` or ``{"status"}`` on the Import API,
    ``ErrorDto`` on the Export API and for 429s); whichever is present is read, and
    junk such as a proxy's HTML page still gives the class that the status calls for.

Redirects
    Never followed (``allow_redirects=False``): a 3xx is a ``RedirectError`` with its
    status and Location. Following one would carry the bearer token wherever it
    points, and a same-origin loop once surfaced as aiohttp's ``TooManyRedirects``,
    whose repr holds the request's headers, token included.

Secrets
    Errors are built from the endpoint's name, the status, the answer's body and
    headers, never from the request. An exception of the HTTP stack (aiohttp's
    ``ClientError`` family, ssl errors, ``OSError``, timeouts) is put into words by
    :func:`describe_transport_error` alone, which keeps its class, the method, the URL
    without its query and the status, and nothing else (no headers, no request_info,
    no message: aiohttp's quote URLs with their query, and a results URL is signed),
    so that neither a token, a client secret nor a signature can reach an error, a
    log line, the store or ``dbsync ctl``. The aiohttp exception is not chained to ours
    for the same reason: a logged traceback prints every exception of the chain.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import ssl
import time
from collections.abc import Mapping
from typing import NamedTuple, Protocol, TypedDict, TypeVar

import aiohttp
import msgspec
import yarl

from dbsync.demandbase import wire
from dbsync.demandbase.wire import Endpoint
from dbsync.errors import (
    AuthError,
    BadRequestError,
    DemandbaseError,
    NotFoundError,
    PayloadError,
    PermissionDeniedError,
    RedirectError,
    ThrottledError,
    TransientError,
)

__all__ = [
    "RequestObserver",
    "decode_answer",
    "describe_transport_error",
    "error_for",
    "is_transport_error",
    "send",
]

_log = logging.getLogger(__name__)

# Error messages quote Demandbase's own text, but never more than this of it.
_QUOTED_TEXT_MAX_CHARS = 200

# The Data Import API's permission, as named in its 403 descriptions, and the Data
# Export API's, as named in the API Key Set settings.
_PERMISSIONS = {"import": "Import Data", "export": "Data Export"}

_T = TypeVar("_T")

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
        case _ if 300 <= status < 400:
            location = _without_secrets(headers.get("Location", "")) or "(none)"
            return RedirectError(f"redirect to {location} not followed", location=location, **ids)
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


# --- An exception of the HTTP stack, in words that are safe anywhere ----------------


def is_transport_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from the HTTP stack, whose own words may carry secrets."""
    return isinstance(exc, aiohttp.ClientError | ssl.SSLError)


def describe_transport_error(
    exc: BaseException, *, method: str = "", url: str | yarl.URL | None = None, status: int = 0
) -> str:
    """``exc`` as it may be logged, stored or shown: class, method, URL, status; no more.

    The method, URL and status come from the caller, else from what aiohttp recorded
    of the request (``request_info``); the URL loses its query, fragment and user info.
    Nothing else of ``exc`` is read: its message and repr can quote the query, the
    request's headers (the bearer token) and, for TLS, certificate details.
    """
    if isinstance(exc, aiohttp.ClientResponseError):
        status = status or exc.status
        info = exc.request_info
        method = method or info.method
        url = url if url is not None else info.real_url
    parts = [type(exc).__name__]
    if method:
        parts.append(method)
    if url is not None and (shown := _without_secrets(url)):
        parts.append(shown)
    if status:
        parts.append(f"status={status}")
    return " ".join(parts)


def _without_secrets(url: str | yarl.URL) -> str:
    """``url`` without query, fragment or user info ("" if it does not parse)."""
    try:
        parsed = url if isinstance(url, yarl.URL) else yarl.URL(url, encoded=True)
        parsed = parsed.with_query(None).with_fragment(None)
        return str(parsed.with_user(None) if parsed.is_absolute() else parsed)
    except (TypeError, ValueError):
        return ""


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
    A 3xx is a ``RedirectError``: redirects are never followed.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    status = 0
    try:
        async with session.request(
            method,
            url,
            headers=headers,
            params=params,
            data=data,
            timeout=client_timeout,
            allow_redirects=False,
        ) as response:
            status = response.status
            body = await response.read()
    except (aiohttp.ClientError, OSError) as exc:
        # OSError covers TimeoutError and ssl's errors. Not chained (see Secrets).
        described = describe_transport_error(exc, method=method, url=url, status=status)
        raise TransientError(
            f"no complete answer: {described}", endpoint=endpoint, status=status
        ) from None
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

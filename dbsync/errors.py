"""The errors dbsync raises, as one small tree.

    DbsyncError
    ├── ConfigError                 the configuration is invalid (exit 78); names the key
    ├── DemandbaseError             a Demandbase call failed; ``retriable`` says what to do
    │   ├── ThrottledError          429: slow down and retry (``error_code``, ``retry_after``)
    │   ├── TransientError          5xx, timeouts, resets: retry with backoff
    │   ├── RedirectError           3xx, never followed: retry with backoff (``location``)
    │   ├── AuthError               401 that a fresh token did not cure: stop the destination
    │   ├── PermissionDeniedError   403: a permission is missing; never refresh, never retry
    │   ├── BadRequestError         400: the request is wrong; do not repeat it unchanged
    │   ├── NotFoundError           404: the job or list does not exist
    │   └── PayloadError            a 2xx whose body is not what the contract promises
    └── StoreError                  SQLite failed: shared infrastructure, stops the daemon

Retry loops read ``retriable`` instead of chains of ``isinstance``. Messages carry
identifiers (job ids, error codes, diagnostic codes), never tokens or whole payloads.
"""

from __future__ import annotations

__all__ = [
    "AuthError",
    "BadRequestError",
    "ConfigError",
    "DbsyncError",
    "DemandbaseError",
    "NotFoundError",
    "PayloadError",
    "PermissionDeniedError",
    "RedirectError",
    "StoreError",
    "ThrottledError",
    "TransientError",
]


class DbsyncError(Exception):
    """Base of every error dbsync raises on purpose."""


class ConfigError(DbsyncError):
    """The configuration is invalid; ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class DemandbaseError(DbsyncError):
    """A call to Demandbase failed.

    ``status`` is the HTTP status (0 when no answer came), ``error_code`` and
    ``diagnostic_code`` are Demandbase's own fields when the body carried them, and
    ``endpoint`` names the call (``import.create_job``), never its URL with a token.
    """

    retriable: bool = False

    def __init__(
        self,
        message: str,
        *,
        endpoint: str = "",
        status: int = 0,
        error_code: str | None = None,
        diagnostic_code: str | None = None,
    ) -> None:
        self.message = message
        self.endpoint = endpoint
        self.status = status
        self.error_code = error_code
        self.diagnostic_code = diagnostic_code
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.endpoint:
            parts.append(f"endpoint={self.endpoint}")
        if self.status:
            parts.append(f"status={self.status}")
        if self.error_code:
            parts.append(f"error_code={self.error_code}")
        if self.diagnostic_code:
            parts.append(f"diagnostic_code={self.diagnostic_code}")
        return " ".join(parts)


class ThrottledError(DemandbaseError):
    """429: a per-minute, daily or concurrency limit was hit.

    ``retry_after`` is the server's Retry-After in seconds if it ever sends one
    (Demandbase documents none); the budget honours it.
    """

    retriable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after


class TransientError(DemandbaseError):
    """5xx, a timeout or a dropped connection: the same request may succeed later."""

    retriable = True


class RedirectError(DemandbaseError):
    """3xx: Demandbase, or something in front of it, sent us elsewhere; never followed.

    Following would send the bearer token wherever a proxy points, and a same-origin
    loop made aiohttp raise an error whose repr holds the request's headers. The error
    carries the status and ``location`` (without its query, which may be signed), and
    nothing more. Retriable: no request was processed, so a repeat is safe, and what
    redirects (a proxy, a moved endpoint) is fixed outside dbsync, so the work waits
    with the reason in ``dbsync ctl status`` and goes again on its own once it is;
    a crash, or a stop that needs a reload, would help no one.
    """

    retriable = True

    def __init__(self, message: str, *, location: str = "", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.location = location


class AuthError(DemandbaseError):
    """401 after the one token re-mint (or with a legacy token): credentials are bad."""


class PermissionDeniedError(DemandbaseError):
    """403: the token is valid but lacks a permission (``permission`` names it)."""

    def __init__(self, message: str, *, permission: str = "", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.permission = permission


class BadRequestError(DemandbaseError):
    """400: the request is malformed; repeating it unchanged cannot help."""


class NotFoundError(DemandbaseError):
    """404: the job (or list) named in the request does not exist."""


class PayloadError(DemandbaseError):
    """A success status whose body does not decode into what the contract promises."""


class StoreError(DbsyncError):
    """The SQLite store failed; shared infrastructure, so the daemon stops.

    ``unwritable`` is true when the file system refused the write (full, read-only, an
    I/O error): a condition to wait out, not a fault of the daemon.
    """

    def __init__(self, message: str, *, unwritable: bool = False) -> None:
        super().__init__(message)
        self.unwritable = unwritable

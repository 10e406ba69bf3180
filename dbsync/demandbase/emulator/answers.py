"""How the emulator answers: per-API error envelopes, JSON bodies, and query parameters.

A route refuses a request by raising :class:`ApiError` with a status, Demandbase's
error code and a message; the gate turns it into the body of the API the path belongs
to with :func:`error_body`, the one function that chooses an envelope [DOC per API]:

========  ==========================================  =====================================
API       401 and 403                                 everything else
========  ==========================================  =====================================
Import    ``{"status": ...}``                         ``{"message": ...}``; 429: ErrorDto
Export    ErrorDto                                    ErrorDto
Auth      (none)                                      ``{"message": ...}`` [ASSUMED];
                                                      429 and 5xx: ErrorDto
control   ``{"message": ...}``                        ``{"message": ...}``
========  ==========================================  =====================================

A 429 is an ErrorDto on every API [DOC for export, ASSUMED elsewhere], and so is a 5xx
of the token route, whose definition declares no error body but its 400.
"""

from __future__ import annotations

import datetime as dt
import enum
import secrets
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from dbsync.demandbase import wire
from dbsync.demandbase.emulator.limits import ThrottleKind

__all__ = [
    "RATE_LIMITED",
    "SERVER_ERROR",
    "Api",
    "ApiError",
    "api_of",
    "choice_param",
    "error_body",
    "int_param",
    "iso",
    "json_object",
    "json_response",
    "page",
]

_T = TypeVar("_T")

RATE_LIMITED: Final = "Rate limit exceeded."  # 429-100 [DOC]
SERVER_ERROR: Final = "Error while communicating with internal service."  # 500-100 [DOC]
_CONTROL_PREFIX: Final = "/_emulator/"

_encoder = msgspec.json.Encoder(order="deterministic")


class Api(enum.StrEnum):
    """Which API a path belongs to; it decides the error envelope."""

    AUTH = "auth"
    IMPORT = "import"
    EXPORT = "export"
    CONTROL = "control"  # the emulator's own routes, the signed results URL included


def api_of(path: str) -> Api | None:
    if path.startswith("/auth/"):
        return Api.AUTH
    if path.startswith("/import/"):
        return Api.IMPORT
    if path.startswith("/data/export/"):
        return Api.EXPORT
    if path.startswith(_CONTROL_PREFIX):
        return Api.CONTROL
    return None


class ApiError(Exception):
    """An error answer: ``status``, Demandbase's ``code`` (ErrorDto bodies), ``message``.

    ``code`` defaults to ``<status>-100``, whose first three digits are the status as
    in every documented code; ``kind``, given with every 429, says why it was answered,
    for the statistics.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        kind: ThrottleKind | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or f"{status}-100"
        self.kind = kind


def error_body(api: Api, error: ApiError) -> bytes:
    """The body ``api`` answers ``error`` with (the table in the module docstring)."""
    if api is Api.EXPORT or error.status == 429 or (api is Api.AUTH and error.status >= 500):
        return _encoder.encode(
            wire.ErrorDto(
                error_code=error.code,
                error_message=error.message,
                diagnostic_code=secrets.token_hex(16),  # opaque, per request [DOC]
            )
        )
    if api is Api.IMPORT and error.status in (401, 403):
        return _encoder.encode(wire.StatusBody(status=error.message))
    return _encoder.encode(wire.MessageBody(message=error.message))


def json_response(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=_encoder.encode(body), content_type="application/json")


def iso(epoch_seconds: float) -> str:
    """A UTC date-time as Demandbase writes it: ``2024-07-17T14:19:26.740Z``."""
    moment = dt.datetime.fromtimestamp(epoch_seconds, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_object(body: bytes) -> dict[str, Any] | None:
    """``body`` as a JSON object, or ``None`` when it is not one."""
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def int_param(
    request: web.Request,
    name: str,
    default: int,
    *,
    minimum: int,
    maximum: int | None = None,
    code: str | None = None,
) -> int:
    """Query parameter ``name`` as an integer in range, else a 400 naming it."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ApiError(400, f"{name} must be an integer {bounds}, not {raw!r}", code=code)
    return value


def choice_param(
    request: web.Request,
    name: str,
    choices: tuple[str, ...] | frozenset[str],
    default: str,
    *,
    code: str | None = None,
) -> str:
    """Query parameter ``name`` if it is one of ``choices``, else a 400 naming it."""
    value = request.query.get(name, default)
    if value not in choices:
        raise ApiError(400, f"{name} must be one of {sorted(choices)}, not {value!r}", code=code)
    return value


def page(items: list[_T], number: int, size: int) -> list[_T]:
    """Page ``number`` (from 1) of ``items``, ``size`` a page."""
    start = (number - 1) * size
    return items[start : start + size]

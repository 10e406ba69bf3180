"""Demandbase's published OpenAPI definitions as an oracle for recorded exchanges.

An exchange (the emulator's :class:`~dbsync.demandbase.emulator.Exchange`, or anything
with the same attributes) is checked against ``tests/data/openapi/{auth,data-import,
data-export}.json`` with openapi-core: the request's path and method must name an
operation; its path and query parameters (``listAction``'s enum, an integer job id),
its bearer token and its body must validate; the response's status must be declared
by the operation and its body must validate against the declared schema.

Where the definitions are silent, the contract's assumptions decide, and nothing is
skipped:

- A status the operation does not declare (the Import API declares no 429 at all,
  and no 404 on ``POST /job``): a 5xx is held to the body the operation declares for
  500, if it declares one (the same failure, another code); any other status is held
  to :data:`ASSUMED_ERROR_ENVELOPE`, the Export API's ``ErrorDto`` with all three
  fields required, which the contract assumes every API answers 429 with.
- A declared status without a body schema (the token route's 400, "invalid request"):
  the body must be :data:`ASSUMED_MESSAGE_BODY`, ``{"message": "..."}``.
- Either way the response must be ``application/json``.

:func:`validate_exchange` checks both sides; a test that broke a request on purpose
says so, and the request must then break the definition and have been refused with
a 4xx. :func:`validate_request` and :func:`validate_response` check one side each.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from openapi_core import OpenAPI
from openapi_core.templating.responses.exceptions import ResponseNotFound
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS30Validator

__all__ = [
    "ASSUMED_ERROR_ENVELOPE",
    "ASSUMED_MESSAGE_BODY",
    "ContractViolation",
    "ExchangeLike",
    "request_errors",
    "validate_exchange",
    "validate_request",
    "validate_response",
]

DEFINITIONS = Path(__file__).resolve().parent.parent / "data" / "openapi"
_HOST = "https://uapi.demandbase.com"
_FILES = {"auth": "auth.json", "import": "data-import.json", "export": "data-export.json"}
_PREFIXES = (("/auth/", "auth"), ("/import/", "import"), ("/data/export/", "export"))


def _export_error_dto() -> dict[str, Any]:
    definition = json.loads((DEFINITIONS / _FILES["export"]).read_text())
    schema: dict[str, Any] = copy.deepcopy(definition["components"]["schemas"]["ErrorDto"])
    schema["required"] = ["errorCode", "errorMessage", "diagnosticCode"]
    return schema


# [ASSUMED] (contract, "Limits": "ASSUMED same envelope elsewhere") the body of a
# status an operation does not declare: the Export API's ErrorDto, every field present.
ASSUMED_ERROR_ENVELOPE: dict[str, Any] = _export_error_dto()
# [ASSUMED] (contract, "Authentication": wrong credentials answer 400, "body not
# documented, ASSUMED {"message": "..."}") the body of a declared status without a schema.
ASSUMED_MESSAGE_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["message"],
    "properties": {"message": {"type": "string"}},
}


class ExchangeLike(Protocol):
    """What the validators read from an exchange."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def query(self) -> Mapping[str, str]: ...
    @property
    def request_headers(self) -> Mapping[str, str]: ...
    @property
    def request_content_type(self) -> str | None: ...
    @property
    def request_body(self) -> bytes: ...
    @property
    def status(self) -> int: ...
    @property
    def response_content_type(self) -> str | None: ...
    @property
    def response_body(self) -> bytes: ...


class ContractViolation(AssertionError):
    """An exchange breaks Demandbase's published definitions."""


@functools.cache
def _definition(api: str) -> OpenAPI:
    return OpenAPI.from_dict(json.loads((DEFINITIONS / _FILES[api]).read_text()))


def _api(exchange: ExchangeLike) -> str:
    for prefix, api in _PREFIXES:
        if exchange.path.startswith(prefix):
            return api
    raise ContractViolation(f"{exchange.method} {exchange.path}: not a Demandbase path")


def _media_type(content_type: str | None) -> str | None:
    return content_type.split(";")[0].strip() if content_type else None


def _request(exchange: ExchangeLike) -> MockRequest:
    return MockRequest(
        _HOST,
        exchange.method.lower(),
        exchange.path,
        args=dict(exchange.query),
        headers=dict(exchange.request_headers),
        data=exchange.request_body or None,
        content_type=_media_type(exchange.request_content_type) or "",
    )


def _response(exchange: ExchangeLike, status: int) -> MockResponse:
    return MockResponse(
        exchange.response_body,
        status_code=status,
        content_type=_media_type(exchange.response_content_type) or "",
    )


def _describe(errors: list[Exception]) -> str:
    """Every error with the schema errors behind it, which openapi-core nests."""
    lines = []
    for error in errors:
        lines.append(f"{type(error).__name__}: {error}")
        cause = error.__cause__
        while cause is not None:
            details = getattr(cause, "schema_errors", None) or ()
            lines.append(f"  {type(cause).__name__}: {cause}")
            lines.extend(f"    {getattr(d, 'message', d)}" for d in details)
            cause = cause.__cause__
    return "\n".join(lines)


def request_errors(exchange: ExchangeLike) -> list[Exception]:
    """How the request breaks its definition (empty when it validates)."""
    result = _definition(_api(exchange)).unmarshal_request(_request(exchange))
    return list(result.errors)


def validate_request(exchange: ExchangeLike) -> None:
    """Raise :class:`ContractViolation` unless the request validates (for client tests)."""
    errors = request_errors(exchange)
    if errors:
        raise ContractViolation(
            f"{exchange.method} {exchange.path}: request breaks the definition:\n"
            + _describe(errors)
        )


def validate_response(exchange: ExchangeLike) -> None:
    """Raise :class:`ContractViolation` unless the response validates (rules: module doc)."""
    where = f"{exchange.method} {exchange.path} -> {exchange.status}"
    definition = _definition(_api(exchange))
    request = _request(exchange)
    result = definition.unmarshal_response(request, _response(exchange, exchange.status))
    errors = list(result.errors)
    if errors and all(isinstance(e, ResponseNotFound) for e in errors):
        _validate_undeclared(exchange, definition, request, where)
        return
    if errors:
        raise ContractViolation(f"{where}: response breaks the definition:\n{_describe(errors)}")
    if result.data is None:
        # Declared, but without a schema: openapi-core accepts any body here.
        _validate_assumed(exchange, ASSUMED_MESSAGE_BODY, "the assumed message body", where)


def _validate_undeclared(
    exchange: ExchangeLike, definition: OpenAPI, request: MockRequest, where: str
) -> None:
    if exchange.status >= 500:
        as_500 = definition.unmarshal_response(request, _response(exchange, 500))
        if not as_500.errors:
            return
        if not all(isinstance(e, ResponseNotFound) for e in as_500.errors):
            raise ContractViolation(
                f"{where}: undeclared 5xx breaks the operation's 500 body:\n"
                + _describe(list(as_500.errors))
            )
    _validate_assumed(exchange, ASSUMED_ERROR_ENVELOPE, "the assumed ErrorDto envelope", where)


def _validate_assumed(
    exchange: ExchangeLike, schema: dict[str, Any], name: str, where: str
) -> None:
    if _media_type(exchange.response_content_type) != "application/json":
        raise ContractViolation(f"{where}: {exchange.response_content_type!r} is not JSON")
    try:
        body = json.loads(exchange.response_body)
    except ValueError as exc:
        raise ContractViolation(f"{where}: body is not JSON: {exc}") from None
    problems = [e.message for e in OAS30Validator(schema).iter_errors(body)]
    if problems:
        raise ContractViolation(f"{where}: body breaks {name}: {problems}")


def validate_exchange(exchange: ExchangeLike, *, invalid_request: bool = False) -> None:
    """Hold an exchange to the definitions: its request and its response must validate.

    ``invalid_request=True`` is for a request a test broke on purpose (a missing token,
    a bad ``listAction``): it must indeed break the definition, and must have been
    refused with a 4xx, since the emulator must not accept what Demandbase's
    definition forbids.
    """
    validate_response(exchange)
    if not invalid_request:
        validate_request(exchange)
        return
    where = f"{exchange.method} {exchange.path} -> {exchange.status}"
    if not request_errors(exchange):
        raise ContractViolation(f"{where}: the request was meant to be invalid, yet validates")
    if not 400 <= exchange.status < 500:
        raise ContractViolation(f"{where}: an invalid request was not refused with a 4xx")

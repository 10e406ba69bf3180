"""The emulator's HTTP face: Demandbase's routes, the control routes, and the gate between.

Routes
    Demandbase's own paths, answered as its OpenAPI definitions and the contract say::

        POST /auth/v1/token                          auth.token
        POST /import/v1/job                          import.create_job    200
        PUT  /import/v1/job/{id}/data?listAction=    import.upload        200
        GET  /import/v1/job/{id}                     import.job_status
        GET  /import/v1/jobs                         import.job_list
        GET  /import/v1/{entityType}/sources         import.sources
        POST /data/export/v1/accountList/job         export.create_job    202
        GET  /data/export/v1/job/{jobId}             export.job_status
        GET  /data/export/v1/jobs                    export.job_list

    and, outside them, the signed results download ``GET /_emulator/results/{jobId}``
    (no bearer; a wrong or expired signature answers 403) and the control routes
    ``/_emulator/{lists,accounts,stats,jobs,faults}``, which spend no quota and are
    never throttled or faulted.

The gate
    Every request on a Demandbase path passes the same steps, in this order:

    1. the tenant catches up with the clock (jobs fall due lazily, see ``tenant``);
    2. the request is counted and its body read;
    3. a status storm or the error ratio answers now, before the request has any effect;
    4. the per-minute rate counts it, and answers 429-100 when it is over;
    5. the bearer token (401) and the API's permission (403), except on the token route;
    6. the endpoint's daily quota is reserved (429-100 when spent);
    7. the route runs; an :class:`ApiError` it raises becomes the API's own error body;
    8. a 429 gives the reservation back, and carries Retry-After if a fault asks;
    9. the exchange is recorded, the latency fault waits, and a reset fault closes the
       connection instead of answering (after the request took effect).

Error bodies differ per API [DOC], and :func:`_error_body` alone chooses: the Import
API answers ``{"message"}`` (``{"status"}`` for 401 and 403), the Export API an
``ErrorDto``, the token route ``{"message"}`` for its 400 [ASSUMED]; a 429 is an
``ErrorDto`` everywhere [DOC for export, ASSUMED elsewhere], and so is any 5xx of the
token route, whose definition declares none.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import hashlib
import hmac
import logging
import math
import secrets
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec
from aiohttp import web

from dbsync.clock import Clock, SystemClock
from dbsync.demandbase import wire
from dbsync.demandbase.client import EXPORT_JOB_NAME_MAX_CHARS
from dbsync.demandbase.emulator.auth import TokenCheck, Tokens, bearer_token
from dbsync.demandbase.emulator.faults import FaultState, Injection
from dbsync.demandbase.emulator.limits import Limits, QuotaUse, ThrottleKind
from dbsync.demandbase.emulator.settings import EmulatorSettings, Faults, checked
from dbsync.demandbase.emulator.tenant import (
    ExportJob,
    ExportState,
    ImportJob,
    ImportState,
    RowCounts,
    Tenant,
    UploadRejected,
    read_import_file,
)
from dbsync.demandbase.wire import Endpoint

__all__ = ["Emulator", "Exchange"]

_log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T = TypeVar("_T")

# --- Demandbase's words ----------------------------------------------------------------

_RATE_LIMITED: Final = "Rate limit exceeded."  # 429-100 [DOC]
_VOLUME_SPENT: Final = "The rolling 24-hour export quota was exceeded."  # 429-101 [DOC]
_EXPORT_RUNNING: Final = "The concurrent export-job limit was exceeded."  # 429-102 [DOC]
_UNAUTHENTICATED: Final = "Authentication credentials are missing or invalid."  # 401-100
_IMPORT_FORBIDDEN: Final = 'The authenticated user lacks the "Import Data" permission'
_EXPORT_FORBIDDEN: Final = "The API key cannot access the requested resource."  # 403-102
_SERVER_ERROR: Final = "Error while communicating with internal service."  # 500-100
_EXPORT_JOB_UNKNOWN: Final = "Job id invalid"  # 404-302 [DOC example]

# The entity types the Import API names [DOC]; the emulator imports accounts only.
_IMPORT_ENTITY_TYPES: Final = ("Account", "Opportunity", "Person", "Activity")
_IMPORT_SOURCES: Final = ("CSV",)
# Filter values of GET /data/export/v1/jobs [DOC: the definition's enums and defaults].
_EXPORT_ENTITY_TYPES: Final = frozenset(
    {"All", "account", "accountBuyingGroup", "personBuyingGroupMember", "opportunity"}
    | {"person", "activity", "campaign", "creative"}
)
_SORTS: Final = ("ascending", "descending")
_ACCOUNT_LIST_IDS_MAX: Final = 10_000  # 400-145 [DOC]
# [ASSUMED] GET /import/v1/jobs pages: the definition gives no defaults; newest first,
# like the Export API's documented default sort.
_IMPORT_JOBS_PER_PAGE: Final = 50
_EXPORT_JOBS_PER_PAGE: Final = 10  # [DOC] default "10"
# [ASSUMED] each body-carrying route takes the media type its definition declares
# (an upload is application/octet-stream, not text/csv); anything else answers 400.
_MEDIA_TYPES: Final = {
    Endpoint.AUTH_TOKEN: "application/json",
    Endpoint.IMPORT_CREATE_JOB: "application/json",
    Endpoint.IMPORT_UPLOAD: "application/octet-stream",
    Endpoint.EXPORT_CREATE_JOB: "application/json",
}
_EXPORT_REQUEST_FIELDS: Final = frozenset(
    f.encode_name for f in msgspec.structs.fields(wire.AccountListExportRequest)
)
_ROUTES: Final = (
    ("POST", "/auth/v1/token", Endpoint.AUTH_TOKEN),
    ("POST", "/import/v1/job", Endpoint.IMPORT_CREATE_JOB),
    ("PUT", "/import/v1/job/{id}/data", Endpoint.IMPORT_UPLOAD),
    ("GET", "/import/v1/job/{id}", Endpoint.IMPORT_JOB_STATUS),
    ("GET", "/import/v1/jobs", Endpoint.IMPORT_JOB_LIST),
    ("GET", "/import/v1/{entityType}/sources", Endpoint.IMPORT_SOURCES),
    ("POST", "/data/export/v1/accountList/job", Endpoint.EXPORT_CREATE_JOB),
    ("GET", "/data/export/v1/job/{jobId}", Endpoint.EXPORT_JOB_STATUS),
    ("GET", "/data/export/v1/jobs", Endpoint.EXPORT_JOB_LIST),
)

_CONTROL_PREFIX: Final = "/_emulator/"
_RESULTS_PATH: Final = "/_emulator/results/{jobId}"
# Handlers still running when serve() exits are given this long, then cancelled.
_SHUTDOWN_SECONDS: Final = 1.0
_ACCOUNTS_PAGE_MAX: Final = 100_000

_encoder = msgspec.json.Encoder(order="deterministic")
_faults_decoder = msgspec.json.Decoder(Faults)


# --- errors and bodies -------------------------------------------------------------------


class _Api(enum.StrEnum):
    """Which API a path belongs to; it decides the error envelope."""

    AUTH = "auth"
    IMPORT = "import"
    EXPORT = "export"
    CONTROL = "control"


def _api_of(path: str) -> _Api | None:
    if path.startswith("/auth/"):
        return _Api.AUTH
    if path.startswith("/import/"):
        return _Api.IMPORT
    if path.startswith("/data/export/"):
        return _Api.EXPORT
    if path.startswith(_CONTROL_PREFIX):
        return _Api.CONTROL
    return None


class ApiError(Exception):
    """An error answer: ``status``, Demandbase's ``code`` (ErrorDto bodies), ``message``.

    ``kind`` says why a 429 was answered, for the statistics.
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


def _error_body(api: _Api, error: ApiError) -> bytes:
    """The error body ``api`` answers ``error`` with [DOC per API; see the module docstring]."""
    if api == _Api.EXPORT or error.status == 429 or (api == _Api.AUTH and error.status >= 500):
        return _encoder.encode(
            wire.ErrorDto(
                error_code=error.code,
                error_message=error.message,
                diagnostic_code=secrets.token_hex(16),
            )
        )
    if api == _Api.IMPORT and error.status in (401, 403):
        return _encoder.encode(wire.StatusBody(status=error.message))
    return _encoder.encode(wire.MessageBody(message=error.message))


def _json(status: int, body: object) -> web.Response:
    return web.Response(status=status, body=_encoder.encode(body), content_type="application/json")


def _iso(epoch_seconds: float) -> str:
    """A UTC date-time as Demandbase writes it: ``2024-07-17T14:19:26.740Z``."""
    moment = dt.datetime.fromtimestamp(epoch_seconds, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) else None


def _int_param(
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


def _choice_param(
    request: web.Request,
    name: str,
    choices: tuple[str, ...] | frozenset[str],
    default: str,
    code: str,
) -> str:
    value = request.query.get(name, default)
    if value not in choices:
        raise ApiError(400, f"{name} must be one of {sorted(choices)}, not {value!r}", code=code)
    return value


def _page(items: list[_T], page: int, per_page: int) -> list[_T]:
    start = (page - 1) * per_page
    return items[start : start + per_page]


# --- what the emulator shows -------------------------------------------------------------


class Exchange(msgspec.Struct, frozen=True, kw_only=True):
    """One Demandbase request and its answer, as recorded for contract tests.

    ``request_headers`` hold the request's headers with the Authorization value cut to
    its scheme. A request whose connection a fault reset has no answer and no record.
    """

    at: float
    endpoint: Endpoint | None
    method: str
    path: str
    query: dict[str, str]
    request_headers: dict[str, str]
    request_content_type: str | None
    request_body: bytes
    status: int
    response_content_type: str | None
    response_body: bytes
    response_headers: dict[str, str]


class _ImportJobView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    data_import_name: str
    state: str
    list_action: str | None
    created_at: float
    updated_at: float
    rows: int
    matched: int
    unmatched: list[str]  # external ids of the unmatched rows ("" for rows without one)
    dropped: list[str]
    account_list_id: int | None


class _ExportJobView(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    job_name: str
    state: str
    list_ids: list[int]
    created_at: float
    updated_at: float
    rows: int
    result_bytes: int


class _Stats(msgspec.Struct, frozen=True, kw_only=True):
    requests: int
    requests_by_endpoint: dict[str, int]
    answers_by_status: dict[str, int]
    throttled: int
    throttled_by_kind: dict[str, int]
    throttled_by_endpoint: dict[str, int]
    server_errors_injected: int
    resets_injected: int
    tokens_minted: int
    downloads: int
    quota: QuotaUse
    jobs: dict[str, dict[str, int]]
    rows: RowCounts
    lists: int
    accounts: int


class _Traffic:
    """Counters of Demandbase requests since start."""

    def __init__(self) -> None:
        self.requests = 0
        self.by_endpoint: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.throttled_by_kind: Counter[ThrottleKind] = Counter()
        self.throttled_by_endpoint: Counter[str] = Counter()
        self.server_errors_injected = 0
        self.resets_injected = 0
        self.downloads = 0


# --- the emulator ------------------------------------------------------------------------


class Emulator:
    """Demandbase's Auth, Data Import and Data Export APIs for one tenant, in process.

    ``serve()`` binds it to a loopback port; :attr:`app` is the aiohttp application for
    those who run it themselves. :attr:`tenant` holds the state for assertions.
    """

    def __init__(
        self, settings: EmulatorSettings | None = None, *, clock: Clock | None = None
    ) -> None:
        self.settings = checked(settings or EmulatorSettings())
        self._clock: Clock = clock or SystemClock()
        self._faults = FaultState(self.settings.start_faults, self.settings.seed)
        self._limits = Limits(self.settings, self._clock)
        self._tokens = Tokens(self.settings.token, self.settings.token_ttl_seconds, self._clock)
        self.tenant = Tenant(
            self.settings,
            self._clock,
            self._faults,
            export_finished=self._limits.spend_export_bytes,
        )
        self._traffic = _Traffic()
        self._exchanges: deque[Exchange] = deque(maxlen=self.settings.max_exchanges)
        self._signing_key = secrets.token_bytes(32)
        self.app = self._build_app()

    # --- public surface ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Listen on ``host:port`` (0: a free port) and yield the base URL; stop on exit."""
        runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, shutdown_timeout=_SHUTDOWN_SECONDS
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_host, bound_port = runner.addresses[0][:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        url = f"http://{url_host}:{bound_port}"
        _log.info(
            "emulator_listening",
            extra={"url": url, "accounts": self.settings.accounts, "seed": self.settings.seed},
        )
        try:
            yield url
        finally:
            await runner.cleanup()
            _log.info("emulator_stopped", extra={"requests": self._traffic.requests})

    @property
    def faults(self) -> Faults:
        """The faults in force (a storm shows the requests it has left)."""
        return self._faults.current

    def set_faults(self, faults: Faults) -> Faults:
        """Replace the faults in force (fields left out are off); returns them.

        ``expire_tokens`` revokes every API Key Set token minted so far, now.
        """
        faults = checked(faults)
        # Jobs that fell due before now complete under the faults they were due under.
        self.tenant.catch_up()
        self._faults.replace(faults)
        revoked = self._tokens.expire_all() if faults.expire_tokens else 0
        _log.info(
            "emulator_faults_changed",
            extra={"faults": msgspec.to_builtins(faults), "tokens_revoked": revoked},
        )
        return self._faults.current

    @property
    def exchanges(self) -> list[Exchange]:
        """The recorded Demandbase exchanges, oldest first (``record_exchanges`` only)."""
        return list(self._exchanges)

    def stats(self) -> dict[str, Any]:
        """What ``GET /_emulator/stats`` answers."""
        tenant = self.tenant
        traffic = self._traffic
        import_states = Counter(job.state for job in tenant.import_jobs)
        export_states = Counter(job.state for job in tenant.export_jobs)
        stats = _Stats(
            requests=traffic.requests,
            requests_by_endpoint=dict(traffic.by_endpoint),
            answers_by_status={str(s): n for s, n in sorted(traffic.by_status.items())},
            throttled=traffic.throttled_by_kind.total(),
            throttled_by_kind={
                kind.value: traffic.throttled_by_kind[kind] for kind in ThrottleKind
            },
            throttled_by_endpoint=dict(traffic.throttled_by_endpoint),
            server_errors_injected=traffic.server_errors_injected,
            resets_injected=traffic.resets_injected,
            tokens_minted=self._tokens.minted,
            downloads=traffic.downloads,
            quota=self._limits.use(),
            jobs={
                "import": {state.value: import_states[state] for state in ImportState},
                "export": {state.value: export_states[state] for state in ExportState},
            },
            rows=tenant.row_counts(),
            lists=len(tenant.lists),
            accounts=len(tenant.accounts),
        )
        result: dict[str, Any] = msgspec.to_builtins(stats)
        return result

    # --- the application -------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._gate], client_max_size=self.settings.max_upload_bytes
        )
        handlers: dict[Endpoint, Handler] = {
            Endpoint.AUTH_TOKEN: self._mint_token,
            Endpoint.IMPORT_CREATE_JOB: self._create_import_job,
            Endpoint.IMPORT_UPLOAD: self._upload,
            Endpoint.IMPORT_JOB_STATUS: self._import_job_status,
            Endpoint.IMPORT_JOB_LIST: self._import_job_list,
            Endpoint.IMPORT_SOURCES: self._import_sources,
            Endpoint.EXPORT_CREATE_JOB: self._create_export_job,
            Endpoint.EXPORT_JOB_STATUS: self._export_job_status,
            Endpoint.EXPORT_JOB_LIST: self._export_job_list,
        }
        for method, path, endpoint in _ROUTES:
            # Route names are identifiers, so the enum member's name rather than its value.
            app.router.add_route(method, path, handlers[endpoint], name=endpoint.name)
        app.router.add_get(_RESULTS_PATH, self._download)
        app.router.add_get("/_emulator/lists", self._lists)
        app.router.add_get("/_emulator/accounts", self._accounts)
        app.router.add_get("/_emulator/stats", self._stats)
        app.router.add_get("/_emulator/jobs", self._jobs)
        app.router.add_get("/_emulator/faults", self._get_faults)
        app.router.add_post("/_emulator/faults", self._post_faults)
        return app

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.tenant.catch_up()
        api = _api_of(request.path)
        if api is None:
            return await handler(request)
        if api == _Api.CONTROL:
            try:
                return await handler(request)
            except ApiError as error:
                return self._error_response(api, error)
        return await self._demandbase(request, handler, api)

    async def _demandbase(
        self, request: web.Request, handler: Handler, api: _Api
    ) -> web.StreamResponse:
        name = request.match_info.route.name
        found = request.match_info.http_exception is None and name is not None
        endpoint = Endpoint[name] if found and name is not None else None
        traffic = self._traffic
        traffic.requests += 1
        if endpoint is not None:
            traffic.by_endpoint[endpoint.value] += 1
        try:
            body: bytes | None = await request.read()
        except web.HTTPRequestEntityTooLarge:
            body = None
        injection, injected_status = self._faults.draw()
        response: web.StreamResponse
        if injection is Injection.STATUS:
            response = self._injected(api, endpoint, injected_status)
        else:
            try:
                response = await self._answer(request, handler, api, endpoint, body)
            except ApiError as error:
                response = self._error_response(api, error, endpoint)
            except Exception:
                _log.exception("emulator_route_failed", extra={"path": request.path})
                response = self._error_response(api, ApiError(500, _SERVER_ERROR), endpoint)
        if response.status == 429 and (retry_after := self._faults.retry_after_seconds) is not None:
            response.headers["Retry-After"] = str(retry_after)
        traffic.by_status[response.status] += 1
        if self.settings.record_exchanges:
            self._exchanges.append(self._exchange(request, endpoint, body or b"", response))
        if latency_seconds := self._faults.latency_seconds:
            # The network's delay, not Demandbase's: real time, even under a fake clock.
            await asyncio.sleep(latency_seconds)
        if injection is Injection.RESET and request.transport is not None:
            traffic.resets_injected += 1
            request.transport.close()
        return response

    async def _answer(
        self,
        request: web.Request,
        handler: Handler,
        api: _Api,
        endpoint: Endpoint | None,
        body: bytes | None,
    ) -> web.StreamResponse:
        """Steps 4 to 8 of the gate; raises :class:`ApiError` for the refusals."""
        if not self._limits.admit():
            raise ApiError(429, _RATE_LIMITED, kind=ThrottleKind.MINUTE)
        if endpoint is None:
            raise ApiError(404, f"no route {request.method} {request.path}", code="404-301")
        if endpoint is not Endpoint.AUTH_TOKEN:
            self._authorize(request, api)
        day = self._limits.reserve(endpoint)
        if day is None:
            raise ApiError(429, _RATE_LIMITED, kind=ThrottleKind.DAILY)
        try:
            if body is None:
                # [ASSUMED] a file over the documented 5 GB limit answers 400, a status
                # the upload route declares (it declares no 413).
                limit = self.settings.max_upload_bytes
                raise ApiError(400, f"the body exceeds {limit} bytes", code="400-103")
            _check_media_type(request, endpoint)
            return await handler(request)
        except ApiError as error:
            if error.status == 429:
                self._limits.give_back(endpoint, day)
            raise

    def _authorize(self, request: web.Request, api: _Api) -> None:
        check = self._tokens.check(bearer_token(request.headers.get("Authorization")))
        if check is not TokenCheck.VALID:
            raise ApiError(401, _UNAUTHENTICATED)
        if api == _Api.IMPORT and "import" not in self.settings.permissions:
            raise ApiError(403, _IMPORT_FORBIDDEN)
        if api == _Api.EXPORT and "export" not in self.settings.permissions:
            raise ApiError(403, _EXPORT_FORBIDDEN, code="403-102")

    def _injected(self, api: _Api, endpoint: Endpoint | None, status: int) -> web.Response:
        if status == 429:
            return self._error_response(
                api, ApiError(429, _RATE_LIMITED, kind=ThrottleKind.INJECTED), endpoint
            )
        self._traffic.server_errors_injected += 1
        return self._error_response(api, ApiError(status, _SERVER_ERROR), endpoint)

    def _error_response(
        self, api: _Api, error: ApiError, endpoint: Endpoint | None = None
    ) -> web.Response:
        if error.status == 429:
            self._traffic.throttled_by_kind[error.kind or ThrottleKind.INJECTED] += 1
            if endpoint is not None:
                self._traffic.throttled_by_endpoint[endpoint.value] += 1
        return web.Response(
            status=error.status, body=_error_body(api, error), content_type="application/json"
        )

    def _exchange(
        self,
        request: web.Request,
        endpoint: Endpoint | None,
        body: bytes,
        response: web.StreamResponse,
    ) -> Exchange:
        headers = dict(request.headers)
        if "Authorization" in headers:
            headers["Authorization"] = headers["Authorization"].partition(" ")[0] + " <redacted>"
        answer = response.body if isinstance(response, web.Response) else None
        return Exchange(
            at=self._clock.time(),
            endpoint=endpoint,
            method=request.method,
            path=request.path,
            query=dict(request.query),
            request_headers=headers,
            request_content_type=request.headers.get("Content-Type"),
            request_body=body,
            status=response.status,
            response_content_type=response.headers.get("Content-Type"),
            response_body=answer if isinstance(answer, bytes) else b"",
            response_headers=dict(response.headers),
        )

    # --- Auth API --------------------------------------------------------------------------

    async def _mint_token(self, request: web.Request) -> web.Response:
        raw = _json_object(await request.read())
        if raw is None:
            raise ApiError(400, "the body must be a JSON object")
        for field in ("grantType", "clientId", "clientSecret"):
            if not isinstance(raw.get(field), str):
                raise ApiError(400, f"{field} is required and must be a string")
        credentials = msgspec.convert(raw, wire.TokenRequest)
        if credentials.grant_type != "client_credentials":
            raise ApiError(400, "grantType must be client_credentials")
        valid_id = hmac.compare_digest(
            credentials.client_id.encode(), self.settings.client_id.encode()
        )
        valid_secret = hmac.compare_digest(
            credentials.client_secret.encode(), self.settings.client_secret.encode()
        )
        if not (valid_id and valid_secret):
            raise ApiError(400, "invalid client credentials")
        return _json(
            200,
            wire.TokenResponse(
                access_token=self._tokens.mint(), expires_in=self.settings.token_ttl_seconds
            ),
        )

    # --- Data Import API ---------------------------------------------------------------------

    async def _create_import_job(self, request: web.Request) -> web.Response:
        raw = _json_object(await request.read())
        if raw is None:
            raise ApiError(400, "the body must be a JSON object")
        for field in ("dataImportName", "entityType"):
            if field not in raw:
                raise ApiError(400, f"{field} is required")
        try:
            spec = msgspec.convert(raw, wire.CreateImportJob)
        except msgspec.ValidationError as exc:
            raise ApiError(400, str(exc)) from None
        if not spec.data_import_name.strip():
            raise ApiError(400, "dataImportName must not be empty")
        if spec.entity_type != "Account":
            # The emulator keeps accounts only; Demandbase also imports the other types.
            raise ApiError(400, f"entityType {spec.entity_type!r} is not supported")
        if spec.source not in _IMPORT_SOURCES:
            raise ApiError(400, f"source must be one of {list(_IMPORT_SOURCES)}")
        job = self.tenant.create_import_job(spec.data_import_name, spec.entity_type, spec.source)
        return _json(200, _import_job_body(job))  # 200, not 201 [DOC]

    async def _upload(self, request: web.Request) -> web.Response:
        job = self._import_job(request)
        list_action = request.query.get("listAction", "replace")  # Demandbase's default [DOC]
        if list_action not in wire.LIST_ACTIONS:
            raise ApiError(400, f"listAction must be one of {list(wire.LIST_ACTIONS)}")
        if job.state is not ImportState.NEW:
            raise ApiError(400, f"job {job.id} is {job.state}: data goes to a new job, once")
        limit = self.settings.concurrent_import_jobs
        if self.tenant.imports_processing() >= limit:
            raise ApiError(
                429,
                f"Max {limit} jobs are allowed at a time",
                code="429-102",
                kind=ThrottleKind.CONCURRENT,
            )
        try:
            rows = read_import_file(
                await request.read(), reject_external_ids=self._faults.reject_external_ids
            )
        except UploadRejected as rejected:
            raise ApiError(400, rejected.message) from None
        self.tenant.start_import(job, rows, list_action)
        return _json(200, _import_job_body(job))

    async def _import_job_status(self, request: web.Request) -> web.Response:
        return _json(200, _import_job_body(self._import_job(request)))

    def _import_job(self, request: web.Request) -> ImportJob:
        raw = request.match_info["id"]
        if not raw.isdigit():
            raise ApiError(400, f"job id must be an integer, not {raw!r}")
        job = self.tenant.import_job(int(raw))
        if job is None:
            raise ApiError(404, f"job {raw} not found")
        return job

    async def _import_job_list(self, request: web.Request) -> web.Response:
        entity_type = request.query.get("entityType")
        state = request.query.get("state")
        if state is not None and state not in set(ImportState):
            raise ApiError(400, f"state must be one of {[s.value for s in ImportState]}")
        sort = _choice_param(request, "sort", _SORTS, "descending", code="400-120")
        page = _int_param(request, "page", 1, minimum=1)
        per_page = _int_param(request, "perPage", _IMPORT_JOBS_PER_PAGE, minimum=1, maximum=1000)
        jobs = [
            job
            for job in sorted(
                self.tenant.import_jobs, key=lambda j: j.id, reverse=sort == "descending"
            )
            if (entity_type is None or job.entity_type.lower() == entity_type.lower())
            and (state is None or job.state == state)
        ]
        return _json(
            200,
            wire.ImportJobs(
                total_count=len(jobs),
                data=[_import_job_body(job) for job in _page(jobs, page, per_page)],
            ),
        )

    async def _import_sources(self, request: web.Request) -> web.Response:
        entity_type = request.match_info["entityType"]
        if entity_type not in _IMPORT_ENTITY_TYPES:
            raise ApiError(400, f"entityType must be one of {list(_IMPORT_ENTITY_TYPES)}")
        return _json(200, wire.ImportSources(data=list(_IMPORT_SOURCES)))

    # --- Data Export API -------------------------------------------------------------------

    async def _create_export_job(self, request: web.Request) -> web.Response:
        spec = _account_list_export(await request.read())
        list_ids = ((spec.account_list_id,) if spec.account_list_id is not None else ()) + tuple(
            spec.account_list_ids or ()
        )
        unknown = [i for i in list_ids if self.tenant.list_by_id(i) is None]
        if unknown:
            raise ApiError(400, f"Account list IDs do not exist: {unknown}", code="400-142")
        if self._limits.export_volume_spent():
            raise ApiError(429, _VOLUME_SPENT, code="429-101", kind=ThrottleKind.VOLUME)
        if self.tenant.exports_running() >= self.settings.concurrent_export_jobs:
            raise ApiError(429, _EXPORT_RUNNING, code="429-102", kind=ThrottleKind.CONCURRENT)
        job = self.tenant.create_export_job(spec.job_name, list_ids)
        return _json(
            202,
            wire.ExportJobDetails(
                job_id=job.job_id,
                job_status=job.state.value,
                entity_type=job.entity_type,
                job_name=job.job_name,
                created_at=_iso(job.created_at),
            ),
        )

    async def _export_job_status(self, request: web.Request) -> web.Response:
        job = self.tenant.export_job(request.match_info["jobId"])
        if job is None:
            raise ApiError(404, _EXPORT_JOB_UNKNOWN, code="404-302")
        return _json(
            200,
            wire.ExportJobStatus(
                job_id=job.job_id,
                job_name=job.job_name,
                entity_type=job.entity_type,
                job_status=job.state.value,
                created_at=_iso(job.created_at),
                updated_at=_iso(job.updated_at),
                results_url=self._results_url(request, job),
                message=job.message,
            ),
        )

    async def _export_job_list(self, request: web.Request) -> web.Response:
        entity_type = _choice_param(request, "entityType", _EXPORT_ENTITY_TYPES, "All", "400-123")
        statuses = ("All", *(s.value for s in ExportState))
        status = _choice_param(request, "jobStatus", statuses, "All", "400-124")
        sort = _choice_param(request, "sort", _SORTS, "descending", "400-120")
        page = _int_param(request, "page", 1, minimum=1, code="400-121")
        per_page = _int_param(request, "perPage", _EXPORT_JOBS_PER_PAGE, minimum=1, code="400-122")
        jobs = [
            job
            for job in sorted(
                self.tenant.export_jobs,
                key=lambda j: j.created_at,
                reverse=sort == "descending",
            )
            if entity_type in ("All", job.entity_type) and status in ("All", job.state)
        ]
        return _json(
            200,
            wire.ExportJobs(
                page_no=page,
                page_size=per_page,
                total_count=len(jobs),
                data=[
                    wire.ExportJobSummary(
                        job_id=job.job_id,
                        job_name=job.job_name,
                        entity_type=job.entity_type,
                        job_status=job.state.value,
                        created_at=_iso(job.created_at),
                        updated_at=_iso(job.updated_at),
                    )
                    for job in _page(jobs, page, per_page)
                ],
            ),
        )

    # --- the signed results URL --------------------------------------------------------------

    def _results_url(self, request: web.Request, job: ExportJob) -> str:
        """The finished job's download URL on the host the client called; "" until then."""
        if job.finished_at is None or job.state is not ExportState.FINISHED:
            return ""
        expires = math.ceil(job.finished_at + self.settings.results_url_ttl_seconds)
        url = request.url.origin().with_path(f"/_emulator/results/{job.job_id}")
        return str(url.with_query(expires=str(expires), sig=self._signature(job.job_id, expires)))

    def _signature(self, job_id: str, expires: int) -> str:
        message = f"{job_id}:{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    async def _download(self, request: web.Request) -> web.Response:
        job_id = request.match_info["jobId"]
        expires_raw = request.query.get("expires", "")
        signature = request.query.get("sig", "")
        job = self.tenant.export_job(job_id)
        valid = (
            expires_raw.isdigit()
            and hmac.compare_digest(signature, self._signature(job_id, int(expires_raw)))
            and self._clock.time() < int(expires_raw)
            and job is not None
        )
        if not valid or job is None:
            raise ApiError(403, "the signature is invalid or has expired")
        self._traffic.downloads += 1
        return web.Response(body=job.result, content_type="text/csv", charset="utf-8")

    # --- control routes ------------------------------------------------------------------------

    async def _lists(self, request: web.Request) -> web.Response:
        return _json(
            200,
            {
                name: {"id": account_list.id, "members": sorted(account_list.members)}
                for name, account_list in self.tenant.lists.items()
            },
        )

    async def _accounts(self, request: web.Request) -> web.Response:
        accounts = self.tenant.accounts
        limit = _int_param(request, "limit", 100, minimum=0, maximum=_ACCOUNTS_PAGE_MAX)
        offset = _int_param(request, "offset", 0, minimum=0)
        return _json(200, {"total": len(accounts), "accounts": list(accounts.page(offset, limit))})

    async def _stats(self, request: web.Request) -> web.Response:
        return _json(200, self.stats())

    async def _jobs(self, request: web.Request) -> web.Response:
        imports = [
            _ImportJobView(
                id=job.id,
                data_import_name=job.data_import_name,
                state=job.state.value,
                list_action=job.list_action,
                created_at=job.created_at,
                updated_at=job.updated_at,
                rows=job.rows,
                matched=len(job.matched),
                unmatched=[row.external_id for row in job.unmatched],
                dropped=job.dropped,
                account_list_id=job.account_list_id,
            )
            for job in self.tenant.import_jobs
        ]
        exports = [
            _ExportJobView(
                job_id=job.job_id,
                job_name=job.job_name,
                state=job.state.value,
                list_ids=list(job.list_ids),
                created_at=job.created_at,
                updated_at=job.updated_at,
                rows=job.rows,
                result_bytes=len(job.result),
            )
            for job in self.tenant.export_jobs
        ]
        return _json(200, {"import": imports, "export": exports})

    async def _get_faults(self, request: web.Request) -> web.Response:
        return _json(200, self.faults)

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            faults = _faults_decoder.decode(await request.read())
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"invalid faults: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"the body must be a JSON object: {exc}") from None
        return _json(200, self.set_faults(faults))


def _check_media_type(request: web.Request, endpoint: Endpoint) -> None:
    expected = _MEDIA_TYPES.get(endpoint)
    if expected is not None and request.content_type != expected:
        raise ApiError(
            400, f"Content-Type must be {expected}, not {request.content_type!r}", code="400-102"
        )


def _import_job_body(job: ImportJob) -> wire.ImportJob:
    return wire.ImportJob(
        id=job.id,
        data_import_name=job.data_import_name,
        entity_type=job.entity_type,
        state=job.state.value,
        created_at=_iso(job.created_at),
        updated_at=_iso(job.updated_at),
        source=job.source,
        account_list_id=job.account_list_id,
    )


def _account_list_export(body: bytes) -> wire.AccountListExportRequest:
    """An account-list export request, or the ErrorDto code that refuses it [DOC codes]."""
    raw = _json_object(body)
    if raw is None:
        raise ApiError(400, "The request body is not a valid JSON object.", code="400-102")
    unknown = sorted(set(raw) - _EXPORT_REQUEST_FIELDS)
    if unknown:
        raise ApiError(400, f"Unrecognized property: {unknown[0]}", code="400-147")
    job_name = raw.get("jobName")
    if not isinstance(job_name, str) or not job_name or len(job_name) > EXPORT_JOB_NAME_MAX_CHARS:
        raise ApiError(
            400,
            f"jobName is required and must be at most {EXPORT_JOB_NAME_MAX_CHARS} characters.",
            code="400-126",
        )
    if "accountListId" in raw and "accountListIds" in raw:
        raise ApiError(
            400, "accountListId and accountListIds cannot be used together.", code="400-144"
        )
    if "accountListId" in raw:
        ids: object = [raw["accountListId"]]
    else:
        ids = raw.get("accountListIds")
    if ids is None or ids == []:
        raise ApiError(400, "A required parameter is missing: accountListId.", code="400-104")
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise ApiError(400, "Account list IDs must be numeric.", code="400-129")
    if len(ids) > _ACCOUNT_LIST_IDS_MAX:
        raise ApiError(
            400, f"accountListIds holds more than {_ACCOUNT_LIST_IDS_MAX} IDs.", code="400-145"
        )
    return msgspec.convert(raw, wire.AccountListExportRequest)

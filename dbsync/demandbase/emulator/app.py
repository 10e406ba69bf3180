"""The emulator: one tenant behind Demandbase's routes, and the gate every request passes.

:class:`Emulator` wires the parts together (``tenant``, ``limits``, ``faults``,
``auth``, the handlers of ``routes`` and ``control``) into one aiohttp application,
serves it with :meth:`Emulator.serve`, and shows its state through :attr:`~Emulator.tenant`,
:meth:`~Emulator.stats` and :attr:`~Emulator.exchanges`.

The gate
    Every request on a Demandbase path passes the same steps, in this order:

    1. the tenant catches up with the clock (jobs fall due lazily, see ``tenant``);
    2. the request is counted and its body read;
    3. a status storm or the error ratio answers now, before the request has any effect;
    4. the per-minute rate counts it, and answers 429-100 when it is over;
    5. the bearer token (401) and the API's permission (403), except on the token route;
    6. the endpoint's daily quota is reserved (429-100 when spent);
    7. the route runs; an :class:`~.answers.ApiError` becomes the API's own error body;
    8. a 429 gives the reservation back, and carries Retry-After if a fault asks;
    9. the exchange is recorded, the latency fault waits, and a reset fault closes the
       connection instead of answering (after the request took effect).

    Control routes (``/_emulator/``, the signed results download included) only catch
    the tenant up: no limit, fault, token or count applies to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import msgspec
from aiohttp import web

from dbsync.clock import Clock, SystemClock
from dbsync.demandbase.emulator.answers import (
    RATE_LIMITED,
    SERVER_ERROR,
    Api,
    ApiError,
    api_of,
    error_body,
)
from dbsync.demandbase.emulator.auth import TokenCheck, Tokens, bearer_token
from dbsync.demandbase.emulator.control import ControlRoutes
from dbsync.demandbase.emulator.faults import FaultState, Injection
from dbsync.demandbase.emulator.limits import Limits, QuotaUse, ThrottleKind
from dbsync.demandbase.emulator.routes import (
    RESULTS_PATH,
    ROUTES,
    DemandbaseRoutes,
    check_media_type,
)
from dbsync.demandbase.emulator.settings import EmulatorSettings, Faults, checked
from dbsync.demandbase.emulator.tenant import ExportState, ImportState, RowCounts, Tenant
from dbsync.demandbase.wire import Endpoint

__all__ = ["Emulator", "Exchange"]

_log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_UNAUTHENTICATED: Final = "Authentication credentials are missing or invalid."  # 401-100
_IMPORT_FORBIDDEN: Final = 'The authenticated user lacks the "Import Data" permission'
_EXPORT_FORBIDDEN: Final = "The API key cannot access the requested resource."  # 403-102
# Handlers still running when serve() exits are given this long, then cancelled.
_SHUTDOWN_SECONDS: Final = 1.0


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
        self._routes = DemandbaseRoutes(
            self.settings, self._clock, self.tenant, self._tokens, self._limits, self._faults
        )
        self._traffic = _Traffic()
        self._exchanges: deque[Exchange] = deque(maxlen=self.settings.max_exchanges)
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
            downloads=self._routes.downloads,
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
        handlers = self._routes.handlers()
        for method, path, endpoint in ROUTES:
            # Route names are identifiers, so the enum member's name rather than its value.
            app.router.add_route(method, path, handlers[endpoint], name=endpoint.name)
        app.router.add_get(RESULTS_PATH, self._routes.download)
        ControlRoutes(
            self.tenant, stats=self.stats, faults=lambda: self.faults, set_faults=self.set_faults
        ).add_to(app.router)
        return app

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.tenant.catch_up()
        api = api_of(request.path)
        if api is None:
            return await handler(request)
        if api == Api.CONTROL:
            try:
                return await handler(request)
            except ApiError as error:
                return self._error_response(api, error)
        return await self._demandbase(request, handler, api)

    async def _demandbase(
        self, request: web.Request, handler: Handler, api: Api
    ) -> web.StreamResponse:
        name = request.match_info.route.name  # None when no route matched
        endpoint = Endpoint[name] if name is not None else None
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
                response = self._error_response(api, ApiError(500, SERVER_ERROR), endpoint)
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
        api: Api,
        endpoint: Endpoint | None,
        body: bytes | None,
    ) -> web.StreamResponse:
        """Steps 4 to 8 of the gate; raises :class:`ApiError` for the refusals."""
        if not self._limits.admit():
            raise ApiError(429, RATE_LIMITED, kind=ThrottleKind.MINUTE)
        if endpoint is None:
            raise ApiError(404, f"no route {request.method} {request.path}", code="404-301")
        if endpoint is not Endpoint.AUTH_TOKEN:
            self._authorize(request, api)
        day = self._limits.reserve(endpoint)
        if day is None:
            raise ApiError(429, RATE_LIMITED, kind=ThrottleKind.DAILY)
        try:
            if body is None:
                # [ASSUMED] a file over the documented 5 GB limit answers 400, a status
                # the upload route declares (it declares no 413).
                limit = self.settings.max_upload_bytes
                raise ApiError(400, f"the body exceeds {limit} bytes", code="400-103")
            check_media_type(request, endpoint)
            return await handler(request)
        except ApiError as error:
            if error.status == 429:
                self._limits.give_back(endpoint, day)
            raise

    def _authorize(self, request: web.Request, api: Api) -> None:
        check = self._tokens.check(bearer_token(request.headers.get("Authorization")))
        if check is not TokenCheck.VALID:
            _log.debug(
                "emulator_token_refused", extra={"path": request.path, "reason": check.value}
            )
            raise ApiError(401, _UNAUTHENTICATED)
        if api == Api.IMPORT and "import" not in self.settings.permissions:
            raise ApiError(403, _IMPORT_FORBIDDEN)
        if api == Api.EXPORT and "export" not in self.settings.permissions:
            raise ApiError(403, _EXPORT_FORBIDDEN, code="403-102")

    def _injected(self, api: Api, endpoint: Endpoint | None, status: int) -> web.Response:
        if status == 429:
            return self._error_response(
                api, ApiError(429, RATE_LIMITED, kind=ThrottleKind.INJECTED), endpoint
            )
        self._traffic.server_errors_injected += 1
        return self._error_response(api, ApiError(status, SERVER_ERROR), endpoint)

    def _error_response(
        self, api: Api, error: ApiError, endpoint: Endpoint | None = None
    ) -> web.Response:
        if error.kind is not None:
            self._traffic.throttled_by_kind[error.kind] += 1
            if endpoint is not None:
                self._traffic.throttled_by_endpoint[endpoint.value] += 1
        return web.Response(
            status=error.status, body=error_body(api, error), content_type="application/json"
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

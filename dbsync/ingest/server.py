"""The ingest HTTP server: where desired state comes in.

Routes (``INTERFACES.md``, "Ingest HTTP API")::

    POST /v1/changes                          native changes, JSON array or NDJSON
    POST /v1/aep                              AEP profile exports (see dbsync.ingest.aep)
    PUT  /v1/audiences/{audience_id}/members  an audience's complete membership, CSV or NDJSON
    GET  /v1/health                           200 while accepting, 503 while draining
                                              or while the store cannot write

A request goes through the same gates in the same order, each answering at once:
bearer token (401; health is open), draining (503), audience named in the path (404),
content type (415), body size (413, from ``Content-Length`` before anything is read,
else while reading), room for the body in memory (it waits, then 503 with Retry-After),
then the body is read within ``body_timeout_seconds`` (408) and decoded and validated
(400 naming the field, 404 for an audience not activated; a body whose
Content-Encoding does not decode is 400 too) before the store is called once. A request
is therefore applied whole or not at all, and 202 is answered only once the store
says the transaction committed; a :class:`~dbsync.errors.StoreError` answers 503 and
nothing of the request was applied. Group commit, many concurrent requests sharing
one transaction, happens inside the store; the server's part is never to split a
request.

What a client may hold is bounded by :mod:`dbsync.ingest.connections`: open
connections, the time to send headers, body and the next request, and the body bytes in
memory across requests. A client that goes away mid-body, or sends what is not HTTP,
is one info line, never an error with a traceback.

The activated audiences are asked for on every request, so a reload takes effect for
the next request. Each rejection is one ``ingest_rejected`` event; the counters in
:attr:`IngestServer.stats` feed the daemon's summary lines.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Collection, Sequence
from typing import Any, Literal, Protocol, overload

import msgspec
from aiohttp import web

from dbsync.clock import Clock, SystemClock
from dbsync.errors import StoreError
from dbsync.ingest.aep import AepMapping, AepMappingLike, changes_from_aep
from dbsync.ingest.bodies import (
    ChangeIn,
    Rejected,
    decode_json,
    decode_ndjson,
    snapshot_chunks,
    to_changes,
)
from dbsync.ingest.connections import (
    EVICTION_GRACE_SECONDS,
    BodyBudget,
    ConnectionLog,
    ConnectionTable,
    GuardedSite,
)
from dbsync.model import Change

__all__ = ["ChangeStore", "IngestServer", "IngestStats", "SnapshotCounts"]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BODY_BYTES_IN_FLIGHT = 128 * 1024 * 1024
# What _read reserved for a request's body, for _gate to release once it is answered.
_RESERVED = web.RequestKey("dbsync_body_bytes_reserved", int)
DEFAULT_AEP_MAPPING = AepMapping()

Media = Literal["json", "ndjson", "csv"]
_JSON: dict[str, Media] = {"application/json": "json"}
_NDJSON: dict[str, Media] = {"application/x-ndjson": "ndjson", "application/ndjson": "ndjson"}
_CSV: dict[str, Media] = {"text/csv": "csv"}

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode


class SnapshotCounts(Protocol):
    """What the store reports after judging an audience's complete membership."""

    @property
    def state(self) -> str: ...  # "applied", or "held" by the removal guard
    @property
    def reason(self) -> str: ...
    @property
    def members(self) -> int: ...
    @property
    def duplicates(self) -> int: ...
    @property
    def added(self) -> int: ...
    @property
    def removed(self) -> int: ...
    @property
    def unchanged(self) -> int: ...


# (external_id, name, domain, member, qualified_at): a staged row, as the store takes it.
SnapshotRow = tuple[str, str, str, int, float | None]


class ChangeStore(Protocol):
    """The part of :class:`~dbsync.store.Store` the server writes through."""

    @property
    def writable(self) -> bool:
        """False while the file system refuses the store's writes (a full disk)."""
        ...

    async def append_changes(self, changes: Sequence[Change]) -> int: ...

    async def apply_snapshot(
        self,
        audience_id: str,
        chunks: AsyncIterable[Sequence[SnapshotRow]],
        *,
        source: str,
        mode: str = "full",
        max_removal_percent: float | None = 20.0,
    ) -> SnapshotCounts: ...


class IngestStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters since start, for the daemon's summary lines."""

    requests: int
    changes_accepted: int
    snapshots_applied: int
    aep_profiles: int
    aep_profiles_ignored: int
    aep_audiences_ignored: int  # memberships of audiences not activated here
    rejected: dict[int, int]  # by HTTP status
    connections_refused: int = 0  # over max_connections with every one busy: 503
    connections_evicted: int = 0  # idle or slow, closed to make room for a new one
    connections_headers_late: int = 0  # closed for not sending headers in time


class IngestServer:
    """The ingest HTTP server on ``host:port``.

    :meth:`start` listens; :meth:`stop` starts the drain (new requests answer 503, those
    under way finish); :meth:`close` stops listening once the daemon has drained.
    """

    def __init__(
        self,
        store: ChangeStore,
        *,
        audiences: Callable[[], Collection[str]],
        host: str = "127.0.0.1",
        port: int = 8470,
        token: str | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        aep_mapping: AepMappingLike = DEFAULT_AEP_MAPPING,
        clock: Clock | None = None,
        header_timeout_seconds: float = 10.0,
        body_timeout_seconds: float = 120.0,
        idle_timeout_seconds: float = 30.0,
        max_connections: int = 512,
        max_body_bytes_in_flight: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
        body_wait_seconds: float = 5.0,
        eviction_grace_seconds: float = EVICTION_GRACE_SECONDS,
        max_removal_percent: Callable[[str], float] = lambda audience_id: 20.0,
    ) -> None:
        self._store = store
        self._audiences = audiences
        self._max_removal_percent = max_removal_percent
        self._host = host
        self._port = port
        if token == "":
            raise ValueError("an empty ingest token would let anyone in")
        self._token = token.encode() if token is not None else None
        self._max_body_bytes = max_body_bytes
        self._aep_mapping = aep_mapping
        self._clock = clock or SystemClock()
        self._body_timeout_seconds = body_timeout_seconds
        self._idle_timeout_seconds = idle_timeout_seconds
        self._connections = ConnectionTable(
            max_connections=max_connections,
            header_timeout_seconds=header_timeout_seconds,
            eviction_grace_seconds=eviction_grace_seconds,
        )
        self._budget = BodyBudget(max_body_bytes_in_flight)
        self._body_wait_seconds = body_wait_seconds
        self._accepting = True
        self._runner: web.AppRunner | None = None
        self._requests = 0
        self._changes_accepted = 0
        self._snapshots_applied = 0
        self._aep_profiles = 0
        self._aep_profiles_ignored = 0
        self._aep_audiences_ignored = 0
        self._rejected: Counter[int] = Counter()

        self._app = web.Application(client_max_size=max_body_bytes, middlewares=[self._gate])
        self._app.router.add_post("/v1/changes", self._post_changes)
        self._app.router.add_post("/v1/aep", self._post_aep)
        self._app.router.add_put("/v1/audiences/{audience_id}/members", self._put_members)
        self._app.router.add_get("/v1/health", self._get_health)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound address (port 0 asks for a free one)."""
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            # aiohttp closes a connection that waits this long for a request: after it
            # opened or after its last response, partial headers included.
            keepalive_timeout=self._idle_timeout_seconds,
            logger=ConnectionLog(),
        )
        await runner.setup()
        self._runner = runner
        await GuardedSite(runner, self._host, self._port, self._connections).start()
        host, port = runner.addresses[0][:2]
        log.info("ingest_listening", extra={"host": host, "port": port, "auth": bool(self._token)})
        return host, port

    def stop(self) -> None:
        """Drain: health and new requests answer 503; requests under way finish."""
        if self._accepting:
            self._accepting = False
            log.info("ingest_draining")

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def close(self) -> None:
        """Stop listening, after the requests under way have been answered."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            log.info("ingest_closed", extra={"requests": self._requests})

    @property
    def stats(self) -> IngestStats:
        return IngestStats(
            requests=self._requests,
            changes_accepted=self._changes_accepted,
            snapshots_applied=self._snapshots_applied,
            aep_profiles=self._aep_profiles,
            aep_profiles_ignored=self._aep_profiles_ignored,
            aep_audiences_ignored=self._aep_audiences_ignored,
            rejected=dict(self._rejected),
            connections_refused=self._connections.refused,
            connections_evicted=self._connections.evicted,
            connections_headers_late=self._connections.headers_late,
        )

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    @property
    def body_bytes_in_flight(self) -> int:
        """Body bytes reserved by requests under way (see BodyBudget)."""
        return self._budget.used

    @property
    def bodies_waiting(self) -> int:
        return self._budget.waiting

    # --- routes ------------------------------------------------------------------------

    async def _post_changes(self, request: web.Request) -> web.Response:
        self._admit()
        media = self._media(request, _JSON | _NDJSON)
        body = await self._read(request)
        active, now = self._active(), self._clock.time()
        if media == "ndjson":
            changes: list[Change] = []
            async for batch in decode_ndjson(body, ChangeIn):
                changes += to_changes(batch, active, now)
        else:
            changes = to_changes(decode_json(body, ChangeIn), active, now)
        await self._append(changes)
        return _accepted(_change_counts(changes))

    async def _post_aep(self, request: web.Request) -> web.Response:
        self._admit()
        self._media(request, _JSON)
        body = await self._read(request)
        if not body.strip():
            raise Rejected(400, "empty body", "body")
        try:
            document = _decode_any(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise Rejected(400, f"malformed JSON: {exc}", "body") from None
        batch = changes_from_aep(
            document, active=self._active(), mapping=self._aep_mapping, now=self._clock.time()
        )
        await self._append(batch.changes)
        self._aep_profiles += batch.profiles
        self._aep_profiles_ignored += batch.profiles_ignored
        self._aep_audiences_ignored += sum(batch.audiences_ignored.values())
        return _accepted(
            {
                **_change_counts(batch.changes),
                "profiles": batch.profiles,
                "profiles_ignored": batch.profiles_ignored,
                "audiences_ignored": batch.audiences_ignored,
            }
        )

    async def _put_members(self, request: web.Request) -> web.Response:
        self._admit()
        audience_id = request.match_info["audience_id"]
        if audience_id not in self._active():
            raise Rejected(404, f"audience {audience_id!r} is not activated", "audience_id")
        media = self._media(request, _CSV | _NDJSON | _JSON)
        bodies = [await self._read(request, in_place=True)]

        async def rows() -> AsyncIterator[list[SnapshotRow]]:
            # Parsed and staged a chunk at a time: the membership never sits whole in
            # Python, and a row refused half-way drops what was staged (400, nothing
            # applied). The body is this generator's alone, so that it is freed once read,
            # before the store judges the snapshot, not when the handler returns.
            body = bodies.pop()
            async for chunk in snapshot_chunks(body, media):
                yield [(a.external_id, a.name, a.domain, 1, None) for a in chunk]

        try:
            result = await self._store.apply_snapshot(
                audience_id,
                rows(),
                source="put",
                max_removal_percent=self._max_removal_percent(audience_id),
            )
        except StoreError as exc:
            raise _store_failed(exc) from exc
        counts: dict[str, Any] = {
            "members": result.members,
            "added": result.added,
            "removed": result.removed,
            "unchanged": result.unchanged,
            "duplicates": result.duplicates,
            "held": result.state == "held",
        }
        if result.state == "held":
            # Nothing applied: the counts are what it would change once approved.
            counts["reason"] = result.reason
            log.warning(
                "snapshot_held",
                extra={
                    "audience": audience_id,
                    "source": "put",
                    "members": result.members,
                    "removed": result.removed,
                    "reason": result.reason,
                },
            )
        else:
            self._snapshots_applied += 1
        return _accepted(counts)

    async def _get_health(self, request: web.Request) -> web.Response:
        if not self._accepting:
            return _json(503, {"status": "draining"})
        if not self._store.writable:
            # Requests still try (each commit is a probe of the disk) and get 503 while
            # it is full; health says so to whoever routes the CDP's traffic.
            return _json(503, {"status": "store_unwritable"})
        return _json(200, {"status": "accepting"})

    # --- gates -------------------------------------------------------------------------

    @web.middleware
    async def _gate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self._requests += 1
        started = self._clock.monotonic()
        guard = self._connections.request_started(request.transport)
        try:
            if self._token is not None and request.path != "/v1/health":
                self._authorize(request)
            response = await handler(request)
        except Rejected as rejection:
            refusal = self._refuse(request, rejection)
            if rejection.status == 408:
                # aiohttp would linger reading the rest of a slow body for up to 10 s:
                # answer now and close, so that the descriptor is free at once.
                await refusal.prepare(request)
                await refusal.write_eof()
                if request.protocol is not None:
                    request.protocol.force_close()
            return refusal
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
            # The router's refusals get the same JSON body as ours.
            field = "path" if exc.status == 404 else "method"
            return self._refuse(request, Rejected(exc.status, exc.reason.lower(), field))
        finally:
            # The body and what was decoded from it are gone once the handler returns.
            self._budget.release(request.get(_RESERVED, 0))
            if guard is not None:
                guard.request_ended()
        log.debug(
            "ingest_answered",
            extra={
                "route": _route(request),
                "status": response.status,
                "seconds": round(self._clock.monotonic() - started, 6),
            },
        )
        return response

    def _authorize(self, request: web.Request) -> None:
        assert self._token is not None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken must not tell how much of the token matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), self._token
        ):
            raise Rejected(401, "a valid bearer token is required", "Authorization")

    def _admit(self) -> None:
        if not self._accepting:
            raise Rejected(503, "draining: not accepting changes")

    def _media(self, request: web.Request, accepted: dict[str, Media]) -> Media:
        media = accepted.get(request.content_type)
        if media is None:
            raise Rejected(
                415,
                f"content type {request.content_type!r} is not one of {', '.join(accepted)}",
                "Content-Type",
            )
        return media

    @overload
    async def _read(self, request: web.Request, *, in_place: Literal[False] = False) -> bytes: ...

    @overload
    async def _read(self, request: web.Request, *, in_place: Literal[True]) -> bytearray: ...

    async def _read(self, request: web.Request, *, in_place: bool = False) -> bytes | bytearray:
        """The request's body, within the limits. ``in_place``: gathered in one buffer
        rather than as aiohttp does it (its chunks, then a copy of them joined), so that
        a large snapshot is held once, not twice, at its peak."""
        length = request.content_length
        if length is not None and length > self._max_body_bytes:
            raise Rejected(
                413, f"{length} bytes exceed the limit of {self._max_body_bytes}", "body"
            )
        # Room in memory first: the declared size, or the most a body without one may be.
        reserved = await self._budget.reserve(
            length if length is not None else self._max_body_bytes, self._body_wait_seconds
        )
        if reserved is None:
            raise Rejected(
                503,
                "too many request bodies in memory at once; retry shortly",
                "body",
                retry_after_seconds=max(1, math.ceil(self._body_wait_seconds)),
            )
        request[_RESERVED] = reserved
        try:
            async with asyncio.timeout(self._body_timeout_seconds):
                if not in_place:
                    return await request.read()
                body = bytearray()
                async for chunk in request.content.iter_any():
                    body += chunk
                    if len(body) > self._max_body_bytes:
                        raise web.HTTPRequestEntityTooLarge(
                            max_size=self._max_body_bytes, actual_size=len(body)
                        )
                return body
        except web.HTTPRequestEntityTooLarge:  # a chunked body, past client_max_size
            raise Rejected(
                413, f"the body exceeds the limit of {self._max_body_bytes} bytes", "body"
            ) from None
        except TimeoutError:
            raise Rejected(
                408, f"the body did not arrive within {self._body_timeout_seconds:g} s", "body"
            ) from None
        except web.RequestPayloadError as exc:
            # A Content-Encoding that does not decode, or a malformed chunked body.
            raise Rejected(400, f"the body cannot be read: {exc}", "body") from None
        except ConnectionError:
            # The client went away mid-body; nobody reads the answer, the log line counts.
            raise Rejected(
                400, "the client closed the connection before its body ended", "body"
            ) from None

    def _active(self) -> frozenset[str]:
        return frozenset(self._audiences())

    async def _append(self, changes: list[Change]) -> None:
        if changes:
            try:
                await self._store.append_changes(changes)
            except StoreError as exc:
                raise _store_failed(exc) from exc
        self._changes_accepted += len(changes)

    def _refuse(self, request: web.Request, rejection: Rejected) -> web.Response:
        self._rejected[rejection.status] += 1
        log.log(
            logging.WARNING if rejection.status >= 500 else logging.INFO,
            "ingest_rejected",
            extra={
                "route": _route(request),
                "status": rejection.status,
                "field": rejection.field,
                "error": rejection.error,
            },
        )
        response = _json(rejection.status, {"error": rejection.error, "field": rejection.field})
        if rejection.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="dbsync ingest"'
        if rejection.retry_after_seconds is not None:
            response.headers["Retry-After"] = str(rejection.retry_after_seconds)
        return response


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unknown"


def _store_failed(exc: StoreError) -> Rejected:
    log.error("ingest_commit_failed", extra={"error": str(exc)})
    return Rejected(503, "the store could not commit; nothing of this request was applied")


def _change_counts(changes: list[Change]) -> dict[str, Any]:
    joins = sum(1 for change in changes if change.member)
    return {"accepted": len(changes), "joins": joins, "leaves": len(changes) - joins}


def _accepted(counts: dict[str, Any]) -> web.Response:
    return _json(202, counts)


def _json(status: int, document: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=_encode(document), content_type="application/json")

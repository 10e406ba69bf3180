"""What ingest holds for its clients, bounded: connections, their time, and body bytes.

aiohttp's server closes a connection only when it waits for a request longer than its
``keepalive_timeout``; it counts no connections and reads any number of bodies at once.
Three pieces close the gaps, each with one job:

:class:`ConnectionGuard`
    the protocol the listening socket creates for each connection, in front of
    aiohttp's own (it forwards every call). It keeps the :class:`ConnectionTable`'s
    count and closes a connection whose first request's headers are not in within
    the header timeout. aiohttp's ``keepalive_timeout`` (the idle timeout) bounds the
    time between requests, partial headers included; the body timeout is the route's
    (:meth:`~dbsync.ingest.server.IngestServer` reads under a deadline).

:class:`ConnectionTable`
    every open connection, oldest first, and whether a request is under way on it. At
    ``max_connections`` a new connection closes the oldest one that has no request
    under way (idle, or still trickling headers) and has been open longer than
    :data:`EVICTION_GRACE_SECONDS`: a client with a real request gets in while slow
    ones hold every slot, which a plain refusal would not allow, and the grace keeps a
    flood of new connections from evicting it before its headers are read. When no
    connection can go, the new one is answered 503 and closed at once. The
    first refusal of an episode is logged (``ingest_connections_full``), and its end.

:class:`BodyBudget`
    the body bytes held in memory across requests. A request reserves its
    ``Content-Length`` before its body is read and frees it once answered; when there
    is no room it waits, in arrival order, up to ``body_wait_seconds``, then gets 503
    with Retry-After. The reservation is the declared size, which is what the body will
    cost, not what has arrived: a client cannot get past the bound by sending slowly.

:class:`ConnectionLog` takes what aiohttp's request handler logs. A client that sends
a malformed request or goes away is the client's fault, not an error of the daemon:
one ``ingest_bad_request`` info line, without a traceback. Anything else stays an error
with its traceback (``ingest_request_failed``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

__all__ = ["BodyBudget", "ConnectionGuard", "ConnectionLog", "ConnectionTable", "GuardedSite"]

log = logging.getLogger("dbsync.ingest.server")

# Answered to a connection over max_connections when every open one is busy; written
# before the request is read, so it names no route.
_FULL_BODY = b'{"error":"too many open connections; retry shortly","field":"connection"}'
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n"
) % len(_FULL_BODY) + _FULL_BODY


EVICTION_GRACE_SECONDS = 1.0
"""A new connection cannot be evicted for this long: time enough to send headers on any
sane link, too short for a flood to keep every slot for itself."""


class ConnectionTable:
    """Open ingest connections, oldest first; see the module docstring for the policy."""

    def __init__(
        self,
        *,
        max_connections: int,
        header_timeout_seconds: float,
        eviction_grace_seconds: float = EVICTION_GRACE_SECONDS,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout_seconds = header_timeout_seconds
        self.eviction_grace_seconds = eviction_grace_seconds
        self._open: dict[ConnectionGuard, None] = {}  # insertion order: oldest first
        self._by_transport: dict[asyncio.BaseTransport, ConnectionGuard] = {}
        self._full = False
        self.refused = 0
        self.evicted = 0
        self.headers_late = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, guard: ConnectionGuard, transport: asyncio.BaseTransport) -> bool:
        """Count ``guard`` in, making room if needed; False when it must be refused."""
        if len(self._open) >= self.max_connections and not self._evict_one():
            self.refused += 1
            if not self._full:
                self._full = True
                log.warning(
                    "ingest_connections_full",
                    extra={"max_connections": self.max_connections, "open": len(self._open)},
                )
            return False
        self._open[guard] = None
        self._by_transport[transport] = guard
        return True

    def _evict_one(self) -> bool:
        opened_before = asyncio.get_running_loop().time() - self.eviction_grace_seconds
        for guard in self._open:
            if guard.opened_at > opened_before:
                break  # the rest are younger still
            if not guard.busy:
                self._forget(guard)
                guard.close()
                self.evicted += 1
                return True
        return False

    def _forget(self, guard: ConnectionGuard) -> None:
        self._open.pop(guard, None)
        if guard.transport is not None:
            self._by_transport.pop(guard.transport, None)

    def closed(self, guard: ConnectionGuard) -> None:
        self._forget(guard)
        if self._full and len(self._open) < self.max_connections:
            self._full = False
            log.info(
                "ingest_connections_available",
                extra={"refused": self.refused, "evicted": self.evicted},
            )

    def request_started(self, transport: asyncio.BaseTransport | None) -> ConnectionGuard | None:
        """A request's headers are in (the gate calls this); its guard, if it has one."""
        guard = self._by_transport.get(transport) if transport is not None else None
        if guard is not None:
            guard.request_started()
        return guard


class ConnectionGuard(asyncio.Protocol):
    """One ingest connection: counted, its first headers timed, the rest aiohttp's.

    The aiohttp handler is made only once the connection is admitted, so a refused
    connection costs no task and no parser.
    """

    def __init__(
        self, table: ConnectionTable, handler_factory: Callable[[], asyncio.Protocol]
    ) -> None:
        self._table = table
        self._factory = handler_factory
        self._handler: asyncio.Protocol | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.BaseTransport | None = None
        self.opened_at = 0.0  # loop time
        self.busy = 0  # requests under way
        self._started = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.opened_at = asyncio.get_running_loop().time()
        if not self._table.admit(self, transport):
            # A stream transport (uvloop's is not an asyncio.WriteTransport subclass).
            cast(asyncio.Transport, transport).write(_FULL)
            transport.close()
            return
        self._timer = asyncio.get_running_loop().call_later(
            self._table.header_timeout_seconds, self._headers_late
        )
        self._handler = self._factory()
        self._handler.connection_made(transport)

    def _headers_late(self) -> None:
        self._timer = None
        if not self._started:
            self._table.headers_late += 1
            log.debug("ingest_headers_late", extra={"seconds": self._table.header_timeout_seconds})
            self.close()

    def request_started(self) -> None:
        self._started = True
        self.busy += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_ended(self) -> None:
        self.busy -= 1

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._handler is not None:
            self._table.closed(self)
            self._handler.connection_lost(exc)
            self._handler = None

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        return self._handler.eof_received() if self._handler is not None else None

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard` each."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, table: ConnectionTable):
        super().__init__(runner)
        self._host = host
        self._port = port
        self._table = table

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        handlers = self._runner.server
        assert handlers is not None
        table = self._table
        self._server = await asyncio.get_running_loop().create_server(
            lambda: ConnectionGuard(table, handlers),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


class BodyBudget:
    """Body bytes in memory across requests, at most ``limit``; waiters in arrival order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def reserve(self, size: int, wait_seconds: float) -> int | None:
        """Reserve ``size`` bytes (at most the whole limit); the amount, or None if refused."""
        size = min(size, self.limit)
        if not self._waiters and self.used + size <= self.limit:
            self.used += size
            return size
        if wait_seconds <= 0:
            return None
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(wait_seconds):
                await granted
        except TimeoutError:
            # release() may have granted it just as the deadline passed: then it holds.
            if not (granted.done() and not granted.cancelled()):
                return None
        except BaseException:
            if granted.done() and not granted.cancelled():
                self.release(size)  # granted, then cancelled: give it back
            raise
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)
        return size

    def release(self, size: int) -> None:
        self.used -= size
        # Grant in arrival order while the first waiter fits: a large body that waits is
        # not overtaken for ever by small ones.
        while self._waiters and self.used + self._waiters[0][0] <= self.limit:
            size_next, granted = self._waiters.pop(0)
            if granted.done():  # timed out or cancelled meanwhile
                continue
            self.used += size_next
            granted.set_result(None)


class ConnectionLog(logging.Logger):
    """The logger handed to aiohttp's request handler (its ``logger`` argument)."""

    def __init__(self) -> None:
        super().__init__("aiohttp.server")

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._client_or_error(kwargs.get("exc_info", True), error_level=True)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        # aiohttp logs non-HTTP bytes on a new connection at debug: a client's fault too.
        self._client_or_error(kwargs.get("exc_info"), error_level=False)

    def _client_or_error(self, exc_info: object, *, error_level: bool) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else None
        if error is None and exc_info is True:
            error = sys.exc_info()[1]
        # RequestPayloadError: a body that does not decode, met while aiohttp drains
        # what a refused request left unread.
        if isinstance(error, HttpProcessingError | ConnectionError | RequestPayloadError):
            log.info("ingest_bad_request", extra={"error": _describe(error)})
        elif error_level:
            log.error(
                "ingest_request_failed",
                exc_info=error or True,
                extra={"error": _describe(error) if error else ""},
            )


def _describe(error: BaseException) -> str:
    """The class and aiohttp's message, without the echoed request line or headers."""
    if isinstance(error, HttpProcessingError):
        return f"{type(error).__name__}: {error.message}"[:200]
    if isinstance(error, RequestPayloadError) and error.args:
        return f"{type(error).__name__}: {error.args[0]}"[:200]
    return f"{type(error).__name__}: {error}"[:200]

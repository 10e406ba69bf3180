"""What a client may hold of the ingest server, and what it may make it log.

Raw sockets play the clients aiohttp's own client would never be: one that trickles
headers, stops mid-body, idles, sends garbage or a body that does not decode. Every
wait is for a condition (the server closing the socket, a counter moving), bounded by
the test timeout; no test asserts how long anything took.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest

from dbsync.clock import FakeClock
from dbsync.ingest import IngestServer
from tests.unit.test_ingest_server import FakeStore

NOW = 1_800_000_000.0
NDJSON = {"Content-Type": "application/x-ndjson"}
CHANGE = msgspec.json.encode(
    {
        "audience_id": "aud-1",
        "account": {"external_id": "001A", "name": "Acme", "domain": "acme.com"},
        "member": True,
    }
)

Serve = Callable[..., Awaitable[IngestServer]]
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
async def serve(store: FakeStore) -> AsyncIterator[Serve]:
    servers: list[IngestServer] = []

    async def start(**options: Any) -> IngestServer:
        server = IngestServer(
            store, audiences=lambda: {"aud-1"}, port=0, clock=FakeClock(NOW), **options
        )
        server.address = await server.start()  # type: ignore[attr-defined]
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def streams() -> AsyncIterator[list[Stream]]:
    opened: list[Stream] = []
    yield opened
    for _, writer in opened:
        writer.close()


async def connect(server: IngestServer, streams: list[Stream]) -> Stream:
    host, port = server.address  # type: ignore[attr-defined]
    stream = await asyncio.open_connection(host, port)
    streams.append(stream)
    return stream


def head(length: int, path: str = "/v1/changes") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-ndjson\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server still sends, until it closes the connection."""
    return await reader.read()


def url(server: IngestServer) -> str:
    host, port = server.address  # type: ignore[attr-defined]
    return f"http://{host}:{port}"


# --- timeouts ----------------------------------------------------------------------------


async def test_headers_not_finished_in_time_close_the_connection(
    serve: Serve, streams: list[Stream]
) -> None:
    server = await serve(header_timeout_seconds=0.2)
    reader, writer = await connect(server, streams)
    writer.write(b"POST /v1/changes HTTP/1.1\r\nHost: x\r\n")  # and never the blank line

    assert await closed_by_server(reader) == b""
    assert server.stats.connections_headers_late == 1
    await until(lambda: server.open_connections == 0)


async def test_an_idle_keep_alive_connection_is_closed(serve: Serve, streams: list[Stream]) -> None:
    server = await serve(idle_timeout_seconds=0.2)
    reader, writer = await connect(server, streams)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")

    answer = await closed_by_server(reader)

    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"accepting"' in answer  # answered, kept alive, then closed once idle


async def test_a_body_not_finished_in_time_is_408_and_the_connection_closes(
    serve: Serve, streams: list[Stream], store: FakeStore
) -> None:
    server = await serve(body_timeout_seconds=1)
    reader, writer = await connect(server, streams)
    writer.write(head(len(CHANGE)) + CHANGE[:10])

    answer = await closed_by_server(reader)

    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"field":"body"' in answer
    assert store.appended == []


# --- the connection cap ------------------------------------------------------------------


async def test_at_the_cap_a_new_connection_closes_the_oldest_idle_one(
    serve: Serve, streams: list[Stream], http: aiohttp.ClientSession
) -> None:
    server = await serve(max_connections=2, eviction_grace_seconds=0)
    slow = [await connect(server, streams) for _ in range(2)]
    for _, writer in slow:
        writer.write(b"GET /v1/health HTTP/1.1\r\n")  # headers started, never finished
    await until(lambda: server.open_connections == 2)

    async with http.get(f"{url(server)}/v1/health") as response:
        assert response.status == 200

    assert await closed_by_server(slow[0][0]) == b""  # the oldest made room
    assert server.stats.connections_evicted >= 1
    assert server.stats.connections_refused == 0


async def test_a_connection_in_its_grace_period_is_not_evicted(
    serve: Serve, streams: list[Stream]
) -> None:
    server = await serve(max_connections=1, eviction_grace_seconds=3600)
    young_reader, young = await connect(server, streams)
    young.write(b"GET /v1/health HTTP/1.1\r\n")
    await until(lambda: server.open_connections == 1)

    reader, writer = await connect(server, streams)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")

    assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 503")
    young.write(b"Host: x\r\n\r\n")  # the young one was kept, and is answered
    assert (await young_reader.readline()).startswith(b"HTTP/1.1 200")


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(
    serve: Serve, streams: list[Stream], store: FakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(max_connections=2)
    busy = [await connect(server, streams) for _ in range(2)]
    for _, writer in busy:
        writer.write(head(len(CHANGE)) + CHANGE[:5])  # a request under way on each
    await until(lambda: server.body_bytes_in_flight == 2 * len(CHANGE))

    reader, writer = await connect(server, streams)
    writer.write(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await closed_by_server(reader)

    assert answer.startswith(b"HTTP/1.1 503")
    assert b"Retry-After: 1" in answer
    assert server.stats.connections_refused == 1
    for reader, writer in busy:  # the busy ones were left alone and finish
        writer.write(CHANGE[5:])
        assert (await reader.readline()).startswith(b"HTTP/1.1 202")
    assert len(store.appended) == 2
    events = [r.message for r in caplog.records if r.name == "dbsync.ingest.server"]
    assert events.count("ingest_connections_full") == 1


# --- bytes in memory ---------------------------------------------------------------------


async def test_a_body_without_room_in_memory_gets_503_and_nothing_is_stored(
    serve: Serve, streams: list[Stream], store: FakeStore, http: aiohttp.ClientSession
) -> None:
    server = await serve(max_body_bytes_in_flight=len(CHANGE), body_wait_seconds=0)
    reader, writer = await connect(server, streams)
    writer.write(head(len(CHANGE)) + CHANGE[:5])  # the first body holds all the room
    await until(lambda: server.body_bytes_in_flight == len(CHANGE))

    async with http.post(f"{url(server)}/v1/changes", data=CHANGE, headers=NDJSON) as second:
        assert second.status == 503
        assert second.headers["Retry-After"] == "1"
        assert (await second.json())["field"] == "body"
    assert store.appended == []

    writer.write(CHANGE[5:])
    assert (await reader.readline()).startswith(b"HTTP/1.1 202")
    assert len(store.appended) == 1
    await until(lambda: server.body_bytes_in_flight == 0)


async def test_a_body_waits_for_room_and_goes_in_after_the_one_before(
    serve: Serve, streams: list[Stream], store: FakeStore, http: aiohttp.ClientSession
) -> None:
    server = await serve(max_body_bytes_in_flight=len(CHANGE), body_wait_seconds=60)
    reader, writer = await connect(server, streams)
    writer.write(head(len(CHANGE)) + CHANGE[:5])
    await until(lambda: server.body_bytes_in_flight == len(CHANGE))
    other = CHANGE.replace(b"001A", b"002B")

    async def send_second() -> int:
        async with http.post(f"{url(server)}/v1/changes", data=other, headers=NDJSON) as answer:
            return answer.status

    second = asyncio.create_task(send_second())
    await until(lambda: server.bodies_waiting == 1)
    assert store.appended == []  # it waits, unread
    writer.write(CHANGE[5:])

    assert (await reader.readline()).startswith(b"HTTP/1.1 202")
    assert await second == 202
    assert [c.account.external_id for batch in store.appended for c in batch] == ["001A", "002B"]


# --- bodies that used to get 500 ---------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_content_encoding_that_does_not_decode_is_400(
    serve: Serve, http: aiohttp.ClientSession, store: FakeStore, encoding: str
) -> None:
    server = await serve()
    broken = b"this was never compressed: " + CHANGE

    headers = {**NDJSON, "Content-Encoding": encoding}
    async with http.post(f"{url(server)}/v1/changes", data=broken, headers=headers) as answer:
        assert answer.status == 400
        refusal = await answer.json()

    assert refusal["field"] == "body"
    assert "content-encoding" in refusal["error"].lower()
    assert store.appended == []


async def test_a_valid_gzip_body_is_accepted(
    serve: Serve, http: aiohttp.ClientSession, store: FakeStore
) -> None:
    server = await serve()
    headers = {**NDJSON, "Content-Encoding": "gzip"}

    async with http.post(
        f"{url(server)}/v1/changes", data=gzip.compress(CHANGE), headers=headers
    ) as answer:
        assert answer.status == 202
    assert len(store.appended) == 1


# --- what clients make the server log ----------------------------------------------------


def client_noise(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records at warning or above, or carrying a traceback: none is the client's due."""
    return [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_a_client_gone_mid_body_is_one_info_line_without_traceback(
    serve: Serve, streams: list[Stream], caplog: pytest.LogCaptureFixture, store: FakeStore
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await serve()
    caplog.clear()
    _, writer = await connect(server, streams)
    writer.write(head(1000) + CHANGE[:10])
    await until(lambda: server.body_bytes_in_flight == 1000)

    writer.close()
    await until(lambda: server.stats.rejected.get(400) == 1)
    await until(lambda: server.open_connections == 0)

    assert client_noise(caplog) == []
    lines = [r for r in caplog.records if r.levelno == logging.INFO and "ingest_" in r.message]
    assert [r.message for r in lines] == ["ingest_rejected"]
    assert "closed the connection" in lines[0].__dict__["error"]
    assert store.appended == []


@pytest.mark.parametrize(
    "garbage",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/health HTTP/9.9\r\n\r\n",
        b"POST /v1/changes HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain port
    ],
)
async def test_a_malformed_request_is_one_info_line_without_traceback(
    serve: Serve, streams: list[Stream], caplog: pytest.LogCaptureFixture, garbage: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    server = await serve()
    caplog.clear()
    reader, writer = await connect(server, streams)
    writer.write(garbage)

    answer = await closed_by_server(reader)

    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    assert client_noise(caplog) == []
    events = [r.message for r in caplog.records if r.levelno == logging.INFO]
    assert events == ["ingest_bad_request"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_a_refused_request_with_a_body_that_does_not_decode_logs_no_error(
    serve: Serve, streams: list[Stream], caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp drains what a refused request left unread; a body that does not decode
    fails there, outside our handler: still the client's fault, one info line."""
    caplog.set_level(logging.DEBUG)
    server = await serve()
    caplog.clear()
    reader, writer = await connect(server, streams)
    broken = b"\x1f\x8b not gzip at all " * 4
    writer.write(
        b"POST /v1/changes HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
        b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(broken), broken)
    )

    assert (await reader.readline()).startswith(b"HTTP/1.1 415")
    await until(lambda: server.open_connections == 0)
    assert client_noise(caplog) == []

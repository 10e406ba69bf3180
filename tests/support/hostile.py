"""A hostile Demandbase on loopback: every way an HTTP exchange can go wrong, on demand.

A raw asyncio server rather than aiohttp's, so that it can answer what no well-behaved
server would: a same-origin redirect loop, a body cut short, a gzip body that is not
gzip, an answer that never comes, and a plain-HTTP answer to a TLS handshake. It keeps
the Authorization headers it was sent, so that a test can prove the token went out
before it searches for it everywhere it must not be.

Each request gets the answer of ``modes[n % len(modes)]``, n counting requests; a
request that followed the loop's Location meets the loop again, and is not counted.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator, Sequence

# The query a redirect's Location carries: a signature that must never be shown.
SIGNATURE = "X-Amz-Signature=sig-5b1e7c-never-print-me"

MODES = ("loop", "redirect", "truncated", "bad_encoding", "silent")

_ANSWERS = {
    # Same origin, so that a client that followed it would send the token again.
    "loop": (
        b"HTTP/1.1 302 Found\r\nLocation: /import/v1/job?" + SIGNATURE.encode() + b"\r\n"
        b"Connection: close\r\nContent-Length: 0\r\n\r\n"
    ),
    "redirect": (
        b"HTTP/1.1 307 Temporary Redirect\r\n"
        b"Location: https://elsewhere.example/import/v1/job?" + SIGNATURE.encode() + b"\r\n"
        b"Connection: close\r\nContent-Length: 0\r\n\r\n"
    ),
    "truncated": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        b'{"id": 1, "dataImport'
    ),
    "bad_encoding": (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 16\r\n\r\nthis is not gzip"
    ),
}


class HostileDemandbase:
    """The server's state: what it answers, and what it was sent."""

    def __init__(self, modes: Sequence[str]) -> None:
        self.modes = tuple(modes)
        self.requests = 0
        self.answered: collections.Counter[str] = collections.Counter()
        self.authorizations: list[str] = []
        self.tls_handshakes = 0
        self.followed = 0  # requests to a Location this server gave
        self.port = 0
        self._silent: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def tls_url(self) -> str:
        """https:// to this plain-HTTP port: every request fails its TLS handshake."""
        return f"https://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.read(1)
            if first == b"\x16":  # a TLS ClientHello: answer in plain HTTP
                self.tls_handshakes += 1
                writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            head = first + await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"authorization":
                    self.authorizations.append(value.strip().decode())
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if SIGNATURE.encode() in head.split(b"\r\n", 1)[0]:
                self.followed += 1
                mode = "loop"  # a client that followed the loop meets it again
            else:
                mode = self.modes[self.requests % len(self.modes)]
                self.requests += 1
            self.answered[mode] += 1
            if mode == "silent":
                # Never answer; the client's timeout ends the exchange.
                self._silent.append(writer)
                await reader.read()
                return
            writer.write(_ANSWERS[mode])
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def hostile_demandbase(modes: Sequence[str] = MODES) -> AsyncIterator[HostileDemandbase]:
    """The hostile server on an ephemeral loopback port, answering ``modes`` in turn."""
    hostile = HostileDemandbase(modes)
    server = await asyncio.start_server(hostile._serve, "127.0.0.1", 0)
    hostile.port = server.sockets[0].getsockname()[1]
    try:
        yield hostile
    finally:
        server.close()
        for writer in hostile._silent:
            writer.close()
        await server.wait_closed()


@contextlib.contextmanager
def unanswered_port() -> Iterator[str]:
    """A loopback URL whose connections are never accepted: a connect that times out.

    A listening socket with a backlog of zero whose queue is already full: the kernel
    drops further SYNs, so a connect waits until the client's own timeout.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        yield f"http://127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()

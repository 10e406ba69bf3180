"""Fuzzing every ingest route: never a 5xx, never a crash, nothing stored from a refusal.

A real :class:`~dbsync.ingest.IngestServer` on a loopback socket writes through a real
:class:`~dbsync.store.Store` on a temporary file. Hypothesis sends ``POST /v1/changes``,
``POST /v1/aep`` and ``PUT /v1/audiences/{id}/members`` random bodies: raw bytes,
JSON-ish documents built from the fields the routes know (so that many get past the
parser and meet the validation), NDJSON, CSV, under random and right content types.
Each answer must be 202 or a 4xx; after a 4xx the store must not have committed a
transaction (its counter, the journal and the desired members are as before); and the
server must still answer health with 200.

The event loop is one :class:`asyncio.Runner` for the whole test: the server and the
store live across examples, as they do in the daemon, and each example is one
``runner.run``. Examples: the ``short`` profile in the default run, ``long`` with
``HYPOTHESIS_PROFILE=long`` (tests/reliability/profiles.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gzip
import io
import json
import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbsync.clock import SystemClock
from dbsync.demandbase.wire import IMPORT_COLUMNS
from dbsync.ingest import IngestServer
from dbsync.store import AudienceSpec, Store
from tests.reliability.profiles import FUZZ_TIMEOUT_SECONDS

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(FUZZ_TIMEOUT_SECONDS)]

ACTIVE = ("fuzz-a", "fuzz-b")
AUDIENCE_IDS = st.sampled_from([*ACTIVE, "not-activated", "", "fuzz-a ", "ümlaut/x"])
CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/x-ndjson",
        "application/ndjson",
        "text/csv",
        "application/json; charset=utf-8",
        "text/csv; charset=latin-1",
        "text/plain",
        "application/octet-stream",
        "multipart/form-data; boundary=x",
        "",
        "application/json;;;",
    ]
)
# Field names the routes read, and a few they do not: most objects get past the parser.
KEYS = st.sampled_from(
    [
        "audience_id",
        "account",
        "member",
        "ts",
        "external_id",
        "name",
        "domain",
        "profiles",
        "segmentMembership",
        "ups",
        "status",
        "lastQualificationTime",
        "identityMap",
        "accountName",
        "accountOrganization",
        "accountKey",
        "sourceKey",
        "attributes",
        "value",
        *ACTIVE,
    ]
) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(
        [*ACTIVE, "realized", "exited", "existing", "2025-03-01T10:00:00Z", "ACC-0000001", ""]
    )
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
ACCOUNT = st.fixed_dictionaries(
    {
        "external_id": st.text(max_size=300) | st.sampled_from(["ACC-1", "ACC-2", " "]),
        "name": st.text(max_size=20),
        "domain": st.text(max_size=20),
    }
)
CHANGE = st.fixed_dictionaries(
    {"audience_id": AUDIENCE_IDS, "account": ACCOUNT | JSONISH, "member": st.booleans() | SCALARS},
    optional={
        "ts": st.floats() | st.integers() | st.text(max_size=30) | st.none(),
        "extra": JSONISH,
    },
)
AEP_PROFILE = st.fixed_dictionaries(
    {
        "segmentMembership": st.fixed_dictionaries(
            {
                "ups": st.dictionaries(
                    AUDIENCE_IDS,
                    st.fixed_dictionaries(
                        {"status": st.sampled_from(["realized", "exited", "existing", "x"])},
                        optional={"lastQualificationTime": SCALARS},
                    )
                    | JSONISH,
                    max_size=3,
                )
            }
        )
        | JSONISH,
    },
    optional={
        "identityMap": JSONISH,
        "accountName": SCALARS,
        "accountOrganization": st.fixed_dictionaries({"domain": SCALARS}) | JSONISH,
        "accountKey": st.fixed_dictionaries({"sourceKey": SCALARS}) | JSONISH,
        "attributes": JSONISH,
    },
)
OBJECTS = CHANGE | ACCOUNT | AEP_PROFILE | JSONISH


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()  # NaN and Infinity included: not JSON, as a CDP may send


@st.composite
def ndjson(draw: st.DrawFn) -> bytes:
    lines = [_json(o) for o in draw(st.lists(OBJECTS, max_size=6))]
    lines += draw(st.lists(st.sampled_from([b"", b"  ", b"{", b"[]", b"{},{}"]), max_size=2))
    draw(st.randoms()).shuffle(lines)
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


@st.composite
def csv_body(draw: st.DrawFn) -> bytes:
    header = draw(
        st.lists(st.sampled_from(IMPORT_COLUMNS) | st.text(max_size=6), min_size=0, max_size=4)
    )
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    for row in draw(st.lists(st.lists(st.text(max_size=12), max_size=5), max_size=6)):
        writer.writerow(row)
    text = out.getvalue()
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text.encode(draw(st.sampled_from(["utf-8", "utf-16"])), errors="replace")


BODIES = (
    st.binary(max_size=200)
    | JSONISH.map(_json)
    | st.lists(OBJECTS, max_size=6).map(_json)
    | OBJECTS.map(_json)
    | st.fixed_dictionaries({"profiles": st.lists(AEP_PROFILE, max_size=3)}).map(_json)
    | ndjson()
    | csv_body()
)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    content_type: str
    body: bytes


JSON_BODIES = (
    JSONISH.map(_json)
    | st.lists(OBJECTS, max_size=6).map(_json)
    | OBJECTS.map(_json)
    | st.fixed_dictionaries({"profiles": st.lists(AEP_PROFILE, max_size=3)}).map(_json)
)
# The content types each route takes, and the bodies that may pass under each.
ROUTES = {
    ("POST", "/v1/changes"): {
        "application/json": JSON_BODIES,
        "application/x-ndjson": ndjson(),
        "application/ndjson": ndjson(),
    },
    ("POST", "/v1/aep"): {"application/json": JSON_BODIES},
    ("PUT", "/v1/audiences/{}/members"): {
        "text/csv": csv_body(),
        "application/x-ndjson": ndjson(),
        "application/json": JSON_BODIES,
    },
}


@st.composite
def requests(draw: st.DrawFn) -> Request:
    """Three in four under a content type the route takes, with a body made for it."""
    method, path = route = draw(st.sampled_from(list(ROUTES)))
    if "{}" in path:
        audience = st.sampled_from(ACTIVE) | st.sampled_from(["not-activated", "%20", "a%2Fb"])
        path = path.format(draw(audience))
    if draw(st.integers(0, 3)):
        content_type = draw(st.sampled_from(list(ROUTES[route])))
        body = draw(ROUTES[route][content_type] | st.binary(max_size=100))
    else:
        content_type, body = draw(CONTENT_TYPES), draw(BODIES)
    return Request(method, path, content_type, body)


@dataclass(frozen=True)
class Stored:
    """What the store holds: a refused request must leave all of it as it was."""

    transactions: int
    journal_rows: int
    desired: tuple[frozenset[str], ...]


class Harness:
    def __init__(self, store: Store, server: IngestServer, url: str, http: aiohttp.ClientSession):
        self.store, self.server, self.url, self.http = store, server, url, http
        self.answers: dict[int, int] = {}

    async def stored(self) -> Stored:
        desired = [frozenset(await self.store.desired_members(a)) for a in ACTIVE]
        return Stored(self.store.transactions, await self.store.pending_journal_rows(), (*desired,))

    async def check(self, request: Request) -> None:
        before = await self.stored()
        headers = {"Content-Type": request.content_type} if request.content_type else {}
        async with self.http.request(
            request.method, self.url + request.path, data=request.body, headers=headers
        ) as response:
            status = response.status
            answer = await response.read()
        self.answers[status] = self.answers.get(status, 0) + 1
        assert status == 202 or 400 <= status < 500, (status, answer)
        if status != 202:
            assert await self.stored() == before, (status, answer)
        async with self.http.get(self.url + "/v1/health") as health:
            assert health.status == 200


@contextlib.asynccontextmanager
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    async with contextlib.AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            Store.open(tmp_path / "fuzz.sqlite3", clock=SystemClock())
        )
        await store.sync_audiences(
            [AudienceSpec(audience_id=a, destination="d", name=a, list_name=a) for a in ACTIVE]
        )
        server = IngestServer(store, audiences=lambda: ACTIVE, port=0, max_body_bytes=64 * 1024)
        host, port = await server.start()
        stack.push_async_callback(server.close)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield Harness(store, server, f"http://{host}:{port}", http)


def test_no_ingest_request_gets_a_5xx_or_leaves_a_refusal_stored(tmp_path: Path) -> None:
    """Random requests to the three routes (see the module docstring).
    Result: every answer is 202 or a 4xx, a 4xx committed nothing, health stays 200;
    and the examples reached both outcomes (the generator is not all noise)."""
    with asyncio.Runner() as runner:
        manager = harness(tmp_path)
        fuzz = runner.run(manager.__aenter__())
        try:

            @given(request=requests())
            def one(request: Request) -> None:
                runner.run(fuzz.check(request))

            one()
        finally:
            runner.run(manager.__aexit__(None, None, None))
        print(f"answers by status: {dict(sorted(fuzz.answers.items()))}")
        assert 202 in fuzz.answers, fuzz.answers
        assert any(400 <= status < 500 for status in fuzz.answers), fuzz.answers


# --- the transport: line endings, content encodings, truncated bodies ----------------------


@dataclass(frozen=True)
class Framed:
    """A request as bytes on the wire, and whether the client hangs up mid-body."""

    request: Request
    line_ending: bytes
    encoding: str
    truncate_at: int | None  # body bytes sent before hanging up; None: all of them

    def body(self) -> bytes:
        body = self.request.body.replace(b"\r\n", b"\n").replace(b"\n", self.line_ending)
        match self.encoding:
            case "gzip":
                return gzip.compress(body)
            case "deflate":
                return zlib.compress(body)
            case "gzip-truncated":
                return gzip.compress(body)[: max(1, len(body) // 2)]
            case "gzip-not":
                return b"\x1f\x8b not gzip " + body
            case "deflate-not":
                return b"not deflate " + body
        return body

    def wire(self) -> tuple[bytes, bytes]:
        """(head, body) as sent; the head declares the whole body's length."""
        body = self.body()
        encoding = self.encoding.split("-")[0]
        head = [f"{self.request.method} {self.request.path} HTTP/1.1", "Host: fuzz"]
        if self.request.content_type:
            head.append(f"Content-Type: {self.request.content_type}")
        if encoding != "identity":
            head.append(f"Content-Encoding: {encoding}")
        head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
        return "\r\n".join(head).encode(), body


@st.composite
def framed(draw: st.DrawFn) -> Framed:
    request = draw(requests())
    encoding = draw(
        st.sampled_from(
            ["identity", "gzip", "deflate", "gzip-truncated", "gzip-not", "deflate-not"]
        )
    )
    truncate_at = draw(st.none() | st.integers(0, max(0, len(request.body) - 1)))
    line_ending = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
    return Framed(request, line_ending, encoding, truncate_at)


class Wire:
    """Raw requests to a real server; every refusal logged is inspected for a 5xx."""

    def __init__(self, fuzz: Harness, host: str, port: int) -> None:
        self.fuzz, self.host, self.port = fuzz, host, port
        self.statuses: dict[int, int] = {}

    async def check(self, framed: Framed) -> None:
        server = self.fuzz.server
        before = await self.fuzz.stored()
        head, body = framed.wire()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            if framed.truncate_at is None:
                writer.write(head + body)
                status_line = await reader.readline()
                status = int(status_line.split()[1])
                self.statuses[status] = self.statuses.get(status, 0) + 1
                assert status == 202 or 400 <= status < 500, (status_line, framed)
                if status == 202:
                    return
            else:
                # Cut short of the declared length: truncate_at was drawn against the
                # uncompressed body, and a compressed one may be shorter than it. Sent
                # whole, the request would be complete and might be taken (202) or
                # cancelled by the hang-up, as the timing falls.
                writer.write(head + body[: min(framed.truncate_at, len(body) - 1)])
                await writer.drain()
        finally:
            writer.close()
        # Refused, or cut off: wait until the server is done with it, then nothing of it
        # may be stored and no answer of the server may have been a 5xx.
        async with asyncio.timeout(30):
            while server.open_connections > 0:
                await asyncio.sleep(0.001)
        assert await self.fuzz.stored() == before, framed
        assert all(status < 500 for status in server.stats.rejected), server.stats.rejected


def test_no_framing_line_ending_or_encoding_gets_a_5xx(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Random requests as raw bytes: LF, CRLF or bare-CR line ends; identity, gzip or
    deflate bodies, valid, truncated or not compressed at all; and clients that hang up
    mid-body. Result: every answer is 202 or a 4xx, nothing of a refused or cut-off
    request is stored, no 5xx was answered, and nothing was logged at error level."""
    with asyncio.Runner() as runner:
        manager = harness(tmp_path)
        fuzz = runner.run(manager.__aenter__())
        host, port = fuzz.url.removeprefix("http://").rsplit(":", 1)
        wire = Wire(fuzz, host, int(port))
        try:

            @given(request=framed())
            def one(request: Framed) -> None:
                runner.run(wire.check(request))

            one()
        finally:
            runner.run(manager.__aexit__(None, None, None))
        print(f"answers by status: {dict(sorted(wire.statuses.items()))}")
    assert 202 in wire.statuses, wire.statuses
    assert any(400 <= status < 500 for status in wire.statuses), wire.statuses
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]

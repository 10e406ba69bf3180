"""The ingest server over a real socket, against an in-memory store.

Each refusal is checked for its status, the field it names, and that the store saw
nothing of the request.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from dbsync.clock import FakeClock
from dbsync.errors import StoreError
from dbsync.ingest import AepMapping, IngestServer
from dbsync.model import Account, Change

NOW = 1_800_000_000.0
AEP_DATA = Path(__file__).parent.parent / "data" / "aep"
HIGH_INTENT = "59bd2f4d-3c48-4b18-bf56-4f5c5e6967ae"
NDJSON = {"Content-Type": "application/x-ndjson"}
JSON = {"Content-Type": "application/json"}
CSV = {"Content-Type": "text/csv"}
encode = msgspec.json.encode


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    members: int
    added: int
    removed: int
    unchanged: int
    duplicates: int
    state: str = "applied"
    reason: str = ""


class FakeStore:
    """append_changes and apply_snapshot, in memory; ``fail`` makes both raise.

    Its snapshots are never held: the removal guard is the real store's (see
    tests/integration/test_store_snapshots.py and test_ingest_server.py).
    """

    def __init__(self) -> None:
        self.appended: list[list[Change]] = []
        self.members: dict[str, dict[str, Account]] = {}
        self.snapshot_guards: list[float | None] = []
        self.fail = False
        self.writable = True

    async def append_changes(self, changes: Sequence[Change]) -> int:
        if self.fail:
            raise StoreError("database is locked")
        self.appended.append(list(changes))
        return len(changes)

    async def apply_snapshot(
        self,
        audience_id: str,
        chunks: AsyncIterable[Sequence[tuple[str, str, str, int, float | None]]],
        *,
        source: str,
        mode: str = "full",
        max_removal_percent: float | None = 20.0,
    ) -> Snapshot:
        rows = [row async for chunk in chunks for row in chunk]
        if self.fail:
            raise StoreError("database is locked")
        before = self.members.get(audience_id, {})
        after = {
            key: Account(external_id=key, name=name, domain=domain)
            for key, name, domain, _, _ in rows
        }
        self.members[audience_id] = after
        self.snapshot_guards.append(max_removal_percent)
        kept = before.keys() & after.keys()
        return Snapshot(
            members=len(after),
            added=len(after) - len(kept),
            removed=len(before) - len(kept),
            unchanged=len(kept),
            duplicates=len(rows) - len(after),
        )


Serve = Callable[..., Awaitable[tuple[IngestServer, str]]]


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def active() -> set[str]:
    return {"aud-1", "aud-2", HIGH_INTENT}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def serve(store: FakeStore, active: set[str]) -> AsyncIterator[Serve]:
    servers: list[IngestServer] = []

    async def start(**options: Any) -> tuple[IngestServer, str]:
        server = IngestServer(
            store, audiences=lambda: active, port=0, clock=FakeClock(NOW), **options
        )
        host, port = await server.start()
        servers.append(server)
        return server, f"http://{host}:{port}"

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def url(serve: Serve) -> str:
    _, base = await serve()
    return base


ID_ONLY_CSV = b"External Account ID,Account Name,Account Domain\n001A,Acme,acme.com\n"


def change(external_id: str = "001A", **fields: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "audience_id": "aud-1",
        "account": {"external_id": external_id, "name": "Acme", "domain": "acme.com"},
        "member": True,
    }
    document.update(fields)
    return document


def lines(*documents: Any) -> bytes:
    return b"\n".join(encode(d) for d in documents) + b"\n"


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = b"", **headers: str
) -> tuple[int, Any]:
    async with http.request(method, url, data=body, headers=headers) as response:
        return response.status, await response.json()


# --- native changes ------------------------------------------------------------------


async def test_ndjson_changes_are_committed_in_one_call(
    http: aiohttp.ClientSession, url: str, store: FakeStore
) -> None:
    body = lines(change("A"), change("B", member=False, ts=1_700_000_000), change("C"))

    status, answer = await call(http, "POST", f"{url}/v1/changes", body, **NDJSON)

    assert (status, answer) == (202, {"accepted": 3, "joins": 2, "leaves": 1})
    (appended,) = store.appended
    # A ts sent is checked, and the time recorded is when ingest received it.
    assert [(c.account.external_id, c.member, c.ts) for c in appended] == [
        ("A", True, NOW),
        ("B", False, NOW),
        ("C", True, NOW),
    ]


async def test_a_json_array_of_changes(
    http: aiohttp.ClientSession, url: str, store: FakeStore
) -> None:
    status, answer = await call(
        http, "POST", f"{url}/v1/changes", encode([change("A"), change("B")]), **JSON
    )

    assert (status, answer["accepted"]) == (202, 2)
    assert len(store.appended) == 1


@pytest.mark.parametrize(
    ("body", "headers", "status", "field"),
    [
        (lines(change("A"), change("B", member="yes")), NDJSON, 400, "line 2: member"),
        (lines(change("A")) + b"{oops\n", NDJSON, 400, "line 2"),
        (lines(change(account={"name": "x"})), NDJSON, 400, "line 1: account.external_id"),
        (lines(change(tier="gold")), NDJSON, 400, "line 1: tier"),
        (lines(change(ts="last tuesday")), NDJSON, 400, "line 1: ts"),
        (encode([change(), change(member=None)]), JSON, 400, "[1].member"),
        (b"", NDJSON, 400, "body"),
        (b"", JSON, 400, "body"),
        (lines(change("A"), change("B", audience_id="aud-9")), NDJSON, 404, "line 2: audience_id"),
        (lines(change()), {"Content-Type": "text/plain"}, 415, "Content-Type"),
        (lines(change()), {}, 415, "Content-Type"),
    ],
)
async def test_refused_changes_name_the_field_and_apply_nothing(
    http: aiohttp.ClientSession,
    url: str,
    store: FakeStore,
    body: bytes,
    headers: dict[str, str],
    status: int,
    field: str,
) -> None:
    got, answer = await call(http, "POST", f"{url}/v1/changes", body, **headers)

    assert (got, answer["field"]) == (status, field)
    assert answer["error"]
    assert store.appended == []


async def test_a_reload_of_the_audiences_takes_effect_on_the_next_request(
    http: aiohttp.ClientSession, url: str, active: set[str]
) -> None:
    body = lines(change(audience_id="aud-new"))
    assert (await call(http, "POST", f"{url}/v1/changes", body, **NDJSON))[0] == 404

    active.add("aud-new")

    assert (await call(http, "POST", f"{url}/v1/changes", body, **NDJSON))[0] == 202


# --- limits, token, store failure, draining ------------------------------------------


async def test_a_body_over_the_limit_is_413_by_its_length(
    http: aiohttp.ClientSession, serve: Serve, store: FakeStore
) -> None:
    _, url = await serve(max_body_bytes=1000)

    status, answer = await call(http, "POST", f"{url}/v1/changes", b" " * 1001, **NDJSON)

    assert (status, answer["field"]) == (413, "body")
    assert "1000" in answer["error"]


async def test_a_chunked_body_over_the_limit_is_413_while_read(
    http: aiohttp.ClientSession, serve: Serve, store: FakeStore
) -> None:
    _, url = await serve(max_body_bytes=1000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield lines(*[change(f"{i:04d}") for i in range(3)])

    status, answer = await call(http, "POST", f"{url}/v1/changes", chunks(), **NDJSON)

    assert (status, answer["field"]) == (413, "body")
    assert store.appended == []


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", "Basic czNjcjN0", "Bearer", "Bearer s3cr3t-and-more"]
)
async def test_a_missing_or_wrong_token_is_401(
    http: aiohttp.ClientSession, serve: Serve, store: FakeStore, authorization: str | None
) -> None:
    _, url = await serve(token="s3cr3t")
    headers = dict(NDJSON) | ({"Authorization": authorization} if authorization else {})

    async with http.post(f"{url}/v1/changes", data=lines(change()), headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await response.json())["field"] == "Authorization"
    assert store.appended == []


async def test_the_right_token_is_let_in_and_health_needs_none(
    http: aiohttp.ClientSession, serve: Serve
) -> None:
    _, url = await serve(token="s3cr3t")

    status, _ = await call(
        http, "POST", f"{url}/v1/changes", lines(change()), Authorization="bearer s3cr3t", **NDJSON
    )

    assert status == 202
    assert (await call(http, "GET", f"{url}/v1/health"))[0] == 200


async def test_a_store_failure_is_503_and_counts_nothing(
    http: aiohttp.ClientSession, serve: Serve, store: FakeStore
) -> None:
    server, url = await serve()
    store.fail = True

    status, answer = await call(http, "POST", f"{url}/v1/changes", lines(change()), **NDJSON)
    snapshot, _ = await call(http, "PUT", f"{url}/v1/audiences/aud-1/members", ID_ONLY_CSV, **CSV)

    assert (status, snapshot) == (503, 503)
    assert "nothing" in answer["error"]
    assert server.stats.changes_accepted == 0
    assert server.stats.snapshots_applied == 0
    assert server.stats.rejected == {503: 2}


async def test_draining_answers_503_to_health_and_changes(
    http: aiohttp.ClientSession, serve: Serve, store: FakeStore
) -> None:
    server, url = await serve()
    assert await call(http, "GET", f"{url}/v1/health") == (200, {"status": "accepting"})

    server.stop()

    assert await call(http, "GET", f"{url}/v1/health") == (503, {"status": "draining"})
    assert (await call(http, "POST", f"{url}/v1/changes", lines(change()), **NDJSON))[0] == 503
    assert (await call(http, "POST", f"{url}/v1/aep", b"{}", **JSON))[0] == 503
    assert not server.accepting
    assert store.appended == []


@pytest.mark.parametrize(
    ("method", "path", "status", "field"),
    [("POST", "/v1/nothing", 404, "path"), ("GET", "/v1/changes", 405, "method")],
)
async def test_unknown_routes_answer_json(
    http: aiohttp.ClientSession, url: str, method: str, path: str, status: int, field: str
) -> None:
    got, answer = await call(http, method, f"{url}{path}")

    assert (got, answer["field"]) == (status, field)


# --- AEP -----------------------------------------------------------------------------


async def test_an_aep_batch_is_committed_with_its_counts(
    http: aiohttp.ClientSession, url: str, store: FakeStore
) -> None:
    body = (AEP_DATA / "batch.json").read_bytes()

    status, answer = await call(http, "POST", f"{url}/v1/aep", body, **JSON)

    assert status == 202
    assert answer == {
        "accepted": 2,
        "joins": 1,
        "leaves": 1,
        "profiles": 3,
        "profiles_ignored": 1,
        "audiences_ignored": {
            "354e086f-2e11-49a2-9e39-e5d9a76be683": 2,
            "8f812592-3f06-416b-bd50-e7831848a31a": 1,
        },
    }
    assert [c.account.external_id for c in store.appended[0]] == [
        "0015g00000UMBRAA4",
        "0015g00000HOOLAA5",
    ]


async def test_an_aep_mapping_is_honoured(
    http: aiohttp.ClientSession, serve: Serve, store: FakeStore
) -> None:
    _, url = await serve(
        aep_mapping=AepMapping(
            domain_attribute="accountEmailDomain", identity_namespace="b2b_account"
        )
    )

    document = json.loads((AEP_DATA / "array.json").read_bytes())
    refused = await call(http, "POST", f"{url}/v1/aep", encode(document), **JSON)
    # The fixture's first profile has no domain, which Demandbase refuses.
    document[0]["attributes"]["accountEmailDomain"] = {"value": "globex.example"}

    status, answer = await call(http, "POST", f"{url}/v1/aep", encode(document), **JSON)

    assert refused[0] == 400
    assert refused[1]["field"] == "[0].accountEmailDomain"
    assert (status, answer["accepted"]) == (202, 2)
    assert [c.account.external_id for c in store.appended[0]] == [
        "0015g00000GLOBAA2",  # the primary identity
        "0015g00000INITAA3",
    ]


@pytest.mark.parametrize(
    ("body", "headers", "status", "field"),
    [
        (b"", JSON, 400, "body"),
        (b'{"segmentMembership": ', JSON, 400, "body"),
        (b"[" * 5000 + b"]" * 5000, JSON, 400, "body"),
        (b"[1]", JSON, 400, "[0]"),
        (
            encode([{"segmentMembership": {"ups": {HIGH_INTENT: {"status": "realized"}}}}]),
            JSON,
            400,
            "[0].accountKey.sourceKey",
        ),
        (b"{}", NDJSON, 415, "Content-Type"),
    ],
)
async def test_refused_aep_payloads_name_the_field(
    http: aiohttp.ClientSession,
    url: str,
    store: FakeStore,
    body: bytes,
    headers: dict[str, str],
    status: int,
    field: str,
) -> None:
    got, answer = await call(http, "POST", f"{url}/v1/aep", body, **headers)

    assert (got, answer["field"]) == (status, field)
    assert store.appended == []


# --- snapshots -----------------------------------------------------------------------


async def test_a_csv_snapshot_replaces_the_membership(
    http: aiohttp.ClientSession, url: str, store: FakeStore
) -> None:
    first = (
        b"Account Name,Account Domain,External Account ID\n"
        b"Acme,acme.com,001A\nGlobex,globex.com,001B\n"
    )
    second = (
        b"External Account ID,Account Name,Account Domain\n"
        b"001B,B,b.com\n001C,C,c.com\n001C,C,c.com\n"
    )

    assert await call(http, "PUT", f"{url}/v1/audiences/aud-1/members", first, **CSV) == (
        202,
        {"members": 2, "added": 2, "removed": 0, "unchanged": 0, "duplicates": 0, "held": False},
    )
    assert await call(http, "PUT", f"{url}/v1/audiences/aud-1/members", second, **CSV) == (
        202,
        {"members": 2, "added": 1, "removed": 1, "unchanged": 1, "duplicates": 1, "held": False},
    )
    assert sorted(store.members["aud-1"]) == ["001B", "001C"]
    assert store.snapshot_guards == [20.0, 20.0]


async def test_an_ndjson_snapshot(http: aiohttp.ClientSession, url: str, store: FakeStore) -> None:
    body = lines(
        {"external_id": "001A", "name": "Acme", "domain": "acme.com"},
        {"external_id": "001B", "name": "B", "domain": "b.com"},
    )

    status, answer = await call(http, "PUT", f"{url}/v1/audiences/aud-2/members", body, **NDJSON)

    assert (status, answer["members"]) == (202, 2)
    assert store.members["aud-2"]["001A"] == Account(
        external_id="001A", name="Acme", domain="acme.com"
    )


@pytest.mark.parametrize(
    ("audience", "body", "headers", "status", "field"),
    [
        ("aud-9", b"External Account ID\n001A\n", CSV, 404, "audience_id"),
        ("aud-1", ID_ONLY_CSV + b"\n,A,a.com\n", CSV, 400, "row 2: External Account ID"),
        ("aud-1", b"External Account ID\n001A\n", CSV, 400, "row 1: Account Name"),
        ("aud-1", b"Account ID\n001A\n", CSV, 400, "header"),
        ("aud-1", lines({"external_id": "001A", "member": True}), NDJSON, 400, "line 1: member"),
        (
            "aud-1",
            b"External Account ID\n001A\n",
            {"Content-Type": "text/plain"},
            415,
            "Content-Type",
        ),
    ],
)
async def test_refused_snapshots_change_nothing(
    http: aiohttp.ClientSession,
    url: str,
    store: FakeStore,
    audience: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    field: str,
) -> None:
    got, answer = await call(http, "PUT", f"{url}/v1/audiences/{audience}/members", body, **headers)

    assert (got, answer["field"]) == (status, field)
    assert store.members == {}


# --- counters ------------------------------------------------------------------------


async def test_stats_count_requests_changes_and_refusals(
    http: aiohttp.ClientSession, serve: Serve
) -> None:
    server, url = await serve()
    await call(http, "POST", f"{url}/v1/changes", lines(change("A"), change("B")), **NDJSON)
    await call(http, "POST", f"{url}/v1/changes", b"{", **NDJSON)
    await call(http, "POST", f"{url}/v1/aep", (AEP_DATA / "batch.json").read_bytes(), **JSON)
    await call(http, "PUT", f"{url}/v1/audiences/aud-1/members", ID_ONLY_CSV, **CSV)
    await call(http, "GET", f"{url}/v1/health")

    stats = server.stats

    assert stats.requests == 5
    assert stats.changes_accepted == 4
    assert stats.snapshots_applied == 1
    assert (stats.aep_profiles, stats.aep_profiles_ignored, stats.aep_audiences_ignored) == (
        3,
        1,
        3,
    )
    assert stats.rejected == {400: 1}


async def test_a_refusal_is_logged_as_an_event_with_its_field(
    http: aiohttp.ClientSession, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dbsync.ingest")

    await call(http, "POST", f"{url}/v1/changes", lines(change(member="yes")), **NDJSON)

    (record,) = [r for r in caplog.records if r.getMessage() == "ingest_rejected"]
    assert record.__dict__["route"] == "/v1/changes"
    assert record.__dict__["status"] == 400
    assert record.__dict__["field"] == "line 1: member"


def test_an_empty_token_is_refused_at_construction(store: FakeStore) -> None:
    with pytest.raises(ValueError, match="empty"):
        IngestServer(store, audiences=frozenset, token="")

"""The ingest server over a real socket, in front of the real SQLite store.

202 means committed: after it, the changes are in the store's journal, and still
there once the store is closed and opened again. A refused request leaves the store
as it was; a store that cannot commit answers 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from dbsync.clock import FakeClock
from dbsync.errors import StoreError
from dbsync.ingest import IngestServer
from dbsync.model import Change
from dbsync.store import Store

AUDIENCES = ("aud-1", "aud-2")
AEP_DATA = Path(__file__).parent.parent / "data" / "aep"
HIGH_INTENT = "59bd2f4d-3c48-4b18-bf56-4f5c5e6967ae"
NDJSON = {"Content-Type": "application/x-ndjson"}
JSON = {"Content-Type": "application/json"}
CSV = {"Content-Type": "text/csv"}
encode = msgspec.json.encode


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "dbsync.sqlite3"


@pytest.fixture
async def store(path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    async with Store.open(path, clock=clock) as store:
        yield store


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def serving(store: Any, clock: FakeClock) -> tuple[IngestServer, str]:
    server = IngestServer(store, audiences=lambda: (*AUDIENCES, HIGH_INTENT), port=0, clock=clock)
    host, port = await server.start()
    return server, f"http://{host}:{port}"


@pytest.fixture
async def url(store: Store, clock: FakeClock) -> AsyncIterator[str]:
    server, base = await serving(store, clock)
    yield base
    await server.close()


def change(external_id: str, audience_id: str = "aud-1", member: bool = True) -> dict[str, Any]:
    account = {"external_id": external_id, "name": f"Company {external_id}", "domain": "x.example"}
    return {"audience_id": audience_id, "account": account, "member": member}


def lines(*documents: Any) -> bytes:
    return b"\n".join(encode(d) for d in documents) + b"\n"


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, **headers: str
) -> tuple[int, Any]:
    async with http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


async def put(
    http: aiohttp.ClientSession, url: str, body: bytes, **headers: str
) -> tuple[int, Any]:
    async with http.put(url, data=body, headers=headers) as response:
        return response.status, await response.json()


async def members(store: Store, audience_id: str) -> set[str]:
    while await store.fold_pending():
        pass
    return await store.desired_members(audience_id)


async def test_a_202_means_the_changes_are_in_the_journal(
    http: aiohttp.ClientSession, url: str, store: Store, path: Path, clock: FakeClock
) -> None:
    body = lines(change("A"), change("B"), change("C", audience_id="aud-2"))

    status, answer = await post(http, f"{url}/v1/changes", body, **NDJSON)

    assert (status, answer["accepted"]) == (202, 3)
    assert await store.pending_journal_rows() == 3
    assert await members(store, "aud-1") == {"A", "B"}
    assert await members(store, "aud-2") == {"C"}


async def test_accepted_changes_survive_closing_the_store(
    http: aiohttp.ClientSession, path: Path, clock: FakeClock
) -> None:
    async with Store.open(path, clock=clock) as store:
        server, url = await serving(store, clock)
        try:
            status, _ = await post(http, f"{url}/v1/changes", lines(change("A")), **NDJSON)
        finally:
            await server.close()
    assert status == 202

    async with Store.open(path, clock=clock) as reopened:
        assert await members(reopened, "aud-1") == {"A"}


async def test_a_refused_request_changes_nothing(
    http: aiohttp.ClientSession, url: str, store: Store
) -> None:
    body = lines(*[change(f"{i:04d}") for i in range(100)]) + lines(
        change("Z", audience_id="aud-9")
    )

    status, answer = await post(http, f"{url}/v1/changes", body, **NDJSON)

    assert (status, answer["field"]) == (404, "line 101: audience_id")
    assert await store.pending_journal_rows() == 0


async def test_a_store_that_cannot_commit_answers_503(
    http: aiohttp.ClientSession, store: Store, clock: FakeClock
) -> None:
    class Failing:
        """The real store, whose commit fails."""

        async def append_changes(self, changes: Sequence[Change]) -> int:
            raise StoreError("disk I/O error")

        async def apply_snapshot(self, audience_id: str, chunks: Any, **kwargs: Any) -> Any:
            return await store.apply_snapshot(audience_id, chunks, **kwargs)

    server, url = await serving(Failing(), clock)
    try:
        status, answer = await post(http, f"{url}/v1/changes", lines(change("A")), **NDJSON)
    finally:
        await server.close()

    assert status == 503
    assert answer["field"] is None
    assert await store.pending_journal_rows() == 0


async def test_concurrent_requests_all_land_sharing_transactions(
    http: aiohttp.ClientSession, url: str, store: Store
) -> None:
    requests = [lines(*[change(f"{r:02d}-{i:03d}") for i in range(50)]) for r in range(40)]

    before = store.transactions

    async with asyncio.TaskGroup() as services:
        services.create_task(store.committer.run())  # as the daemon runs it
        answers = await asyncio.gather(
            *(post(http, f"{url}/v1/changes", body, **NDJSON) for body in requests)
        )
        store.committer.stop()

    assert {status for status, _ in answers} == {202}
    assert store.transactions - before < len(requests)  # group commit shared them
    assert len(await members(store, "aud-1")) == 40 * 50


async def test_an_aep_export_lands_as_changes(
    http: aiohttp.ClientSession, url: str, store: Store
) -> None:
    status, answer = await post(
        http, f"{url}/v1/aep", (AEP_DATA / "batch.json").read_bytes(), **JSON
    )

    assert (status, answer["accepted"], answer["profiles_ignored"]) == (202, 2, 1)
    assert await members(store, HIGH_INTENT) == {"0015g00000UMBRAA4"}  # Hooli exited


async def test_snapshots_apply_the_difference(
    http: aiohttp.ClientSession, url: str, store: Store
) -> None:
    snapshot = f"{url}/v1/audiences/aud-1/members"
    # Removing one of five: 20%, within the removal guard's default.
    csv = b"Account Name,Account Domain,External Account ID\nAcme,acme.com,A\nGlobex,g.com,B\n"
    csv += b"D,d.com,D\nE,e.com,E\nF,f.com,F\n"
    ndjson = lines(
        {"external_id": "B", "name": "Globex", "domain": "g.com"},
        {"external_id": "C", "name": "Initech", "domain": "i.com"},
        *({"external_id": k, "name": k, "domain": f"{k.lower()}.com"} for k in "DEF"),
    )

    first = await put(http, snapshot, csv, **CSV)
    second = await put(http, snapshot, ndjson + ndjson, **NDJSON)

    counts = {"members": 5, "added": 5, "removed": 0, "unchanged": 0, "duplicates": 0}
    assert first == (202, {**counts, "held": False})
    assert second == (
        202,
        {"members": 5, "added": 1, "removed": 1, "unchanged": 4, "duplicates": 5, "held": False},
    )
    assert await members(store, "aud-1") == set("BCDEF")


async def test_a_snapshot_removing_too_many_is_held_not_applied(
    http: aiohttp.ClientSession, url: str, store: Store
) -> None:
    snapshot = f"{url}/v1/audiences/aud-1/members"
    header = b"External Account ID,Account Name,Account Domain\n"
    await put(http, snapshot, header + b"A,Acme,a.com\nB,B,b.com\nC,C,c.com\n", **CSV)

    status, answer = await put(http, snapshot, header + b"A,Acme,a.com\n", **CSV)

    assert (status, answer["held"], answer["removed"]) == (202, True, 2)
    assert answer["reason"] == ("would remove 2 of 3 members (66.7% > max_removal_percent 20)")
    assert await members(store, "aud-1") == {"A", "B", "C"}
    [held] = await store.held_snapshots("aud-1")
    assert (held.source, held.members) == ("put", 1)
    status, answer = await put(
        http, snapshot, header + b"A,Acme,a.com\nB,B,b.com\nC,C,c.com\nD,D,d.com\n", **CSV
    )
    assert (status, answer["held"], answer["added"]) == (202, False, 1)
    assert await store.held_snapshots() == []
    assert await members(store, "aud-1") == {"A", "B", "C", "D"}


async def test_a_refused_snapshot_changes_nothing(
    http: aiohttp.ClientSession, url: str, store: Store
) -> None:
    snapshot = f"{url}/v1/audiences/aud-1/members"
    header = b"External Account ID,Account Name,Account Domain\n"
    await put(http, snapshot, header + b"A,Acme,a.com\nB,B,b.com\n", **CSV)

    status, answer = await put(http, snapshot, header + b"C,C,c.com\n\n,D,d.com\n", **CSV)

    assert (status, answer["field"]) == (400, "row 2: External Account ID")
    assert await members(store, "aud-1") == {"A", "B"}


async def test_health_turns_503_once_draining(
    http: aiohttp.ClientSession, store: Store, clock: FakeClock
) -> None:
    server, url = await serving(store, clock)
    try:
        async with http.get(f"{url}/v1/health") as response:
            assert response.status == 200
        server.stop()
        async with http.get(f"{url}/v1/health") as response:
            assert response.status == 503
        status, _ = await post(http, f"{url}/v1/changes", lines(change("A")), **NDJSON)
        assert status == 503
    finally:
        await server.close()
    assert await store.pending_journal_rows() == 0

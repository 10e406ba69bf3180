"""Ingest throughput: accounts per second answered 202 over HTTP, beside raw SQLite.

Starts a real Store on a temporary file and the IngestServer on loopback (uvloop),
then a client in its own process (so that it shares neither the server's event loop
nor its GIL) sends NDJSON bodies of ``--batch`` changes over ``--connections`` concurrent
connections: random account keys over ``--keys``, random audiences among
``--audiences``, four joins for each leave. It prints the rate at which changes were
answered 202 (each 202 means committed), the raw SQLite upsert rate of the very same
rows measured in the same run, and their ratio; then the longest the event loop
stalled while one ``--big-mib`` body was decoded and committed.

    python bench/ingest.py [--changes 1000000] [--batch 10000] [--connections 4] [--quick]

Human lines go to stderr; the last line on stdout is one JSON object of the figures.
The target is 100,000 changes/s.

Measured on the 2-core development machine (1,000,000 changes over 3,000,000 keys):
205,000 accounts/s with 4 connections, 227,000 with 8, against a raw upsert of
59,000-64,000 rows/s (ratio 3.5): 202 waits for the journal append, which is why
ingest outruns a keyed upsert; folding into desired state runs behind it. One 64 MiB
body stalled the loop for 100-180 ms, mostly in the garbage collector's full passes
over the new Account and Change objects; since they are ``gc=False`` structs, 81-90 ms
(bench/README.md has the latest figures).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import aiohttp
import msgspec
import uvloop

from bench._common import add_check_flag, emit, say

NDJSON = {"Content-Type": "application/x-ndjson"}
TARGET_CHANGES_PER_SECOND = 100_000


class Plan(msgspec.Struct, frozen=True):
    changes: int
    batch: int
    connections: int
    audiences: int
    keys: int
    seed: int


class Outcome(msgspec.Struct, frozen=True):
    seconds: float
    accepted: int
    statuses: dict[int, int]


def audience_ids(plan: Plan) -> list[str]:
    return [f"bench-audience-{i}" for i in range(plan.audiences)]


def rows(plan: Plan) -> Iterator[tuple[str, str, bool]]:
    """(audience, account key, member) of the run: the same for the client and for raw."""
    rng = random.Random(plan.seed)
    audiences = audience_ids(plan)
    for _ in range(plan.changes):
        yield rng.choice(audiences), f"acct-{rng.randrange(plan.keys):08d}", rng.random() < 0.8


def change_line(audience_id: str, key: str, member: bool) -> dict[str, object]:
    account = {"external_id": key, "name": f"Company {key}", "domain": f"{key}.example"}
    return {"audience_id": audience_id, "account": account, "member": member}


def bodies(plan: Plan) -> list[bytes]:
    encode = msgspec.json.Encoder().encode
    lines = [encode(change_line(*row)) for row in rows(plan)]
    return [b"\n".join(lines[i : i + plan.batch]) + b"\n" for i in range(0, len(lines), plan.batch)]


# --- the client process ------------------------------------------------------------------


def client(url: str, plan: Plan, pipe: Connection) -> None:
    prepared = bodies(plan)
    pipe.send("ready")
    pipe.recv()  # go
    outcome = uvloop.run(_send(url, prepared, plan.connections))
    pipe.send(msgspec.msgpack.encode(outcome))


async def _send(url: str, prepared: list[bytes], connections: int) -> Outcome:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in prepared:
        queue.put_nowait(body)
    statuses: dict[int, int] = {}
    accepted = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(f"{url}/v1/changes", data=body, headers=NDJSON) as response:
                answer = await response.json()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 202:
                    accepted += answer["accepted"]

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for i in range(connections):
                group.create_task(worker(session), name=f"client:{i}")
        seconds = time.perf_counter() - started
    return Outcome(seconds=seconds, accepted=accepted, statuses=statuses)


# --- the server side -----------------------------------------------------------------------


class Stalls:
    """The longest gap between two turns of the event loop, sampled every millisecond."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(0.001)
            self.longest = max(self.longest, loop.time() - before - 0.001)


async def ingest(plan: Plan, directory: Path, big_mib: int) -> tuple[Outcome, float, int]:
    # Imported here, not at the top: the client process (spawned, so it imports this
    # file afresh) needs none of the server side.
    from dbsync.clock import SystemClock
    from dbsync.ingest import IngestServer
    from dbsync.store import Store

    audiences = audience_ids(plan)
    async with (
        Store.open(directory / "ingest.sqlite3", clock=SystemClock()) as store,
        asyncio.TaskGroup() as services,
    ):
        # The group commit runs as the daemon runs it: a service in a TaskGroup.
        services.create_task(store.committer.run(), name="store:group-commit")
        server = IngestServer(
            store,
            audiences=lambda: audiences,
            port=0,
            max_body_bytes=(big_mib + 1) * 1024 * 1024,
        )
        host, port = await server.start()
        url = f"http://{host}:{port}"
        try:
            outcome = await _drive_client(url, plan)
            stall, big_changes = await _one_big_body(url, plan, big_mib)
        finally:
            await server.close()
            store.committer.stop()
    return outcome, stall, big_changes


async def _drive_client(url: str, plan: Plan) -> Outcome:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=client, args=(url, plan, theirs), name="bench-client")
    process.start()
    try:
        assert await asyncio.to_thread(ours.recv) == "ready"
        ours.send("go")
        return msgspec.msgpack.decode(await asyncio.to_thread(ours.recv), type=Outcome)
    finally:
        await asyncio.to_thread(process.join)


async def _one_big_body(url: str, plan: Plan, big_mib: int) -> tuple[float, int]:
    """Send one body of about ``big_mib`` MiB; the loop's longest stall meanwhile."""
    one = msgspec.json.encode(change_line(*next(rows(plan)))) + b"\n"
    body = one * (big_mib * 1024 * 1024 // len(one))
    stalls = Stalls()
    async with asyncio.TaskGroup() as group:
        watcher = group.create_task(stalls.watch(), name="stall-watch")
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{url}/v1/changes", data=body, headers=NDJSON) as response,
        ):
            answer = await response.json()
            assert response.status == 202, answer
        watcher.cancel()
    return stalls.longest, answer["accepted"]


def main() -> int:
    from bench.store_upsert import measure_raw_upsert

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--audiences", type=int, default=3)
    parser.add_argument("--keys", type=int, default=3_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--big-mib", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="20,000 changes, a 2 MiB body")
    add_check_flag(parser)
    args = parser.parse_args()
    if args.quick:
        args.changes, args.batch, args.keys, args.big_mib = 20_000, 2_000, 100_000, 2
    plan = Plan(args.changes, args.batch, args.connections, args.audiences, args.keys, args.seed)

    with tempfile.TemporaryDirectory(prefix="dbsync-bench-") as directory:
        outcome, stall, big_changes = uvloop.run(ingest(plan, Path(directory), args.big_mib))
        same_rows = [
            (audience_id, key, f"Company {key}", f"{key}.example", member, 1_800_000_000.0)
            for audience_id, key, member in rows(plan)
        ]
        raw = measure_raw_upsert(same_rows, Path(directory) / "raw.sqlite3", batch=plan.batch)

    ingest_rate = outcome.accepted / outcome.seconds
    say(
        f"ingest: {outcome.accepted:,} changes in {outcome.seconds:.2f} s over HTTP "
        f"({plan.connections} connections, {plan.batch:,} a request): "
        f"{ingest_rate:,.0f} accounts/s accepted; answers {outcome.statuses}"
    )
    say(f"raw SQLite upsert of the same rows: {raw:,.0f} rows/s")
    say(f"ratio ingest / raw upsert: {ingest_rate / raw:.2f}")
    say(
        f"one {args.big_mib} MiB body ({big_changes:,} changes): "
        f"longest event-loop stall {stall * 1000:.1f} ms"
    )
    return emit(
        "ingest",
        {
            "changes": outcome.accepted,
            "connections": plan.connections,
            "batch": plan.batch,
            "seconds": round(outcome.seconds, 3),
            "changes_per_second": round(ingest_rate),
            "raw_upsert_rows_per_second": round(raw),
            "ratio": round(ingest_rate / raw, 2),
            "statuses": {str(k): v for k, v in outcome.statuses.items()},
            "big_body_mib": args.big_mib,
            "big_body_changes": big_changes,
            "big_body_stall_ms": round(stall * 1000, 1),
            "target_met": ingest_rate >= TARGET_CHANGES_PER_SECOND,
        },
        check=args.check,
    )


if __name__ == "__main__":
    raise SystemExit(main())

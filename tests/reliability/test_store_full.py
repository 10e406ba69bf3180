"""The store cannot write (a full disk): ingest answers 503, applies nothing, then recovers.

How the disk fills: the store's own write connection gets ``PRAGMA max_page_count`` set
to the file's current size, so that every transaction that needs one more page fails
in SQLite's pager with ``SQLITE_FULL``, "database or disk is full": the error, code and
path a full disk gives (SQLite reports ENOSPC as SQLITE_FULL too), through the real
store and daemon. Lifting the cap is "space returns". Not a tiny tmpfs: mounting one
works here (root in a container) but not in an unprivileged CI, and in WAL mode a full
filesystem fails only the writes that grow a file (the WAL is rewritten in place after
a checkpoint), so which request fails would be left to chance. Not a monkeypatched
writer either: that would skip SQLite's own rollback of a failed statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from dbsync.admin.client import exchange
from dbsync.admin.protocol import Fault, Status
from dbsync.daemon import Daemon
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.exitcodes import ExitCode
from dbsync.model import Account
from dbsync.store import Store
from dbsync.testing import (
    AudienceConfig,
    Engine,
    aep_profile,
    fast_tenant,
    running_daemon,
    running_emulator,
    running_engine,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.reliability

AUDIENCE = AudienceConfig("disk", max_records=500, max_age_seconds=0.05)
TIMEOUT = 20.0
SQLITE_MAX_PAGES = 1_073_741_823  # SQLite's default max_page_count


async def set_max_pages(store: Store, pages: int | None) -> None:
    """Cap the store file at ``pages`` (None: its current size), on its writer thread."""

    def cap() -> None:
        db = store._engine._write_db
        assert db is not None
        limit = pages if pages is not None else db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {int(limit)}")

    await store._engine.write(cap)


async def compact(store: Store) -> None:
    """VACUUM on the writer thread: no free page is left for a write to reuse."""

    def vacuum() -> None:
        db = store._engine._write_db
        assert db is not None
        db.execute("VACUUM")

    await store._engine.write(vacuum)


def changes_body(accounts: list[Account], member: bool) -> bytes:
    return b"".join(
        msgspec.json.encode({"audience_id": AUDIENCE.id, "account": a, "member": member}) + b"\n"
        for a in accounts
    )


def stored(path: Path) -> tuple[int, int]:
    """Journal rows and desired members, read apart from the daemon's connections."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (journal,) = db.execute("SELECT COUNT(*) FROM changes").fetchone()
        (desired,) = db.execute(
            "SELECT COUNT(*) FROM membership JOIN audience_keys USING (audience_key)"
            " WHERE audience_id = ? AND desired = 1",
            (AUDIENCE.id,),
        ).fetchone()
    return int(journal), int(desired)


async def test_a_full_store_answers_503_applies_nothing_and_recovers_without_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. One audience gets 100 tenant accounts; wait until its list equals them.
    2. The disk fills (the store's file may not grow by one page).
    3. Send 2,000 joins (NDJSON), 2,000 more as AEP profiles, and a CSV snapshot of
       2,000 accounts, each large enough to need new pages.
    4. Space returns; send the same three requests again.
    Result: during the fault each request answers 503 and an ``ingest_commit_failed``
    event is logged; the journal and the desired members are exactly as before (nothing
    half-applied); health answers 503. After it, the same daemon (no restart) answers
    202 to each and health 200, and the list ends equal to the desired state (the
    snapshot's 2,000 accounts), with nothing pending and a balanced ledger; one
    ``store_unwritable`` and one ``store_writable`` were logged.
    """
    async with running_engine(tmp_path, [AUDIENCE]) as engine:
        accounts = await engine.tenant_accounts(1_900, offset=0)
        accounts += [
            Account(external_id=f"ACC-FULL-{i}", name=f"Full {i} " + "x" * 40, domain=f"f{i}.x")
            for i in range(100)
        ]
        await engine.cdp.changes((AUDIENCE.id, account, True) for account in accounts[:100])
        await engine.wait_settled(timeout=TIMEOUT)
        path = engine.store.path
        before = stored(path)
        requests = [
            ("POST", "/v1/changes", changes_body(accounts, True), "application/x-ndjson"),
            (
                "POST",
                "/v1/aep",
                msgspec.json.encode([aep_profile(a, {AUDIENCE.id: "realized"}) for a in accounts]),
                "application/json",
            ),
            ("PUT", f"/v1/audiences/{AUDIENCE.id}/members", encode_accounts(accounts), "text/csv"),
        ]

        await set_max_pages(engine.store, None)
        try:
            for method, route, body, content_type in requests:
                status, answer = await engine.cdp.send(method, route, body, content_type)
                assert status == 503, (route, status, answer)
                assert stored(path) == before, route
            assert await engine.cdp.health() == 503
        finally:
            await set_max_pages(engine.store, SQLITE_MAX_PAGES)
        failures = [r for r in caplog.records if r.getMessage() == "ingest_commit_failed"]
        assert len(failures) == len(requests)
        assert all("full" in r.__dict__["error"] for r in failures), [
            r.__dict__["error"] for r in failures
        ]

        for method, route, body, content_type in requests:
            status, answer = await engine.cdp.send(method, route, body, content_type)
            assert status == 202, (route, status, answer)
        assert await engine.cdp.health() == 200
        await engine.wait_settled(timeout=TIMEOUT)
        assert await engine.store.desired_members(AUDIENCE.id) == {a.external_id for a in accounts}
        check = await engine.store.ledger_check(AUDIENCE.id)
        assert check.balanced, check
        events = [r.getMessage() for r in caplog.records]
        assert events.count("store_unwritable") == 1
        assert events.count("store_writable") == 1


async def test_the_disk_fills_while_delivery_runs_and_the_daemon_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. An audience that flushes after 1 s gets 1,000 tenant accounts; once they are
       folded, the file is compacted (VACUUM: no free page left) and the disk fills, so
       that planning the first batch needs a page it cannot have.
    2. Once a write has failed, space returns.
    Result: the actor's write failed (``actor_crashed``, naming the full disk) and the
    supervisor restarted it; with no restart of the daemon, everything is delivered: the
    list equals the desired state, nothing pending, the ledger balanced; the daemon
    exits 0 at the end (running_engine)."""
    audience = AudienceConfig("disk", max_records=500, max_age_seconds=1.0)
    async with running_engine(tmp_path, [audience]) as engine:
        accounts = await engine.tenant_accounts(1_000)
        await engine.cdp.changes((audience.id, account, True) for account in accounts)
        await engine.wait_folded(timeout=TIMEOUT)
        await compact(engine.store)
        await set_max_pages(engine.store, None)
        try:

            def met() -> bool:
                return any("full" in str(r.__dict__) for r in caplog.records)

            await wait_until(met, TIMEOUT, what=lambda: engine._state(None))
        finally:
            await set_max_pages(engine.store, SQLITE_MAX_PAGES)
        await engine.wait_settled(timeout=TIMEOUT)
        assert await engine.store.desired_members(audience.id) == {a.external_id for a in accounts}
        check = await engine.store.ledger_check(audience.id)
        assert check.balanced, check
        # The actor met the full disk and was restarted by the supervisor, in process.
        assert "actor_crashed" in {r.getMessage() for r in caplog.records}


# --- a real full file system ------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(size: str = "3m") -> Iterator[Path]:
    """A tmpfs of ``size`` on a short path (the admin socket lives in it); root only."""
    mount = Path(tempfile.mkdtemp(prefix="dbf-", dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        mount.rmdir()


def fill(filler: Path) -> None:
    """Write ``filler`` until the file system has no byte left."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)


def changes_body_for(audience_id: str, accounts: list[Account]) -> bytes:
    return b"".join(
        msgspec.json.encode({"audience_id": audience_id, "account": a, "member": True}) + b"\n"
        for a in accounts
    )


def batches(accounts: list[Account], size: int) -> list[list[Account]]:
    return [accounts[i : i + size] for i in range(0, len(accounts), size)]


async def test_a_real_full_disk_neither_ends_nor_restart_loops_the_daemon(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1. A daemon whose state (and config) live on a 3 MiB tmpfs; 50 accounts are
       delivered. The file system is then filled to its last byte.
    2. Batches of 100 joins until one answers 503 (which one depends on how much room
       the WAL has left); then health, ``ctl status`` (an admin read) and the daemon.
    3. Space returns; the refused batch is sent again.
    Result: while full, ingest and health answer 503, ``store_unwritable`` is logged
    once, ``ctl status`` answers and the daemon runs on; once space returns, the batch
    is accepted, ``store_writable`` is logged once, health is 200 and every accepted
    account reaches the list with a balanced ledger; the daemon exits 0."""
    with small_filesystem() as mount:
        async with running_emulator(fast_tenant()) as emulator:
            audience = AudienceConfig("disk", max_records=100, max_age_seconds=0.05)
            config = write_config(mount, emulator.url, [audience])
            filler = mount / "filler"
            async with running_daemon(config) as daemon:
                engine = Engine(emulator, daemon, [audience])
                accounts = await engine.tenant_accounts(1_000)
                await engine.cdp.changes((audience.id, a, True) for a in accounts[:50])
                await engine.wait_settled(timeout=TIMEOUT)
                accepted = {a.external_id for a in accounts[:50]}

                fill(filler)
                refused: list[Account] = []
                for batch in batches(accounts[50:], 100):
                    body = changes_body_for(audience.id, batch)
                    status, _ = await engine.cdp.send(
                        "POST", "/v1/changes", body, "application/x-ndjson"
                    )
                    if status == 503:
                        refused = batch
                        break
                    assert status == 202
                    accepted |= {a.external_id for a in batch}
                assert refused, "the disk never filled"
                assert await engine.cdp.health() == 503
                assert daemon.config is not None
                status_reply = await asyncio.to_thread(
                    exchange, daemon.config.daemon.admin_socket, Status()
                )
                assert not isinstance(status_reply, Fault), status_reply

                filler.unlink()
                body = changes_body_for(audience.id, refused)
                status, answer = await engine.cdp.send(
                    "POST", "/v1/changes", body, "application/x-ndjson"
                )
                assert status == 202, answer
                accepted |= {a.external_id for a in refused}
                assert await engine.cdp.health() == 200
                await engine.wait_settled(timeout=TIMEOUT)
                assert await engine.store.desired_members(audience.id) == accepted
                assert (await engine.store.ledger_check(audience.id)).balanced
            events = [r.getMessage() for r in caplog.records]
            assert events.count("store_unwritable") == 1
            assert events.count("store_writable") == 1


async def test_a_daemon_started_on_a_full_disk_waits_for_space_instead_of_exiting(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """1. A daemon's first start, with its state on a 3 MiB tmpfs filled to its last
       byte: the store cannot even be created.
    2. Space returns.
    Result: while full the daemon runs on (no exit, so no restart loop for systemd to
    end in ``start-limit-hit``), not ready, with ``store_unwritable`` logged once while
    it tries again and asks systemd each time to wait longer for it; once space returns
    it opens the store, logs ``store_writable`` once, becomes ready and takes changes; a
    stop then exits 0. A second daemon on the full disk that is asked
    to stop while waiting exits 0 too."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    told: list[str] = []

    def extensions() -> int:
        with contextlib.suppress(BlockingIOError):
            while True:
                told.extend(notify.recv(4096).decode().split("\n"))
        return sum(line.startswith("EXTEND_TIMEOUT_USEC=") for line in told)

    with notify, small_filesystem() as mount:
        async with running_emulator(fast_tenant()) as emulator:
            audience = AudienceConfig("disk", max_records=100, max_age_seconds=0.05)
            config = write_config(mount, emulator.url, [audience])
            filler = mount / "filler"
            fill(filler)

            daemon = Daemon(config)
            running = asyncio.create_task(daemon.run())

            def logged(name: str) -> int:
                return [r.getMessage() for r in caplog.records].count(name)

            await wait_until(lambda: logged("store_unwritable") == 1, TIMEOUT)
            await wait_until(lambda: extensions() >= 3, TIMEOUT, what="three tries")
            assert "READY=1" not in told
            assert any(line.startswith("STATUS=waiting for the store") for line in told)
            assert not running.done()
            assert not daemon.ready.is_set()
            assert logged("store_unwritable") == 1

            filler.unlink()
            await asyncio.wait_for(daemon.ready.wait(), TIMEOUT)
            assert logged("store_writable") == 1
            engine = Engine(emulator, daemon, [audience])
            accounts = await engine.tenant_accounts(20)
            await engine.cdp.changes((audience.id, a, True) for a in accounts)
            await engine.wait_settled(timeout=TIMEOUT)
            daemon.request_shutdown()
            assert await running == ExitCode.OK

            fill(filler)
            second = Daemon(config)
            waiting = asyncio.create_task(second.run())
            await wait_until(lambda: logged("store_unwritable") == 2, TIMEOUT)
            second.request_shutdown()
            assert await asyncio.wait_for(waiting, TIMEOUT) == ExitCode.OK
            assert not second.ready.is_set()

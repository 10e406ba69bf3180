"""The watched folder against a real store: AEP runs as AEP writes them, polled by hand.

The clock is fake and each test calls :meth:`Watcher.poll` itself, so that "still for
``settle_seconds``" is a clock advance, never a sleep.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dbsync.clock import FakeClock
from dbsync.config.schema import FileIngestSettings
from dbsync.files.watcher import AudienceFiles, Watcher
from dbsync.model import AudienceSpec
from dbsync.store import Store
from dbsync.testing.aepfiles import ExportRow, epoch, write_export, write_manifest

AEP_ID = "7c1f0d3a-2b4e-4c6f-9a8b-1d2e3f4a5b6c"
AUDIENCE = "high-intent"
SETTLE = 60.0
DAY1, DAY2, DAY3 = epoch(2026, 12, 1), epoch(2026, 12, 2), epoch(2026, 12, 3)


def accounts(keys: str | list[str], status: str | None = "realized") -> list[ExportRow]:
    return [(k, f"{k} Inc.", f"{k.lower()}.example", status) for k in keys]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=DAY3)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "dbsync.sqlite3", clock=clock) as store:
        await store.sync_audiences(
            [AudienceSpec(audience_id=AUDIENCE, destination="d", name="A", list_name="A")]
        )
        yield store


def watcher_for(store: Store, inbox: Path, clock: FakeClock, mode: str = "full") -> Watcher:
    audience = AudienceFiles(audience_id=AUDIENCE, aep_audience_id=AEP_ID, file_mode=mode)
    settings = FileIngestSettings(directory=inbox, poll_seconds=10, settle_seconds=SETTLE)
    return Watcher(store, settings, lambda: {AEP_ID: audience}, clock)


@pytest.fixture
def watcher(store: Store, inbox: Path, clock: FakeClock) -> Watcher:
    return watcher_for(store, inbox, clock)


async def settle(watcher: Watcher, clock: FakeClock) -> None:
    """Poll once (files seen), then again once they have been still long enough."""
    await watcher.poll()
    await clock.advance(SETTLE)
    await watcher.poll()


async def members(store: Store) -> set[str]:
    while await store.fold_pending():
        pass
    return await store.desired_members(AUDIENCE)


async def outcomes(store: Store) -> list[tuple[str, str]]:
    return [(r.run_key[-15:], r.outcome) for r in reversed(await store.file_runs())]


async def test_a_run_without_manifest_is_read_once_still(
    store: Store, watcher: Watcher, inbox: Path, clock: FakeClock
) -> None:
    write_export(inbox, AEP_ID, accounts("ABC"), when=DAY1)
    await watcher.poll()
    assert await outcomes(store) == []
    [waiting] = watcher.waiting()
    assert "read once still for 60 s" in waiting.reason
    await clock.advance(SETTLE)
    await watcher.poll()
    assert await outcomes(store) == [("20261201_010000", "applied")]
    assert await members(store) == set("ABC")
    assert watcher.waiting() == []


async def test_a_file_written_slowly_is_never_read_half(
    store: Store, watcher: Watcher, inbox: Path, clock: FakeClock
) -> None:
    [path] = write_export(inbox, AEP_ID, accounts([f"K{i:04}" for i in range(300)]), when=DAY1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    for end in (2 * len(data) // 3, len(data)):
        await watcher.poll()
        await clock.advance(SETTLE - 1)
        await watcher.poll()
        assert await outcomes(store) == []
        with path.open("ab") as file:
            file.write(data[file.tell() : end])
    await settle(watcher, clock)
    assert await outcomes(store) == [("20261201_010000", "applied")]
    assert len(await members(store)) == 300


async def test_split_parts_with_a_manifest_are_one_run(
    store: Store, watcher: Watcher, inbox: Path
) -> None:
    keys = [f"K{i:03}" for i in range(25)]
    paths = write_export(
        inbox, AEP_ID, accounts(keys), when=DAY1, max_rows_per_file=10, manifest=True
    )
    assert [p.name[-10:] for p in paths] == [
        "010000.csv",
        "0000_2.csv",
        "0000_3.csv",
        paths[3].name[-10:],
    ]
    await watcher.poll()  # complete by the manifest: no settling
    [run] = await store.file_runs()
    assert (run.outcome, run.rows, run.added) == ("applied", 25, 25)
    assert len(run.files) == 4  # three parts and the manifest
    assert await members(store) == set(keys)


async def test_split_parts_without_a_manifest_are_one_run(
    store: Store, watcher: Watcher, inbox: Path, clock: FakeClock
) -> None:
    keys = [f"K{i:03}" for i in range(25)]
    write_export(inbox, AEP_ID, accounts(keys), when=DAY1, max_rows_per_file=10)
    await settle(watcher, clock)
    [run] = await store.file_runs()
    assert (run.outcome, len(run.files), run.added) == ("applied", 3, 25)


async def test_a_manifest_waits_for_a_missing_part_and_the_right_size(
    store: Store, watcher: Watcher, inbox: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    keys = [f"K{i:03}" for i in range(15)]
    first, second = write_export(inbox, AEP_ID, accounts(keys), when=DAY1, max_rows_per_file=10)
    write_manifest(inbox, [first, second], scheduled_time=DAY1)
    data = second.read_bytes()
    second.unlink()
    with caplog.at_level(logging.INFO, logger="dbsync.files.watcher"):
        await watcher.poll()
        await clock.advance(SETTLE * 10)
        await watcher.poll()
    [waiting] = watcher.waiting()
    assert waiting.reason == f"part {second.name} is missing (listed in the manifest)"
    assert [r.message for r in caplog.records].count("files_run_waiting") == 1
    second.write_bytes(data[:10])
    await watcher.poll()
    [waiting] = watcher.waiting()
    assert waiting.reason.startswith(f"part {second.name} is 10 bytes; the manifest says")
    assert await outcomes(store) == []
    second.write_bytes(data)
    await watcher.poll()
    assert await outcomes(store) == [("20261201_010000", "applied")]
    assert await members(store) == set(keys)


async def test_a_late_run_is_skipped_and_a_duplicate_delivery_is_a_no_op(
    store: Store, watcher: Watcher, inbox: Path, clock: FakeClock
) -> None:
    write_export(inbox, AEP_ID, accounts("ABCDE"), when=DAY2, manifest=True)
    await watcher.poll()
    write_export(inbox, AEP_ID, accounts("ABCDEF"), when=DAY1, manifest=True)  # older
    write_export(inbox, AEP_ID, accounts("ABCDE"), when=DAY3, custom_text="now", manifest=True)
    await watcher.poll()
    await watcher.poll()  # decided runs are not read again
    assert await outcomes(store) == [
        ("20261202_010000", "applied"),
        ("20261201_010000", "skipped_late"),
        ("20261203_010000_now"[-15:], "skipped_duplicate"),
    ]
    assert await members(store) == set("ABCDE")


async def test_a_restart_does_not_record_a_decided_run_again(
    store: Store, inbox: Path, clock: FakeClock
) -> None:
    write_export(inbox, AEP_ID, accounts("AB"), when=DAY1, manifest=True)
    await watcher_for(store, inbox, clock).poll()
    await watcher_for(store, inbox, clock).poll()  # a new process: hashes, finds it seen
    assert await outcomes(store) == [("20261201_010000", "applied")]


async def test_incremental_runs_join_and_leave_after_a_backfill(
    store: Store, inbox: Path, clock: FakeClock
) -> None:
    watcher = watcher_for(store, inbox, clock, mode="incremental")
    write_export(inbox, AEP_ID, accounts("ABCD"), when=DAY1, manifest=True)  # the backfill
    await watcher.poll()
    assert await members(store) == set("ABCD")
    changes = (
        accounts("AB", "exited")
        + accounts("E")
        + [("C", "", "", "exited"), ("C", "C Inc.", "c.example", "realized")]
    )
    write_export(inbox, AEP_ID, changes, when=DAY2, manifest=True)
    await watcher.poll()
    [run, _] = await store.file_runs()
    assert (run.outcome, run.added, run.removed, run.conflicts, run.duplicates) == (
        "applied",
        1,
        2,
        1,
        1,
    )
    assert await members(store) == set("CDE")


async def test_an_exited_row_in_a_full_file_refuses_it(
    store: Store, watcher: Watcher, inbox: Path
) -> None:
    write_export(inbox, AEP_ID, accounts("AB") + accounts("C", "exited"), when=DAY1, manifest=True)
    await watcher.poll()
    [run] = await store.file_runs()
    assert run.outcome == "refused"
    assert "row 3: an exited row in a file of a full audience" in run.reason
    assert await members(store) == set()
    assert await store.held_snapshots() == []


async def test_an_empty_full_file_is_held_then_approved_or_discarded(
    store: Store, watcher: Watcher, inbox: Path
) -> None:
    write_export(inbox, AEP_ID, accounts("ABC"), when=DAY1, manifest=True)
    await watcher.poll()
    write_export(inbox, AEP_ID, [], when=DAY2, manifest=True)
    await watcher.poll()
    assert await outcomes(store) == [("20261201_010000", "applied"), ("20261202_010000", "held")]
    [held] = await store.held_snapshots()
    assert (held.source, held.members, held.reason) == (
        "files",
        0,
        "empty while the audience has 3 members",
    )
    assert await members(store) == set("ABC")
    await store.discard_snapshot(AUDIENCE)
    assert await outcomes(store) == [
        ("20261201_010000", "applied"),
        ("20261202_010000", "discarded"),
    ]
    write_export(inbox, AEP_ID, [], when=DAY3, manifest=True)
    await watcher.poll()
    await store.approve_snapshot(AUDIENCE)
    assert (await outcomes(store))[-1] == ("20261203_010000", "applied")
    assert await members(store) == set()


async def test_a_static_name_overwritten_is_a_new_run(
    store: Store, watcher: Watcher, inbox: Path, clock: FakeClock
) -> None:
    write_export(inbox, AEP_ID, accounts("ABCDE"), when=None, template="static")
    await settle(watcher, clock)
    [path] = write_export(inbox, AEP_ID, accounts("ABCDEF"), when=None, template="static")
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)
    await settle(watcher, clock)
    assert [r.outcome for r in await store.file_runs()] == ["applied", "applied"]
    assert await members(store) == set("ABCDEF")


async def test_gzip_in_a_folder_named_after_the_audience(
    store: Store, watcher: Watcher, inbox: Path, clock: FakeClock
) -> None:
    folder = inbox / AEP_ID
    folder.mkdir()
    (folder / "export_20261201_010000.csv.gz").write_bytes(
        gzip.compress(b"external_id,name,domain\nA,A,a.com\n")
    )
    (inbox / "someone-else_20261201_010000.csv").write_bytes(b"x\n")
    await settle(watcher, clock)
    assert await outcomes(store) == [("20261201_010000", "applied")]
    assert await members(store) == {"A"}


async def test_files_of_decided_runs_are_deleted_after_keep_days(
    store: Store, watcher: Watcher, inbox: Path, clock: FakeClock
) -> None:
    paths = write_export(inbox, AEP_ID, accounts("AB"), when=DAY1, manifest=True)
    await watcher.poll()
    await clock.advance(7 * 86_400 - 1)
    await watcher.poll()
    assert all(p.exists() for p in paths)
    await clock.advance(2)
    await watcher.poll()
    assert not any(p.exists() for p in paths)
    [run] = await store.file_runs()
    assert run.files_deleted


async def test_run_polls_until_stopped(
    watcher: Watcher, clock: FakeClock, inbox: Path, store: Store
) -> None:
    import asyncio

    task = asyncio.create_task(watcher.run())
    await clock.wait_for_sleepers()
    write_export(inbox, AEP_ID, accounts("AB"), when=DAY1, manifest=True)
    await clock.advance(10)
    await clock.wait_for_sleepers()
    assert watcher.polls == 2
    watcher.stop()
    await task
    assert await members(store) == {"A", "B"}


async def test_a_store_that_cannot_commit_is_retried_at_the_next_poll(
    store: Store, watcher: Watcher, inbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dbsync.errors import StoreError

    write_export(inbox, AEP_ID, accounts("AB"), when=DAY1, manifest=True)
    real = store.apply_snapshot

    async def full_disk(*args: object, **kwargs: object) -> object:
        raise StoreError("database or disk is full")

    monkeypatch.setattr(store, "apply_snapshot", full_disk)
    await watcher.poll()
    assert await outcomes(store) == []
    monkeypatch.setattr(store, "apply_snapshot", real)
    await watcher.poll()
    assert await outcomes(store) == [("20261201_010000", "applied")]

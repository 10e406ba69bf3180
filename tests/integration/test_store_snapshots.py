"""Snapshots in the store: staged in chunks, judged by the removal guard, applied in SQL."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from dbsync.clock import FakeClock
from dbsync.model import Account, AudienceSpec, Change, FileRunInfo
from dbsync.store import SnapshotRow, Store
from dbsync.store.schema import MIGRATIONS

AUDIENCE = "aud-1"


def member(key: str, *, name: str = "", qualified_at: float | None = None) -> SnapshotRow:
    return (key, name or f"{key} Inc.", f"{key.lower()}.example", 1, qualified_at)


def exited(key: str, *, qualified_at: float | None = None) -> SnapshotRow:
    return (key, "", "", 0, qualified_at)


async def chunks(*parts: Sequence[SnapshotRow]) -> AsyncIterator[Sequence[SnapshotRow]]:
    for part in parts:
        yield part


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with Store.open(tmp_path / "dbsync.sqlite3", clock=FakeClock(start=1e6)) as store:
        await store.sync_audiences(
            [AudienceSpec(audience_id=AUDIENCE, destination="d", name="A", list_name="List A")]
        )
        yield store


async def seed(store: Store, keys: str) -> None:
    await store.append_changes(
        [
            Change(
                audience_id=AUDIENCE,
                account=Account(external_id=k, name=f"{k} Inc.", domain=f"{k.lower()}.example"),
                member=True,
                ts=1.0,
            )
            for k in keys
        ]
    )
    await store.fold_pending()


async def test_the_migration_creates_the_snapshot_tables(tmp_path: Path) -> None:
    async with Store.open(tmp_path / "s.sqlite3", clock=FakeClock()):
        pass
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"snapshots", "snapshot_rows", "file_runs"} <= tables


async def test_a_full_snapshot_in_chunks_applies_its_difference(store: Store) -> None:
    await seed(store, "ABCDEFGHIJ")
    await store.append_changes(  # not folded yet: "current" must include it
        [Change(audience_id=AUDIENCE, account=Account(external_id="K"), member=True, ts=2.0)]
    )
    rows = [member(k) for k in "BCDEFGHIJ"] + [member("L")]
    outcome = await store.apply_snapshot(
        AUDIENCE, chunks(rows[:4], rows[4:], [member("B")]), source="put"
    )
    assert outcome.state == "applied"
    assert (outcome.current, outcome.members, outcome.added, outcome.removed) == (11, 10, 1, 2)
    assert (outcome.unchanged, outcome.duplicates, outcome.rows) == (9, 1, 11)
    await store.fold_pending()
    assert await store.desired_members(AUDIENCE) == set("BCDEFGHIJL")
    assert await store.held_snapshots() == []


async def test_unchanged_members_are_not_appended_again(store: Store) -> None:
    await seed(store, "ABC")
    before = await store.ledger(AUDIENCE)
    await store.apply_snapshot(AUDIENCE, chunks([member(k) for k in "ABC"]), source="put")
    assert await store.pending_journal_rows() == 0
    assert (await store.ledger(AUDIENCE)).received == before.received


async def test_a_renamed_member_is_appended(store: Store) -> None:
    await seed(store, "AB")
    await store.apply_snapshot(
        AUDIENCE, chunks([member("A", name="A Renamed"), member("B")]), source="put"
    )
    assert await store.pending_journal_rows() == 1


async def test_the_guard_holds_a_snapshot_removing_too_many(store: Store) -> None:
    await seed(store, "ABCDEFGHIJ")
    outcome = await store.apply_snapshot(
        AUDIENCE, chunks([member(k) for k in "ABCDEFG"]), source="put", max_removal_percent=20
    )
    assert outcome.state == "held"
    assert outcome.removed == 3
    assert "would remove 3 of 10 members" in outcome.reason
    [held] = await store.held_snapshots()
    assert (held.audience_id, held.members, held.removed) == (AUDIENCE, 7, 3)
    assert await store.pending_journal_rows() == 0
    await store.fold_pending()
    assert await store.desired_members(AUDIENCE) == set("ABCDEFGHIJ")


async def test_removing_exactly_the_limit_applies(store: Store) -> None:
    await seed(store, "ABCDEFGHIJ")
    outcome = await store.apply_snapshot(
        AUDIENCE, chunks([member(k) for k in "ABCDEFGH"]), source="put", max_removal_percent=20
    )
    assert (outcome.state, outcome.removed) == ("applied", 2)


async def test_an_empty_snapshot_of_a_non_empty_audience_is_held(store: Store) -> None:
    await seed(store, "AB")
    outcome = await store.apply_snapshot(AUDIENCE, chunks(), source="files", max_removal_percent=99)
    assert outcome.state == "held"
    assert outcome.reason == "empty while the audience has 2 members"


async def test_an_empty_snapshot_of_an_empty_audience_applies(store: Store) -> None:
    outcome = await store.apply_snapshot(AUDIENCE, chunks(), source="put")
    assert (outcome.state, outcome.added, outcome.removed) == ("applied", 0, 0)


async def test_approve_applies_the_held_snapshot(store: Store) -> None:
    await seed(store, "ABCD")
    await store.apply_snapshot(AUDIENCE, chunks([member("A")]), source="put")
    outcome = await store.approve_snapshot(AUDIENCE)
    assert outcome is not None
    assert (outcome.state, outcome.added, outcome.removed) == ("applied", 0, 3)
    await store.fold_pending()
    assert await store.desired_members(AUDIENCE) == {"A"}
    assert await store.held_snapshots() == []
    assert await store.approve_snapshot(AUDIENCE) is None


async def test_discard_drops_the_held_snapshot(store: Store) -> None:
    await seed(store, "ABCD")
    await store.apply_snapshot(AUDIENCE, chunks([member("A")]), source="put")
    dropped = await store.discard_snapshot(AUDIENCE)
    assert dropped is not None
    assert dropped.removed == 3
    assert await store.held_snapshots() == []
    assert await store.discard_snapshot(AUDIENCE) is None
    await store.fold_pending()
    assert await store.desired_members(AUDIENCE) == set("ABCD")


async def test_a_newer_snapshot_replaces_a_held_one_and_is_judged_again(store: Store) -> None:
    await seed(store, "ABCDE")
    first = await store.apply_snapshot(AUDIENCE, chunks([member("A")]), source="put")
    assert first.state == "held"
    second = await store.apply_snapshot(
        AUDIENCE, chunks([member(k) for k in "ABCDEF"]), source="put"
    )
    assert (second.state, second.added, second.removed) == ("applied", 1, 0)
    assert await store.held_snapshots() == []
    third = await store.apply_snapshot(AUDIENCE, chunks([member("F")]), source="put")
    fourth = await store.apply_snapshot(AUDIENCE, chunks([member("A")]), source="put")
    assert (third.state, fourth.state) == ("held", "held")
    [held] = await store.held_snapshots()
    assert held.snapshot_id == fourth.snapshot_id


async def test_incremental_rows_join_and_leave_without_the_guard(store: Store) -> None:
    await seed(store, "ABCD")
    outcome = await store.apply_snapshot(
        AUDIENCE,
        chunks([exited("A"), exited("B"), exited("C"), member("E"), exited("Z")]),
        source="files",
        mode="incremental",
        max_removal_percent=20,
    )
    assert outcome.state == "applied"
    assert (outcome.members, outcome.exited, outcome.added, outcome.removed) == (1, 4, 1, 3)
    await store.fold_pending()
    assert await store.desired_members(AUDIENCE) == {"D", "E"}


async def test_conflicting_rows_are_counted_and_resolved(store: Store) -> None:
    outcome = await store.apply_snapshot(
        AUDIENCE,
        chunks(
            [member("A"), exited("A")],  # no times: membership wins
            [exited("B", qualified_at=5.0), member("B", qualified_at=4.0)],  # the later wins
            [member("C", qualified_at=4.0), exited("C", qualified_at=5.0), member("C")],
        ),
        source="files",
        mode="incremental",
    )
    assert (outcome.conflicts, outcome.duplicates) == (3, 4)
    await store.fold_pending()
    assert await store.desired_members(AUDIENCE) == {"A", "C"}


async def test_a_failing_input_drops_what_was_staged(store: Store) -> None:
    await seed(store, "AB")

    async def failing() -> AsyncIterator[Sequence[SnapshotRow]]:
        yield [member("A")]
        raise ValueError("row 2: bad")

    with pytest.raises(ValueError, match="row 2"):
        await store.apply_snapshot(AUDIENCE, failing(), source="put")
    assert await store.held_snapshots() == []
    await store.fold_pending()
    assert await store.desired_members(AUDIENCE) == {"A", "B"}


async def test_file_runs_are_recorded_with_their_outcome(store: Store) -> None:
    run = FileRunInfo(
        audience_id=AUDIENCE,
        run_key="x_20260101_000000",
        run_time=100.0,
        content_hash="h1",
        files=("x_20260101_000000.csv",),
        invalid=2,
    )
    assert await store.file_run_decided(run) is None
    outcome = await store.apply_snapshot(
        AUDIENCE, chunks([member("A"), member("A")]), source="files", run=lambda: run
    )
    assert outcome.state == "applied"
    assert await store.file_run_decided(run) == "seen"
    copy = FileRunInfo(
        audience_id=AUDIENCE,
        run_key="x_20260102_000000",
        run_time=200.0,
        content_hash="h1",
        files=("x_20260102_000000.csv",),
    )
    assert await store.file_run_decided(copy) == "skipped_duplicate"
    late = FileRunInfo(
        audience_id=AUDIENCE,
        run_key="x_20251231_000000",
        run_time=50.0,
        content_hash="h2",
        files=("x_20251231_000000.csv",),
    )
    assert await store.file_run_decided(late) == "skipped_late"
    await store.record_file_run(late, "skipped_late", "older than the newest applied run")
    runs = await store.file_runs()
    assert [(r.run_key, r.outcome) for r in runs] == [
        ("x_20251231_000000", "skipped_late"),
        ("x_20260101_000000", "applied"),
    ]
    applied = runs[1]
    assert (applied.rows, applied.duplicates, applied.invalid, applied.added) == (2, 1, 2, 1)


async def test_a_held_run_becomes_applied_when_approved(store: Store) -> None:
    await seed(store, "ABC")
    run = FileRunInfo(
        audience_id=AUDIENCE, run_key="r1", run_time=1.0, content_hash="h", files=("r1.csv",)
    )
    await store.apply_snapshot(AUDIENCE, chunks(), source="files", run=lambda: run)
    assert [r.outcome for r in await store.file_runs()] == ["held"]
    await store.approve_snapshot(AUDIENCE)
    [applied] = await store.file_runs()
    assert (applied.outcome, applied.removed) == ("applied", 3)


async def test_a_snapshot_staged_before_a_crash_is_dropped_at_open(tmp_path: Path) -> None:
    path = tmp_path / "dbsync.sqlite3"
    async with Store.open(path, clock=FakeClock()) as store:
        await store.sync_audiences(
            [AudienceSpec(audience_id=AUDIENCE, destination="d", name="A", list_name="L")]
        )
    with sqlite3.connect(path) as db:  # what a kill -9 while staging leaves
        db.execute(
            "INSERT INTO snapshots (audience_id, source, mode, state, received_at)"
            " VALUES (?, 'files', 'full', 'staging', 1.0)",
            (AUDIENCE,),
        )
        db.execute("INSERT INTO snapshot_rows VALUES (1, 'A', '', '', 1, NULL, 1, 0)")
    async with Store.open(path, clock=FakeClock()):
        pass
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM snapshot_rows").fetchone()[0] == 0
        assert db.execute("SELECT state FROM snapshots").fetchone()[0] == "dropped"


async def test_a_limit_of_100_turns_the_guard_off(store: Store) -> None:
    await seed(store, "ABC")
    outcome = await store.apply_snapshot(AUDIENCE, chunks(), source="put", max_removal_percent=100)
    assert (outcome.state, outcome.removed) == ("applied", 3)

"""The tenant without HTTP: upload rules, list history, and jobs falling due on a fake clock."""

from __future__ import annotations

import msgspec
import pytest

from dbsync.clock import FakeClock
from dbsync.demandbase.csvfile import encode_rows, read_rows
from dbsync.demandbase.emulator import EmulatorSettings
from dbsync.demandbase.emulator.faults import FaultState
from dbsync.demandbase.emulator.tenant import (
    AccountList,
    ExportState,
    ImportRow,
    ImportState,
    Tenant,
    UploadRejected,
    read_import_file,
)
from dbsync.ingest.bodies import Rejected, snapshot_accounts

HEADER = ("Account Name", "Account Domain", "External Account ID")


def test_an_import_file_gives_its_rows_numbered_from_one() -> None:
    body = b"\xef\xbb\xbf" + encode_rows(
        HEADER, [("Acme, Inc.", "acme.com", "A-1"), ("B", "b.io", "")]
    )
    assert read_import_file(body, reject_external_ids=frozenset()) == [
        ImportRow(1, "A-1", "Acme, Inc.", "acme.com"),
        ImportRow(2, "", "B", "b.io"),
    ]
    assert read_import_file(encode_rows(HEADER[:2], []), reject_external_ids=frozenset()) == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"Account Name,Account Domain\r\n\xc3(,x\r\n", "not a UTF-8 CSV file"),
        (b"", "the file is empty"),
        (b"\r\n", "the file is empty"),
        (encode_rows(("Account Name",), []), "lacks the column 'Account Domain'"),
        (encode_rows(("Name", "Account Domain"), [("a", "b")]), "lacks the column 'Account Name'"),
        (
            encode_rows(HEADER, [("a", "a.com", "1"), ("b", "", "2")]),
            "row 2: column 'Account Domain'",
        ),
        (encode_rows(HEADER, [("a", "a.com", "X-9")]), "row 1: account 'X-9' cannot be imported"),
        (encode_rows(HEADER, [(" ", "a.com", "1")]), "row 1: column 'Account Name' is empty"),
        (encode_rows(HEADER, [("n" * 256, "a.com", "1")]), "'Account Name' holds 256 characters"),
        (encode_rows(HEADER, [("a", "d" * 256, "1")]), "'Account Domain' holds 256 characters"),
    ],
)
def test_an_import_file_demandbase_would_refuse_names_the_problem(
    body: bytes, message: str
) -> None:
    with pytest.raises(UploadRejected, match=message):
        read_import_file(body, reject_external_ids=frozenset({"X-9"}))


def test_a_list_remembers_recent_changes_to_answer_as_of_an_earlier_time() -> None:
    account_list = AccountList(1, "L", created_at=0.0)
    account_list.change(10.0, joined=["a", "b"])
    account_list.change(20.0, left=["a"], joined=["c"])
    account_list.change(20.0, joined=["b"])  # already a member: no change recorded
    assert account_list.members == {"b", "c"}
    assert account_list.members_at(5.0) == set()
    assert account_list.members_at(10.0) == {"a", "b"}
    assert account_list.members_at(19.9) == {"a", "b"}
    assert account_list.members_at(20.0) == {"b", "c"}
    account_list.forget_before(10.0)
    assert account_list.members_at(15.0) == {"a", "b"}  # still answerable after forgetting


def tenant(clock: FakeClock, **settings: object) -> Tenant:
    chosen = msgspec.convert(
        {"accounts": 20, "job_delay_seconds": 10.0, **settings}, EmulatorSettings
    )
    faults = FaultState(chosen.start_faults, chosen.seed)
    return Tenant(chosen, clock, faults, export_finished=lambda at, size: None)


def rows(state: Tenant, *indexes: int) -> list[ImportRow]:
    accounts = state.accounts
    return [
        ImportRow(n, accounts.external_id(i), accounts.name(i), accounts.domain(i))
        for n, i in enumerate(indexes, start=1)
    ]


async def test_jobs_fall_due_lazily_and_are_stamped_with_their_own_due_time() -> None:
    clock = FakeClock()
    state = tenant(clock)
    job = state.create_import_job("L", "Account", "CSV")
    state.start_import(job, rows(state, 0, 1), "insert")
    uploaded = clock.time()
    await clock.advance(9.0)
    assert state.import_job(job.id) is job
    assert job.state is ImportState.PROCESSING
    assert state.imports_processing() == 1
    await clock.advance(50.0)
    assert job.state is ImportState.PROCESSING  # nobody looked yet: nothing ran
    account_list = state.lists["L"]
    assert account_list.members == {"ACC-0000001", "ACC-0000002"}
    assert "ACC-0000002" in account_list
    assert len(account_list) == 2
    assert job.state is ImportState.COMPLETED
    assert job.updated_at == uploaded + 10.0
    assert job.account_list_id == 1


async def test_an_export_snapshots_the_lists_as_they_were_lag_seconds_before_it_finished() -> None:
    clock = FakeClock()
    state = tenant(clock, visibility_lag_seconds=30.0)
    job = state.create_import_job("L", "Account", "CSV")
    state.start_import(job, rows(state, 0, 1, 2), "insert")
    await clock.advance(10.0)
    export = state.create_export_job("read", (state.lists["L"].id,))
    await clock.advance(5.0)
    assert state.exports_running() == 1
    assert export.state is ExportState.PROCESSING
    await clock.advance(5.0)
    assert state.export_job(export.job_id) is export
    assert export.state is ExportState.FINISHED
    assert list(read_rows(export.result)) == []  # completed 10 s before: younger than 30 s

    await clock.advance(20.0)
    later = state.create_export_job("read", (1,))
    await clock.advance(10.0)
    assert state.export_job(later.job_id) is later
    assert [r["External Account ID"] for r in read_rows(later.result)] == [
        "ACC-0000001",
        "ACC-0000002",
        "ACC-0000003",
    ]
    assert later.rows == 3


async def test_drops_and_failures_follow_the_faults_in_force_when_the_job_completes() -> None:
    clock = FakeClock()
    state = tenant(clock, drop_ratio=1.0)
    dropped = state.create_import_job("L", "Account", "CSV")
    state.start_import(dropped, rows(state, 0, 1), "insert")
    await clock.advance(10.0)
    assert state.dropped == [(dropped.id, "ACC-0000001"), (dropped.id, "ACC-0000002")]
    assert state.lists["L"].members == frozenset()
    assert state.row_counts().dropped == 2

    noop = state.create_import_job("L", "Account", "CSV")
    state.start_import(noop, rows(state, 3), "noop")
    await clock.advance(10.0)
    assert state.import_job(noop.id) is noop
    assert noop.dropped == []  # a noop changes no list, so nothing is lost


@pytest.mark.parametrize(
    "row",
    [
        ("Acme", "acme.com", "A"),
        ("", "acme.com", "A"),
        ("Acme", "\t", "A"),
        ("n" * 255, "d" * 255, "x" * 256),
        ("n" * 256, "acme.com", "A"),
        ("Acme", "d" * 256, "A"),
        ("Acme", "acme.com", "   "),
    ],
)
async def test_ingest_refuses_exactly_the_rows_the_emulator_refuses(
    row: tuple[str, str, str],
) -> None:
    """One rule in two places: what ingest lets in, the emulator's import accepts."""
    body = encode_rows(HEADER, [row])
    try:
        read_import_file(body, reject_external_ids=frozenset())
        emulator_accepts = True
    except UploadRejected:
        emulator_accepts = False
    try:
        await snapshot_accounts(body, "csv")
        ingest_accepts = True
    except Rejected:
        ingest_accepts = False

    assert ingest_accepts == emulator_accepts


@pytest.mark.parametrize(
    ("dialects", "multi"),
    [((), False), ((), True), (("multi-list-column",), True), (("results-columns",), True)],
)
async def test_an_export_writes_one_row_per_member_ordered_by_account_then_list(
    dialects: tuple[str, ...], multi: bool
) -> None:
    # The results file, written from first principles with encode_rows: the emulator's
    # fast writer (each account's cells encoded once) must give the same bytes.
    clock = FakeClock()
    state = tenant(clock, faults={"dialects": list(dialects)}, visibility_lag_seconds=0.0)
    for name, indexes in (("L1", (4, 0, 7)), ("L2", (7, 1)), ("L3", (2,))):
        job = state.create_import_job(name, "Account", "CSV")
        state.start_import(job, rows(state, *indexes), "insert")
    await clock.advance(10.0)
    ids = tuple(state.lists[name].id for name in ("L1", "L2"))
    export = state.create_export_job("read", ids, multi=multi)
    await clock.advance(20.0)
    assert state.export_job(export.job_id) is export
    accounts = state.accounts
    by_list = "multi-list-column" in dialects
    members = sorted(
        {(i, ids[n] if by_list else 0) for n, ix in enumerate(((4, 0, 7), (7, 1))) for i in ix}
    )
    cells = [
        (str(i + 1), accounts.name(i), accounts.domain(i), accounts.external_id(i))
        + ((str(list_id),) if by_list else ())
        for i, list_id in members
    ]
    header = ("Account ID", "Account Name", "Account Domain", "External Account ID")
    header += ("Account List ID",) if by_list else ()
    if "results-columns" in dialects:
        order = [3, 2, 1, 0]
        header = tuple(
            [header[k].upper() if k % 2 else header[k].lower() for k in order] + ["Industry"]
        )
        cells = [tuple([row[k] for k in order] + ["Software"]) for row in cells]
        assert export.result == b"\xef\xbb\xbf" + encode_rows(header, cells)
    else:
        assert export.result == encode_rows(header, cells)
    assert export.rows == len(cells) == (5 if by_list else 4)


async def test_an_export_after_a_list_changed_sees_the_change_and_none_younger() -> None:
    # The members of each list are kept between exports while the list does not change:
    # a change must show in the first export finished a lag after it, and not before.
    clock = FakeClock()
    state = tenant(clock, faults={"dialects": ["multi-list-column"]}, visibility_lag_seconds=15.0)
    job = state.create_import_job("L", "Account", "CSV")
    state.start_import(job, rows(state, 2, 0), "insert")
    await clock.advance(20.0)  # completed at 10

    async def exported() -> list[str]:
        # Created now, finished 10 s later: it sees the list as it was 5 s ago.
        export = state.create_export_job("read", (state.lists["L"].id,), multi=True)
        await clock.advance(10.0)
        assert state.export_job(export.job_id) is export
        return [r["External Account ID"] for r in read_rows(export.result)]

    assert await exported() == ["ACC-0000001", "ACC-0000003"]
    assert await exported() == ["ACC-0000001", "ACC-0000003"]  # the kept members
    job = state.create_import_job("L", "Account", "CSV")
    state.start_import(job, rows(state, 1), "insert")
    await clock.advance(10.0)  # completed at 50
    assert await exported() == ["ACC-0000001", "ACC-0000003"]  # seen at 45
    assert await exported() == ["ACC-0000001", "ACC-0000002", "ACC-0000003"]  # at 55

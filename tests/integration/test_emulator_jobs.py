"""Import and export jobs over HTTP: matching, list actions, timing, lag, loss, failure."""

from __future__ import annotations

import asyncio
import datetime as dt
import random

import msgspec

from dbsync.clock import FakeClock
from dbsync.demandbase.csvfile import encode_accounts, encode_rows, read_rows
from dbsync.demandbase.emulator import EmulatorSettings, Faults
from dbsync.demandbase.wire import EXPORT_RESULT_COLUMNS
from dbsync.model import Account
from dbsync.testing import EmulatorApi, running_emulator

INSTANT = EmulatorSettings(accounts=2000, job_delay_seconds=0.0)


def iso(epoch_seconds: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch_seconds, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def members(api: EmulatorApi, name: str) -> list[str] | None:
    lists = await api.control("lists")
    return lists[name]["members"] if name in lists else None


async def read_back(api: EmulatorApi, list_id: int) -> list[dict[str, str]]:
    """Export list ``list_id`` (jobs take no time here) and read its results file."""
    created = await api.create_export(list_id)
    assert created.status == 202, created
    status = await api.export_status(created.json()["jobId"])
    assert status["jobStatus"] == "finished"
    download = await api.get_url(status["resultsUrl"])
    assert download.status == 200
    return list(read_rows(download.body))


async def test_rows_match_by_external_id_then_domain_and_name_and_the_rest_are_recorded() -> None:
    async with running_emulator(INSTANT) as api:
        a = api.accounts(0, 3)
        rows = [
            # The external id wins over a name and domain that match nothing.
            Account(external_id=a[0].external_id, name="Renamed Ltd", domain="renamed.example"),
            # No external id: domain and name, compared case-insensitively.
            Account(external_id="", name=a[1].name.upper(), domain=f" {a[1].domain.upper()} "),
            # An external id Demandbase does not know falls back to domain and name.
            Account(external_id="CRM-7", name=a[2].name, domain=a[2].domain),
            Account(external_id="CRM-404", name="Nobody Inc.", domain="nobody.example"),
            Account(external_id="", name=a[0].name, domain="elsewhere.example"),
        ]
        job_id = await api.import_accounts("Matched", rows)

        job = await api.import_job(job_id)
        assert job["state"] == "completed"  # unmatched rows do not fail a job
        assert await members(api, "Matched") == sorted(x.external_id for x in a)
        [view] = (await api.control("jobs"))["import"]
        assert (view["rows"], view["matched"], view["unmatched"]) == (5, 3, ["CRM-404", ""])
        assert (await api.control("stats"))["rows"] == {
            "received": 5,
            "matched": 3,
            "unmatched": 2,
            "dropped": 0,
        }
        unmatched = api.emulator.tenant.unmatched
        assert [(job_id, row.row, row.domain) for _, row in unmatched] == [
            (job_id, 4, "nobody.example"),
            (job_id, 5, "elsewhere.example"),
        ]


async def test_jobs_complete_after_the_delay_and_change_lists_in_completion_order() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=100, job_delay_seconds=10.0)
    async with running_emulator(settings, clock=clock) as api:
        a = api.accounts(0, 3)
        started = clock.time()
        first = await api.import_accounts("Ordered", a)
        await clock.advance(1.0)
        second = await api.import_accounts("Ordered", a[1:2], action="delete")

        await clock.advance(8.0)
        assert (await api.import_job(first))["state"] == "processing"
        assert await members(api, "Ordered") is None
        await clock.advance(1.0)
        assert (await api.import_job(first))["state"] == "completed"
        assert (await api.import_job(second))["state"] == "processing"
        assert await members(api, "Ordered") == [
            a[0].external_id,
            a[1].external_id,
            a[2].external_id,
        ]

        await clock.advance(100.0)  # asked late, the job still completed at its due time
        job = await api.import_job(second)
        assert job["state"] == "completed"
        assert job["updatedAt"] == iso(started + 11.0)
        assert await members(api, "Ordered") == [a[0].external_id, a[2].external_id]


async def test_list_actions_insert_replace_delete_and_noop() -> None:
    async with running_emulator(INSTANT) as api:
        a = api.accounts(0, 6)
        inserted = await api.import_job(await api.import_accounts("One", a[:3]))
        assert inserted["accountListId"] == 1  # [A2] the completed job names its list
        other = await api.import_job(await api.import_accounts("Two", a[:1]))
        assert other["accountListId"] == 2  # one list per name [A1], ids increasing

        await api.import_accounts("One", a[3:5], action="replace")
        assert await members(api, "One") == [x.external_id for x in a[3:5]]
        deleted = await api.import_job(await api.import_accounts("One", a[3:4], action="delete"))
        assert deleted["accountListId"] == 1
        assert await members(api, "One") == [a[4].external_id]
        noop = await api.import_job(await api.import_accounts("One", a[:2], action="noop"))
        assert noop["state"] == "completed"
        assert "accountListId" not in noop
        assert await members(api, "One") == [a[4].external_id]

        missing = await api.import_job(await api.import_accounts("Never", a[:2], action="delete"))
        assert missing["state"] == "completed"
        assert "accountListId" not in missing
        assert await members(api, "Never") is None

        replaced = await api.import_job(await api.import_accounts("Fresh", a[:1], action="replace"))
        assert replaced["accountListId"] == 3  # replace creates the list, as insert does


async def test_exports_see_list_changes_only_after_the_visibility_lag() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=100, job_delay_seconds=0.0, visibility_lag_seconds=100.0)
    async with running_emulator(settings, clock=clock) as api:
        a = api.accounts(0, 2)
        await api.import_accounts("Lagging", a)
        assert await members(api, "Lagging") == [a[0].external_id, a[1].external_id]  # true now
        assert await read_back(api, 1) == []

        await clock.advance(99.0)
        assert await read_back(api, 1) == []
        await clock.advance(1.0)
        rows = await read_back(api, 1)
        assert list(rows[0]) == list(EXPORT_RESULT_COLUMNS)  # [A3]
        assert [
            (r["External Account ID"], r["Account Name"], r["Account Domain"]) for r in rows
        ] == [(x.external_id, x.name, x.domain) for x in a]
        assert [r["Account ID"] for r in rows] == ["1", "2"]

        await api.import_accounts("Lagging", a[:1], action="delete")
        assert await members(api, "Lagging") == [a[1].external_id]
        assert len(await read_back(api, 1)) == 2  # the removal is too young to show
        await clock.advance(100.0)
        assert [r["External Account ID"] for r in await read_back(api, 1)] == [a[1].external_id]


async def dropped_ids(seed: int, ratio: float, accounts: int = 1000) -> tuple[list[str], list[str]]:
    """Import ``accounts`` rows with a drop ratio; the dropped ids and the list's members."""
    settings = EmulatorSettings(accounts=accounts, seed=seed, job_delay_seconds=0.0)
    async with running_emulator(settings) as api:
        assert (await api.set_faults({"drop_ratio": ratio})).status == 200
        job_id = await api.import_accounts("Lossy", api.accounts(0, accounts))
        assert (await api.import_job(job_id))["state"] == "completed"  # silent loss
        [view] = (await api.control("jobs"))["import"]
        assert (await api.control("stats"))["rows"]["dropped"] == len(view["dropped"])
        return view["dropped"], await members(api, "Lossy") or []


async def test_drop_ratio_drops_that_share_of_rows_the_same_way_for_the_same_seed() -> None:
    dropped, kept = await dropped_ids(seed=7, ratio=0.3)
    assert 0.25 <= len(dropped) / 1000 <= 0.35
    assert set(dropped).isdisjoint(kept)
    assert len(dropped) + len(kept) == 1000

    again, _ = await dropped_ids(seed=7, ratio=0.3)
    assert again == dropped
    other, _ = await dropped_ids(seed=8, ratio=0.3)
    assert other != dropped


async def test_drop_ratio_from_the_start_settings() -> None:
    settings = EmulatorSettings(accounts=200, seed=3, job_delay_seconds=0.0, drop_ratio=1.0)
    async with running_emulator(settings) as api:
        assert api.emulator.faults.drop_ratio == 1.0
        await api.import_accounts("Lost", api.accounts(0, 200))
        assert await members(api, "Lost") == []
        assert len(api.emulator.tenant.dropped) == 200


async def test_failed_jobs_change_nothing_and_failed_exports_say_why() -> None:
    faults = Faults(job_fail_ratio=1.0)
    settings = msgspec.structs.replace(INSTANT, faults=faults)
    async with running_emulator(settings) as api:
        job = await api.import_job(await api.import_accounts("Failing", api.accounts(0, 3)))
        assert job["state"] == "failed"
        assert await members(api, "Failing") is None

        api.emulator.set_faults(Faults())
        await api.import_accounts("Failing", api.accounts(0, 3))
        api.emulator.set_faults(faults)
        export = (await api.create_export(1)).json()
        status = await api.export_status(export["jobId"])
        assert status["jobStatus"] == "failed"
        assert status["resultsUrl"] == ""
        assert status["message"]


async def test_uploads_that_demandbase_would_refuse_answer_400_naming_the_problem() -> None:
    async with running_emulator(INSTANT) as api:
        header = ("Account Name", "Account Domain", "External Account ID")
        cases = {
            b"\xff\xfe not utf-8": "not a UTF-8 CSV file",
            b'Account Name,Account Domain\r\n"unclosed,x.com\r\n': "not a UTF-8 CSV file",
            b"": "empty",
            b"Account Name,External Account ID\r\nAcme,ACC-1\r\n": "'Account Domain'",
            encode_rows(header, [("Acme", "acme.com", "1"), ("Beta", " ", "2")]): (
                "row 2: column 'Account Domain' is empty"
            ),
            encode_rows(header, [("", "acme.com", "1")]): "row 1: column 'Account Name' is empty",
        }
        for body, message in cases.items():
            answer = await api.upload(await api.create_import_job("Bad"), body)
            assert answer.status == 400, body
            assert message in answer.json()["message"], (body, answer.json())

        good = encode_accounts(api.accounts(0, 1))
        job_id = await api.create_import_job("Good")
        wrong_type = await api.request(
            "PUT", f"/import/v1/job/{job_id}/data", data=good, content_type="text/csv"
        )
        assert wrong_type.status == 400
        assert "application/octet-stream" in wrong_type.json()["message"]
        assert (await api.upload(job_id, good, action="merge")).status == 400
        assert (await api.import_job(job_id))["state"] == "new"
        assert (await api.upload(job_id, good)).status == 200
        again = await api.upload(job_id, good)
        assert again.status == 400
        assert "new" in again.json()["message"]
        assert (await api.upload(123, good)).json() == {"message": "job 123 not found"}
        # A header with no rows is a valid, empty import.
        empty_job = await api.create_import_job("Empty")
        assert (await api.upload(empty_job, encode_rows(header, []))).status == 200


async def test_two_uploads_racing_to_one_job_leave_one_accepted() -> None:
    async with running_emulator(INSTANT) as api:
        job_id = await api.create_import_job("Race")
        files = [encode_accounts(api.accounts(i * 50, 50)) for i in range(2)]
        answers = await asyncio.gather(*(api.upload(job_id, file) for file in files))
        assert sorted(a.status for a in answers) == [200, 400]
        assert len(await members(api, "Race") or []) == 50


async def test_the_results_url_is_signed_and_expires() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=10, job_delay_seconds=0.0, results_url_ttl_seconds=60.0)
    async with running_emulator(settings, clock=clock) as api:
        await api.import_accounts("Signed", api.accounts(0, 2))
        status = await api.export_status((await api.create_export(1)).json()["jobId"])
        url = status["resultsUrl"]
        assert (await api.get_url(url)).status == 200  # no bearer needed
        tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
        assert (await api.get_url(tampered)).status == 403
        await clock.advance(61.0)
        assert (await api.get_url(url)).status == 403
        assert api.emulator.stats()["downloads"] == 1


async def test_a_tenant_of_100000_accounts_takes_a_10000_row_job() -> None:
    """Distinct domains for 100,000 generated accounts; a 10,000-row job matches the
    9,900 known ones, in order, and counts the 100 others unmatched. (How fast: see
    bench/emulator_startup.py; a test asserts no duration.)"""
    settings = EmulatorSettings(accounts=100_000, seed=11, job_delay_seconds=0.0)
    async with running_emulator(settings) as api:
        database = api.emulator.tenant.accounts
        assert len({database.domain(i) for i in range(len(database))}) == 100_000
        chosen = sorted(random.Random(1).sample(range(100_000), 9_900))
        rows = [database.account(i) for i in chosen] + [
            Account(external_id=f"CRM-{n}", name=f"Unknown {n}", domain=f"u{n}.example")
            for n in range(100)
        ]
        job_id = await api.import_accounts("Big", rows)
        assert (await api.import_job(job_id))["state"] == "completed"
        exported = await read_back(api, 1)
        assert [r["External Account ID"] for r in exported] == [
            database.external_id(i) for i in chosen
        ]
        assert (await api.control("stats"))["rows"]["unmatched"] == 100

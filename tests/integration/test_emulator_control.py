"""The control routes: true state for tests and demos, no quota spent, bad parameters named."""

from __future__ import annotations

from dbsync.clock import FakeClock
from dbsync.demandbase.emulator import EmulatorSettings
from dbsync.testing import running_emulator


async def test_accounts_pages_through_the_database() -> None:
    async with running_emulator(EmulatorSettings(accounts=250, seed=4)) as api:
        page = await api.control("accounts", limit="3", offset="248")
        assert page["total"] == 250
        assert [a["external_id"] for a in page["accounts"]] == ["ACC-0000249", "ACC-0000250"]
        first = (await api.control("accounts"))["accounts"]
        assert len(first) == 100
        assert first[0] == {
            "external_id": "ACC-0000001",
            "name": api.emulator.tenant.accounts.name(0),
            "domain": api.emulator.tenant.accounts.domain(0),
        }
        for params, name in (({"limit": "-1"}, "limit"), ({"offset": "x"}, "offset")):
            answer = await api.request("GET", "/_emulator/accounts", token=None, params=params)
            assert answer.status == 400
            assert answer.json()["message"].startswith(name)


async def test_lists_jobs_and_stats_show_the_truth_without_spending_quota() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=50, job_delay_seconds=5.0, import_status_per_day=1)
    async with running_emulator(settings, clock=clock) as api:
        accounts = api.accounts(0, 3)
        job_id = await api.import_accounts("Zeta", list(reversed(accounts)))
        assert await api.control("lists") == {}
        await clock.advance(5.0)
        for _ in range(3):
            assert await api.control("lists") == {
                "Zeta": {"id": 1, "members": [a.external_id for a in accounts]}
            }
        [job] = (await api.control("jobs"))["import"]
        assert (job["id"], job["state"], job["list_action"]) == (job_id, "completed", "insert")

        stats = await api.control("stats")
        assert stats["requests"] == 2  # create and upload; the control routes are not counted
        assert stats["requests_by_endpoint"] == {"import.create_job": 1, "import.upload": 1}
        assert stats["jobs"]["import"] == {"new": 0, "processing": 0, "completed": 1, "failed": 0}
        assert stats["quota"]["endpoints"]["import.job_status"] == {"used": 0, "limit": 1}
        assert stats["answers_by_status"] == {"200": 2}
        assert stats["lists"] == 1
        assert stats == api.emulator.stats()


async def test_unknown_demandbase_routes_answer_404_in_the_apis_envelope() -> None:
    async with running_emulator(EmulatorSettings(accounts=10)) as api:
        imported = await api.request("GET", "/import/v1/nowhere")
        assert imported.status == 404
        assert set(imported.json()) == {"message"}
        exported = await api.request("DELETE", "/data/export/v1/jobs")
        assert exported.status == 404
        assert exported.json()["errorCode"] == "404-301"

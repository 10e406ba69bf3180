"""Both authentication modes at once, token expiry, and per-API 401 and 403 bodies."""

from __future__ import annotations

from dbsync.clock import FakeClock
from dbsync.demandbase.emulator import EmulatorSettings, Faults
from dbsync.testing import EmulatorApi, running_emulator

CREDENTIALS = {
    "grantType": "client_credentials",
    "clientId": "emulator-client",
    "clientSecret": "emulator-secret",
}


async def mint(api: EmulatorApi, credentials: dict[str, str] = CREDENTIALS) -> str:
    answer = await api.request("POST", "/auth/v1/token", token=None, json=credentials)
    assert answer.status == 200, answer
    body = answer.json()
    assert body["tokenType"] == "bearer"
    assert body["expiresIn"] == api.emulator.settings.token_ttl_seconds
    token: str = body["accessToken"]
    return token


async def assert_refused(api: EmulatorApi, token: str | None) -> None:
    """Both APIs answer 401, each with its own body."""
    imported = await api.request("GET", "/import/v1/jobs", token=token)
    assert imported.status == 401
    assert set(imported.json()) == {"status"}
    exported = await api.request("GET", "/data/export/v1/jobs", token=token)
    assert exported.status == 401
    assert exported.json()["errorCode"] == "401-100"


async def test_the_legacy_token_and_minted_tokens_work_side_by_side() -> None:
    settings = EmulatorSettings(accounts=10, token="legacy-secret")
    async with running_emulator(settings) as api:
        minted = await mint(api)
        assert minted != await mint(api)  # opaque and fresh each time
        for token in ("legacy-secret", minted):
            assert (await api.request("GET", "/import/v1/jobs", token=token)).status == 200
            assert (await api.request("GET", "/data/export/v1/jobs", token=token)).status == 200
        assert api.emulator.stats()["tokens_minted"] == 2


async def test_missing_unknown_and_malformed_tokens_answer_401() -> None:
    async with running_emulator(EmulatorSettings(accounts=10)) as api:
        await assert_refused(api, None)
        await assert_refused(api, "guessed")
        basic = {"Authorization": "Basic emulator-token"}
        async with api.session.get(f"{api.url}/import/v1/jobs", headers=basic) as answer:
            assert answer.status == 401
        # Refusals spend no daily quota.
        assert api.emulator.stats()["quota"]["endpoints"]["import.job_list"]["used"] == 0


async def test_minted_tokens_expire_after_their_lifetime_on_the_emulator_clock() -> None:
    clock = FakeClock()
    settings = EmulatorSettings(accounts=10, token_ttl_seconds=600)
    async with running_emulator(settings, clock=clock) as api:
        token = await mint(api)
        await clock.advance(599.0)
        assert (await api.request("GET", "/import/v1/jobs", token=token)).status == 200
        await clock.advance(1.0)
        await assert_refused(api, token)
        assert (await api.request("GET", "/import/v1/jobs")).status == 200  # legacy: no expiry


async def test_wrong_credentials_answer_400_with_a_message() -> None:
    async with running_emulator(EmulatorSettings(accounts=10)) as api:
        for credentials in (
            {**CREDENTIALS, "clientSecret": "wrong"},
            {**CREDENTIALS, "clientId": "someone"},
            {**CREDENTIALS, "grantType": "password"},
            {"clientId": "emulator-client"},
        ):
            answer = await api.request("POST", "/auth/v1/token", token=None, json=credentials)
            assert answer.status == 400
            assert set(answer.json()) == {"message"}
        assert api.emulator.stats()["tokens_minted"] == 0


async def test_an_expire_tokens_fault_revokes_every_minted_token_now() -> None:
    async with running_emulator(EmulatorSettings(accounts=10)) as api:
        first, second = await mint(api), await mint(api)
        assert (await api.set_faults({"expire_tokens": True})).status == 200
        await assert_refused(api, first)
        await assert_refused(api, second)
        assert (await api.request("GET", "/import/v1/jobs")).status == 200  # legacy token
        fresh = await mint(api)  # a new mint works again
        assert (await api.request("GET", "/import/v1/jobs", token=fresh)).status == 200
        api.emulator.set_faults(Faults(expire_tokens=True))
        await assert_refused(api, fresh)


async def test_missing_permissions_answer_403_per_api() -> None:
    settings = EmulatorSettings(accounts=10, permissions=frozenset({"export"}))
    async with running_emulator(settings) as api:
        refused = await api.request("POST", "/import/v1/job", json={"dataImportName": "x"})
        assert refused.status == 403
        assert refused.json() == {
            "status": 'The authenticated user lacks the "Import Data" permission'
        }
        assert (await api.request("GET", "/data/export/v1/jobs")).status == 200

    settings = EmulatorSettings(accounts=10, permissions=frozenset({"import"}))
    async with running_emulator(settings) as api:
        refused = await api.request("GET", "/data/export/v1/jobs")
        assert refused.status == 403
        assert refused.json()["errorCode"] == "403-102"
        assert (await api.request("GET", "/import/v1/jobs")).status == 200

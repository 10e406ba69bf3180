"""Every emulator answer validates against Demandbase's published OpenAPI definitions.

Each Demandbase route is driven through its success and its main error paths over
real HTTP, with exchanges recorded; then every exchange is validated, request and
response (tests/support/openapi.py). The validator itself is shown to catch broken
bodies, so that the first test cannot pass vacuously.
"""

from __future__ import annotations

import msgspec
import pytest

from dbsync.clock import FakeClock
from dbsync.demandbase.csvfile import encode_accounts, encode_rows
from dbsync.demandbase.emulator import EmulatorSettings, Exchange
from dbsync.demandbase.wire import Endpoint
from dbsync.testing import EmulatorApi, running_emulator
from tests.support.openapi import ContractViolation, validate_exchange, validate_request

SETTINGS = EmulatorSettings(
    accounts=200,
    job_delay_seconds=10.0,
    import_sources_per_day=2,  # the third sources request meets the daily quota
    record_exchanges=True,
)


class Recorder:
    """Remembers which recorded exchanges a test broke on purpose."""

    def __init__(self, api: EmulatorApi) -> None:
        self.api = api
        self.invalid: set[int] = set()

    def mark_last_invalid(self) -> None:
        self.invalid.add(len(self.api.emulator.exchanges) - 1)

    def violations(self) -> list[str]:
        found = []
        for index, exchange in enumerate(self.api.emulator.exchanges):
            try:
                validate_exchange(exchange, invalid_request=index in self.invalid)
            except ContractViolation as violation:
                found.append(str(violation))
        return found


async def drive_auth(api: EmulatorApi, rec: Recorder) -> None:
    token = "/auth/v1/token"
    credentials = {
        "grantType": "client_credentials",
        "clientId": "emulator-client",
        "clientSecret": "emulator-secret",
    }
    assert (await api.request("POST", token, token=None, json=credentials)).status == 200
    wrong = {**credentials, "clientSecret": "nope"}
    assert (await api.request("POST", token, token=None, json=wrong)).status == 400
    missing = {"grantType": "client_credentials", "clientId": "emulator-client"}
    assert (await api.request("POST", token, token=None, json=missing)).status == 400
    rec.mark_last_invalid()
    not_json = await api.request(
        "POST", token, token=None, data=b"{oops", content_type="application/json"
    )
    assert not_json.status == 400
    rec.mark_last_invalid()


async def drive_import(api: EmulatorApi, rec: Recorder, clock: FakeClock) -> None:
    job_id = await api.create_import_job("Contract list")
    no_type = await api.request("POST", "/import/v1/job", json={"dataImportName": "x"})
    assert no_type.status == 400
    rec.mark_last_invalid()
    not_json = await api.request(
        "POST", "/import/v1/job", data=b"dataImportName=x", content_type="application/json"
    )
    assert not_json.json() == {"message": "the body must be a JSON object"}
    rec.mark_last_invalid()
    no_token = await api.request(
        "POST", "/import/v1/job", token=None, json={"dataImportName": "x", "entityType": "Account"}
    )
    assert no_token.status == 401
    rec.mark_last_invalid()

    file = encode_accounts(api.accounts(0, 5))
    assert (await api.upload(job_id, file, action="bogus")).status == 400
    rec.mark_last_invalid()
    assert (await api.upload(job_id, file, action="insert")).status == 200
    assert (await api.upload(job_id, file, action="insert")).status == 400  # twice
    assert (await api.upload(99, file)).status == 404
    empty_name = encode_rows(("Account Name", "Account Domain"), [("", "x.com")])
    assert (await api.upload(await api.create_import_job("x"), empty_name)).status == 400
    not_an_id = await api.request(
        "PUT", "/import/v1/job/abc/data", data=file, content_type="application/octet-stream"
    )
    assert not_an_id.status == 400
    rec.mark_last_invalid()

    assert (await api.import_job(job_id))["state"] == "processing"
    await clock.advance(SETTINGS.job_delay_seconds)
    completed = await api.import_job(job_id)
    assert completed["state"] == "completed"
    assert completed["accountListId"] == 1
    assert (await api.request("GET", "/import/v1/job/99")).status == 404
    assert (await api.request("GET", "/import/v1/job/abc")).status == 400
    rec.mark_last_invalid()

    jobs = await api.request("GET", "/import/v1/jobs", params={"state": "completed"})
    assert jobs.status == 200
    assert jobs.json()["totalCount"] == 1
    bad_page = await api.request("GET", "/import/v1/jobs", params={"page": "first"})
    assert bad_page.status == 400
    rec.mark_last_invalid()

    assert (await api.request("GET", "/import/v1/Account/sources")).json() == {"data": ["CSV"]}
    assert (await api.request("GET", "/import/v1/Spaceship/sources")).status == 400
    over_quota = await api.request("GET", "/import/v1/Account/sources")
    assert over_quota.status == 429  # an undeclared status: the assumed ErrorDto

    for status in (500, 503):
        await api.set_faults({"status_storm": {"status": status, "count": 1}})
        assert (await api.request("GET", "/import/v1/jobs")).status == status


async def drive_export(api: EmulatorApi, rec: Recorder, clock: FakeClock) -> None:
    created = await api.create_export(1)
    assert created.status == 202
    job_id = created.json()["jobId"]
    assert (await api.create_export(1)).status == 429  # one export at a time

    path = "/data/export/v1/accountList/job"
    not_json = await api.request("POST", path, data=b"[1,", content_type="application/json")
    assert not_json.json()["errorCode"] == "400-102"
    rec.mark_last_invalid()
    too_long = await api.request("POST", path, json={"jobName": "n" * 51, "accountListId": 1})
    assert too_long.json()["errorCode"] == "400-126"
    not_numeric = await api.request("POST", path, json={"jobName": "n", "accountListId": "one"})
    assert not_numeric.json()["errorCode"] == "400-129"
    rec.mark_last_invalid()
    unknown_list = await api.request("POST", path, json={"jobName": "n", "accountListId": 77})
    assert unknown_list.json()["errorCode"] == "400-142"
    both = {"jobName": "n", "accountListId": 1, "accountListIds": [1]}
    assert (await api.request("POST", path, json=both)).json()["errorCode"] == "400-144"
    extra = {"jobName": "n", "accountListId": 1, "format": "CSV"}
    assert (await api.request("POST", path, json=extra)).json()["errorCode"] == "400-147"
    no_token = await api.request("POST", path, token=None, json={"jobName": "n"})
    assert no_token.json()["errorCode"] == "401-100"
    rec.mark_last_invalid()

    assert (await api.export_status(job_id))["jobStatus"] == "accepted"
    await clock.advance(SETTINGS.job_delay_seconds / 2)
    assert (await api.export_status(job_id))["jobStatus"] == "processing"
    await clock.advance(SETTINGS.job_delay_seconds / 2)
    finished = await api.export_status(job_id)
    assert finished["jobStatus"] == "finished"
    assert finished["resultsUrl"]
    unknown_job = await api.request("GET", "/data/export/v1/job/no-such-job")
    assert unknown_job.json()["errorCode"] == "404-302"

    jobs = await api.request("GET", "/data/export/v1/jobs", params={"jobStatus": "finished"})
    assert jobs.json()["totalCount"] == 1
    bad_sort = await api.request("GET", "/data/export/v1/jobs", params={"sort": "sideways"})
    assert bad_sort.json()["errorCode"] == "400-120"

    await api.set_faults({"status_storm": {"status": 500, "count": 1}})
    assert (await api.request("GET", "/data/export/v1/jobs")).json()["errorCode"] == "500-100"


async def test_every_route_answers_as_the_definitions_say() -> None:
    clock = FakeClock()
    async with running_emulator(SETTINGS, clock=clock) as api:
        rec = Recorder(api)
        await drive_auth(api, rec)
        await drive_import(api, rec, clock)
        await drive_export(api, rec, clock)
        exchanges = api.emulator.exchanges
        assert rec.violations() == []

    answered = {(e.endpoint, e.status // 100) for e in exchanges}
    for endpoint in set(Endpoint) - {Endpoint.EXPORT_DOWNLOAD}:
        assert (endpoint, 2) in answered, f"{endpoint} never succeeded"
        assert (endpoint, 4) in answered, f"{endpoint} never refused"
    assert {e.status for e in exchanges} >= {200, 202, 400, 401, 404, 429, 500, 503}


async def test_permission_refusals_answer_as_the_definitions_say() -> None:
    settings = msgspec.structs.replace(SETTINGS, permissions=frozenset())
    async with running_emulator(settings) as api:
        rec = Recorder(api)
        imported = await api.request("GET", "/import/v1/jobs")
        exported = await api.request("GET", "/data/export/v1/jobs")
        assert imported.status == exported.status == 403
        assert "Import Data" in imported.json()["status"]
        assert exported.json()["errorCode"] == "403-102"
        assert rec.violations() == []


# --- the validator is not vacuous ----------------------------------------------------------


async def recorded() -> dict[str, Exchange]:
    """Real exchanges to break: an import job, an export status, an import 429."""
    clock = FakeClock()
    settings = msgspec.structs.replace(SETTINGS, import_status_per_day=1)
    async with running_emulator(settings, clock=clock) as api:
        job_id = await api.import_accounts("List", api.accounts(0, 3))
        await clock.advance(settings.job_delay_seconds)
        await api.import_job(job_id)
        assert (await api.request("GET", f"/import/v1/job/{job_id}")).status == 429
        export_id = (await api.create_export(1)).json()["jobId"]
        await api.export_status(export_id)
        await api.request("POST", "/auth/v1/token", token=None, json={"grantType": "x"})
        by_kind = {}
        for exchange in api.emulator.exchanges:
            key = f"{exchange.endpoint}:{exchange.status}"
            by_kind.setdefault(key, exchange)
        return by_kind


def broken(exchange: Exchange, **changes: object) -> Exchange:
    return msgspec.structs.replace(exchange, **changes)


def violates(exchange: Exchange) -> bool:
    try:
        validate_exchange(exchange, invalid_request=exchange.endpoint is Endpoint.AUTH_TOKEN)
    except ContractViolation:
        return True
    return False


def body_with(exchange: Exchange, **fields: object) -> bytes:
    body = msgspec.json.decode(exchange.response_body)
    body.update(fields)
    return msgspec.json.encode({k: v for k, v in body.items() if v is not None})


async def test_the_validator_rejects_broken_answers() -> None:
    found = await recorded()
    job = found["import.job_status:200"]
    export = found["export.job_status:200"]
    throttled = found["import.job_status:429"]
    token_refused = found["auth.token:400"]
    for exchange in (job, export, throttled, token_refused):
        validate_exchange(exchange, invalid_request=exchange is token_refused)

    wrong = {
        "import job id not an integer": broken(job, response_body=body_with(job, id="x")),
        "export status without resultsUrl": broken(
            export, response_body=body_with(export, resultsUrl=None)
        ),
        "export status with an unknown jobStatus": broken(
            export, response_body=body_with(export, jobStatus="done")
        ),
        "import 429 as a message body": broken(throttled, response_body=b'{"message": "slow"}'),
        "import 503 as an ErrorDto": broken(throttled, status=503),
        "export 418, a status nobody declares": broken(
            export, status=418, response_body=b'{"errorCode": "418-100"}'
        ),
        "token 400 with a status body": broken(token_refused, response_body=b'{"status": "x"}'),
        "import job as text/plain": broken(job, response_content_type="text/plain"),
        "a status the import job route does not declare, no body": broken(
            job, status=409, response_body=b""
        ),
    }
    uncaught = [reason for reason, exchange in wrong.items() if not violates(exchange)]
    assert uncaught == []


async def test_the_validator_rejects_broken_requests() -> None:
    found = await recorded()
    job = found["import.job_status:200"]
    with pytest.raises(ContractViolation, match="Path parameter error: id"):
        validate_request(broken(job, path="/import/v1/job/abc"))
    with pytest.raises(ContractViolation, match="Security"):
        validate_request(broken(job, request_headers={}))
    with pytest.raises(ContractViolation, match="not found"):
        validate_request(broken(job, path="/import/v1/nowhere"))
    upload = broken(
        job,
        method="PUT",
        path="/import/v1/job/70001/data",
        query={"listAction": "merge"},
        request_content_type="application/octet-stream",
        request_body=b"Account Name,Account Domain\r\n",
    )
    with pytest.raises(ContractViolation, match="listAction"):
        validate_request(upload)
    # A request broken on purpose must really be broken, and must have been refused.
    with pytest.raises(ContractViolation, match="meant to be invalid"):
        validate_exchange(job, invalid_request=True)
    with pytest.raises(ContractViolation, match="not refused"):
        validate_exchange(broken(job, request_headers={}), invalid_request=True)

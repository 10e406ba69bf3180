"""A running emulator on loopback, a thin HTTP caller, and tenants far from any limit.

The caller is deliberately raw (status, body bytes, headers), not the dbsync client:
emulator tests must be able to send what a correct client never would (no token, a
broken body, a wrong media type) and to read every byte of the answer.

    async with running_emulator(EmulatorSettings(job_delay_seconds=0.0)) as api:
        job_id = await api.create_import_job("EMEA")
        answer = await api.upload(job_id, encode_accounts(accounts), action="insert")

:func:`fast_tenant` is the tenant the harness's runs use unless they ask otherwise:
jobs that complete in 50 ms and quotas no scenario reaches unasked, so that only the
scenarios about limits meet one.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, NamedTuple

import aiohttp
import msgspec
from multidict import CIMultiDictProxy

from dbsync.clock import Clock
from dbsync.demandbase.csvfile import encode_accounts
from dbsync.demandbase.emulator import Emulator, EmulatorSettings
from dbsync.model import Account
from dbsync.testing.config import HIGH, TOKEN

__all__ = ["Answer", "EmulatorApi", "fast_export_tenant", "fast_tenant", "running_emulator"]


def fast_tenant(**settings: Any) -> EmulatorSettings:
    """A tenant whose jobs complete in 50 ms and whose limits no scenario reaches unasked."""
    defaults: dict[str, Any] = {
        "accounts": 2_000,
        "seed": 11,
        "job_delay_seconds": 0.05,
        "requests_per_minute": HIGH,
        "import_jobs_per_day": HIGH,
        "import_uploads_per_day": HIGH,
        "import_status_per_day": HIGH,
        "import_list_per_day": HIGH,
        "concurrent_import_jobs": 100,
    }
    return EmulatorSettings(**(defaults | settings))


def fast_export_tenant(**settings: Any) -> EmulatorSettings:
    """:func:`fast_tenant` whose export quotas no scenario reaches either."""
    quotas = {"export_jobs_per_day": HIGH, "export_status_per_day": HIGH}
    return fast_tenant(**(quotas | settings))


class Answer(NamedTuple):
    status: int
    body: bytes
    headers: CIMultiDictProxy[str]

    def json(self) -> Any:
        return msgspec.json.decode(self.body)


class EmulatorApi:
    """Requests to one running emulator; ``emulator`` is the object itself, for assertions."""

    def __init__(self, emulator: Emulator, url: str, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.url = url
        self.session = session

    async def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = TOKEN,
        json: object = None,
        data: bytes | None = None,
        content_type: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Answer:
        headers = {}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if json is not None:
            data = msgspec.json.encode(json)
            content_type = content_type or "application/json"
        if content_type is not None:
            headers["Content-Type"] = content_type
        async with self.session.request(
            method, f"{self.url}{path}", headers=headers, data=data, params=params
        ) as response:
            return Answer(response.status, await response.read(), response.headers)

    async def get_url(self, url: str) -> Answer:
        """GET an absolute URL (a results URL) without any token."""
        async with self.session.get(url) as response:
            return Answer(response.status, await response.read(), response.headers)

    # Data Import API

    async def create_import_job(self, name: str, *, token: str | None = TOKEN) -> int:
        answer = await self.request(
            "POST",
            "/import/v1/job",
            token=token,
            json={"dataImportName": name, "entityType": "Account"},
        )
        assert answer.status == 200, answer
        job_id: int = answer.json()["id"]
        return job_id

    async def upload(
        self, job_id: int, body: bytes, *, action: str = "insert", token: str | None = TOKEN
    ) -> Answer:
        return await self.request(
            "PUT",
            f"/import/v1/job/{job_id}/data",
            token=token,
            data=body,
            content_type="application/octet-stream",
            params={"listAction": action},
        )

    async def import_accounts(
        self, name: str, accounts: Sequence[Account], *, action: str = "insert"
    ) -> int:
        """Create a job for list ``name`` and upload ``accounts``; the job's id."""
        job_id = await self.create_import_job(name)
        answer = await self.upload(job_id, encode_accounts(accounts), action=action)
        assert answer.status == 200, answer
        return job_id

    async def import_job(self, job_id: int) -> dict[str, Any]:
        answer = await self.request("GET", f"/import/v1/job/{job_id}")
        assert answer.status == 200, answer
        job: dict[str, Any] = answer.json()
        return job

    # Data Export API

    async def create_export(self, list_id: int, *, name: str = "read-back") -> Answer:
        return await self.request(
            "POST",
            "/data/export/v1/accountList/job",
            json={"jobName": name, "accountListId": list_id},
        )

    async def export_status(self, job_id: str) -> dict[str, Any]:
        answer = await self.request("GET", f"/data/export/v1/job/{job_id}")
        assert answer.status == 200, answer
        status: dict[str, Any] = answer.json()
        return status

    # Control routes

    async def control(self, path: str, **params: str) -> Any:
        answer = await self.request("GET", f"/_emulator/{path}", token=None, params=params)
        assert answer.status == 200, answer
        return answer.json()

    async def set_faults(self, faults: Mapping[str, object]) -> Answer:
        return await self.request("POST", "/_emulator/faults", token=None, json=faults)

    def accounts(self, start: int, count: int) -> list[Account]:
        """Accounts ``start`` to ``start + count - 1`` of the emulator's database."""
        return list(self.emulator.tenant.accounts.page(start, count))


@contextlib.asynccontextmanager
async def running_emulator(
    settings: EmulatorSettings | None = None, *, clock: Clock | None = None
) -> AsyncIterator[EmulatorApi]:
    """An emulator served on a free loopback port, and a session to call it with."""
    emulator = Emulator(settings, clock=clock)
    async with emulator.serve() as url, aiohttp.ClientSession() as session:
        yield EmulatorApi(emulator, url, session)

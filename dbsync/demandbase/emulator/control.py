"""The control routes: the tenant's true state for tests and demos, and faults at run time.

They live under ``/_emulator/``, apart from Demandbase's paths, and are never
throttled, faulted or counted as Demandbase traffic (INTERFACES.md, "Emulator
control")::

    GET  /_emulator/lists                      {"<name>": {"id": N, "members": [...]}}, no lag
    GET  /_emulator/accounts?limit=&offset=    {"total": T, "accounts": [...]}
    GET  /_emulator/stats                      Emulator.stats()
    GET  /_emulator/jobs                       import and export jobs, rows per job
    GET  /_emulator/faults                     the faults in force
    POST /_emulator/faults                     replace them; unknown fields -> 400
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import msgspec
from aiohttp import web

from dbsync.demandbase.emulator.answers import ApiError, int_param, json_response
from dbsync.demandbase.emulator.settings import Faults
from dbsync.demandbase.emulator.tenant import Tenant

__all__ = ["ControlRoutes"]

_ACCOUNTS_PAGE: Final = 100
_ACCOUNTS_PAGE_MAX: Final = 100_000

_faults_decoder = msgspec.json.Decoder(Faults)


class _ImportJobView(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    data_import_name: str
    state: str
    list_action: str | None
    created_at: float
    updated_at: float
    rows: int
    matched: int
    unmatched: list[str]  # external ids of the unmatched rows ("" for rows without one)
    dropped: list[str]
    account_list_id: int | None


class _ExportJobView(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    job_name: str
    state: str
    list_ids: list[int]
    created_at: float
    updated_at: float
    rows: int
    result_bytes: int


class ControlRoutes:
    """Handlers of the control routes, over the emulator's tenant, statistics and faults."""

    def __init__(
        self,
        tenant: Tenant,
        *,
        stats: Callable[[], dict[str, Any]],
        faults: Callable[[], Faults],
        set_faults: Callable[[Faults], Faults],
    ) -> None:
        self._tenant = tenant
        self._stats = stats
        self._faults = faults
        self._set_faults = set_faults

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get("/_emulator/lists", self.lists)
        router.add_get("/_emulator/accounts", self.accounts)
        router.add_get("/_emulator/stats", self.stats)
        router.add_get("/_emulator/jobs", self.jobs)
        router.add_get("/_emulator/faults", self.get_faults)
        router.add_post("/_emulator/faults", self.post_faults)

    async def lists(self, request: web.Request) -> web.Response:
        return json_response(
            200,
            {
                name: {"id": account_list.id, "members": sorted(account_list.members)}
                for name, account_list in self._tenant.lists.items()
            },
        )

    async def accounts(self, request: web.Request) -> web.Response:
        database = self._tenant.accounts
        limit = int_param(request, "limit", _ACCOUNTS_PAGE, minimum=0, maximum=_ACCOUNTS_PAGE_MAX)
        offset = int_param(request, "offset", 0, minimum=0)
        return json_response(
            200, {"total": len(database), "accounts": list(database.page(offset, limit))}
        )

    async def stats(self, request: web.Request) -> web.Response:
        return json_response(200, self._stats())

    async def jobs(self, request: web.Request) -> web.Response:
        imports = [
            _ImportJobView(
                id=job.id,
                data_import_name=job.data_import_name,
                state=job.state.value,
                list_action=job.list_action,
                created_at=job.created_at,
                updated_at=job.updated_at,
                rows=job.rows,
                matched=len(job.matched),
                unmatched=[row.external_id for row in job.unmatched],
                dropped=job.dropped,
                account_list_id=job.account_list_id,
            )
            for job in self._tenant.import_jobs
        ]
        exports = [
            _ExportJobView(
                job_id=job.job_id,
                job_name=job.job_name,
                state=job.state.value,
                list_ids=list(job.list_ids),
                created_at=job.created_at,
                updated_at=job.updated_at,
                rows=job.rows,
                result_bytes=len(job.result),
            )
            for job in self._tenant.export_jobs
        ]
        return json_response(200, {"import": imports, "export": exports})

    async def get_faults(self, request: web.Request) -> web.Response:
        return json_response(200, self._faults())

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            faults = _faults_decoder.decode(await request.read())
        except msgspec.ValidationError as exc:
            raise ApiError(400, f"invalid faults: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"the body must be a JSON object: {exc}") from None
        return json_response(200, self._set_faults(faults))

"""Demandbase's routes: the Auth, Data Import and Data Export calls, and the results download.

Each handler reads its request, refuses it with an :class:`~.answers.ApiError`
carrying Demandbase's documented status and code, or answers with the
:mod:`~dbsync.demandbase.wire` Struct the definition names. What every route shares
(the token, the limits, faults, recording) happens before and after them, in the gate
(``app``); so a handler is only what Demandbase does with a request that got through.

The results URL of a finished export is signed, as a presigned download URL is: an
HMAC of the job id and an expiry time, under a key drawn when the emulator starts. It
points at ``/_emulator/results/{jobId}`` on whatever host the client called, needs
no bearer, and answers 403 once expired or when tampered with.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
from aiohttp import web

from dbsync.clock import Clock
from dbsync.demandbase import wire
from dbsync.demandbase.emulator.answers import (
    ApiError,
    choice_param,
    int_param,
    iso,
    json_object,
    json_response,
    page,
)
from dbsync.demandbase.emulator.auth import TokenCheck, Tokens, bearer_token
from dbsync.demandbase.emulator.faults import FaultState
from dbsync.demandbase.emulator.limits import Limits, ThrottleKind
from dbsync.demandbase.emulator.settings import EmulatorSettings
from dbsync.demandbase.emulator.tenant import (
    ExportJob,
    ExportState,
    ImportJob,
    ImportRow,
    ImportState,
    Tenant,
    UploadRejected,
    read_import_file,
)
from dbsync.demandbase.wire import EXPORT_JOB_NAME_MAX_CHARS, Endpoint

__all__ = ["RESULTS_PATH", "ROUTES", "DemandbaseRoutes", "check_media_type"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ROUTES: Final = (
    ("POST", "/auth/v1/token", Endpoint.AUTH_TOKEN),
    ("POST", "/import/v1/job", Endpoint.IMPORT_CREATE_JOB),
    ("PUT", "/import/v1/job/{id}/data", Endpoint.IMPORT_UPLOAD),
    ("GET", "/import/v1/job/{id}", Endpoint.IMPORT_JOB_STATUS),
    ("GET", "/import/v1/jobs", Endpoint.IMPORT_JOB_LIST),
    ("GET", "/import/v1/{entityType}/sources", Endpoint.IMPORT_SOURCES),
    ("POST", "/data/export/v1/accountList/job", Endpoint.EXPORT_CREATE_JOB),
    ("GET", "/data/export/v1/job/{jobId}", Endpoint.EXPORT_JOB_STATUS),
    ("GET", "/data/export/v1/jobs", Endpoint.EXPORT_JOB_LIST),
)
RESULTS_PATH: Final = "/_emulator/results/{jobId}"

_VOLUME_SPENT: Final = "The rolling 24-hour export quota was exceeded."  # 429-101 [DOC]
_EXPORT_RUNNING: Final = "The concurrent export-job limit was exceeded."  # 429-102 [DOC]
_EXPORT_JOB_UNKNOWN: Final = "Job id invalid"  # 404-302 [DOC example]

# The entity types the Import API names [DOC]; the emulator imports accounts only.
_IMPORT_ENTITY_TYPES: Final = ("Account", "Opportunity", "Person", "Activity")
_IMPORT_SOURCES: Final = ("CSV",)
# Filter values of GET /data/export/v1/jobs [DOC: the definition's enums and defaults].
_EXPORT_ENTITY_TYPES: Final = frozenset(
    {"All", "account", "accountBuyingGroup", "personBuyingGroupMember", "opportunity"}
    | {"person", "activity", "campaign", "creative"}
)
_SORTS: Final = ("ascending", "descending")
_ACCOUNT_LIST_IDS_MAX: Final = 10_000  # 400-145 [DOC]
_EXPORT_JOBS_PER_PAGE: Final = 10  # [DOC] default "10"
# [ASSUMED] GET /import/v1/jobs: the definition gives no defaults; newest first like
# the Export API's documented default sort, 50 a page, at most 1000.
_IMPORT_JOBS_PER_PAGE: Final = 50
_IMPORT_JOBS_PER_PAGE_MAX: Final = 1_000
# [ASSUMED] each body-carrying route takes the media type its definition declares
# (an upload is application/octet-stream, not text/csv); anything else answers 400.
_MEDIA_TYPES: Final = {
    Endpoint.AUTH_TOKEN: "application/json",
    Endpoint.IMPORT_CREATE_JOB: "application/json",
    Endpoint.IMPORT_UPLOAD: "application/octet-stream",
    Endpoint.EXPORT_CREATE_JOB: "application/json",
}
_EXPORT_REQUEST_FIELDS: Final = frozenset(
    f.encode_name for f in msgspec.structs.fields(wire.AccountListExportRequest)
)


def check_media_type(request: web.Request, endpoint: Endpoint) -> None:
    """Refuse a body sent as another media type than the definition declares (400)."""
    expected = _MEDIA_TYPES.get(endpoint)
    if expected is not None and request.content_type != expected:
        raise ApiError(
            400, f"Content-Type must be {expected}, not {request.content_type!r}", code="400-102"
        )


class DemandbaseRoutes:
    """The handlers of Demandbase's routes for one tenant."""

    def __init__(
        self,
        settings: EmulatorSettings,
        clock: Clock,
        tenant: Tenant,
        tokens: Tokens,
        limits: Limits,
        faults: FaultState,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._tenant = tenant
        self._tokens = tokens
        self._limits = limits
        self._faults = faults
        self._signing_key = secrets.token_bytes(32)
        self.downloads = 0

    def handlers(self) -> dict[Endpoint, Handler]:
        return {
            Endpoint.AUTH_TOKEN: self.mint_token,
            Endpoint.IMPORT_CREATE_JOB: self.create_import_job,
            Endpoint.IMPORT_UPLOAD: self.upload,
            Endpoint.IMPORT_JOB_STATUS: self.import_job_status,
            Endpoint.IMPORT_JOB_LIST: self.import_job_list,
            Endpoint.IMPORT_SOURCES: self.import_sources,
            Endpoint.EXPORT_CREATE_JOB: self.create_export_job,
            Endpoint.EXPORT_JOB_STATUS: self.export_job_status,
            Endpoint.EXPORT_JOB_LIST: self.export_job_list,
        }

    # --- Auth API ------------------------------------------------------------------------

    async def mint_token(self, request: web.Request) -> web.Response:
        raw = json_object(await request.read())
        if raw is None:
            raise ApiError(400, "the body must be a JSON object")
        for field in ("grantType", "clientId", "clientSecret"):
            if not isinstance(raw.get(field), str):
                raise ApiError(400, f"{field} is required and must be a string")
        credentials = msgspec.convert(raw, wire.TokenRequest)
        if credentials.grant_type != "client_credentials":
            raise ApiError(400, "grantType must be client_credentials")
        settings = self._settings
        valid_id = hmac.compare_digest(credentials.client_id.encode(), settings.client_id.encode())
        valid_secret = hmac.compare_digest(
            credentials.client_secret.encode(), settings.client_secret.encode()
        )
        if not (valid_id and valid_secret):
            raise ApiError(400, "invalid client credentials")
        return json_response(
            200,
            wire.TokenResponse(
                access_token=self._tokens.mint(), expires_in=settings.token_ttl_seconds
            ),
        )

    # --- Data Import API -------------------------------------------------------------------

    async def create_import_job(self, request: web.Request) -> web.Response:
        raw = json_object(await request.read())
        if raw is None:
            raise ApiError(400, "the body must be a JSON object")
        for field in ("dataImportName", "entityType"):
            if field not in raw:
                raise ApiError(400, f"{field} is required")
        try:
            spec = msgspec.convert(raw, wire.CreateImportJob)
        except msgspec.ValidationError as exc:
            raise ApiError(400, str(exc)) from None
        if not spec.data_import_name.strip():
            raise ApiError(400, "dataImportName must not be empty")
        if spec.entity_type != "Account":
            # The emulator keeps accounts only; Demandbase also imports the other types.
            raise ApiError(400, f"entityType {spec.entity_type!r} is not supported")
        if spec.source not in _IMPORT_SOURCES:
            raise ApiError(400, f"source must be one of {list(_IMPORT_SOURCES)}")
        job = self._tenant.create_import_job(spec.data_import_name, spec.entity_type, spec.source)
        return json_response(200, self._import_job_body(job))  # 200, not 201 [DOC]

    async def upload(self, request: web.Request) -> web.Response:
        # Read first: from here to start_import nothing awaits, so two uploads to one
        # job cannot both find it new.
        data = await request.read()
        job = self._import_job(request)
        list_action = request.query.get("listAction", "replace")  # Demandbase's default [DOC]
        if list_action not in wire.LIST_ACTIONS:
            raise ApiError(400, f"listAction must be one of {list(wire.LIST_ACTIONS)}")
        if job.state is not ImportState.NEW:
            raise ApiError(400, f"job {job.id} is {job.state}: data goes to a new job, once")
        limit = self._settings.concurrent_import_jobs
        if self._tenant.imports_processing() >= limit:
            raise ApiError(
                429,
                f"Max {limit} jobs are allowed at a time",
                code="429-102",
                kind=ThrottleKind.CONCURRENT,
            )
        later = self._faults.speaks("skip-silently") or self._faults.speaks("content-fails")
        refused: list[ImportRow] | None = [] if later else None
        try:
            rows = read_import_file(
                data, reject_external_ids=self._faults.reject_external_ids, refused=refused
            )
        except UploadRejected as rejected:
            raise ApiError(400, rejected.message) from None
        self._tenant.start_import(job, rows, list_action, refused)
        return json_response(200, self._import_job_body(job))

    async def import_job_status(self, request: web.Request) -> web.Response:
        return json_response(200, self._import_job_body(self._import_job(request)))

    def _import_job_body(self, job: ImportJob) -> wire.ImportJob:
        """The job as Demandbase answers it, in the dialects in force."""
        faults = self._faults
        state = job.state.value
        if state == ImportState.PROCESSING and faults.speaks("state-unknown"):
            state = "queued"
        if faults.speaks("states-upper"):
            state = state.upper()
        list_id = None if faults.speaks("no-list-id") else job.account_list_id
        if faults.speaks("sparse-jobs"):
            return wire.ImportJob(id=job.id, state=state, account_list_id=list_id)
        return wire.ImportJob(
            id=job.id,
            data_import_name=job.data_import_name,
            entity_type=job.entity_type,
            state=state,
            created_at=iso(job.created_at),
            updated_at=iso(job.updated_at),
            source=job.source,
            account_list_id=list_id,  # [ASSUMED A2] once the job fed a list
        )

    def _import_job(self, request: web.Request) -> ImportJob:
        raw = request.match_info["id"]
        if not raw.isdigit():
            raise ApiError(400, f"job id must be an integer, not {raw!r}")
        job = self._tenant.import_job(int(raw))
        if job is None:
            raise ApiError(404, f"job {raw} not found")
        return job

    async def import_job_list(self, request: web.Request) -> web.Response:
        entity_type = request.query.get("entityType")
        states = tuple(state.value for state in ImportState)
        state = choice_param(request, "state", states, "") if "state" in request.query else None
        sort = choice_param(request, "sort", _SORTS, "descending")
        number = int_param(request, "page", 1, minimum=1)
        size = int_param(
            request, "perPage", _IMPORT_JOBS_PER_PAGE, minimum=1, maximum=_IMPORT_JOBS_PER_PAGE_MAX
        )
        jobs = [
            job
            for job in sorted(
                self._tenant.import_jobs, key=lambda j: j.id, reverse=sort == "descending"
            )
            if (entity_type is None or job.entity_type.lower() == entity_type.lower())
            and (state is None or job.state == state)
        ]
        return json_response(
            200,
            wire.ImportJobs(
                total_count=len(jobs),
                data=[self._import_job_body(job) for job in page(jobs, number, size)],
            ),
        )

    async def import_sources(self, request: web.Request) -> web.Response:
        entity_type = request.match_info["entityType"]
        if entity_type not in _IMPORT_ENTITY_TYPES:
            raise ApiError(400, f"entityType must be one of {list(_IMPORT_ENTITY_TYPES)}")
        return json_response(200, wire.ImportSources(data=list(_IMPORT_SOURCES)))

    # --- Data Export API -------------------------------------------------------------------

    async def create_export_job(self, request: web.Request) -> web.Response:
        spec = _account_list_export(await request.read())
        single = [spec.account_list_id] if spec.account_list_id is not None else []
        list_ids = tuple(single + (spec.account_list_ids or []))
        unknown = [i for i in list_ids if self._tenant.list_by_id(i) is None]
        if unknown:
            raise ApiError(400, f"Account list IDs do not exist: {unknown}", code="400-142")
        if self._limits.export_volume_spent():
            raise ApiError(429, _VOLUME_SPENT, code="429-101", kind=ThrottleKind.VOLUME)
        if self._tenant.exports_running() >= self._settings.concurrent_export_jobs:
            raise ApiError(429, _EXPORT_RUNNING, code="429-102", kind=ThrottleKind.CONCURRENT)
        job = self._tenant.create_export_job(
            spec.job_name, list_ids, multi=spec.account_list_ids is not None
        )
        return json_response(
            202,
            wire.ExportJobDetails(
                job_id=job.job_id,
                job_status=job.state.value,
                entity_type=job.entity_type,
                job_name=job.job_name,
                created_at=iso(job.created_at),
            ),
        )

    async def export_job_status(self, request: web.Request) -> web.Response:
        job = self._tenant.export_job(request.match_info["jobId"])
        if job is None:
            raise ApiError(404, _EXPORT_JOB_UNKNOWN, code="404-302")
        state = job.state.value
        if job.state is ExportState.PROCESSING and self._faults.speaks("state-unknown"):
            state = "running"
        if self._faults.speaks("states-upper"):
            state = state.upper()
        results_url: str | None = self._results_url(request, job)
        if not results_url and self._faults.speaks("results-url-null"):
            results_url = None
        return json_response(
            200,
            wire.ExportJobStatus(
                job_id=job.job_id,
                job_name=job.job_name,
                entity_type=job.entity_type,
                job_status=state,
                created_at=iso(job.created_at),
                updated_at=iso(job.updated_at),
                results_url=results_url,
                message=job.message,
            ),
        )

    async def export_job_list(self, request: web.Request) -> web.Response:
        entity_type = choice_param(
            request, "entityType", _EXPORT_ENTITY_TYPES, "All", code="400-123"
        )
        statuses = ("All", *(state.value for state in ExportState))
        status = choice_param(request, "jobStatus", statuses, "All", code="400-124")
        sort = choice_param(request, "sort", _SORTS, "descending", code="400-120")
        number = int_param(request, "page", 1, minimum=1, code="400-121")
        size = int_param(request, "perPage", _EXPORT_JOBS_PER_PAGE, minimum=1, code="400-122")
        jobs = [
            job
            for job in sorted(
                self._tenant.export_jobs, key=lambda j: j.created_at, reverse=sort == "descending"
            )
            if entity_type in ("All", job.entity_type) and status in ("All", job.state)
        ]
        return json_response(
            200,
            wire.ExportJobs(
                page_no=number,
                page_size=size,
                total_count=len(jobs),
                data=[
                    wire.ExportJobSummary(
                        job_id=job.job_id,
                        job_name=job.job_name,
                        entity_type=job.entity_type,
                        job_status=job.state.value,
                        created_at=iso(job.created_at),
                        updated_at=iso(job.updated_at),
                    )
                    for job in page(jobs, number, size)
                ],
            ),
        )

    # --- the signed results URL ----------------------------------------------------------

    def _results_url(self, request: web.Request, job: ExportJob) -> str:
        """The finished job's download URL on the host the client called; "" until then."""
        if job.state is not ExportState.FINISHED or job.finished_at is None:
            return ""
        expires = math.ceil(job.finished_at + self._settings.results_url_ttl_seconds)
        url = request.url.origin().with_path(RESULTS_PATH.format(jobId=job.job_id))
        return str(url.with_query(expires=str(expires), sig=self._signature(job.job_id, expires)))

    def _signature(self, job_id: str, expires: int) -> str:
        message = f"{job_id}:{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    async def download(self, request: web.Request) -> web.Response:
        """``GET <resultsUrl>``: the results file, for a valid, unexpired signature only."""
        job_id = request.match_info["jobId"]
        expires = request.query.get("expires", "")
        signature = request.query.get("sig", "")
        job = self._tenant.export_job(job_id)
        if (
            job is None
            or not expires.isdigit()
            or not hmac.compare_digest(signature, self._signature(job_id, int(expires)))
            or self._clock.time() >= int(expires)
        ):
            raise ApiError(403, "the signature is invalid or has expired")
        if self._faults.speaks("results-need-bearer"):
            token = bearer_token(request.headers.get("Authorization"))
            if self._tokens.check(token) is not TokenCheck.VALID:
                raise ApiError(401, "Authentication credentials are missing or invalid.")
        self.downloads += 1
        return web.Response(body=job.result, content_type="text/csv", charset="utf-8")


def _account_list_export(body: bytes) -> wire.AccountListExportRequest:
    """An account-list export request, or the ErrorDto code that refuses it [DOC codes]."""
    raw = json_object(body)
    if raw is None:
        raise ApiError(400, "The request body is not a valid JSON object.", code="400-102")
    unknown = sorted(set(raw) - _EXPORT_REQUEST_FIELDS)
    if unknown:
        raise ApiError(400, f"Unrecognized property: {unknown[0]}", code="400-147")
    job_name = raw.get("jobName")
    if not isinstance(job_name, str) or not job_name or len(job_name) > EXPORT_JOB_NAME_MAX_CHARS:
        raise ApiError(
            400,
            f"jobName is required and must be at most {EXPORT_JOB_NAME_MAX_CHARS} characters.",
            code="400-126",
        )
    if "accountListId" in raw and "accountListIds" in raw:
        raise ApiError(
            400, "accountListId and accountListIds cannot be used together.", code="400-144"
        )
    ids = [raw["accountListId"]] if "accountListId" in raw else raw.get("accountListIds")
    if ids is None or ids == []:
        raise ApiError(400, "A required parameter is missing: accountListId.", code="400-104")
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise ApiError(400, "Account list IDs must be numeric.", code="400-129")
    if len(ids) > _ACCOUNT_LIST_IDS_MAX:
        raise ApiError(
            400, f"accountListIds holds more than {_ACCOUNT_LIST_IDS_MAX} IDs.", code="400-145"
        )
    return msgspec.convert(raw, wire.AccountListExportRequest)

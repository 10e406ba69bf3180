"""Demandbase's request and response bodies, as msgspec Structs.

Shared by the client (which encodes requests and decodes answers) and the emulator
(which does the reverse), so the two cannot drift apart. Field names follow
Demandbase's camelCase through ``rename="camel"``. Answers tolerate fields we do not
know (Demandbase may add some); nothing here forbids unknown fields, the emulator
checks its inputs itself so that it can answer with Demandbase's own error bodies.

Sources: ``tests/data/openapi/{auth,data-import,data-export}.json`` and
``demandbase-contract.md``; the [ASSUMED] items are marked where they appear.
"""

from __future__ import annotations

import enum

import msgspec

__all__ = [
    "ACCOUNT_DOMAIN_MAX_CHARS",
    "ACCOUNT_NAME_MAX_CHARS",
    "EXPORT_JOB_NAME_MAX_CHARS",
    "EXPORT_LIST_ID_COLUMN",
    "EXPORT_RESULT_COLUMNS",
    "EXTERNAL_ID_MAX_CHARS",
    "IMPORT_COLUMNS",
    "LIST_ACTIONS",
    "AccountListExportRequest",
    "CreateImportJob",
    "Endpoint",
    "ErrorDto",
    "ExportJobDetails",
    "ExportJobStatus",
    "ExportJobSummary",
    "ExportJobs",
    "ImportJob",
    "ImportJobs",
    "ImportSources",
    "MessageBody",
    "StatusBody",
    "TokenRequest",
    "TokenResponse",
    "import_row_problem",
]


class Endpoint(enum.StrEnum):
    """Each Demandbase call dbsync makes, by the name its quotas and statistics use."""

    AUTH_TOKEN = "auth.token"
    IMPORT_CREATE_JOB = "import.create_job"  # POST /import/v1/job               1,200/day
    IMPORT_UPLOAD = "import.upload"  # PUT /import/v1/job/{id}/data            1,200/day
    IMPORT_JOB_STATUS = "import.job_status"  # GET /import/v1/job/{id}          3,600/day
    IMPORT_JOB_LIST = "import.job_list"  # GET /import/v1/jobs                  3,600/day
    IMPORT_SOURCES = "import.sources"  # GET /import/v1/{entityType}/sources    3,600/day
    EXPORT_CREATE_JOB = "export.create_job"  # POST /data/export/v1/accountList/job  60/day
    EXPORT_JOB_STATUS = "export.job_status"  # GET /data/export/v1/job/{jobId}  300/day
    EXPORT_JOB_LIST = "export.job_list"  # GET /data/export/v1/jobs             1,200/day
    EXPORT_DOWNLOAD = "export.download"  # GET <resultsUrl> (signed, no bearer)


class _Wire(msgspec.Struct, kw_only=True, rename="camel"):
    pass


class _Sparse(_Wire, omit_defaults=True):
    """A body whose unset optional fields are left out rather than sent as null."""


# --- Auth API: POST /auth/v1/token -------------------------------------------------


class TokenRequest(_Wire, kw_only=True):
    grant_type: str = "client_credentials"
    client_id: str
    client_secret: str


class TokenResponse(_Wire, kw_only=True):
    access_token: str
    token_type: str = "bearer"
    expires_in: int = 28800


# --- Data Import API: /import/v1 ---------------------------------------------------

# listAction values; "replace" is Demandbase's default and empties the list first, so
# the client always sends one explicitly.
LIST_ACTIONS = ("replace", "insert", "delete", "noop")

# Columns of an account import file [DOC: CSV Record Matching and Data Mapping].
IMPORT_COLUMNS = ("Account Name", "Account Domain", "External Account ID")

# [ASSUMED] the longest name and domain Demandbase imports. The documentation gives
# no length; a domain is at most 253 characters in DNS, and 255 is the usual column
# width for both. The emulator refuses longer ones, and ingest refuses them first.
ACCOUNT_NAME_MAX_CHARS = 255
ACCOUNT_DOMAIN_MAX_CHARS = 255
# The longest External Account ID dbsync accepts (dbsync.model.AccountKey says the same).
EXTERNAL_ID_MAX_CHARS = 256


def import_row_problem(name: str, domain: str, external_id: str) -> tuple[str, str] | None:
    """Why Demandbase refuses an import row with these cells: (column, problem), or None.

    The one definition of a row Demandbase refuses, read by ingest (which answers 400
    before anything is stored, so that a refused row never spends import jobs) and by
    the emulator (which fails the job, as Demandbase does). [DOC] Account Name and
    Account Domain are required on every row, joins and leaves alike; a cell of only
    whitespace is empty. The External Account ID is optional in an import file, but
    dbsync keys accounts by it, so one of only whitespace is refused too.
    """
    name_column, domain_column, id_column = IMPORT_COLUMNS
    # isspace() rather than strip(): no copy per row on the ingest hot path.
    if not name or name.isspace():
        return name_column, "is empty"
    if len(name) > ACCOUNT_NAME_MAX_CHARS:
        return name_column, f"holds {len(name)} characters; at most {ACCOUNT_NAME_MAX_CHARS}"
    if not domain or domain.isspace():
        return domain_column, "is empty"
    if len(domain) > ACCOUNT_DOMAIN_MAX_CHARS:
        return domain_column, f"holds {len(domain)} characters; at most {ACCOUNT_DOMAIN_MAX_CHARS}"
    if external_id.isspace() or len(external_id) > EXTERNAL_ID_MAX_CHARS:
        return id_column, f"must hold 1 to {EXTERNAL_ID_MAX_CHARS} characters, not only spaces"
    return None


class CreateImportJob(_Wire, kw_only=True):
    # Not sparse: the definition requires entityType, and a sparse body would leave out
    # every field equal to its default, "Account" included.
    data_import_name: str
    entity_type: str = "Account"
    source: str = "CSV"


class ImportJob(_Sparse, kw_only=True):
    """An import job. The definition requires none of its fields; dbsync needs ``id``.

    Every other field may be missing or null in an answer: a job without ``state`` is
    in a state dbsync does not know (``dbsync.states.import_job_state``), which it polls
    until a deadline like any other unknown state.
    """

    id: int
    state: str = ""  # new | processing | completed | failed, in any case
    data_import_name: str | None = None
    entity_type: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    source: str | None = None
    # [ASSUMED A2] set once the job fed a list; absent from Demandbase's definition.
    account_list_id: int | None = None


class ImportJobs(_Wire, kw_only=True):
    total_count: int
    data: list[ImportJob] = msgspec.field(default_factory=list)


class ImportSources(_Wire, kw_only=True):
    """``GET /import/v1/{entityType}/sources``: the sources a job may name (``["CSV"]``)."""

    data: list[str] = msgspec.field(default_factory=list)


class MessageBody(_Wire, kw_only=True):
    """Import API 400 / 404 / 500 body."""

    message: str


class StatusBody(_Wire, kw_only=True):
    """Import API 401 / 403 body."""

    status: str


# --- Data Export API: /data/export/v1 ----------------------------------------------

# Longer export job names are refused with 400-126 [DOC]; the client checks before
# spending a request, and the emulator refuses them as Demandbase does.
EXPORT_JOB_NAME_MAX_CHARS = 50

# [ASSUMED A3] columns of an account-list export result file, matched by name (case,
# order, a byte-order mark and extra columns do not matter).
EXPORT_RESULT_COLUMNS = ("Account ID", "Account Name", "Account Domain", "External Account ID")


# [ASSUMED A5] the column that says which list a row of a multi-list export belongs to.
EXPORT_LIST_ID_COLUMN = "Account List ID"


class AccountListExportRequest(_Sparse, kw_only=True):
    job_name: str
    account_list_id: int | None = None
    account_list_ids: list[int] | None = None


class ExportJobDetails(_Wire, kw_only=True):
    """202 answer to an export job creation."""

    job_id: str
    job_status: str  # accepted
    entity_type: str
    job_name: str
    created_at: str


class ExportJobStatus(_Wire, kw_only=True):
    job_id: str
    job_name: str = ""
    entity_type: str = ""
    job_status: str  # accepted | processing | finished | failed, in any case
    created_at: str = ""
    updated_at: str = ""
    # Empty until finished (the definition requires a string); null is read as empty.
    results_url: str | None = ""
    message: str | None = None


class ExportJobSummary(_Wire, kw_only=True):
    """One job in ``GET /data/export/v1/jobs``."""

    job_id: str
    job_name: str
    entity_type: str
    job_status: str
    created_at: str
    updated_at: str


class ExportJobs(_Wire, kw_only=True):
    """``GET /data/export/v1/jobs`` (the definition's JobDetailsList)."""

    page_no: int
    page_size: int
    total_count: int
    data: list[ExportJobSummary] = msgspec.field(default_factory=list)


class ErrorDto(_Wire, kw_only=True):
    """Export API error envelope; [ASSUMED] also the 429 body of the other APIs."""

    error_code: str
    error_message: str
    diagnostic_code: str = ""

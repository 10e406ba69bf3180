"""What the emulator is started with (:class:`EmulatorSettings`) and what a test changes
while it runs (:class:`Faults`).

Both are frozen msgspec Structs that reject unknown fields, so that ``POST
/_emulator/faults`` with a misspelt field, or a settings dict built by a test, fails
loudly and names the field. Constraints live in the type annotations (``Ratio``,
``Seconds``, ...): msgspec checks them when it decodes or converts, and
:func:`checked` runs the same check on an instance built in Python, so the rules are
written once.

The defaults are Demandbase's production limits as the contract lists them
(``demandbase-contract.md``, "Limits"): a test or the demo shortens the "day" with
``day_seconds`` and lowers a quota to reach it in a few requests. Where Demandbase
documents nothing (import concurrency, the results URL's lifetime), the setting's
comment says so and cites the contract's [ASSUMED] mark.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal, TypeVar

import msgspec

from dbsync.demandbase.wire import Endpoint

__all__ = [
    "DIALECTS",
    "PERMISSIONS",
    "Dialect",
    "EmulatorSettings",
    "Faults",
    "Permission",
    "StatusStorm",
    "checked",
]

Ratio = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Seconds = Annotated[float, msgspec.Meta(gt=0.0)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0.0)]
Quota = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]

# The two permissions a Demandbase user or API key set may lack: the Data Import
# API's "Import Data" (403 with a status body) and Data Export access (403-102).
Permission = Literal["import", "export"]
PERMISSIONS: Final[frozenset[Permission]] = frozenset({"import", "export"})

_S = TypeVar("_S", bound=msgspec.Struct)

# Other readings of what Demandbase's documents leave open (docs/demandbase-contract.md,
# "Dialects"). None in force is the emulator's own reading, A1 to A5 as assumed.
Dialect = Literal[
    "list-per-job",  # A1: an insert job with no list associated creates a new list
    "no-list-id",  # A2: completed jobs carry no accountListId
    "results-need-bearer",  # A3: the results URL answers 401 without the bearer token
    "results-columns",  # A3: results columns re-cased, reordered, one extra; a BOM
    "results-url-null",  # resultsUrl is null, not "", until the export finished
    "states-upper",  # job states in upper case
    "state-unknown",  # a state nobody documented: "queued" (import), "running" (export)
    "skip-silently",  # rows Demandbase will not take are accepted, skipped at completion
    "content-fails",  # a job whose file holds such a row ends failed, not refused at upload
    "sparse-jobs",  # import-job answers carry only id, state (and accountListId)
    "multi-list-column",  # A5: a multi-list export says each row's list (Account List ID)
]
DIALECTS: Final[tuple[Dialect, ...]] = (
    "list-per-job",
    "no-list-id",
    "results-need-bearer",
    "results-columns",
    "results-url-null",
    "states-upper",
    "state-unknown",
    "skip-silently",
    "content-fails",
    "sparse-jobs",
    "multi-list-column",
)


def checked(value: _S) -> _S:
    """``value`` after the constraints of its annotations, as msgspec checks them on decode.

    A Struct built in Python skips them (msgspec checks only when it decodes); this
    converts it to builtins and back, so that ``Faults(drop_ratio=2)`` fails the same
    way as ``{"drop_ratio": 2}`` does. Raises ``ValueError`` naming the field.
    """
    try:
        return msgspec.convert(msgspec.to_builtins(value), type(value))
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from None


class StatusStorm(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The next ``count`` Demandbase requests answer ``status`` (429 or a 5xx)."""

    status: Annotated[int, msgspec.Meta(ge=429, le=599)]
    count: Annotated[int, msgspec.Meta(ge=0)]

    def __post_init__(self) -> None:
        if self.status != 429 and self.status < 500:
            raise ValueError(f"status_storm.status must be 429 or a 5xx, not {self.status}")


class Faults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Faults in force; every field left out is off.

    Requests meet them in this order: a ``status_storm`` answers first, then
    ``error_ratio`` (both before the request has any effect, as a failing gateway
    would); ``reset_ratio`` drops the connection *after* the request took effect, the
    worst case for a client (a job was created, no answer came); ``latency_ms`` delays
    every answer. ``drop_ratio`` acts when an import job completes, ``job_fail_ratio``
    when any job does. Draws come from RNGs seeded with the settings' ``seed``, so one seed
    gives the same faults for the same sequence of requests and jobs.
    """

    # Share of a completing import job's matched rows that are silently left out of
    # its list change; the job still says "completed" (Adobe's "throttled" loss).
    drop_ratio: Ratio = 0.0
    # Share of jobs that end "failed": an import job instead of "completed" (its list is
    # not changed), an export job instead of "finished" (no results file).
    job_fail_ratio: Ratio = 0.0
    status_storm: StatusStorm | None = None
    # Share of Demandbase requests answered ``error_status`` at random.
    error_ratio: Ratio = 0.0
    error_status: Annotated[int, msgspec.Meta(ge=500, le=599)] = 500
    # Share of Demandbase requests whose connection is closed without an answer.
    reset_ratio: Ratio = 0.0
    latency_ms: Annotated[float, msgspec.Meta(ge=0.0, le=600_000.0)] = 0.0
    # Demandbase sends no Retry-After [DOC]; set, every 429 carries this one, so that a
    # client's handling of the header can be tested.
    retry_after_seconds: Annotated[int, msgspec.Meta(ge=0)] | None = None
    # True: every API Key Set token minted so far stops working when these faults are
    # set (the legacy token is not affected).
    expire_tokens: bool = False
    # An upload holding a row with one of these External Account IDs answers 400
    # naming the row, as a row Demandbase cannot take would.
    reject_external_ids: frozenset[str] = frozenset()
    # The dialects in force (``dbsync emulator --dialect``); set here, they can change
    # while the emulator runs, as a tenant's behaviour could.
    dialects: frozenset[Dialect] = frozenset()


# The settings field that holds each endpoint's daily quota.
_DAILY_QUOTA_FIELDS: Final[dict[Endpoint, str]] = {
    Endpoint.IMPORT_CREATE_JOB: "import_jobs_per_day",
    Endpoint.IMPORT_UPLOAD: "import_uploads_per_day",
    Endpoint.IMPORT_JOB_STATUS: "import_status_per_day",
    Endpoint.IMPORT_JOB_LIST: "import_list_per_day",
    Endpoint.IMPORT_SOURCES: "import_sources_per_day",
    Endpoint.EXPORT_CREATE_JOB: "export_jobs_per_day",
    Endpoint.EXPORT_JOB_STATUS: "export_status_per_day",
    Endpoint.EXPORT_JOB_LIST: "export_list_per_day",
}


class EmulatorSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How an emulator is started; fixed for its life (faults change through :class:`Faults`)."""

    # --- the tenant --------------------------------------------------------------------
    accounts: Annotated[int, msgspec.Meta(ge=0, le=9_999_999)] = 10_000  # ACC-0000001..
    seed: int = 0

    # --- credentials (INTERFACES.md: the emulator's defaults) ---------------------------
    token: NonEmpty = "emulator-token"  # the legacy user token, accepted as a bearer
    client_id: NonEmpty = "emulator-client"  # the API Key Set
    client_secret: NonEmpty = "emulator-secret"
    token_ttl_seconds: PositiveInt = 28_800  # expiresIn of minted tokens [DOC]
    permissions: frozenset[Permission] = PERMISSIONS

    # --- time ----------------------------------------------------------------------------
    # Length of a quota "day"; windows are aligned to the epoch, so 86400 resets at
    # midnight UTC like Demandbase [3P].
    day_seconds: Seconds = 86_400.0
    minute_seconds: Seconds = 60.0
    # From upload to completed (import), from creation to finished (export).
    job_delay_seconds: NonNegativeSeconds = 2.0
    # [ASSUMED A4] how old a list change must be before an export shows it. 0 by
    # default: a lag longer than the daemon's own setting would show it losses that
    # are not there; the demo and the read-back tests set it.
    visibility_lag_seconds: NonNegativeSeconds = 0.0
    # [ASSUMED A3] a finished export's signed results URL works this long (a presigned
    # download URL expires; Demandbase documents no lifetime).
    results_url_ttl_seconds: Seconds = 3_600.0

    # --- limits [DOC/3P, contract "Limits"] ------------------------------------------
    requests_per_minute: Quota = 1_000  # all Demandbase routes together
    import_jobs_per_day: Quota = 1_200
    import_uploads_per_day: Quota = 1_200
    import_status_per_day: Quota = 3_600
    import_list_per_day: Quota = 3_600
    import_sources_per_day: Quota = 3_600
    export_jobs_per_day: Quota = 60
    export_status_per_day: Quota = 300
    export_list_per_day: Quota = 1_200
    export_bytes_per_day: Quota = 10 * 1000**3  # 10 GB of results a day (429-101)
    # [ASSUMED] import jobs "processing" at once, checked at upload (429-102); the
    # Data Import API documents no cap, the B2B API caps its own jobs.
    concurrent_import_jobs: Quota = 10
    concurrent_export_jobs: Quota = 1  # 429-102 [3P]
    max_upload_bytes: PositiveInt = 5 * 1024**3  # "files are limited to 5GB" [DOC]

    # --- faults ----------------------------------------------------------------------
    # The faults in force at start. ``drop_ratio`` is a shorthand for
    # ``faults.drop_ratio`` (INTERFACES.md names --drop-ratio); give it once.
    drop_ratio: Ratio = 0.0
    faults: Faults = Faults()

    # --- contract tests ----------------------------------------------------------------
    # Keep the last ``max_exchanges`` Demandbase exchanges for OpenAPI validation.
    record_exchanges: bool = False
    max_exchanges: PositiveInt = 10_000

    def __post_init__(self) -> None:
        if self.drop_ratio and self.faults.drop_ratio:
            raise ValueError("give drop_ratio or faults.drop_ratio, not both")

    @property
    def start_faults(self) -> Faults:
        """The faults in force when the emulator starts."""
        if self.drop_ratio:
            return msgspec.structs.replace(self.faults, drop_ratio=self.drop_ratio)
        return self.faults

    def daily_quota(self, endpoint: Endpoint) -> int | None:
        """Requests a day allowed on ``endpoint``; ``None`` when it has no daily quota."""
        field = _DAILY_QUOTA_FIELDS.get(endpoint)
        return None if field is None else int(getattr(self, field))

    @staticmethod
    def daily_quota_fields() -> dict[Endpoint, str]:
        """The settings field holding each endpoint's daily quota."""
        return dict(_DAILY_QUOTA_FIELDS)

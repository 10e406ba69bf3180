"""The configuration's schema: one frozen msgspec Struct per TOML table.

There is one Struct per TOML table, its fields named exactly like the keys (so that
grep finds both) with the unit in the name (``drain_seconds``), and each field's
attribute docstring is the key's documentation. Decoding is strict: every table
rejects unknown keys, and the constrained types below reject values of the wrong type
or out of range, so that a mistyped key fails when the file is decoded (or, in tests,
when the Struct is built), never later. The checks that span several fields live in
:mod:`dbsync.config.load`; reading secrets in :mod:`dbsync.config.secrets`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import msgspec

__all__ = [
    "AepMapping",
    "Audience",
    "Config",
    "CredentialRefs",
    "DaemonSettings",
    "DeliverySettings",
    "Destination",
    "FileColumns",
    "FileIngestSettings",
    "FlushPolicy",
    "IngestSettings",
    "Limits",
    "LoggingSettings",
    "ReconcileSettings",
    "SecretRef",
]

# Every duration is finite and has a range. Below 10 ms a loop that sleeps for one
# spins; a week is longer than any wait dbsync has, and refuses ``inf``, which would
# turn a timeout into a hang. NaN fails every bound.
_WEEK_SECONDS = 7 * 86400.0
Seconds = Annotated[float, msgspec.Meta(ge=0.01, le=_WEEK_SECONDS)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0, le=_WEEK_SECONDS)]
Count = Annotated[int, msgspec.Meta(ge=1)]
PositiveDays = Annotated[float, msgspec.Meta(gt=0, le=3650)]
AudienceId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")
]
DestinationName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
]
ListName = Annotated[str, msgspec.Meta(max_length=255)]
# A credential is a file name inside $CREDENTIALS_DIRECTORY: no slash, and not "." or "..".
CredentialName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@:+-]*$")]
# A dotted path into an AEP profile export (``accountOrganization.domain``).
AttributePath = Annotated[str, msgspec.Meta(pattern=r"^[^.\s]+(\.[^.\s]+)*$")]


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of every table: immutable once loaded, keys in any order, typos rejected.

    Subclasses repeat ``frozen=True``, which type checkers do not inherit.
    """


class DaemonSettings(_Table, frozen=True):
    """``[daemon]``: where the daemon keeps its state and how it stops."""

    state_dir: Path = Path("state")
    """Directory of the SQLite store (desired and delivered state, ledger, quota use).
    Relative to the configuration file's directory; production uses /var/lib/dbsync
    (systemd's StateDirectory=). Changing it needs a restart."""

    admin_socket: Path = Path("admin.sock")
    """Unix socket of ``dbsync ctl``. Relative to ``state_dir``, hence the default
    ``<state_dir>/admin.sock``; production uses /run/dbsync/admin.sock (systemd's
    RuntimeDirectory=). At most 107 bytes once absolute, the kernel's limit. Changing it
    needs a restart."""

    drain_seconds: Seconds = 20.0
    """Seconds a graceful stop waits for batches in flight to be acknowledged before it
    gives up on them (they are sent again after the restart). 20 s leaves systemd's
    45 s TimeoutStopSec room for the store to close."""

    summary_interval_seconds: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0
    """Seconds between two ``audience_summary`` log lines per audience: one a minute is
    fine-grained enough for alerts and cheap enough for the journal. From 1 s (a line
    per audience a second is already a flood) to a day."""

    restart_max_crashes: Count = 5
    """Crashes of one actor (or reconciler) within ``restart_window_seconds`` after which
    it is no longer restarted: the audience stays ``failed``, with the reason, until
    ``dbsync ctl resume`` (a reconciler, until a reload). A bug that crashes an actor
    at once would otherwise restart it forever."""

    restart_window_seconds: Seconds = 600.0
    """Seconds after which a crash is forgotten: an actor that crashes now and then,
    rather than in a loop, is always restarted."""

    restart_backoff_seconds: Seconds = 1.0
    """Seconds before the first restart after a crash; each further crash within the
    window doubles it, up to ``restart_backoff_max_seconds``."""

    restart_backoff_max_seconds: Seconds = 300.0
    """The longest wait before a restart. A graceful stop never waits it out."""

    admin_viewer_group: str | None = None
    """Group whose members may use the admin socket's read verbs (``status``,
    ``quota``, ``rejected``, ``plan``). Unset: only the daemon's own user and root."""

    admin_operator_group: str | None = None
    """Group whose members may also use the verbs that change something (``pause``,
    ``flush``, ``resync``, ``reload``, ``drain`` ...). Unset: only the daemon's own user
    and root."""


class AepMapping(_Table, frozen=True):
    """``[ingest.aep_mapping]``: where ``POST /v1/aep`` finds an account in an AEP profile.

    Paths are dotted, from the root of one profile of an AEP HTTP-destination export.
    The defaults are the mandatory mappings of Adobe's Demandbase destination.
    """

    name_attribute: AttributePath = "accountName"
    """Attribute holding the account's name (Demandbase's ``Account Name``)."""

    domain_attribute: AttributePath = "accountOrganization.domain"
    """Attribute holding the account's domain (Demandbase's ``Account Domain``)."""

    external_id_attribute: AttributePath = "accountKey.sourceKey"
    """Attribute holding the account's key (Demandbase's ``External Account ID``), used
    unless ``identity_namespace`` is set."""

    identity_namespace: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    """When set, the external id is taken from the profile's ``identityMap`` under this
    namespace instead (the entry marked primary, else the first), and
    ``external_id_attribute`` is not read. Unset: the attribute is used."""


class FileIngestSettings(_Table, frozen=True):
    """``[ingest.files]``: the folder AEP's account-audience file exports land in."""

    directory: Path
    """The watched folder (an SFTP chroot or a bucket mirror), relative to the config
    file. Files whose name holds a configured ``aep_audience_id`` (or that lie in a
    sub-folder named after one) are read; others are left alone."""

    poll_seconds: Seconds = 10.0
    """How often the folder is listed."""

    settle_seconds: NonNegativeSeconds = 60.0
    """A run without a manifest is read once its files' sizes and times have been
    still this long (a run listed in a manifest once every part is there at its size)."""

    keep_days: Annotated[float, msgspec.Meta(ge=0)] = 7.0
    """Files of a decided run (applied, skipped, refused) are deleted this many days
    after the decision; a held run's files are kept."""


class FileColumns(_Table, frozen=True):
    """``[destinations.audiences.file_columns]``: header names in this audience's files
    that the defaults do not cover (compared ignoring case)."""

    external_id: str | None = None
    """Default: ``accountKey_sourceKey``, ``external_id``, ``primaryId``, ``sourceKey``..."""

    name: str | None = None
    """Default: ``accountName``, ``name``, ``companyName``."""

    domain: str | None = None
    """Default: ``accountOrganization_domain``, ``domain``, ``website``..."""

    status: str | None = None
    """Default: ``status`` or a header ending in ``_status`` (the membership status)."""

    qualified_at: str | None = None
    """Default: ``lastQualificationTime``, ``last_qualified`` or one ending in
    ``_lastQualificationTime``."""


class IngestSettings(_Table, frozen=True):
    """``[ingest]``: the HTTP server through which the CDP sends changes."""

    host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    """Address to listen on. Loopback by default: a CDP on another host should come
    through a reverse proxy that terminates TLS. Changing it needs a restart."""

    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8470
    """TCP port to listen on (0: any free port, for tests). Changing it needs a restart."""

    token_file: Path | None = None
    """File holding a bearer token (one line) that every ingest request must carry as
    ``Authorization: Bearer <token>``; relative to the configuration file's directory.
    Unset: no token is asked for, which is safe only on loopback."""

    max_body_bytes: Count = 64 * 1024 * 1024
    """Largest request body accepted, in bytes; larger ones get 413. 64 MiB holds a
    snapshot of about a million accounts in CSV."""

    aep_mapping: AepMapping = AepMapping()
    """How AEP profile exports map onto accounts."""

    header_timeout_seconds: Annotated[float, msgspec.Meta(ge=0.1, le=300)] = 10.0
    """Seconds a new connection has to send its first request's headers; then it is
    closed. Slow-loris clients that trickle headers hold a descriptor no longer."""

    body_timeout_seconds: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 120.0
    """Seconds a request has to send its whole body once its headers are in; then it
    gets 408 and its connection is closed. 120 s carries the largest body at about
    half a megabyte a second."""

    idle_timeout_seconds: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 30.0
    """Seconds a kept-alive connection may wait for its next request (or a partial one
    may stall) before the server closes it."""

    max_connections: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 512
    """Open ingest connections at most. At the limit a new connection closes the
    oldest one with no request under way (idle, or still sending headers) that has been
    open for a second; when none can go, the new one is answered 503 and closed. Keep it
    well below the unit's LimitNOFILE, so that descriptors remain for the store and the
    admin socket."""

    max_body_bytes_in_flight: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 128 * 1024 * 1024
    """Request bytes held in memory at once, across requests: a body reserves its
    Content-Length (max_body_bytes when it has none, no more than this limit) before it
    is read, and frees it once answered. Decoding costs about three times a body's
    size, so the default bounds bodies to about 400 MiB of memory."""

    body_wait_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 5.0
    """Seconds a body waits for room under max_body_bytes_in_flight before it gets 503
    with Retry-After (0: at once)."""

    files: FileIngestSettings | None = None
    """The watched folder of AEP file exports; absent: no folder is watched."""


class LoggingSettings(_Table, frozen=True):
    """``[logging]``: the event lines written on stdout."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level of dbsync's own events written. ``info`` shows state changes,
    acknowledged batches and summaries; ``debug`` adds each request. Libraries'
    messages are written from ``warning`` up, whatever this says."""

    format: Literal["json", "text"] = "json"
    """``json``: one object per line, for journald and monitoring; ``text``:
    ``key=value`` lines for a terminal."""


class SecretRef(_Table, frozen=True):
    """Where a secret is read from: ``{ file = "path" }`` or ``{ credential = "name" }``.

    Exactly one of the two. The secret is a single line; one trailing newline is
    ignored, so that ``echo token > file`` works.
    """

    file: Path | None = None
    """A file holding the secret; relative to the configuration file's directory."""

    credential: CredentialName | None = None
    """A systemd credential (``LoadCredential=`` or ``LoadCredentialEncrypted=`` in the
    unit), read from ``$CREDENTIALS_DIRECTORY/<name>``."""


class CredentialRefs(_Table, frozen=True):
    """``[destinations.credentials]``: one of Demandbase's two authentication modes.

    Either ``token`` (the legacy user API token, which Adobe's destination asks for) or
    ``client_id`` and ``client_secret`` (an API key set, traded for short-lived access
    tokens). Each is a :class:`SecretRef`, never the secret itself.
    """

    token: SecretRef | None = None
    """The legacy API token from Demandbase's "My Profile > API Token"."""

    client_id: SecretRef | None = None
    """The API key set's client id."""

    client_secret: SecretRef | None = None
    """The API key set's client secret."""


class Limits(_Table, frozen=True):
    """``[destinations.limits]``: Demandbase's limits for one tenant, tracked client-side.

    The defaults are Demandbase's published limits; lower them when other integrations
    share the tenant, since the quotas are per tenant, not per client.
    """

    requests_per_minute: Count = 1000
    """Requests a minute across all calls (documented for the B2B API, assumed for the
    others). A 429 slows the pace below it for a while."""

    import_jobs_per_day: Count = 1200
    """Import jobs created a day (``POST /import/v1/job``)."""

    import_uploads_per_day: Count = 1200
    """CSV uploads a day (``PUT /import/v1/job/{id}/data``)."""

    import_status_per_day: Count = 3600
    """Import job status reads a day (``GET /import/v1/job/{id}``)."""

    import_list_per_day: Count = 3600
    """Import job listings a day (``GET /import/v1/jobs``)."""

    export_jobs_per_day: Count = 60
    """Export jobs created a day (``POST /data/export/v1/accountList/job``): this bounds
    how many read-backs a day all audiences of the destination share."""

    export_status_per_day: Count = 300
    """Export job status reads a day (``GET /data/export/v1/job/{id}``)."""

    concurrent_import_jobs: Count = 10
    """Import jobs created and not yet completed or failed at once. Undocumented:
    assumed, to keep a backlog from flooding the tenant."""

    concurrent_export_jobs: Count = 1
    """Export jobs running at once; Demandbase allows one (429-102 beyond)."""

    export_bytes_per_day: Count = 10_000_000_000
    """Bytes of export results a day (10 GB; 429-101 beyond), tracked on our side and
    kept in the store: estimated from the lists' sizes before an export starts,
    corrected by the size of the file downloaded."""

    day_seconds: Seconds = 86400.0
    """Length of the quota "day", in seconds. Windows are aligned to the Unix epoch, so
    86400 resets at midnight UTC like Demandbase. Shortened only for tests and the demo,
    together with the emulator's ``--day-seconds``."""

    quota_safety_margin: Annotated[float, msgspec.Meta(ge=0, lt=0.5)] = 0.02
    """Share of each daily quota kept in reserve, for the clock skew between us and
    Demandbase and for calls made by hand; 2% of 1,200 keeps 24 calls back."""


class DeliverySettings(_Table, frozen=True):
    """``[destinations.delivery]``: how actors pace their import jobs."""

    job_poll_initial_seconds: Seconds = 5.0
    """Seconds before the first status read of an uploaded job. Each later read waits
    twice as long, and the wait learns how long jobs really take: status reads have a
    daily quota too (3,600, for 1,200 jobs)."""

    job_poll_max_seconds: Seconds = 300.0
    """Longest wait between two status reads of one job."""

    max_jobs_in_flight_per_audience: Annotated[int, msgspec.Meta(ge=1, le=100)] = 2
    """Import jobs one audience may have open at once, within the destination's
    ``concurrent_import_jobs``; never two jobs for the same account."""

    pace_recovery_seconds: Seconds = 60.0
    """After a 429 halved the request pace, each quiet period of this many seconds
    gives back a tenth of ``requests_per_minute``."""

    backlog_eta_warn_hours: Annotated[float, msgspec.Meta(gt=0, le=8760)] = 24.0
    """Hours within which an audience's backlog should be delivered: when the forecast
    (``backlog_eta`` in ``dbsync ctl status`` and ``audience_summary``) is later, a
    ``backlog_eta_exceeded`` warning is logged once, and ``backlog_eta_recovered`` once
    it falls back. Real hours, whatever ``day_seconds``; from a fraction to a year."""


class ReconcileSettings(_Table, frozen=True):
    """``[destinations.reconcile]``: reading lists back to prove what Demandbase holds.

    Each read-back is one Data Export job (``export_jobs_per_day`` and
    ``concurrent_export_jobs`` in ``[destinations.limits]`` bound them), shared by every
    audience of the destination in turn, the one read back longest ago first.
    """

    scheduled: bool = True
    """Read lists back on schedule, every ``interval_seconds``. ``false``: only when
    asked (``dbsync ctl reconcile AUDIENCE``)."""

    visibility_lag_seconds: NonNegativeSeconds = 86400.0
    """Age, in seconds, a change must reach before a read-back may judge it. Demandbase
    applies loaded data overnight, so a day by default; seconds against the emulator."""

    interval_seconds: Seconds = 86400.0
    """Seconds between two read-backs of one audience. With 60 export jobs a day shared
    by every audience of the destination, daily is what a tenant can afford; with more
    audiences than exports, each waits its turn (every ceil(audiences / exports) days)."""

    repair_limit: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    """Times an account found missing is sent again. Found missing once more, it is set
    aside as ``unmatched`` (Demandbase has no account that matches it) and listed by
    ``dbsync ctl rejected`` instead of being sent forever."""

    multi_list_exports: Literal["auto", "yes", "no"] = "auto"
    """Read many audiences' lists in one export job (``accountListIds``), which needs
    Demandbase's results file to say each row's list (assumption A5, an ``Account List
    ID`` column). ``auto``: when ``dbsync probe`` found A5 holds for this destination
    (``<state_dir>/contract.json``); ``yes``: it holds (the development emulator's
    ``multi-list-column`` dialect); ``no``: one list per export job. A results file
    without the column turns it off until the next start."""

    verify_within_hours: Annotated[float, msgspec.Meta(gt=0, le=720)] = 24.0
    """With multi-list exports: hours within which every audience is read back again, if
    the export jobs, status reads and the daily export volume allow; each export job then
    reads every audience due by the next one."""

    retry_unmatched_days: tuple[PositiveDays, ...] = (1.0, 3.0, 7.0, 30.0)
    """Days (of ``[destinations.limits] day_seconds``) after which an account set aside as
    ``unmatched`` is sent again, one entry per try, the last repeating: by default after
    1, 3 and 7 days, then every 30. Demandbase's account database grows, and a row it
    dropped at every repair looks unmatched. A try uses only quota no other batch waits
    for; an account found listed is verified and leaves the set. ``[]``: never again."""

    export_poll_initial_seconds: Seconds = 30.0
    """Seconds before the first status read of an export job. Each later read waits
    twice as long, and the wait learns how long exports take: 300 status reads a day
    are shared by 60 exports."""

    export_poll_max_seconds: Seconds = 1800.0
    """Longest wait between two status reads of one export job; at least
    ``export_poll_initial_seconds``."""

    def __post_init__(self) -> None:
        if self.export_poll_max_seconds < self.export_poll_initial_seconds:
            raise ValueError(
                f"export_poll_max_seconds ({self.export_poll_max_seconds:g}) is below"
                f" export_poll_initial_seconds ({self.export_poll_initial_seconds:g})"
            )


class FlushPolicy(_Table, frozen=True):
    """``[destinations.audiences.flush]``: when pending changes become a batch."""

    max_records: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10_000
    """A batch is sent once this many accounts differ. 10,000 rows make a CSV of about
    half a megabyte: large enough to spare the daily job quota, small enough to retry."""

    max_age_seconds: Seconds = 60.0
    """A batch is sent once its oldest change is this many seconds old, however small.
    At 1,200 jobs a day for the whole tenant, a minute is as fast as a few audiences
    can go on average."""


class Audience(_Table, frozen=True):
    """``[[destinations.audiences]]``: one activated account audience and its list."""

    id: AudienceId
    """The CDP's audience id (an AEP segment id is a UUID). Unique in the whole
    configuration: ingest addresses audiences by id alone."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    """The audience's name, as shown in the CDP."""

    origin: str
    """Where the CDP built the audience: ``segmentation`` (or AEP's
    ``REAL_TIME_CUSTOMER_PROFILE``). Custom CSV uploads (``custom_upload``) are refused,
    as Adobe's Demandbase destination refuses them."""

    list_name: ListName = ""
    """Name of the Demandbase account list the audience feeds; empty or absent: the
    audience's name. Demandbase list names are unique, so two audiences of one
    destination may not share one (compared ignoring case)."""

    list_id: Annotated[int, msgspec.Meta(gt=0)] | None = None
    """The list's Demandbase id, if known. Read-back needs it; dbsync learns it from the
    first completed import job otherwise."""

    requests_per_minute: Count = 60
    """The audience's own pace, within the destination's: one busy audience cannot
    take every request of the tenant."""

    flush: FlushPolicy = FlushPolicy()
    """When pending changes are sent."""

    paused: bool = False
    """Start paused: changes are accepted and kept, nothing is sent until
    ``dbsync ctl resume``."""

    aep_audience_id: (
        Annotated[
            str, msgspec.Meta(pattern=r"^[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$")
        ]
        | None
    ) = None
    """The audience's UUID in AEP, as it appears in the names of its exported files
    (or as the name of the sub-folder they land in)."""

    file_mode: Literal["full", "incremental"] = "full"
    """What the audience's AEP files hold: ``full``, its complete membership (daily
    full exports); ``incremental``, members who joined and, with the status mapped,
    who left. Nothing in a file says which: it must match the AEP schedule."""

    file_columns: FileColumns = FileColumns()
    """Header names of this audience's files beyond the defaults."""

    max_removal_percent: Annotated[float, msgspec.Meta(ge=0, le=100)] = 20.0
    """The removal guard, for every complete membership (PUT snapshots and full
    files): one that would remove more than this share of the audience's members, or
    empty it, is held until ``dbsync ctl approve`` (or dropped by ``discard``). 100
    turns the guard off."""

    def __post_init__(self) -> None:
        if not self.list_name:
            msgspec.structs.force_setattr(self, "list_name", self.name)


class Destination(_Table, frozen=True):
    """``[[destinations]]``: one Demandbase tenant connection and its audiences."""

    name: DestinationName
    """Short name of the connection, in logs, ``dbsync ctl quota`` and the store
    (letters, digits, ``.``, ``_``, ``-``). Unique."""

    credentials: CredentialRefs
    """How dbsync authenticates to this tenant."""

    description: str = ""
    """Free text for the operator."""

    entity_type: str = "account"
    """Always ``account``: only account audiences can be activated to Demandbase."""

    base_url: str = "https://uapi.demandbase.com"
    """Scheme and host of Demandbase's APIs (a path prefix is allowed, for a proxy).
    The emulator serves the same paths on http://127.0.0.1:8471."""

    request_timeout_seconds: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 30.0
    """Seconds one HTTP request may take, connection included, before it is retried
    (0.1 to 3,600)."""

    limits: Limits = Limits()
    """Demandbase's limits for this tenant."""

    delivery: DeliverySettings = DeliverySettings()
    """How actors pace their import jobs."""

    reconcile: ReconcileSettings = ReconcileSettings()
    """Read-back scheduling."""

    audiences: tuple[Audience, ...] = ()
    """The audiences activated to this tenant."""


class Config(_Table, frozen=True, dict=True):
    """The whole configuration file. ``dict=True`` only makes room for cached lookups."""

    daemon: DaemonSettings = DaemonSettings()
    """``[daemon]``."""

    ingest: IngestSettings = IngestSettings()
    """``[ingest]``."""

    logging: LoggingSettings = LoggingSettings()
    """``[logging]``."""

    destinations: tuple[Destination, ...] = ()
    """``[[destinations]]``: the Demandbase tenants fed, each with its audiences. At
    least one: a file without any is refused, since it is far more often a truncated
    file than a wish, and a reload with it would deactivate every audience."""

    def audiences(self) -> Iterator[tuple[Destination, Audience]]:
        """Every audience with its destination, in file order."""
        for destination in self.destinations:
            for audience in destination.audiences:
                yield destination, audience

    def audience(self, audience_id: str) -> tuple[Destination, Audience] | None:
        """The audience with this id and its destination, or None if none has it."""
        return self._audience_index.get(audience_id)

    @functools.cached_property
    def _audience_index(self) -> dict[str, tuple[Destination, Audience]]:
        return {audience.id: (destination, audience) for destination, audience in self.audiences()}

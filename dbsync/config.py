"""dbsync's configuration: one TOML file, decoded into frozen msgspec Structs.

There is one Struct per TOML table, its fields named exactly like the keys (so that
grep finds both) with the unit in the name (``drain_seconds``). Decoding is strict:
msgspec rejects unknown keys and values of the wrong type or out of range, and its
error paths (``- at `$.destinations[0].limits```) are translated into a
:class:`~dbsync.errors.ConfigError` whose key is the dotted path of the culprit
(``destinations[0].limits.requests_per_minute``). What spans several fields (unique
names, one credential mode, the socket path's length ...) is checked afterwards, in
:func:`_validate`, which names the key just as precisely.

Paths: a relative path the operator provides (``state_dir``, ``token_file``, secret
files) is taken from the configuration file's directory, so that a checkout works
whatever the current directory; a relative ``admin_socket``, something the daemon
creates, is taken inside ``state_dir``. After loading, every path is absolute.

Secrets are never written in the configuration, which can then be shown, diffed and
backed up freely: a :class:`SecretRef` names a file or a systemd credential, and only
:func:`read_secret` opens it, when the daemon starts or reloads and when
``dbsync check-config`` runs. The values it returns live in :class:`Credentials`,
whose ``repr`` and ``str`` never show them.
"""

from __future__ import annotations

import difflib
import functools
import grp
import hashlib
import os
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import msgspec.inspect as mi

from dbsync import validation
from dbsync.errors import ConfigError

__all__ = [
    "AepMapping",
    "Audience",
    "Config",
    "CredentialRefs",
    "Credentials",
    "DaemonSettings",
    "DeliverySettings",
    "Destination",
    "FlushPolicy",
    "IngestSettings",
    "Limits",
    "LoggingSettings",
    "ReconcileSettings",
    "SecretRef",
    "check_secrets",
    "decode_config",
    "load_config",
    "load_credentials",
    "load_ingest_token",
    "read_secret",
]

Seconds = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeSeconds = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]
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

# The origins of an audience that may be activated: built by segmentation, under our
# name or AEP's. Custom uploads are refused, as Adobe's Demandbase destination does.
_SEGMENTATION_ORIGINS = ("segmentation", "real_time_customer_profile")
_CUSTOM_UPLOAD_ORIGINS = ("custom_upload",)

# sun_path holds 108 bytes including the terminating NUL.
_UNIX_SOCKET_PATH_MAX_BYTES = 107


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

    summary_interval_seconds: Seconds = 60.0
    """Seconds between two ``audience_summary`` log lines per audience: one a minute is
    fine-grained enough for alerts and cheap enough for the journal."""

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
    ``quota``, ``rejected``). Unset: only the daemon's own user and root."""

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

    request_timeout_seconds: Seconds = 30.0
    """Seconds one HTTP request may take, connection included, before it is retried."""

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
    """``[[destinations]]``: the Demandbase tenants fed, each with its audiences. None
    is valid (ingest then knows no audience), which helps while setting up."""

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


# Keys the credential fingerprints: they can be compared within this process, and
# cannot be used elsewhere to confirm a guessed secret.
_FINGERPRINT_KEY = os.urandom(16)


class Credentials:
    """A destination's secrets, once read: ``token``, or ``client_id`` and ``client_secret``.

    ``repr`` and ``str`` name the secrets present, never their values. A plain class
    rather than a Struct or a dataclass, which msgspec would encode field by field: the
    log formatter falls back to ``str``, so credentials passed to a log call stay hidden.
    """

    __slots__ = ("client_id", "client_secret", "token")

    token: str | None
    """The legacy API token, sent as ``Authorization: Bearer <token>``."""

    client_id: str | None
    """The API key set's client id, traded with the secret at ``POST /auth/v1/token``."""

    client_secret: str | None
    """The API key set's client secret."""

    def __init__(
        self,
        *,
        token: str | None = None,
        client_id: str | None = None,
        client_secret: str | None = None,
    ) -> None:
        self.token = token
        self.client_id = client_id
        self.client_secret = client_secret

    def __repr__(self) -> str:
        present = [f"{name}=<redacted>" for name in self.__slots__ if getattr(self, name)]
        return f"Credentials({', '.join(present)})"

    @property
    def fingerprint(self) -> str:
        """A digest that changes when any secret does, for noticing a rotation on reload.

        Keyed per process: stable within this process only, and of no use to anyone
        trying to confirm a guessed secret.
        """
        digest = hashlib.blake2b(key=_FINGERPRINT_KEY, digest_size=8)
        for value in (self.token, self.client_id, self.client_secret):
            digest.update(b"-" if value is None else b"+" + value.encode() + b"\0")
        return digest.hexdigest()


def load_config(path: Path) -> Config:
    """Read, decode and validate the configuration file at ``path``.

    Secrets are not read here (see :func:`load_credentials` and :func:`check_secrets`).

    Raises:
        ConfigError: the file cannot be read, is not TOML, or is invalid; the error's
            key is the dotted path of the offending key ("" for the file as a whole).
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_config(data, base_dir=path.parent)


def decode_config(data: bytes, *, base_dir: Path) -> Config:
    """Decode and validate a configuration; relative paths are taken from ``base_dir``."""
    # UTF-8 is checked here, before the TOML decoder sees the bytes: how a decoder
    # reports bad UTF-8 (its error class, its words) changes between its versions.
    text = _utf8_text(data)
    try:
        config = msgspec.toml.decode(text, type=Config, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise _translate(exc) from exc
    except msgspec.DecodeError as exc:
        raise ConfigError("", f"not valid TOML: {exc}") from exc
    config = _resolve(config, base_dir.absolute())
    _validate(config)
    return config


def _utf8_text(data: bytes) -> str:
    """``data`` as text, or a ConfigError naming the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            "",
            f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}"
            f" (line {line}, column {column})",
        ) from None


def read_secret(ref: SecretRef, *, key: str) -> str:
    """The secret ``ref`` points to; ``key`` is the reference's own dotted path.

    Raises:
        ConfigError: the file or credential is missing, unreadable, empty or not one
            line; the error names ``<key>.file`` or ``<key>.credential`` and the path,
            never the content.
    """
    if ref.file is not None:
        return _read_secret_file(ref.file, key=f"{key}.file")
    if ref.credential is not None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                f"{key}.credential",
                f"systemd credential {ref.credential!r} cannot be read: $CREDENTIALS_DIRECTORY"
                " is not set (systemd sets it for a unit with LoadCredential=)",
            )
        return _read_secret_file(Path(directory, ref.credential), key=f"{key}.credential")
    raise ConfigError(key, _ONE_SECRET_SOURCE)


def load_credentials(destination: Destination, index: int) -> Credentials:
    """Read the secrets of ``destination``, the ``index``-th of the file (for error keys)."""
    key = f"destinations[{index}].credentials"
    refs = destination.credentials
    if refs.token is not None:
        return Credentials(token=read_secret(refs.token, key=f"{key}.token"))
    if refs.client_id is not None and refs.client_secret is not None:
        return Credentials(
            client_id=read_secret(refs.client_id, key=f"{key}.client_id"),
            client_secret=read_secret(refs.client_secret, key=f"{key}.client_secret"),
        )
    raise ConfigError(key, _ONE_CREDENTIAL_MODE)


def load_ingest_token(ingest: IngestSettings) -> str | None:
    """The bearer token ingest requests must carry, or None when none is configured."""
    if ingest.token_file is None:
        return None
    return _read_secret_file(ingest.token_file, key="ingest.token_file")


def check_secrets(config: Config) -> list[str]:
    """Read every secret ``config`` refers to, as the daemon will when it starts.

    Returns a note for each secret that cannot be checked from here: a systemd
    credential, outside the service that receives it.

    Raises:
        ConfigError: the first secret that is missing, unreadable or empty.
    """
    notes: list[str] = []
    for key, ref in _secret_refs(config):
        if ref.credential is not None and not os.environ.get("CREDENTIALS_DIRECTORY"):
            notes.append(
                f"{key}.credential: systemd credential {ref.credential!r} not checked"
                " ($CREDENTIALS_DIRECTORY is set only inside the service)"
            )
        else:
            read_secret(ref, key=key)
    load_ingest_token(config.ingest)
    return notes


_ONE_SECRET_SOURCE = 'set exactly one of file = "path" or credential = "name"'
_ONE_CREDENTIAL_MODE = (
    "set either token (the legacy API token) or client_id and client_secret (an API key set)"
)
_INLINE_SECRET = (
    "secrets are never written in the configuration; refer to one with"
    ' { file = "/path/to/secret" } or { credential = "systemd-credential-name" }'
)


def _decode_path(type_: type, obj: object) -> object:
    # msgspec turns a TypeError from a dec_hook into a ValidationError naming the key;
    # any other exception would escape load_config raw.
    if type_ is not Path:
        raise TypeError(f"no decoder for `{type_.__name__}`")
    if not isinstance(obj, str):
        raise TypeError(f"Expected a path (`str`), got `{type(obj).__name__}`")
    if not obj or "\0" in obj:
        raise ValueError("Expected a path, got an empty string or a NUL byte")
    return Path(obj)


def _read_secret_file(path: Path, *, key: str) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read secret {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode()
    except UnicodeDecodeError:
        # Not chained: the decode error quotes bytes of the secret.
        raise ConfigError(key, f"secret {path} is not UTF-8 text") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(key, f"secret {path} is empty")
    if "\n" in text or "\r" in text:
        raise ConfigError(key, f"secret {path} has more than one line")
    if text != text.strip():
        # An HTTP server strips such spaces, and the token would then fail for no
        # visible reason.
        raise ConfigError(key, f"secret {path} starts or ends with white space")
    return text


def _secret_refs(config: Config) -> Iterator[tuple[str, SecretRef]]:
    for index, destination in enumerate(config.destinations):
        refs = destination.credentials
        for name in ("token", "client_id", "client_secret"):
            ref: SecretRef | None = getattr(refs, name)
            if ref is not None:
                yield f"destinations[{index}].credentials.{name}", ref


# --- From msgspec's errors to ConfigError ------------------------------------------

_CONFIG_TYPE = mi.type_info(Config)
_PATH_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_INVALID_ENUM = re.compile(r"Invalid enum value (?P<value>.+)")


def _translate(exc: msgspec.ValidationError) -> ConfigError:
    """msgspec's error as a ConfigError keyed by the dotted path (``a[0].b``)."""
    message, key = validation.split(exc)
    target = _type_at(f".{key}" if key else "")
    if name := validation.unknown_field(message):
        return ConfigError(_join(key, name), _unknown_key(name, target))
    if name := validation.missing_field(message):
        return ConfigError(_join(key, name), "required key is missing")
    if isinstance(target, mi.StructType) and target.cls is SecretRef and "got `str`" in message:
        return ConfigError(key, _INLINE_SECRET)
    if isinstance(target, mi.LiteralType) and (found := _INVALID_ENUM.fullmatch(message)):
        allowed = ", ".join(map(str, target.values))
        return ConfigError(key, f"invalid value {found['value']}; expected one of: {allowed}")
    return ConfigError(key, message[:1].lower() + message[1:])


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _unknown_key(name: str, table: mi.Type | None) -> str:
    if not isinstance(table, mi.StructType):
        return "unknown key"
    known = [field.encode_name for field in table.fields]
    if close := difflib.get_close_matches(name, known, n=1):
        return f"unknown key; did you mean `{close[0]}`?"
    return f"unknown key; known keys here: {', '.join(known)}"


def _type_at(path: str) -> mi.Type | None:
    """The declared type at msgspec's error ``path`` (``.destinations[0].limits``)."""
    current: mi.Type = _CONFIG_TYPE
    for name, index in _PATH_PART.findall(path):
        current = _unwrap(current)
        if name and isinstance(current, mi.StructType):
            field = next((f for f in current.fields if f.encode_name == name), None)
            if field is None:
                return None
            current = field.type
        elif index and isinstance(current, mi.VarTupleType):
            current = current.item_type
        else:
            return None
    return _unwrap(current)


def _unwrap(type_: mi.Type) -> mi.Type:
    """Strip constraints and ``| None`` to reach the type a value is checked against."""
    if isinstance(type_, mi.Metadata):
        return _unwrap(type_.type)
    if isinstance(type_, mi.UnionType):
        others = [t for t in type_.types if not isinstance(t, mi.NoneType)]
        if len(others) == 1:
            return _unwrap(others[0])
    return type_


# --- After decoding: absolute paths, then checks across fields --------------------


def _resolve(config: Config, base_dir: Path) -> Config:
    """Make every path absolute and drop a trailing slash from each base URL."""
    state_dir = base_dir / config.daemon.state_dir
    daemon = msgspec.structs.replace(
        config.daemon, state_dir=state_dir, admin_socket=state_dir / config.daemon.admin_socket
    )
    ingest = config.ingest
    if ingest.token_file is not None:
        ingest = msgspec.structs.replace(ingest, token_file=base_dir / ingest.token_file)
    destinations = tuple(
        msgspec.structs.replace(
            destination,
            base_url=destination.base_url.rstrip("/"),
            credentials=CredentialRefs(
                token=_resolve_secret(destination.credentials.token, base_dir),
                client_id=_resolve_secret(destination.credentials.client_id, base_dir),
                client_secret=_resolve_secret(destination.credentials.client_secret, base_dir),
            ),
        )
        for destination in config.destinations
    )
    return msgspec.structs.replace(config, daemon=daemon, ingest=ingest, destinations=destinations)


def _resolve_secret(ref: SecretRef | None, base_dir: Path) -> SecretRef | None:
    if ref is None or ref.file is None:
        return ref
    return msgspec.structs.replace(ref, file=base_dir / ref.file)


def _validate(config: Config) -> None:
    """The checks no single field can make; each error names the key to fix."""
    socket_bytes = len(os.fsencode(config.daemon.admin_socket))
    if socket_bytes > _UNIX_SOCKET_PATH_MAX_BYTES:
        raise ConfigError(
            "daemon.admin_socket",
            f"{config.daemon.admin_socket} is {socket_bytes} bytes long; a Unix socket path"
            f" may have at most {_UNIX_SOCKET_PATH_MAX_BYTES}: set a shorter admin_socket",
        )
    if config.daemon.restart_backoff_max_seconds < config.daemon.restart_backoff_seconds:
        raise ConfigError(
            "daemon.restart_backoff_max_seconds",
            f"{config.daemon.restart_backoff_max_seconds:g} is shorter than"
            f" restart_backoff_seconds ({config.daemon.restart_backoff_seconds:g})",
        )
    for name in ("admin_viewer_group", "admin_operator_group"):
        group: str | None = getattr(config.daemon, name)
        if group is not None:
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ConfigError(f"daemon.{name}", f"no group {group!r} on this host") from None

    for key, ref in _secret_refs(config):
        if (ref.file is None) == (ref.credential is None):
            raise ConfigError(key, _ONE_SECRET_SOURCE)

    destination_names: dict[str, str] = {}
    audience_ids: dict[str, str] = {}
    for index, destination in enumerate(config.destinations):
        key = f"destinations[{index}]"
        if (first := destination_names.setdefault(destination.name, key)) != key:
            raise ConfigError(
                f"{key}.name", f"destination name {destination.name!r} is also {first}'s"
            )
        _validate_destination(destination, key)
        list_names: dict[str, str] = {}
        list_ids: dict[int, str] = {}
        for position, audience in enumerate(destination.audiences):
            audience_key = f"{key}.audiences[{position}]"
            if (first := audience_ids.setdefault(audience.id, audience_key)) != audience_key:
                raise ConfigError(
                    f"{audience_key}.id",
                    f"audience id {audience.id!r} is also {first}'s; ids must be unique in"
                    " the whole configuration, as ingest addresses audiences by id alone",
                )
            _validate_audience(audience, audience_key)
            folded = audience.list_name.strip().casefold()
            if (first := list_names.setdefault(folded, audience_key)) != audience_key:
                raise ConfigError(
                    f"{audience_key}.list_name",
                    f"list {audience.list_name!r} is also fed by {first} of the same"
                    " destination (names compared ignoring case); set a distinct list_name",
                )
            if audience.list_id is not None and (
                (first := list_ids.setdefault(audience.list_id, audience_key)) != audience_key
            ):
                raise ConfigError(
                    f"{audience_key}.list_id", f"list id {audience.list_id} is also {first}'s"
                )


def _validate_destination(destination: Destination, key: str) -> None:
    if destination.entity_type.casefold() != "account":
        raise ConfigError(
            f"{key}.entity_type",
            f"entity type {destination.entity_type!r} is not supported: only account"
            " audiences can be activated, as Demandbase's destination requires"
            ' entity type = Account; set entity_type = "account"',
        )
    url = urllib.parse.urlsplit(destination.base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(
            f"{key}.base_url",
            f"{destination.base_url!r} is not an http:// or https:// URL with a host",
        )
    if url.username is not None or url.password is not None:
        raise ConfigError(
            f"{key}.base_url", "must not carry credentials: use [destinations.credentials]"
        )
    if url.query or url.fragment:
        raise ConfigError(f"{key}.base_url", "must not carry a query or a fragment")

    refs = destination.credentials
    has_key_set = refs.client_id is not None or refs.client_secret is not None
    if refs.token is not None and has_key_set:
        raise ConfigError(
            f"{key}.credentials",
            "set token or client_id and client_secret, not both: a destination has one"
            " authentication mode",
        )
    if refs.token is None:
        if not has_key_set:
            raise ConfigError(f"{key}.credentials", _ONE_CREDENTIAL_MODE)
        for name in ("client_id", "client_secret"):
            if getattr(refs, name) is None:
                raise ConfigError(
                    f"{key}.credentials.{name}",
                    "required key is missing: an API key set needs client_id and client_secret",
                )


def _validate_audience(audience: Audience, key: str) -> None:
    origin = audience.origin.casefold()
    if origin in _CUSTOM_UPLOAD_ORIGINS:
        raise ConfigError(
            f"{key}.origin",
            "custom CSV uploads cannot be activated to Demandbase; only audiences built by"
            " segmentation can",
        )
    if origin not in _SEGMENTATION_ORIGINS:
        raise ConfigError(
            f"{key}.origin",
            f"unknown origin {audience.origin!r}; accepted (ignoring case):"
            f" {', '.join(_SEGMENTATION_ORIGINS)}",
        )
    for name in ("name", "list_name"):
        if not getattr(audience, name).strip():
            raise ConfigError(f"{key}.{name}", "must not be blank")

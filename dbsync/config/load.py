"""Loading the configuration: bytes to a validated :class:`~dbsync.config.schema.Config`.

In order: the bytes must be UTF-8 (checked before the TOML decoder, whose own report
changes between versions); msgspec decodes them strictly into the schema's Structs,
and its error paths (``- at `$.destinations[0].limits```), read by
:mod:`dbsync.validation`, become a :class:`~dbsync.errors.ConfigError` whose key is the
dotted path of the culprit (``destinations[0].limits.requests_per_minute``); then every
path is made absolute; then :func:`_validate` makes the checks that span several
fields (unique names, one credential mode, the socket path's length ...), naming the
key just as precisely.

Paths: a relative path the operator provides (``state_dir``, ``token_file``, secret
files) is taken from the configuration file's directory, so that a checkout works
whatever the current directory; a relative ``admin_socket``, something the daemon
creates, is taken inside ``state_dir``. After loading, every path is absolute.
Secrets are not read here (:mod:`dbsync.config.secrets`).
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import os
import re
import urllib.parse
from pathlib import Path

import msgspec
import msgspec.inspect as mi

from dbsync import validation
from dbsync.config.schema import Audience, Config, CredentialRefs, Destination, SecretRef
from dbsync.config.secrets import ONE_CREDENTIAL_MODE, ONE_SECRET_SOURCE, secret_refs
from dbsync.errors import ConfigError

__all__ = ["decode_config", "load_config"]


# The origins of an audience that may be activated: built by segmentation, under our
# name or AEP's. Custom uploads are refused, as Adobe's Demandbase destination does.
_SEGMENTATION_ORIGINS = ("segmentation", "real_time_customer_profile")
_CUSTOM_UPLOAD_ORIGINS = ("custom_upload",)

# sun_path holds 108 bytes including the terminating NUL.
_UNIX_SOCKET_PATH_MAX_BYTES = 107

# What a secret written inline gets: where it belongs instead (see dbsync.config.secrets).
_INLINE_SECRET = (
    "secrets are never written in the configuration; refer to one with"
    ' { file = "/path/to/secret" } or { credential = "systemd-credential-name" }'
)


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
    if isinstance(target, mi.FloatType | mi.IntType) and (allowed := _allowed_range(target)):
        return ConfigError(key, f"{message[:1].lower() + message[1:]}; allowed: {allowed}")
    return ConfigError(key, message[:1].lower() + message[1:])


def _allowed_range(number: mi.FloatType | mi.IntType) -> str:
    """The range a number key accepts, in words (``from 1 to 86400``); "" if unbounded."""
    low = f"from {number.ge:g}" if number.ge is not None else ""
    low = f"above {number.gt:g}" if number.gt is not None else low
    high = f"to {number.le:g}" if number.le is not None else ""
    high = f"below {number.lt:g}" if number.lt is not None else high
    if isinstance(number, mi.FloatType) and (low or high):
        high = f"{high} (finite)" if high else "(finite)"
    return " ".join(part for part in (low, high) if part)


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
    if ingest.files is not None:
        files = msgspec.structs.replace(ingest.files, directory=base_dir / ingest.files.directory)
        ingest = msgspec.structs.replace(ingest, files=files)
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
    if not config.destinations:
        raise ConfigError(
            "destinations",
            "no destination: at least one [[destinations]] table is required (an empty"
            " or truncated file would otherwise deactivate every audience on reload)",
        )
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

    for key, ref in secret_refs(config):
        if (ref.file is None) == (ref.credential is None):
            raise ConfigError(key, ONE_SECRET_SOURCE)

    destination_names: dict[str, str] = {}
    audience_ids: dict[str, str] = {}
    aep_ids: dict[str, str] = {}
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
            if audience.aep_audience_id is not None:
                aep_key = f"{audience_key}.aep_audience_id"
                aep_id = audience.aep_audience_id.lower()
                if (first := aep_ids.setdefault(aep_id, aep_key)) != aep_key:
                    raise ConfigError(
                        aep_key,
                        f"AEP audience {audience.aep_audience_id} is also {first}: its files"
                        " can feed one audience only",
                    )
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


def _is_loopback(host: str) -> bool:
    if host.casefold() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    if url.scheme == "http" and not _is_loopback(url.hostname):
        raise ConfigError(
            f"{key}.base_url",
            f"http:// to {url.hostname} would send the bearer token in clear: https:// is"
            " required unless the host is loopback (127.0.0.0/8, ::1 or localhost)",
        )

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
            raise ConfigError(f"{key}.credentials", ONE_CREDENTIAL_MODE)
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

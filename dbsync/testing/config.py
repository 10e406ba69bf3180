"""A daemon's ``config.toml`` for tests, benchmarks and the demo, built from the real schema.

The file is not templated text: :func:`build_config` builds a
:class:`~dbsync.config.Config` from the Structs the daemon decodes, and
:func:`config_toml` writes that Struct out. Overrides are keyword arguments to those
Structs, named exactly as in config.toml, so a mistyped key (``drain_second``) raises
``TypeError`` where the test builds its configuration, instead of a ConfigError once a
daemon reads the file; and the writer cannot drift from the schema, since there is
only one.

The defaults are the harness's, not production's: every Demandbase limit far out of
reach (:data:`NO_LIMITS`), job polls of 50 ms, summaries once an hour (these runs do
not look at them), a crashed actor restarted after 50 ms, requests that time out after
10 s; ingest is always on a free loopback port. ``presets=False`` starts from the
schema's own defaults instead, as the demo does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from dbsync.config import (
    Audience,
    Config,
    CredentialRefs,
    DaemonSettings,
    DeliverySettings,
    Destination,
    FlushPolicy,
    IngestSettings,
    Limits,
    LoggingSettings,
    ReconcileSettings,
    SecretRef,
)
from dbsync.daemon import DATABASE_NAME

__all__ = [
    "DESTINATION",
    "EXPORTS_UNLIMITED",
    "FAST_DELIVERY",
    "FAST_RECONCILE",
    "HIGH",
    "NO_LIMITS",
    "QUIET_DAEMON",
    "TOKEN",
    "ApiKeySet",
    "AudienceConfig",
    "build_config",
    "config_toml",
    "database",
    "write_config",
    "write_reconcile_config",
]

DESTINATION = "emulator"
# The emulator's legacy token (its ``EmulatorSettings.token`` default).
TOKEN = "emulator-token"
# Far above anything a scenario spends: only the scenarios about limits meet one.
HIGH = 1_000_000

NO_LIMITS: Mapping[str, float] = {
    "requests_per_minute": HIGH,
    "import_jobs_per_day": HIGH,
    "import_uploads_per_day": HIGH,
    "import_status_per_day": HIGH,
    "import_list_per_day": HIGH,
    "concurrent_import_jobs": 20,
}
EXPORTS_UNLIMITED: Mapping[str, float] = {
    "export_jobs_per_day": HIGH,
    "export_status_per_day": HIGH,
}
FAST_DELIVERY: Mapping[str, float] = {
    "job_poll_initial_seconds": 0.05,
    "job_poll_max_seconds": 0.5,
    "max_jobs_in_flight_per_audience": 2,
}
QUIET_DAEMON: Mapping[str, object] = {
    "drain_seconds": 5.0,
    # Summaries are not what these runs look at: keep the log quiet.
    "summary_interval_seconds": 3600.0,
    # A crashed actor or reconciler comes back at once, and a crash loop gives up fast.
    "restart_backoff_seconds": 0.05,
    "restart_backoff_max_seconds": 0.2,
}
# Read-backs every 0.15 s, judging what was acknowledged 0.15 s ago; polls of 50 ms.
FAST_RECONCILE: Mapping[str, object] = {
    "visibility_lag_seconds": 0.15,
    "interval_seconds": 0.15,
    "repair_limit": 3,
    "export_poll_initial_seconds": 0.05,
    "export_poll_max_seconds": 0.2,
}


@dataclass(frozen=True)
class AudienceConfig:
    """One ``[[destinations.audiences]]`` table; ``list`` is the Demandbase list it feeds."""

    id: str
    name: str = ""
    list_name: str = ""
    max_records: int = 1_000
    max_age_seconds: float = 0.2
    requests_per_minute: int = HIGH
    paused: bool = False
    aep_audience_id: str | None = None
    file_mode: Literal["full", "incremental"] = "full"
    max_removal_percent: float = 20.0
    list_id: int | None = None  # the Demandbase list, when configured (adopted at start)

    @property
    def display_name(self) -> str:
        return self.name or f"List {self.id}"

    @property
    def list(self) -> str:
        """The list the configuration names: ``list_name``, else the audience's name."""
        return self.list_name or self.display_name

    def table(self) -> Audience:
        return Audience(
            id=self.id,
            name=self.display_name,
            origin="segmentation",
            list_name=self.list_name,
            requests_per_minute=self.requests_per_minute,
            flush=FlushPolicy(max_records=self.max_records, max_age_seconds=self.max_age_seconds),
            paused=self.paused,
            aep_audience_id=self.aep_audience_id,
            file_mode=self.file_mode,
            max_removal_percent=self.max_removal_percent,
            list_id=self.list_id,
        )


@dataclass(frozen=True)
class ApiKeySet:
    """API Key Set credentials (``client_id`` and ``client_secret``); the emulator's defaults."""

    client_id: str = "emulator-client"
    client_secret: str = "emulator-secret"


def build_config(
    directory: Path,
    base_url: str,
    audiences: Sequence[AudienceConfig],
    *,
    destination: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
    delivery: Mapping[str, Any] | None = None,
    reconcile: Mapping[str, Any] | None = None,
    daemon: Mapping[str, Any] | None = None,
    ingest: Mapping[str, Any] | None = None,
    logging: Mapping[str, Any] | None = None,
    credentials: CredentialRefs | None = None,
    presets: bool = True,
) -> Config:
    """The configuration of one emulator destination feeding ``audiences``.

    Each mapping overrides keys of its table (``limits`` of ``[destinations.limits]``
    ...), over the harness's presets unless ``presets`` is false. State goes to
    ``directory/state``. Raises ``TypeError`` for a key the table does not have.
    """
    limits_keys = {**(NO_LIMITS if presets else {}), **(limits or {})}
    delivery_keys = {**(FAST_DELIVERY if presets else {}), **(delivery or {})}
    daemon_keys = {**(QUIET_DAEMON if presets else {}), **(daemon or {})}
    ingest_keys = {"host": "127.0.0.1", "port": 0, **(ingest or {})}
    destination_keys = {
        "name": DESTINATION,
        **({"request_timeout_seconds": 10.0} if presets else {}),
        **(destination or {}),
    }
    return Config(
        daemon=DaemonSettings(state_dir=directory / "state", **daemon_keys),
        ingest=IngestSettings(**ingest_keys),
        logging=LoggingSettings(**(logging or {})),
        destinations=(
            Destination(
                base_url=base_url,
                credentials=credentials or _token_file(directory, TOKEN),
                limits=Limits(**limits_keys),
                delivery=DeliverySettings(**delivery_keys),
                reconcile=ReconcileSettings(**(reconcile or {})),
                audiences=tuple(audience.table() for audience in audiences),
                **destination_keys,
            ),
        ),
    )


def write_config(
    directory: Path,
    base_url: str,
    audiences: Sequence[AudienceConfig],
    *,
    api_key_set: ApiKeySet | None = None,
    token: str = TOKEN,
    **tables: Any,
) -> Path:
    """Write ``directory/config.toml`` and its secret files; the config's path.

    The credentials are the legacy ``token`` (the emulator's default), or
    ``api_key_set`` when given; ``tables`` are :func:`build_config`'s overrides.
    Writing again (a reload) keeps the state directory.
    """
    if api_key_set is None:
        credentials = _token_file(directory, token)
    else:
        credentials = CredentialRefs(
            client_id=_secret_file(directory, "client_id", api_key_set.client_id),
            client_secret=_secret_file(directory, "client_secret", api_key_set.client_secret),
        )
    config = build_config(directory, base_url, audiences, credentials=credentials, **tables)
    path = directory / "config.toml"
    path.write_text(config_toml(config))
    return path


def write_reconcile_config(
    directory: Path,
    base_url: str,
    audiences: Sequence[AudienceConfig],
    *,
    reconcile: Mapping[str, object] = FAST_RECONCILE,
    limits: Mapping[str, float] | None = None,
    **tables: Any,
) -> Path:
    """:func:`write_config` with fast read-backs and export quotas far from any limit."""
    return write_config(
        directory,
        base_url,
        audiences,
        reconcile=reconcile,
        limits={**EXPORTS_UNLIMITED, **(limits or {})},
        **tables,
    )


def database(config: Path) -> Path:
    """The SQLite file of the daemon that ``config`` configures (see :func:`write_config`)."""
    return config.parent / "state" / DATABASE_NAME


def _token_file(directory: Path, token: str) -> CredentialRefs:
    return CredentialRefs(token=_secret_file(directory, "token", token))


def _secret_file(directory: Path, key: str, secret: str) -> SecretRef:
    path = directory / ("emulator-token" if key == "token" else f"emulator-{key}")
    # Private, as the daemon requires of a secret file (dbsync.config.secrets).
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(secret + "\n")
    return SecretRef(file=path)


# --- Config -> TOML --------------------------------------------------------------------------


def config_toml(config: Config) -> str:
    """``config`` as TOML that decodes back to an equal Config.

    msgspec encodes TOML only through an optional package dbsync does not need
    otherwise; what a Config holds (tables, arrays of tables, scalars, paths) takes
    a few lines. Unset optional keys (``None``) are left out, as TOML has no null.
    """
    lines: list[str] = []
    _table(msgspec.to_builtins(config, enc_hook=str), "", lines)
    return "\n".join(lines) + "\n"


def _table(table: Mapping[str, Any], name: str, lines: list[str]) -> None:
    # Keys first, then sub-tables: a header ends the keys of the table above it.
    subtables: list[tuple[str, str, Mapping[str, Any]]] = []
    for key, value in table.items():
        full = f"{name}.{key}" if name else key
        if value is None:
            continue
        if isinstance(value, dict):
            subtables.append((f"[{full}]", full, value))
        elif isinstance(value, list | tuple) and value and all(isinstance(v, dict) for v in value):
            subtables.extend((f"[[{full}]]", full, item) for item in value)
        else:
            lines.append(f"{key} = {_value(value)}")
    for header, full, subtable in subtables:
        lines.append(f"\n{header}")
        _table(subtable, full, lines)


def _value(value: object) -> str:
    match value:
        case bool():
            return "true" if value else "false"
        case int():
            return str(value)
        case float():
            return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
        case str():
            return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's
        case list() | tuple():
            return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")

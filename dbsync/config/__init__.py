"""dbsync's configuration: one TOML file, decoded into frozen msgspec Structs.

Three modules, each of one concern, and this package re-exports what the rest of
dbsync imports, so that callers write ``from dbsync.config import Config``:

``schema``   the Structs, one per TOML table, with each key documented where it is
             declared; strict (unknown keys and out-of-range values are refused)
``load``     file to Config: UTF-8, msgspec's errors as ConfigError keyed by dotted
             path, relative paths made absolute, the checks across fields
``secrets``  reading what a SecretRef points to, into Credentials that never show
             their values; ``check_secrets`` for ``dbsync check-config``

They import msgspec and the standard library only: ``dbsync ctl`` reads the
configuration for its socket path and must start fast.
"""

from dbsync.config.load import decode_config, load_config
from dbsync.config.schema import (
    AepMapping,
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
from dbsync.config.secrets import (
    Credentials,
    check_secrets,
    load_credentials,
    load_ingest_token,
    read_secret,
)

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

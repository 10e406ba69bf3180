"""dbsync's test harness, shipped in the package as Kopf ships ``kopf.testing``.

The tests, the benchmarks and ``dbsync demo`` all run the same thing: the bundled
Demandbase emulator, a real daemon with a real SQLite store, and a CDP feeding it;
then they ask whether every Demandbase list equals its desired state. This package is
that harness, written once:

``config``    a daemon's config.toml built from the real :class:`~dbsync.config.Config`
              Structs (a mistyped key fails where it is written), with presets that
              keep every Demandbase limit out of reach
``emulator``  the emulator on loopback, a raw HTTP caller for it, fast tenants
``cdp``       NDJSON changes, AEP profile exports and snapshots; accounts that the
              tenant does not know
``engine``    a daemon run in process, the emulator + daemon + CDP bundle, the verdict
              "every list equals desired state", and waiting for a condition

It imports the daemon and the emulator: nothing in the daemon imports it. The kill -9
scenarios keep their own subprocess daemon and their own read-only SQLite oracle
(``tests/crash/harness.py``): they are independent of the code they judge on purpose.

    async with running_engine(tmp_path, [AudienceConfig("emea")]) as engine:
        accounts = await engine.tenant_accounts(10)
        await engine.cdp.changes([("emea", account, True) for account in accounts])
        await engine.wait_settled()
"""

from dbsync.testing.cdp import Cdp, aep_profile, changes_ndjson, strangers
from dbsync.testing.config import (
    DESTINATION,
    EXPORTS_UNLIMITED,
    FAST_DELIVERY,
    FAST_RECONCILE,
    HIGH,
    NO_LIMITS,
    QUIET_DAEMON,
    TOKEN,
    ApiKeySet,
    AudienceConfig,
    build_config,
    config_toml,
    database,
    write_config,
    write_reconcile_config,
)
from dbsync.testing.emulator import (
    Answer,
    EmulatorApi,
    fast_export_tenant,
    fast_tenant,
    running_emulator,
)
from dbsync.testing.engine import (
    DaemonExited,
    Engine,
    last_report,
    ledger_check,
    list_differences,
    running_daemon,
    running_engine,
    running_reconcile_engine,
    wait_until,
)

__all__ = [
    "DESTINATION",
    "EXPORTS_UNLIMITED",
    "FAST_DELIVERY",
    "FAST_RECONCILE",
    "HIGH",
    "NO_LIMITS",
    "QUIET_DAEMON",
    "TOKEN",
    "Answer",
    "ApiKeySet",
    "AudienceConfig",
    "Cdp",
    "DaemonExited",
    "EmulatorApi",
    "Engine",
    "aep_profile",
    "build_config",
    "changes_ndjson",
    "config_toml",
    "database",
    "fast_export_tenant",
    "fast_tenant",
    "last_report",
    "ledger_check",
    "list_differences",
    "running_daemon",
    "running_emulator",
    "running_engine",
    "running_reconcile_engine",
    "strangers",
    "wait_until",
    "write_config",
    "write_reconcile_config",
]

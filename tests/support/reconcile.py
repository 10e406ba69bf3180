"""The engine with read-backs on: a ``[destinations.reconcile]`` table, and what tests ask of it.

:func:`running_reconcile_engine` is :func:`~tests.support.engine.running_engine` with
the configuration's ``[destinations.reconcile]`` written from ``reconcile`` (keys named
as in config.toml) and export quotas far from any limit unless given.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from dbsync.demandbase.emulator import EmulatorSettings
from dbsync.model import LedgerCheck
from dbsync.reconcile import ReconcileReport
from tests.support.emulator import running_emulator
from tests.support.engine import (
    HIGH,
    AudienceConfig,
    Engine,
    fast_tenant,
    running_daemon,
    write_config,
)

__all__ = [
    "EXPORTS_UNLIMITED",
    "FAST_RECONCILE",
    "fast_export_tenant",
    "last_report",
    "ledger_check",
    "running_reconcile_engine",
    "write_reconcile_config",
]

# Read-backs every 0.15 s, judging what was acknowledged 0.15 s ago; polls of 50 ms.
FAST_RECONCILE: Mapping[str, object] = {
    "visibility_lag_seconds": 0.15,
    "interval_seconds": 0.15,
    "repair_limit": 3,
    "export_poll_initial_seconds": 0.05,
    "export_poll_max_seconds": 0.2,
}
EXPORTS_UNLIMITED: Mapping[str, float] = {
    "export_jobs_per_day": HIGH,
    "export_status_per_day": HIGH,
}


def _reconcile_table(keys: Mapping[str, object]) -> str:
    lines = ["[destinations.reconcile]"]
    for key, value in keys.items():
        text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def write_reconcile_config(
    directory: Path,
    base_url: str,
    audiences: Sequence[AudienceConfig],
    *,
    reconcile: Mapping[str, object] = FAST_RECONCILE,
    limits: Mapping[str, float] | None = None,
    delivery: Mapping[str, float] | None = None,
) -> Path:
    """:func:`~tests.support.engine.write_config`, plus ``[destinations.reconcile]``."""
    config = write_config(
        directory,
        base_url,
        audiences,
        limits={**EXPORTS_UNLIMITED, **(limits or {})},
        delivery=delivery,
    )
    # [destinations.reconcile] after the audiences' tables still belongs to the last
    # (here the only) destination.
    with config.open("a") as file:
        file.write("\n" + _reconcile_table(reconcile))
    return config


def fast_export_tenant(**settings: Any) -> EmulatorSettings:
    """:func:`~tests.support.engine.fast_tenant` whose export quotas no scenario reaches."""
    quotas = {"export_jobs_per_day": HIGH, "export_status_per_day": HIGH}
    return fast_tenant(**(quotas | settings))


@contextlib.asynccontextmanager
async def running_reconcile_engine(
    directory: Path,
    audiences: Sequence[AudienceConfig],
    *,
    reconcile: Mapping[str, object] = FAST_RECONCILE,
    tenant: EmulatorSettings | None = None,
    limits: Mapping[str, float] | None = None,
    delivery: Mapping[str, float] | None = None,
) -> AsyncIterator[Engine]:
    """An emulator and a daemon whose reconciler runs with ``reconcile``."""
    async with running_emulator(tenant or fast_export_tenant()) as emulator:
        config = write_reconcile_config(
            directory,
            emulator.url,
            audiences,
            reconcile=reconcile,
            limits=limits,
            delivery=delivery,
        )
        async with running_daemon(config) as running:
            yield Engine(emulator, running, audiences)


def last_report(engine: Engine, audience_id: str) -> ReconcileReport | None:
    report, _ = engine.supervisor.reconcile_state(audience_id)
    return report


async def ledger_check(engine: Engine, audience_id: str) -> LedgerCheck:
    return await engine.store.ledger_check(audience_id)

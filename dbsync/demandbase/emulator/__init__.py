"""The Demandbase emulator: the Demandbase of every test, of the demo and of the benchmarks.

It serves the documented Auth, Data Import and Data Export routes with Demandbase's
bodies, status codes and error envelopes, keeps one tenant (a generated account
database, lists, jobs, quota counters), and injects faults on demand. Faithful where
the documentation speaks, configurable where it is silent: every [ASSUMED] behaviour
sits behind one named constant or setting that cites the contract
(``demandbase-contract.md``).

    from dbsync.demandbase.emulator import Emulator, EmulatorSettings, Faults

    emulator = Emulator(EmulatorSettings(accounts=1000, job_delay_seconds=0.0))
    async with emulator.serve() as base_url:      # http://127.0.0.1:<free port>
        ...
        emulator.set_faults(Faults(drop_ratio=0.1))
        assert emulator.stats()["throttled_by_kind"]["daily"] == 0

Modules, from the bottom up: ``settings`` (what it is started with, the faults),
``accounts`` (the generated companies and matching), ``tenant`` (lists and jobs on
the clock), ``limits`` (quota windows), ``faults`` (the draws), ``auth`` (tokens),
``answers`` (error envelopes per API), ``routes`` (what Demandbase does with a
request), ``control`` (the ``/_emulator/`` routes), ``app`` (the :class:`Emulator` and
the gate every request passes), ``cli`` (``dbsync emulator``).

The names below are imported lazily: ``dbsync`` imports ``emulator.cli`` at every
start to build its argument parser, and that must not pull in aiohttp.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dbsync.demandbase.emulator.app import Emulator, Exchange
    from dbsync.demandbase.emulator.settings import (
        DIALECTS,
        EmulatorSettings,
        Faults,
        StatusStorm,
    )
    from dbsync.demandbase.emulator.tenant import AccountList, ExportJob, ImportJob, Tenant

__all__ = [
    "DIALECTS",
    "AccountList",
    "Emulator",
    "EmulatorSettings",
    "Exchange",
    "ExportJob",
    "Faults",
    "ImportJob",
    "StatusStorm",
    "Tenant",
]

_HOMES = {
    "Emulator": "app",
    "Exchange": "app",
    "DIALECTS": "settings",
    "EmulatorSettings": "settings",
    "Faults": "settings",
    "StatusStorm": "settings",
    "AccountList": "tenant",
    "ExportJob": "tenant",
    "ImportJob": "tenant",
    "Tenant": "tenant",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)

"""Several lists per export job, when a multi-list export says which list each row is on (A5).

The emulator serves the ``multi-list-column`` dialect (an ``Account List ID`` column)
and the destination says ``multi_list_exports = "yes"``: one export job reads every
audience due by the next one. Against the emulator's own reading (no such column), the
first multi-list read-back fails, and the destination falls back to one list per job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from dbsync.clock import SystemClock
from dbsync.daemon import Daemon
from dbsync.demandbase.emulator import Faults
from dbsync.store import Store
from dbsync.testing import (
    FAST_RECONCILE,
    AudienceConfig,
    Engine,
    database,
    fast_export_tenant,
    last_report,
    running_daemon,
    running_emulator,
    running_reconcile_engine,
    wait_until,
    write_reconcile_config,
)

AUDIENCES = [AudienceConfig(f"multi-{i}", max_records=100, max_age_seconds=0.05) for i in range(12)]
MEMBERS = 30
TIMEOUT = 30.0
# Read back a second after delivery, then a minute later: the first read-backs of the
# audiences, delivered together, fall due together.
MULTI = {
    **FAST_RECONCILE,
    "multi_list_exports": "yes",
    "interval_seconds": 60.0,
    "visibility_lag_seconds": 1.0,
}


async def feed(engine: Engine) -> None:
    pool = await engine.tenant_accounts(MEMBERS * len(AUDIENCES))
    await engine.cdp.changes(
        (audience.id, account, True)
        for i, audience in enumerate(AUDIENCES)
        for account in pool[i * MEMBERS : (i + 1) * MEMBERS]
    )


def destination_window(daemon: Daemon) -> int:
    """The quota window (day) the destination's budget counts in now."""
    assert daemon.supervisor is not None
    destination = daemon.supervisor.destination("emulator")
    assert destination is not None
    return destination.budget.snapshot().window


def all_verified(engine: Engine) -> bool:
    for audience in AUDIENCES:
        report = last_report(engine, audience.id)
        if report is None or report.verified != MEMBERS:
            return False
    return True


async def test_one_export_job_reads_many_lists_when_each_row_names_its_list(
    tmp_path: Path,
) -> None:
    """12 audiences of 30 members, delivered together; multi-list exports on.
    Result: every audience is verified (30 of 30), by fewer export jobs than audiences,
    at least one of them naming several lists; each list equals desired state."""
    async with running_reconcile_engine(
        tmp_path,
        AUDIENCES,
        tenant=fast_export_tenant(
            visibility_lag_seconds=0.1, faults=Faults(dialects=frozenset({"multi-list-column"}))
        ),
        reconcile=MULTI,
    ) as engine:
        await feed(engine)
        await wait_until(lambda: all_verified(engine), TIMEOUT, what="every audience verified")
        exports = engine.emulator.emulator.tenant.export_jobs
        assert len(exports) < len(AUDIENCES), [len(job.list_ids) for job in exports]
        assert max(len(job.list_ids) for job in exports) > 1
        assert await engine.lists_match_desired()
        print(f"\nexport jobs {len(exports)}, lists per job {[len(j.list_ids) for j in exports]}")
        # ctl status's next read-backs: the audiences one job read are due together and
        # predicted together, in one planned job (one list per job would space them).
        await wait_until(
            lambda: predicted_by_job(engine), TIMEOUT, what="next read-backs planned by job"
        )


def predicted_by_job(engine: Engine) -> bool:
    """Each audience's next read-back is planned no earlier than it is due, and the
    audiences whose last read-back started together are planned together."""
    planned: dict[float, set[float]] = {}
    for audience in AUDIENCES:
        report, next_at = engine.supervisor.reconcile_state(audience.id)
        if report is None or next_at is None or next_at < report.started_at + 60.0:
            return False
        planned.setdefault(report.started_at, set()).add(next_at)
    return all(len(times) == 1 for times in planned.values())


async def test_without_the_list_column_the_destination_reads_one_list_per_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same, against a tenant whose multi-list exports do not say each row's list.
    Result: ``multi_list_export_unsupported`` once; then one list per export job, and
    every audience is verified all the same."""
    async with running_reconcile_engine(
        tmp_path,
        AUDIENCES,
        tenant=fast_export_tenant(visibility_lag_seconds=0.1),
        # A failed read-back waits its interval: a short one here.
        reconcile={**MULTI, "interval_seconds": FAST_RECONCILE["interval_seconds"]},
    ) as engine:
        await feed(engine)
        await wait_until(lambda: all_verified(engine), TIMEOUT, what="every audience verified")
        exports = engine.emulator.emulator.tenant.export_jobs
        several = [job for job in exports if len(job.list_ids) > 1]
        assert len(several) == 1, [len(job.list_ids) for job in exports]
        assert len(exports[-1].list_ids) == 1
    warnings = [r for r in caplog.records if r.getMessage() == "multi_list_export_unsupported"]
    assert len(warnings) == 1
    assert all(r.levelno == logging.WARNING for r in warnings)


async def test_the_export_volume_spent_today_is_remembered_across_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. 12 audiences of 30 members, multi-list exports: the first round of read-backs
    is judged, then the daemon stops.
    2. The store holds the day's export volume (at least the bytes of the results files
    the emulator wrote). The daemon starts again with a daily volume of those bytes and
    10 more: less than one list; the audiences are due again 2 s after their last read-back.
    Result: once the audiences are due again, no export job is created (one would be by
    a reconciler that forgot): ``export_volume_spent`` says the day's volume is spent."""
    caplog.set_level(logging.INFO, logger="dbsync")
    tenant_settings = fast_export_tenant(
        visibility_lag_seconds=0.1, faults=Faults(dialects=frozenset({"multi-list-column"}))
    )
    again = {**MULTI, "interval_seconds": 2.0, "visibility_lag_seconds": 0.5}
    async with running_emulator(tenant_settings) as emulator:
        tenant = emulator.emulator.tenant
        config = write_reconcile_config(tmp_path, emulator.url, AUDIENCES, reconcile=MULTI)
        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, AUDIENCES)
            await feed(engine)
            await wait_until(lambda: all_verified(engine), TIMEOUT, what="every audience verified")
            window = destination_window(daemon)
        jobs = len(tenant.export_jobs)
        written = sum(len(job.result) for job in tenant.export_jobs)
        async with Store.open(database(config), clock=SystemClock()) as store:
            kept = await store.export_volume("emulator", window)
        # A multi-list job is charged its file's size; a job of one list (a client reads
        # it without its size) its rows at the bytes per row learned so far.
        assert kept >= written > 0

        config = write_reconcile_config(
            tmp_path,
            emulator.url,
            AUDIENCES,
            reconcile=again,
            limits={"export_bytes_per_day": kept + 10, "quota_safety_margin": 0.0},
        )
        caplog.clear()
        async with running_daemon(config) as daemon:
            assert destination_window(daemon) == window
            await wait_until(
                lambda: "export_volume_spent" in caplog.messages, TIMEOUT, what="volume spent"
            )
        assert len(tenant.export_jobs) == jobs
        [spent] = [r for r in caplog.records if r.getMessage() == "export_volume_spent"]
        assert spent.used_bytes == kept  # type: ignore[attr-defined]

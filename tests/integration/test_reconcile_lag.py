"""Read-back judges nothing younger than the visibility lag: recent changes are never lost.

Demandbase applies loaded data late, so an export shows a list as it was a while ago.
Here the emulator shows lists as they were 3 s before, and the daemon's
``visibility_lag_seconds`` says the same. A read-back right after delivery sees an
empty list and must report no loss; one after the lag verifies every account.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from dbsync.testing import (
    FAST_RECONCILE,
    HIGH,
    AudienceConfig,
    fast_tenant,
    ledger_check,
    running_reconcile_engine,
    wait_until,
)

LAG_SECONDS = 3.0
AUDIENCE = AudienceConfig("lag", max_records=100, max_age_seconds=0.05)


async def test_no_loss_is_reported_for_changes_younger_than_the_visibility_lag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The emulator's exports lag 3 s; the daemon judges only changes older than
    3 s and reads back only when asked (``scheduled = false``).
    2. 40 accounts are delivered; a read-back is asked for at once.
    3. 10 more are delivered 1.5 s later; once the first 40 are 3 s old, another
    read-back.
    Result: the first export lists none of the 40 (judging them would call them all
    lost) and the report says 40 too young, 0 lost, nothing re-sent; the second verifies
    the 40, calls the 10 newer ones too young, and still nothing is lost. No
    ``loss_detected`` event, and the ledger balances."""
    caplog.set_level(logging.INFO, logger="dbsync")
    async with running_reconcile_engine(
        tmp_path,
        [AUDIENCE],
        tenant=fast_tenant(
            visibility_lag_seconds=LAG_SECONDS, export_jobs_per_day=HIGH, export_status_per_day=HIGH
        ),
        reconcile={
            **FAST_RECONCILE,
            "scheduled": False,
            "visibility_lag_seconds": LAG_SECONDS,
            "repair_limit": 0,  # a single loss would set the account aside at once
        },
    ) as engine:
        accounts = await engine.tenant_accounts(50)
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts[:40]])
        await engine.wait_settled()
        first_acked = time.time()

        early = await engine.supervisor.reconcile_now(AUDIENCE.id)
        assert early.listed == 0, "the export does not show the new members yet"
        assert (early.too_young, early.expected, early.lost_total) == (40, 0, 0), early
        assert (early.repaired, early.extra_removed, early.unmatched) == (0, 0, ())
        assert (await engine.store.backlog(AUDIENCE.id)).pending == 0, "nothing re-sent"

        # Half a lag later, so that at the next read-back they are clearly younger than it.
        await wait_until(
            lambda: time.time() > first_acked + LAG_SECONDS / 2, LAG_SECONDS + 5, what="a while"
        )
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts[40:]])
        await engine.wait_settled()
        await wait_until(
            lambda: time.time() > first_acked + LAG_SECONDS, LAG_SECONDS + 5, what="the lag"
        )
        later = await engine.supervisor.reconcile_now(AUDIENCE.id)
        assert later.listed >= 40
        assert (later.expected, later.verified, later.too_young) == (40, 40, 10), later
        assert (later.lost_total, later.repaired) == (0, 0), later

        check = await ledger_check(engine, AUDIENCE.id)
        assert check.balanced, check
        assert (check.counts.lost, check.counts.verified, check.awaiting) == (0, 40, 10)
        assert await engine.store.rejected(AUDIENCE.id) == []
        assert await engine.settled()
    events = [r.getMessage() for r in caplog.records]
    assert events.count("reconcile_completed") == 2
    assert "loss_detected" not in events
    assert "ledger_imbalance" not in events

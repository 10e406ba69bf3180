"""The ledger is checked after every reconciliation; an imbalance is an error event, never silence.

The ledger's sums (:class:`~dbsync.model.LedgerCheck`) hold by construction while
the store alone moves the counters. Here one counter is corrupted behind the daemon's
back, through a second SQLite connection, as a bug or a hand edit would: the next
reconciliation must report it with the numbers, and so must the periodic summary
for the sums it checks (those of counters alone: a summary does not count rows).
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from dbsync.testing import (
    FAST_RECONCILE,
    AudienceConfig,
    database,
    ledger_check,
    running_reconcile_engine,
)

AUDIENCE = AudienceConfig("ledger", max_records=100, max_age_seconds=0.05)


def imbalance_events(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "ledger_imbalance"]


async def test_a_corrupted_count_produces_the_ledger_imbalance_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. 20 accounts delivered, the emulator without lag; read-backs only when asked.
    2. A read-back: every sum balances, no ``ledger_imbalance``.
    3. ``verified`` is raised by one in the SQLite file, by another connection.
    4. Another read-back, then a summary.
    5. ``exported`` is raised by one too; a summary.
    Result: the second report says unbalanced (``verdicts`` off by 1); an error-level
    ``ledger_imbalance`` event names the sum and carries the ledger's numbers. The
    summary after it says nothing: ``verdicts`` needs the awaiting rows counted, which
    only a read-back does. The summary after 5 names ``delivery``, a sum of counters."""
    async with running_reconcile_engine(
        tmp_path,
        [AUDIENCE],
        reconcile={**FAST_RECONCILE, "scheduled": False, "visibility_lag_seconds": 0},
    ) as engine:
        accounts = await engine.tenant_accounts(20)
        await engine.cdp.changes([(AUDIENCE.id, a, True) for a in accounts])
        await engine.wait_settled()

        report = await engine.supervisor.reconcile_now(AUDIENCE.id)
        assert (report.expected, report.verified, report.lost_total) == (20, 20, 0), report
        assert report.ledger_balanced
        assert report.imbalances == {}
        assert imbalance_events(caplog) == []

        with sqlite3.connect(database(tmp_path / "config.toml"), timeout=30) as db:
            db.execute(
                "UPDATE ledger SET value = value + 1 WHERE audience_id = ? AND counter = ?",
                (AUDIENCE.id, "verified"),
            )
        db.close()

        report = await engine.supervisor.reconcile_now(AUDIENCE.id)
        assert not report.ledger_balanced
        assert report.imbalances == {"verdicts": -1}, report.imbalances
        [event] = imbalance_events(caplog)
        assert event.levelno == logging.ERROR
        fields = event.__dict__
        assert fields["audience"] == AUDIENCE.id
        assert fields["checked_by"] == "reconcile"
        assert fields["imbalances"] == {"verdicts": -1}
        assert fields["ledger"]["verified"] == 21
        assert fields["ledger"]["acknowledged"] == 20
        assert fields["awaiting"] == 0

        await engine.supervisor.log_summaries()
        assert len(imbalance_events(caplog)) == 1

        with sqlite3.connect(database(tmp_path / "config.toml"), timeout=30) as db:
            db.execute(
                "UPDATE ledger SET value = value + 1 WHERE audience_id = ? AND counter = ?",
                (AUDIENCE.id, "exported"),
            )
        db.close()
        await engine.supervisor.log_summaries()
        summary = imbalance_events(caplog)[-1].__dict__
        assert summary["checked_by"] == "summary"
        assert summary["imbalances"] == {"delivery": 1}
        assert (await ledger_check(engine, AUDIENCE.id)).imbalances == {
            "delivery": 1,
            "verdicts": -1,
        }

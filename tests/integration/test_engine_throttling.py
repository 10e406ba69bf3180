"""Throttled and failing Demandbase: slow down, retry, lose nothing (invariant 5).

A 429 is a signal to slow down, counted, never an error that drops data: the
destination's pace halves, then each quiet ``pace_recovery_seconds`` gives back a
tenth of the configured rate. A 5xx is retried with backoff.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dbsync.demandbase.emulator import Faults, StatusStorm
from dbsync.testing import DESTINATION, AudienceConfig, running_engine, wait_until

AUDIENCES = [AudienceConfig(f"storm-{i}", max_records=10, max_age_seconds=0.05) for i in range(3)]
PACE_PER_MINUTE = 6_000
THROTTLES = 30
SERVER_ERRORS = 20
TIMEOUT = 20.0


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # The actor's retry backoff starts at 1 s and doubles (full jitter), which is right
    # against Demandbase and would make 50 refused requests take minutes here. Only the
    # scale changes; the policy under test (retry, never drop) stays.
    monkeypatch.setattr("dbsync.retry.BACKOFF_BASE_SECONDS", 0.02)


async def test_a_429_storm_then_a_5xx_burst_slow_the_pace_and_lose_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """0. Each audience delivers 20 accounts, which confirms its list.
    1. The next 30 Demandbase requests answer 429; three audiences get 30 accounts each.
    2. The destination's pace drops below the configured 6,000 a minute; the lists
    end equal to their desired state all the same.
    3. The next 20 requests answer 503; 30 more accounts each.
    Result: every list equals its desired state; the budget and the ledgers counted
    the 30 429s exactly; the burst halved the pace once (not once per request that
    met it), and the pace came back to the configured rate by itself."""
    async with running_engine(
        tmp_path,
        AUDIENCES,
        limits={"requests_per_minute": PACE_PER_MINUTE},
        delivery={"pace_recovery_seconds": 0.25},
    ) as engine:
        emulator = engine.emulator.emulator
        destination = engine.supervisor.destination(DESTINATION)
        assert destination is not None

        def pace() -> float:
            return destination.budget.snapshot().pace_per_minute

        assert pace() == PACE_PER_MINUTE
        accounts = await engine.tenant_accounts(240)
        # Each audience's list is confirmed first (two jobs naming it): until then an
        # audience sends one job at a time, and the storm would meet fewer requests at
        # once, spread over more than the one second in which a burst halves the pace once.
        await engine.cdp.changes(
            (a.id, account, True)
            for i, a in enumerate(AUDIENCES)
            for account in accounts[180 + i * 20 : 180 + (i + 1) * 20]
        )
        await engine.wait_settled(timeout=TIMEOUT)

        emulator.set_faults(Faults(status_storm=StatusStorm(status=429, count=THROTTLES)))
        await engine.cdp.changes(
            (a.id, account, True)
            for i, a in enumerate(AUDIENCES)
            for account in accounts[i * 30 : (i + 1) * 30]
        )
        await wait_until(lambda: pace() < PACE_PER_MINUTE, TIMEOUT, what="the pace to drop")
        await engine.wait_settled(timeout=TIMEOUT)
        assert emulator.faults.status_storm is None, "the storm met every request it could"

        emulator.set_faults(Faults(status_storm=StatusStorm(status=503, count=SERVER_ERRORS)))
        await engine.cdp.changes(
            (a.id, account, True)
            for i, a in enumerate(AUDIENCES)
            for account in accounts[90 + i * 30 : 90 + (i + 1) * 30]
        )
        await engine.wait_settled(timeout=TIMEOUT)

        stats = emulator.stats()
        assert stats["throttled_by_kind"]["injected"] == THROTTLES
        assert stats["server_errors_injected"] == SERVER_ERRORS
        assert destination.budget.snapshot().throttled == THROTTLES
        ledgers = [await engine.store.ledger(a.id) for a in AUDIENCES]
        assert sum(ledger.throttled for ledger in ledgers) == THROTTLES
        assert all(ledger.acknowledged == 80 for ledger in ledgers), ledgers

        decreases = [r for r in caplog.records if r.getMessage() == "pace_decreased"]
        assert [r.__dict__["requests_per_minute"] for r in decreases] == [PACE_PER_MINUTE / 2]
        await wait_until(
            lambda: pace() == PACE_PER_MINUTE, TIMEOUT, what=lambda: f"pace back: {pace()}"
        )

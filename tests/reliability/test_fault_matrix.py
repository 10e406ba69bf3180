"""The fault matrix: six ways Demandbase misbehaves mid-run, and each loses nothing.

One scenario, parametrized over the faults of issue 6: a 429 storm, a burst of 5xx,
answers slower than the destination's request timeout, connections reset after the
request took effect, the API Key Set's token expiring, and a 403. Each runs the in-process
engine (emulator, daemon, CDP): the lists are settled first, then the fault is set, more
changes (joins and leaves) arrive, and the fault clears by itself (a storm's count) or
once the daemon has met it (the test lifts it). Each ends with every list equal to its
desired state and the ledgers balanced; the 403 instead stops the destination with the
whole backlog kept. And each logged the event an operator would alert on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dbsync.demandbase.emulator import EmulatorSettings, Faults, StatusStorm
from dbsync.model import AudienceState
from dbsync.testing import (
    DESTINATION,
    ApiKeySet,
    AudienceConfig,
    Engine,
    fast_tenant,
    running_daemon,
    running_emulator,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.reliability

AUDIENCES = [AudienceConfig(f"matrix-{i}", max_records=10, max_age_seconds=0.05) for i in range(2)]
TIMEOUT = 20.0
# Below the emulator's slow answers: each one times out at the client.
REQUEST_TIMEOUT_SECONDS = 0.3
SLOW_ANSWER_MS = 600.0


@dataclass(frozen=True)
class Fault:
    """A fault set mid-run; ``lifted`` ones are cleared once ``event`` was logged."""

    faults: Faults
    event: str
    lifted: bool = False
    tenant: dict[str, object] = field(default_factory=dict)
    api_key_set: bool = False
    request_timeout_seconds: float = 10.0
    stops: bool = False


MATRIX = {
    "429-storm": Fault(Faults(status_storm=StatusStorm(status=429, count=20)), "pace_decreased"),
    "5xx-burst": Fault(Faults(status_storm=StatusStorm(status=503, count=10)), "api_retry"),
    "slow-past-timeout": Fault(
        Faults(latency_ms=SLOW_ANSWER_MS),
        "api_retry",
        lifted=True,
        request_timeout_seconds=REQUEST_TIMEOUT_SECONDS,
    ),
    "connection-resets": Fault(Faults(reset_ratio=0.5, latency_ms=5.0), "api_retry", lifted=True),
    "token-expiry": Fault(
        Faults(expire_tokens=True), "demandbase_token_rejected", api_key_set=True
    ),
    "403": Fault(
        Faults(), "destination_stopped", tenant={"permissions": frozenset({"export"})}, stops=True
    ),
}


@pytest.fixture(autouse=True)
def _short_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in test_engine_throttling.py: only the backoff's scale changes, not the policy.
    monkeypatch.setattr("dbsync.retry.BACKOFF_BASE_SECONDS", 0.02)


@asynccontextmanager
async def engine_with(
    tmp_path: Path, fault: Fault, tenant: EmulatorSettings
) -> AsyncIterator[Engine]:
    """running_engine, with the destination's request timeout the fault asks for."""
    async with running_emulator(tenant) as emulator:
        config = write_config(
            tmp_path,
            emulator.url,
            AUDIENCES,
            api_key_set=ApiKeySet() if fault.api_key_set else None,
            destination={"request_timeout_seconds": fault.request_timeout_seconds},
        )
        async with running_daemon(config) as daemon:
            yield Engine(emulator, daemon, AUDIENCES)


def logged(caplog: pytest.LogCaptureFixture, event: str) -> int:
    return sum(1 for r in caplog.records if r.getMessage() == event)


@pytest.mark.parametrize("name", list(MATRIX))
async def test_a_fault_mid_run_loses_nothing_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """1. Two audiences get 20 tenant accounts each; wait until the lists equal their
       desired state (not for the 403: that tenant refuses every import).
    2. Set the fault; send 20 more joins each and (but for the 403) leaves of 5 of the
       first accounts.
    3. Once the fault's event is logged, lift it (slow answers, resets); a storm ends
       after its count, an expired token is replaced by a new one.
    Result: the event was logged (pace_decreased, api_retry, demandbase_token_rejected,
    destination_stopped); every list equals its desired state, nothing is pending or in
    flight, and each ledger balances. For the 403: the destination stopped as
    ``permission_denied``, both audiences' actors are stopped, and all 80 accounts are
    still pending or in flight: none delivered, none rejected, the lists untouched.
    """
    fault = MATRIX[name]
    tenant = fast_tenant(**fault.tenant)
    async with engine_with(tmp_path, fault, tenant) as engine:
        emulator = engine.emulator.emulator
        accounts = await engine.tenant_accounts(80)
        first = {a.id: accounts[i * 40 : i * 40 + 20] for i, a in enumerate(AUDIENCES)}
        then = {a.id: accounts[i * 40 + 20 : i * 40 + 40] for i, a in enumerate(AUDIENCES)}
        await engine.cdp.changes(
            (a, account, True) for a, chunk in first.items() for account in chunk
        )
        if not fault.stops:
            await engine.wait_settled(timeout=TIMEOUT)
            assert logged(caplog, fault.event) == 0, "the event before the fault"

        emulator.set_faults(fault.faults)
        # Leaves of accounts never delivered (the 403) would settle them or not, by
        # whether their batch was planned yet: that scenario sends joins only.
        leaves = [] if fault.stops else [(a, x, False) for a, c in first.items() for x in c[:5]]
        await engine.cdp.changes(
            [(a, account, True) for a, chunk in then.items() for account in chunk] + leaves
        )
        await wait_until(lambda: logged(caplog, fault.event) > 0, TIMEOUT, what=fault.event)
        if fault.lifted:
            emulator.set_faults(Faults())

        if fault.stops:
            await assert_stopped_with_the_backlog_kept(engine)
            return
        await engine.wait_settled(timeout=TIMEOUT)
        for audience in AUDIENCES:
            assert len(await engine.store.desired_members(audience.id)) == 35
            check = await engine.store.ledger_check(audience.id)
            assert check.balanced, (audience.id, check)
        destination = engine.supervisor.destination(DESTINATION)
        assert destination is not None
        assert destination.is_running
        assert logged(caplog, "destination_stopped") == 0


async def assert_stopped_with_the_backlog_kept(engine: Engine) -> None:
    destination = engine.supervisor.destination(DESTINATION)
    assert destination is not None

    def stopped() -> bool:
        states = {s.audience_id: s.state for s in engine.supervisor.statuses()}
        return not destination.is_running and all(
            states[a.id] is AudienceState.STOPPED for a in AUDIENCES
        )

    await wait_until(stopped, TIMEOUT, what=lambda: f"stopped: {engine.supervisor.statuses()}")
    assert destination.stopped_reason == "permission_denied"
    await engine.wait_folded(timeout=TIMEOUT)
    for audience in AUDIENCES:
        backlog = await engine.store.backlog(audience.id)
        assert backlog.pending + backlog.in_flight == 40, (audience.id, backlog)
        assert backlog.rejected == 0
        ledger = await engine.store.ledger(audience.id)
        assert (ledger.exported, ledger.acknowledged, ledger.rejected) == (0, 0, 0)
    assert await engine.lists() == {}

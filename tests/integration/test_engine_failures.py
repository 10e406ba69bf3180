"""Demandbase refuses: a bad row, a revoked token, bad credentials, a missing permission.

The contract: a 400 on an upload splits the batch until the row Demandbase refuses
stands alone, and that row alone goes to the rejected table with its reason; a 401
under an API Key Set re-mints the token once and goes on; a 401 that no new token can
cure (a legacy token) stops the destination as ``auth_failed``, a 403 stops it naming
the missing permission. A stopped destination holds its backlog (nothing is dropped
or marked delivered), says so in an error event, and ingest goes on accepting.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from dbsync.demandbase.emulator import Faults
from dbsync.model import AudienceState
from dbsync.testing import (
    DESTINATION,
    ApiKeySet,
    AudienceConfig,
    Engine,
    database,
    fast_tenant,
    running_engine,
    wait_until,
)

AUDIENCE = AudienceConfig("failures", max_records=100, max_age_seconds=0.05)
TIMEOUT = 10.0


def delivered_rows(engine: Engine, tmp_path: Path) -> int:
    """Accounts the SQLite file marks delivered, read apart from the daemon's connections."""
    path = database(tmp_path / "config.toml")
    assert path == engine.store.path
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM membership WHERE delivered = 1").fetchone()
    return int(count)


def stopped_events(caplog: pytest.LogCaptureFixture) -> list[pytest.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == "destination_stopped"]


def assert_stopped_without_waiting_for_the_destination(caplog: pytest.LogCaptureFixture) -> None:
    """The daemon stopped gracefully (running_engine checked exit 0) without waiting out
    its drain: nothing runs at Demandbase while the destination is stopped, so a planned
    batch stays open for the next start instead of holding the stop."""
    assert "drain_deadline_exceeded" not in [r.getMessage() for r in caplog.records]


async def wait_stopped(engine: Engine) -> None:
    """Until the destination is stopped and the audience's actor says so."""
    destination = engine.supervisor.destination(DESTINATION)
    assert destination is not None

    def stopped() -> bool:
        states = {s.audience_id: s.state for s in engine.supervisor.statuses()}
        return not destination.is_running and states[AUDIENCE.id] is AudienceState.STOPPED

    await wait_until(stopped, TIMEOUT, what=lambda: f"stopped: {engine.supervisor.statuses()}")


async def test_a_400_on_an_upload_rejects_the_one_bad_row_and_delivers_the_rest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Uploads holding one of 20 tenant accounts answer 400 naming its row.
    2. The 20 accounts are sent to one audience, in one batch.
    Result: the batch is split down to that account, which alone is rejected: the list
    holds the 19 others (desired minus the rejected one), the backlog is empty but for
    ``rejected == 1``, the rejected table names the account with Demandbase's reason, and
    the ledger counts 1 rejected and 19 exported and acknowledged."""
    async with running_engine(tmp_path, [AUDIENCE]) as engine:
        accounts = await engine.tenant_accounts(20)
        bad = accounts[13]
        engine.emulator.emulator.set_faults(
            Faults(reject_external_ids=frozenset({bad.external_id}))
        )
        await engine.cdp.changes([(AUDIENCE.id, account, True) for account in accounts])

        async def delivered_but_one() -> bool:
            backlog = await engine.store.backlog(AUDIENCE.id)
            return await engine.idle() and backlog.rejected == 1

        async def state() -> str:
            return f"{await engine.store.backlog(AUDIENCE.id)} {await engine.differences()}"

        await wait_until(delivered_but_one, TIMEOUT, what=state)

        want = {a.external_id for a in accounts} - {bad.external_id}
        assert await engine.expected_members(AUDIENCE.id) == want | {bad.external_id}
        assert (await engine.lists())[AUDIENCE.list] == want
        backlog = await engine.store.backlog(AUDIENCE.id)
        assert (backlog.pending, backlog.in_flight, backlog.rejected) == (0, 0, 1)
        [rejected] = await engine.store.rejected()
        assert (rejected.audience_id, rejected.account, rejected.member) == (AUDIENCE.id, bad, True)
        assert bad.external_id in rejected.reason
        assert "cannot be imported" in rejected.reason
        ledger = await engine.store.ledger(AUDIENCE.id)
        assert (ledger.rejected, ledger.exported, ledger.acknowledged) == (1, 19, 19)
        events = [r for r in caplog.records if r.getMessage() == "account_rejected"]
        assert [r.__dict__["external_id"] for r in events] == [bad.external_id]
        assert not stopped_events(caplog)


async def test_an_api_key_set_token_revoked_mid_run_is_minted_again_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The daemon authenticates with an API Key Set; three audiences get 20 accounts
    each; wait until the lists equal their desired state (one token minted).
    2. The emulator revokes every token it minted; 20 more accounts each, sent at once
    so that the three audiences meet the revoked token together.
    Result: the revoked token was refused (401s) and the client minted exactly one new
    token (two in all); the destination never stopped; every list equals its desired
    state."""
    audiences = [AudienceConfig(f"key-set-{i}", max_age_seconds=0.05) for i in range(3)]
    async with running_engine(tmp_path, audiences, api_key_set=ApiKeySet()) as engine:
        emulator = engine.emulator.emulator
        accounts = await engine.tenant_accounts(120)
        await engine.cdp.changes(
            (a.id, account, True) for i, a in enumerate(audiences) for account in accounts[i::6]
        )
        await engine.wait_settled(timeout=TIMEOUT)
        assert emulator.stats()["tokens_minted"] == 1
        assert "401" not in emulator.stats()["answers_by_status"]

        emulator.set_faults(Faults(expire_tokens=True))
        await engine.cdp.changes(
            (a.id, account, True)
            for i, a in enumerate(audiences)
            for account in accounts[i + 3 :: 6]
        )
        await engine.wait_settled(timeout=TIMEOUT)

        stats = emulator.stats()
        assert stats["answers_by_status"]["401"] >= 1, "the revoked token was never met"
        assert stats["tokens_minted"] == 2
        for audience in audiences:
            assert len(await engine.store.desired_members(audience.id)) == 40
        destination = engine.supervisor.destination(DESTINATION)
        assert destination is not None
        assert destination.is_running
        assert not stopped_events(caplog)


async def test_a_refused_legacy_token_stops_the_destination_and_keeps_the_backlog(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The emulator accepts another legacy token than the one the daemon sends.
    2. 20 accounts are sent to one audience.
    3. Once the destination stops, 10 more accounts are sent.
    Result: the destination stops as ``auth_failed`` and a ``destination_stopped`` error
    event says so; the actor is ``stopped``; nothing reached the list, nothing is marked
    delivered or exported, and all 30 accounts are still pending or in flight; ingest
    still answers 202 (and health 200): the daemon runs on."""
    tenant = fast_tenant(token="a-token-the-daemon-does-not-have")
    async with running_engine(tmp_path, [AUDIENCE], tenant=tenant) as engine:
        accounts = await engine.tenant_accounts(30)
        await engine.cdp.changes([(AUDIENCE.id, account, True) for account in accounts[:20]])
        await wait_stopped(engine)

        destination = engine.supervisor.destination(DESTINATION)
        assert destination is not None
        assert destination.stopped_reason == "auth_failed"
        [event] = stopped_events(caplog)
        assert event.levelname == "ERROR"
        assert (event.__dict__["destination"], event.__dict__["reason"]) == (
            DESTINATION,
            "auth_failed",
        )
        assert "missing_permission" not in event.__dict__

        answer = await engine.cdp.changes(
            [(AUDIENCE.id, account, True) for account in accounts[20:]]
        )
        assert answer["accepted"] == 10, answer
        assert await engine.cdp.health() == 200
        await engine.wait_folded(timeout=TIMEOUT)

        backlog = await engine.store.backlog(AUDIENCE.id)
        assert backlog.pending + backlog.in_flight == 30, backlog
        assert backlog.rejected == 0
        assert delivered_rows(engine, tmp_path) == 0
        ledger = await engine.store.ledger(AUDIENCE.id)
        assert (ledger.exported, ledger.acknowledged, ledger.rejected) == (0, 0, 0)
        assert await engine.lists() == {}
        assert engine.emulator.emulator.stats()["answers_by_status"].keys() == {"401"}
        assert len(stopped_events(caplog)) == 1
    assert_stopped_without_waiting_for_the_destination(caplog)


async def test_a_403_stops_the_destination_naming_the_missing_permission(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The tenant's user may export but lacks the "Import Data" permission.
    2. 20 accounts are sent to one audience.
    Result: the destination stops as ``permission_denied``; its ``destination_stopped``
    event carries ``missing_permission = "Import Data"``; the 20 accounts are still
    pending or in flight, none delivered, none rejected."""
    tenant = fast_tenant(permissions=frozenset({"export"}))
    async with running_engine(tmp_path, [AUDIENCE], tenant=tenant) as engine:
        accounts = await engine.tenant_accounts(20)
        await engine.cdp.changes([(AUDIENCE.id, account, True) for account in accounts])
        await wait_stopped(engine)

        destination = engine.supervisor.destination(DESTINATION)
        assert destination is not None
        assert destination.stopped_reason == "permission_denied"
        [event] = stopped_events(caplog)
        assert event.levelname == "ERROR"
        assert event.__dict__["reason"] == "permission_denied"
        assert event.__dict__["missing_permission"] == "Import Data"

        backlog = await engine.store.backlog(AUDIENCE.id)
        assert backlog.pending + backlog.in_flight == 20, backlog
        assert backlog.rejected == 0
        assert await engine.store.rejected() == []
        assert delivered_rows(engine, tmp_path) == 0
        ledger = await engine.store.ledger(AUDIENCE.id)
        assert (ledger.exported, ledger.acknowledged, ledger.rejected) == (0, 0, 0)
        assert await engine.lists() == {}
        assert engine.emulator.emulator.stats()["answers_by_status"].keys() == {"403"}
    assert_stopped_without_waiting_for_the_destination(caplog)

"""A crash of one actor or one reconciler is contained: logged, restarted, the rest goes on.

The crash is injected by making the first call of one of their methods raise, as a
bug would; everything else is real (emulator, SQLite, the daemon in process).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dbsync.actor
import dbsync.reconcile
from dbsync.model import AudienceState
from tests.support.engine import AudienceConfig, running_engine, wait_until
from tests.support.reconcile import running_reconcile_engine

A = AudienceConfig("restart-a", max_records=10, max_age_seconds=0.05)
B = AudienceConfig("restart-b", max_records=10, max_age_seconds=0.05)
TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _short_restart_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dbsync.supervisor._RESTART_BACKOFF_SECONDS", (0.05,))


def crash_once(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, when: Callable[[Any], bool]
) -> list[Any]:
    """``owner.name`` raises once, for the first instance ``when`` picks; the crashed list."""
    original = getattr(owner, name)
    crashed: list[Any] = []

    async def patched(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not crashed and when(self):
            crashed.append(self)
            raise RuntimeError("injected bug")
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, patched)
    return crashed


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[Any]:
    return [r for r in caplog.records if r.getMessage() == name]


async def test_a_crashed_actor_is_restarted_while_the_others_deliver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """1. A's actor raises an unexpected error when it first reads its backlog.
    2. A and B get 20 accounts each.
    Result: one ``actor_crashed`` error for A, which names the error; A is restarted
    (active again) and both lists end equal to their desired state."""
    crashed = crash_once(
        monkeypatch,
        dbsync.actor.AudienceActor,
        "_due_in",
        lambda actor: actor.settings.audience_id == A.id,
    )
    async with running_engine(tmp_path, [A, B]) as engine:
        accounts = await engine.tenant_accounts(40)
        await engine.cdp.changes(
            [(A.id, a, True) for a in accounts[:20]] + [(B.id, a, True) for a in accounts[20:]]
        )
        await engine.wait_settled()
        assert crashed
        [event] = events(caplog, "actor_crashed")
        assert event.__dict__["audience"] == A.id
        assert "RuntimeError('injected bug')" in event.__dict__["error"]
        await wait_until(
            lambda: (
                engine.supervisor.actor(A.id) is not None
                and engine.supervisor.actor(A.id).state is AudienceState.ACTIVE
            ),  # type: ignore[union-attr]
            TIMEOUT,
            what="A active again",
        )


async def test_a_crashed_reconciler_is_restarted_and_delivery_never_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The destination's reconciler raises when it first runs.
    2. A gets 20 accounts.
    Result: one ``reconciler_crashed`` error; A's list fills all the same, and the
    restarted reconciler reads it back (a report with 20 verified)."""
    crashed = crash_once(monkeypatch, dbsync.reconcile.Reconciler, "run", lambda _: True)
    async with running_reconcile_engine(tmp_path, [A]) as engine:
        accounts = await engine.tenant_accounts(20)
        await engine.cdp.changes([(A.id, a, True) for a in accounts])
        await engine.wait_settled()
        assert crashed
        assert len(events(caplog, "reconciler_crashed")) == 1

        def verified() -> bool:
            report, _ = engine.supervisor.reconcile_state(A.id)
            return report is not None and report.verified == 20

        await wait_until(verified, TIMEOUT, what="a read-back by the restarted reconciler")

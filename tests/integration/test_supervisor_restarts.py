"""A crash of one actor or one reconciler is contained: logged, restarted, the rest goes on.

The crash is injected by making the first call of one of their methods raise, as a
bug would; everything else is real (emulator, SQLite, the daemon in process). The
restart backoff comes from ``[daemon]`` (tests/support/engine.py makes it short).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import dbsync.actor
import dbsync.reconcile
from dbsync.admin.client import exchange
from dbsync.admin.ctl import render
from dbsync.admin.protocol import Resume, ResumeReply, Status, StatusReply
from dbsync.model import AudienceState
from dbsync.testing import AudienceConfig, running_engine, running_reconcile_engine, wait_until

A = AudienceConfig("restart-a", max_records=10, max_age_seconds=0.05)
B = AudienceConfig("restart-b", max_records=10, max_age_seconds=0.05)
TIMEOUT = 10.0


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
        assert event.__dict__["error"] == "RuntimeError: injected bug"
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


async def test_an_actor_crashing_past_its_budget_fails_until_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """1. A's actor raises every time it reads its backlog; the budget is 3 crashes.
    2. A and B get 10 accounts each.
    Result: three ``actor_crashed`` and one ``actor_failed`` for A, which stays
    ``failed`` (``ctl status`` says why, on one line) while B's list fills. Once the bug
    is gone, ``ctl resume A`` starts a new actor and A's list fills too."""
    broken = {A.id}
    original = dbsync.actor.AudienceActor._due_in

    async def due_in(self: dbsync.actor.AudienceActor) -> float:
        if self.settings.audience_id in broken:
            raise RuntimeError("injected bug\n\x1b[31m")
        return await original(self)

    monkeypatch.setattr(dbsync.actor.AudienceActor, "_due_in", due_in)
    sock_dir = Path(tempfile.mkdtemp(prefix="dbr", dir="/tmp"))
    sock = sock_dir / "admin.sock"
    daemon = {"restart_max_crashes": 3, "admin_socket": str(sock)}
    try:
        async with running_engine(tmp_path, [A, B], daemon=daemon) as engine:
            accounts = await engine.tenant_accounts(20)
            await engine.cdp.changes(
                [(A.id, a, True) for a in accounts[:10]] + [(B.id, a, True) for a in accounts[10:]]
            )
            await wait_until(lambda: events(caplog, "actor_failed"), TIMEOUT, what="A gave up")
            assert len(events(caplog, "actor_crashed")) == 3
            [failed] = events(caplog, "actor_failed")
            assert failed.__dict__["audience"] == A.id

            reply = await asyncio.to_thread(exchange, sock, Status(audience=A.id))
            assert isinstance(reply, StatusReply)
            [view] = reply.audiences
            assert view.state == AudienceState.FAILED
            assert "crashed 3 times" in view.reason
            assert "RuntimeError: injected bug" in view.reason
            [line] = [line for line in render(reply).splitlines() if line.startswith(f"{A.id}:")]
            assert "\x1b" not in line
            assert "restarts given up" in line

            async def b_delivered() -> bool:
                return B.id not in await engine.differences()

            await wait_until(b_delivered, TIMEOUT, what="B's list full")

            broken.clear()
            resumed = await asyncio.to_thread(exchange, sock, Resume(audience=A.id))
            assert isinstance(resumed, ResumeReply)
            assert resumed.state == AudienceState.ACTIVE
            await engine.wait_settled()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)

"""Configuration reloads against the running engine, and one actor failing among others.

What the operator changes in ``config.toml`` takes effect without a restart: a SIGHUP
(or ``Daemon.reload``, what the handler runs) activates new audiences, deactivates
removed ones without ever deleting their Demandbase list, keeps a renamed audience on
the list it was first activated with and says so, and rejects a bad file while the
running configuration goes on. An actor whose destination cannot be reached backs off
and reports ``failed`` while the other destination's audiences deliver.

Everything is real but Demandbase: the daemon in process, ingest on loopback, the
SQLite store, the client speaking HTTP to the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dbsync.demandbase.emulator.tenant import ImportState
from dbsync.model import Account, AudienceState
from dbsync.testing import (
    AudienceConfig,
    Engine,
    aep_profile,
    fast_tenant,
    running_daemon,
    running_emulator,
    running_engine,
    wait_until,
    write_config,
)

A = AudienceConfig("reload-a", "High-intent EMEA accounts")
B = AudienceConfig("reload-b", "Renewals at risk")
C = AudienceConfig("reload-c", "Expansion targets")
TIMEOUT = 10.0


def ids(accounts: list[Account]) -> set[str]:
    return {a.external_id for a in accounts}


def records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


async def post_change(engine: Engine, audience_id: str, account: Account) -> tuple[int, Any]:
    """``POST /v1/changes`` of one join, answered or refused."""
    line = msgspec.json.encode({"audience_id": audience_id, "account": account, "member": True})
    return await engine.cdp.send("POST", "/v1/changes", line + b"\n", "application/x-ndjson")


def actor_task_running(audience_id: str) -> bool:
    return any(t.get_name() == f"actor:{audience_id}" and not t.done() for t in asyncio.all_tasks())


async def test_an_audience_added_to_the_config_is_activated_by_sighup(tmp_path: Path) -> None:
    """1. The daemon runs audience A; A gets 20 accounts and its list fills.
    2. Changes for B are refused (404): B is not activated.
    3. The configuration is rewritten with A and B, and the process gets a real SIGHUP
    (the daemon's handler on the running loop).
    4. B gets 30 accounts.
    Result: B has an actor and its list equals its desired state; A kept the same actor
    (not restarted) and its list is exactly what it was."""
    async with running_engine(tmp_path, [A]) as engine:
        accounts = await engine.tenant_accounts(50)
        await engine.cdp.changes([(A.id, a, True) for a in accounts[:20]])
        await engine.wait_settled()
        actor_a = engine.supervisor.actor(A.id)
        assert (await engine.lists())[A.list] == ids(accounts[:20])

        status, answer = await post_change(engine, B.id, accounts[20])
        assert (status, answer["field"]) == (404, "line 1: audience_id"), answer

        write_config(tmp_path, engine.emulator.url, [A, B])
        # asyncio's add_signal_handler sets a no-op Python handler: with the default one
        # SIGHUP would end the test process.
        assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, signal.SIG_IGN)
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_until(
            lambda: B.id in engine.supervisor.audience_ids(), TIMEOUT, what="B activated"
        )

        await engine.cdp.changes([(B.id, a, True) for a in accounts[20:]])
        both = {A.id: A.list, B.id: B.list}
        await engine.wait_settled(both, timeout=TIMEOUT)

        lists = await engine.lists()
        assert lists[B.list] == ids(accounts[20:])
        assert lists[A.list] == ids(accounts[:20])
        assert engine.supervisor.actor(A.id) is actor_a, "A was not restarted"
        states = {s.audience_id: s.state for s in engine.supervisor.statuses()}
        assert states == {A.id: AudienceState.ACTIVE, B.id: AudienceState.ACTIVE}


async def test_an_audience_removed_from_the_config_stops_and_its_list_stays(
    tmp_path: Path,
) -> None:
    """1. A and B get 20 accounts each; both lists fill.
    2. The configuration is rewritten without B; reload.
    3. The CDP sends B changes (NDJSON), a B snapshot and AEP profiles naming B; A gets
    10 more accounts, which settle.
    Result: B's actor stopped and its stored state is ``deactivated``; B's Demandbase
    list still exists with its 20 members; ingest refuses B's changes and snapshot
    with 404 and ignores its AEP memberships, so B's desired state is untouched and
    nothing more reaches its list; A delivered its new accounts."""
    async with running_engine(tmp_path, [A, B]) as engine:
        accounts = await engine.tenant_accounts(70)
        a_accounts, b_accounts, later = accounts[:20], accounts[20:40], accounts[40:]
        await engine.cdp.changes(
            [(A.id, a, True) for a in a_accounts] + [(B.id, a, True) for a in b_accounts]
        )
        await engine.wait_settled()
        actor_a = engine.supervisor.actor(A.id)

        write_config(tmp_path, engine.emulator.url, [A])
        assert await engine.daemon.reload(engine.supervisor)

        assert engine.supervisor.audience_ids() == [A.id]
        assert engine.supervisor.actor(A.id) is actor_a
        assert not actor_task_running(B.id)
        stored = await engine.store.audiences()
        assert stored[B.id].state is AudienceState.DEACTIVATED
        assert stored[A.id].state is AudienceState.ACTIVE
        assert (await engine.lists())[B.list] == ids(b_accounts), "the list is never deleted"

        status, answer = await post_change(engine, B.id, later[0])
        assert (status, answer["field"]) == (404, "line 1: audience_id"), answer
        status, answer = await engine.cdp.send(
            "PUT", f"/v1/audiences/{B.id}/members", b"", "text/csv"
        )
        assert (status, answer["field"]) == (404, "audience_id"), answer
        aep = await engine.cdp.aep([aep_profile(a, {B.id: "realized"}) for a in later[:5]])
        assert (aep["accepted"], aep["audiences_ignored"]) == (0, {B.id: 5})

        await engine.cdp.changes([(A.id, a, True) for a in later[10:20]])
        await engine.wait_settled({A.id: A.list}, timeout=TIMEOUT)

        assert await engine.store.desired_members(B.id) == ids(b_accounts)
        lists = await engine.lists()
        assert lists[B.list] == ids(b_accounts)
        assert lists[A.list] == ids(a_accounts) | ids(later[10:20])


async def test_a_renamed_audience_keeps_feeding_its_list_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. B ("Renewals at risk", no list_name: its list is named after it) gets 20
    accounts; its list fills.
    2. B's name becomes "Renewals at risk (renamed)" in the configuration; reload.
    3. B gets 15 more accounts and loses 5.
    Result: one ``audience_renamed`` warning names the old and new names, the list
    still fed and the operator's action (rename it in Demandbase); the changes went to
    the original list, which equals B's desired state; no list of the new name was
    created; the actor reports the new name and the original list."""
    renamed = AudienceConfig(B.id, "Renewals at risk (renamed)")
    async with running_engine(tmp_path, [A, B]) as engine:
        accounts = await engine.tenant_accounts(35)
        await engine.cdp.changes([(B.id, a, True) for a in accounts[:20]])
        await engine.wait_settled()

        write_config(tmp_path, engine.emulator.url, [A, renamed])
        assert await engine.daemon.reload(engine.supervisor)

        [warning] = records(caplog, "audience_renamed")
        assert warning.levelno == logging.WARNING
        fields = {k: warning.__dict__[k] for k in ("audience", "old_name", "new_name", "list_name")}
        assert fields == {
            "audience": B.id,
            "old_name": B.display_name,
            "new_name": renamed.display_name,
            "list_name": B.list,
        }
        assert "rename the list in Demandbase" in warning.__dict__["action_required"]

        await engine.cdp.changes(
            [(B.id, a, True) for a in accounts[20:]] + [(B.id, a, False) for a in accounts[:5]]
        )
        await engine.wait_settled({B.id: B.list}, timeout=TIMEOUT)

        lists = await engine.lists()
        assert lists[B.list] == ids(accounts[5:])
        assert renamed.list not in lists
        [status] = [s for s in engine.supervisor.statuses() if s.audience_id == B.id]
        assert (status.name, status.list_name) == (renamed.display_name, B.list)
        assert (await engine.store.audiences())[B.id].list_name == B.list


async def test_a_rejected_reload_keeps_the_running_configuration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. A and B run and deliver 10 accounts each.
    2. The configuration is rewritten to drop B and add C, with an unknown key in
    ``[daemon]``; reload.
    3. A and B get 10 more accounts each; a change for C is sent.
    Result: the reload returns False and ``config_reload_rejected`` names the bad key;
    nothing of the new file was applied: the same two actors run, C is refused (404),
    and A's and B's lists fill with their new accounts."""
    async with running_engine(tmp_path, [A, B]) as engine:
        accounts = await engine.tenant_accounts(40)
        await engine.cdp.changes(
            [(A.id, a, True) for a in accounts[:10]] + [(B.id, a, True) for a in accounts[10:20]]
        )
        await engine.wait_settled()
        actors = {a: engine.supervisor.actor(a) for a in (A.id, B.id)}

        config = write_config(tmp_path, engine.emulator.url, [A, C])
        config.write_text(config.read_text().replace("[daemon]\n", "[daemon]\ndrain_secondz = 1\n"))
        assert not await engine.daemon.reload(engine.supervisor)

        [rejected] = records(caplog, "config_reload_rejected")
        assert rejected.levelno == logging.ERROR
        assert rejected.__dict__["error"].startswith("daemon.drain_secondz: unknown key")
        assert engine.supervisor.audience_ids() == [A.id, B.id]
        assert {a: engine.supervisor.actor(a) for a in (A.id, B.id)} == actors
        status, answer = await post_change(engine, C.id, accounts[39])
        assert (status, answer["field"]) == (404, "line 1: audience_id"), answer

        await engine.cdp.changes(
            [(A.id, a, True) for a in accounts[20:30]] + [(B.id, a, True) for a in accounts[30:39]]
        )
        await engine.wait_settled(timeout=TIMEOUT)
        lists = await engine.lists()
        assert lists[A.list] == ids(accounts[:10]) | ids(accounts[20:30])
        assert lists[B.list] == ids(accounts[10:20]) | ids(accounts[30:39])
        assert C.list not in lists


SECOND = "second"
LOST = AudienceConfig("reload-lost", "Accounts behind a wrong URL")


def unreachable_url() -> str:
    """A loopback URL where nothing listens: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_two_destinations(directory: Path, emulator_url: str, second_url: str) -> Path:
    """The harness's config (the emulator, with A) plus a destination ``second`` at
    ``second_url`` with its own credentials, limits, delivery and one audience."""
    config = write_config(directory, emulator_url, [A], daemon={"drain_seconds": 0.5})
    token_file = directory / "emulator-token"
    second = f"""
[[destinations]]
name = "{SECOND}"
base_url = "{second_url}"
request_timeout_seconds = 2
[destinations.credentials]
token = {{ file = "{token_file}" }}
[destinations.limits]
requests_per_minute = 1000000
import_jobs_per_day = 1000000
import_uploads_per_day = 1000000
import_status_per_day = 1000000
concurrent_import_jobs = 20
[destinations.delivery]
job_poll_initial_seconds = 0.05
job_poll_max_seconds = 0.5
[[destinations.audiences]]
id = "{LOST.id}"
name = "{LOST.display_name}"
origin = "segmentation"
requests_per_minute = 1000000
[destinations.audiences.flush]
max_records = 1000
max_age_seconds = 0.1
"""
    config.write_text(config.read_text() + second)
    return config


@contextlib.asynccontextmanager
async def lost_audience_failed(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Engine, list[Account]]]:
    """The two destinations, the second unreachable; A and LOST get 30 accounts each.
    Yields once LOST's actor reports ``failed``, with the accounts (A's, then LOST's)."""
    # The backoff starts at 1 s and doubles; 8 failures in a row make ``failed``. Only
    # the scale changes here, not the policy.
    monkeypatch.setattr("dbsync.retry.BACKOFF_BASE_SECONDS", 0.01)
    monkeypatch.setattr("dbsync.retry.BACKOFF_MAX_SECONDS", 0.05)
    async with running_emulator(fast_tenant()) as emulator:
        # The failing delivery retries until the drain deadline (0.5 s) cuts it.
        config = write_two_destinations(directory, emulator.url, unreachable_url())
        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, [A])
            assert engine.supervisor.audience_ids() == [A.id, LOST.id]
            accounts = await engine.tenant_accounts(60)
            await engine.cdp.changes(
                [(A.id, a, True) for a in accounts[:30]]
                + [(LOST.id, a, True) for a in accounts[30:]]
            )
            await wait_until(
                lambda: state(engine, LOST.id) is AudienceState.FAILED,
                TIMEOUT,
                what=lambda: f"LOST failed: {engine.supervisor.statuses()}",
            )
            yield engine, accounts


def state(engine: Engine, audience_id: str) -> AudienceState:
    [status] = [s for s in engine.supervisor.statuses() if s.audience_id == audience_id]
    return status.state


async def test_an_actor_that_keeps_failing_reports_failed_while_the_others_deliver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. Two destinations: the emulator with A, and a second one whose base URL is a
    loopback port where nothing listens, with audience LOST.
    2. A and LOST get 30 accounts each, in one request.
    Result: LOST's actor retries with backoff and reaches ``failed`` (in the
    supervisor's status and in the store), its error saying no answer came; meanwhile
    A's list fills with its 30 accounts and A stays ``active``; LOST lost nothing: its
    30 desired accounts are all still waiting (pending or in its open batch), none
    acknowledged, and no list of its name exists."""
    async with lost_audience_failed(tmp_path, monkeypatch) as (engine, accounts):
        await engine.wait_settled({A.id: A.list}, timeout=TIMEOUT)

        assert (await engine.lists())[A.list] == ids(accounts[:30])
        statuses = {s.audience_id: s for s in engine.supervisor.statuses()}
        assert statuses[A.id].state is AudienceState.ACTIVE
        assert statuses[LOST.id].state is AudienceState.FAILED
        assert "no complete answer" in statuses[LOST.id].last_error
        assert (await engine.store.audiences())[LOST.id].state is AudienceState.FAILED

        assert await engine.store.desired_members(LOST.id) == ids(accounts[30:])
        backlog = await engine.store.backlog(LOST.id)
        assert backlog.pending + backlog.in_flight == 30, backlog
        assert (await engine.store.ledger(LOST.id)).acknowledged == 0
        assert LOST.list not in await engine.lists()


async def test_fixing_the_failing_destination_by_reload_delivers_its_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. As above: LOST's destination is unreachable and its actor reports ``failed``.
    2. The operator fixes the second destination's base URL (the emulator) and reloads.
    Result: the reload returns within 3 s (the destination gets a new client, LOST a
    new actor), LOST's list fills with its 30 accounts and LOST is ``active`` again."""
    async with lost_audience_failed(tmp_path, monkeypatch) as (engine, accounts):
        write_two_destinations(tmp_path, engine.emulator.url, engine.emulator.url)
        async with asyncio.timeout(3.0):
            assert await engine.daemon.reload(engine.supervisor)

        await engine.wait_settled({A.id: A.list, LOST.id: LOST.list}, timeout=TIMEOUT)
        assert (await engine.lists())[LOST.list] == ids(accounts[30:])
        assert state(engine, LOST.id) is AudienceState.ACTIVE


async def test_a_destination_added_by_reload_delivers(tmp_path: Path) -> None:
    """1. The daemon runs one destination (the emulator) with A.
    2. The configuration gains a second destination (also the emulator, another name)
    with audience LOST; reload.
    3. LOST gets 20 accounts.
    Result: the reload is applied, LOST has an actor and its list fills."""
    async with running_engine(tmp_path, [A]) as engine:
        write_two_destinations(tmp_path, engine.emulator.url, engine.emulator.url)
        assert await engine.daemon.reload(engine.supervisor)
        assert engine.supervisor.audience_ids() == [A.id, LOST.id]

        accounts = await engine.tenant_accounts(20)
        await engine.cdp.changes([(LOST.id, a, True) for a in accounts])
        await engine.wait_settled({LOST.id: LOST.list}, timeout=TIMEOUT)
        assert (await engine.lists())[LOST.list] == ids(accounts)


async def test_a_reload_does_not_wait_longer_than_a_drain_for_a_job_in_flight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. Demandbase takes 3 s per job; the daemon's drain_seconds is 0.3.
    2. A gets 10 accounts; once their job is uploaded, A's flush settings change and the
    configuration is reloaded, which restarts A's actor.
    Result: the reload returns after about the drain time, not the job's: the old actor
    is cut short (``actor_stop_cut_short``), its batch stays open, and the new actor
    resumes it: A's list ends with the 10 accounts, sent in one job."""
    drain = {"drain_seconds": 0.3}
    tenant = fast_tenant(job_delay_seconds=3.0)
    async with running_engine(tmp_path, [A], tenant=tenant, daemon=drain) as engine:
        accounts = await engine.tenant_accounts(10)
        await engine.cdp.changes([(A.id, a, True) for a in accounts])

        tenant_state = engine.emulator.emulator.tenant

        async def uploaded() -> bool:
            return (await engine.store.backlog(A.id)).in_flight == 10 and any(
                job.state is not ImportState.NEW for job in tenant_state.import_jobs
            )

        await wait_until(uploaded, TIMEOUT, what="A's job uploaded")
        changed = AudienceConfig(A.id, A.name, max_records=A.max_records + 1)
        write_config(tmp_path, engine.emulator.url, [changed], daemon=drain)
        async with asyncio.timeout(2.0):
            assert await engine.daemon.reload(engine.supervisor)
        [cut] = records(caplog, "actor_stop_cut_short")
        assert cut.__dict__["audience"] == A.id

        await engine.wait_settled(timeout=TIMEOUT)
        assert (await engine.lists())[A.list] == ids(accounts)
        assert len(tenant_state.import_jobs) == 1

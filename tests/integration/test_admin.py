"""The admin socket and ``dbsync ctl`` against the running engine, over a real socket.

Everything is real but Demandbase: the daemon in process beside the test, the
emulator on loopback, and ``dbsync ctl`` as a separate process
(``python -m dbsync ctl``) where the exit code or the printed output is the point;
in process (the blocking client in a thread) where the daemon's state is. Sockets live
in short directories under /tmp (the 108-byte limit).

The role tests run ``dbsync ctl`` as ``nobody`` (uid and gid 65534, no supplementary
group) through ``setpriv``; the test prepares the socket's directory as systemd's
RuntimeDirectory= would be for a ``dbsync`` group: owned by group ``nogroup``, 2750,
so that the socket the daemon creates there (0660) belongs to that group and nobody
can connect. What nobody may then do is the daemon's decision, from SO_PEERCRED.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import io
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from dbsync.admin.client import exchange
from dbsync.admin.protocol import (
    AnyReply,
    AnyRequest,
    FaultCode,
    Pause,
    PauseReply,
    Resume,
    ResumeReply,
    Status,
    StatusReply,
)
from dbsync.config import load_config
from dbsync.contract.command import probe_destination
from dbsync.daemon import Daemon
from dbsync.demandbase.emulator import Faults
from dbsync.exitcodes import ExitCode
from dbsync.logs import JsonFormatter
from dbsync.model import Account, AudienceState
from dbsync.testing import (
    DESTINATION,
    HIGH,
    ApiKeySet,
    AudienceConfig,
    Engine,
    fast_tenant,
    running_daemon,
    running_emulator,
    running_engine,
    wait_until,
    write_config,
)

EMEA = AudienceConfig("emea", "High-intent EMEA")
APAC = AudienceConfig("apac", "Expansion APAC")
# Due only when flushed: an hour's max age, far more than any test waits.
LAZY = AudienceConfig("lazy", "Renewals", max_age_seconds=3600.0)
TIMEOUT = 8.0
NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="runs dbsync ctl as nobody: root only")


# --- helpers ---------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp short enough for a socket path; nobody may traverse it."""
    path = Path(tempfile.mkdtemp(prefix="dbs", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def socket_path(directory: Path) -> Path:
    return directory / "run" / "admin.sock"


def admin_keys(directory: Path, **keys: object) -> dict[str, object]:
    return {"admin_socket": str(socket_path(directory)), **keys}


def group_runtime_dir(directory: Path) -> None:
    """The socket's directory as systemd makes it for a group: nobody's group, 2750."""
    runtime = socket_path(directory).parent
    runtime.mkdir()
    os.chown(runtime, 0, grp.getgrnam("nogroup").gr_gid)
    runtime.chmod(0o2750)  # setgid: the socket created inside belongs to the group


@contextlib.asynccontextmanager
async def admin_engine(
    directory: Path,
    audiences: Sequence[AudienceConfig],
    *,
    daemon: Mapping[str, object] | None = None,
    **settings: Any,
) -> AsyncIterator[Engine]:
    async with running_engine(
        directory, audiences, daemon=admin_keys(directory, **(daemon or {})), **settings
    ) as engine:
        yield engine


class Run(NamedTuple):
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def ctl(sock: Path, *args: str, nobody: bool = False) -> Run:
    """``dbsync ctl --socket SOCK ARGS`` as its own process (as nobody if asked)."""
    command = [
        *(AS_NOBODY if nobody else ()),
        sys.executable,
        "-m",
        "dbsync",
        "ctl",
        "--socket",
        str(sock),
        *args,
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def ask(sock: Path, request: AnyRequest) -> AnyReply:
    """One exchange through the blocking client, off the loop the daemon runs on."""
    return await asyncio.to_thread(exchange, sock, request)


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == event]


def ids(accounts: Sequence[Account]) -> set[str]:
    return {a.external_id for a in accounts}


# --- the socket --------------------------------------------------------------------------------


async def test_the_socket_is_0660_in_a_0750_directory_and_removed_at_stop(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. The daemon starts with its socket in a directory that does not exist yet.
    2. It stops.
    Result: the directory was created 0750, the socket 0660; ``admin_listening`` named
    it with its mode; after the stop the socket file is gone."""
    caplog.set_level(logging.INFO)
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA]):
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o750
        found = os.lstat(sock)
        assert stat.S_ISSOCK(found.st_mode)
        assert stat.S_IMODE(found.st_mode) == 0o660
        await wait_until(lambda: bool(events(caplog, "admin_listening")), TIMEOUT)
        [listening] = events(caplog, "admin_listening")
        assert (listening.path, listening.mode) == (str(sock), "0660")  # type: ignore[attr-defined]
    assert not sock.exists()


async def test_a_stale_socket_is_removed_and_a_second_daemon_refuses_to_start(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. A socket file nobody listens on (a crashed daemon's) sits at the path.
    2. The daemon starts; then a second daemon (its own state) is started on the same
    socket.
    Result: the first removed the stale file (``admin_stale_socket_removed``) and
    answers; the second exits 1 with ``admin_socket_in_use`` and leaves the first's
    socket alone, which still answers."""
    sock = socket_path(short_dir)
    sock.parent.mkdir(mode=0o750)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))  # closed without unlink: a leftover
    async with admin_engine(short_dir, [EMEA]) as engine:
        assert events(caplog, "admin_stale_socket_removed")
        assert isinstance(await ask(sock, Status()), StatusReply)

        other = short_dir / "other"
        other.mkdir()
        config = write_config(
            other, engine.emulator.url, [EMEA], daemon=admin_keys(short_dir, drain_seconds=1.0)
        )
        code = await asyncio.wait_for(Daemon(config).run(), TIMEOUT)
        assert code == ExitCode.FAULT
        [in_use] = events(caplog, "admin_socket_in_use")
        assert in_use.path == str(sock)  # type: ignore[attr-defined]
        assert not (other / "state" / "dbsync.sqlite3").exists()  # refused before the store
        assert isinstance(await ask(sock, Status()), StatusReply)


async def test_no_daemon_gives_69(short_dir: Path) -> None:
    """``dbsync ctl`` with no daemon: no socket file, then a stale one nobody listens on.
    Result: exit 69 both times; with ``--json`` the one document printed is a fault
    ``unreachable``."""
    sock = socket_path(short_dir)
    missing = await ctl(sock, "status")
    assert missing.code == ExitCode.UNAVAILABLE, missing
    assert "no daemon answers" in missing.err

    sock.parent.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(sock))
    refused = await ctl(sock, "--json", "pause", "emea")
    assert refused.code == ExitCode.UNAVAILABLE, refused
    assert refused.json() == {
        "reply": "fault",
        "code": "unreachable",
        "message": f"no daemon answers at {sock}",
    }


async def test_a_drain_answers_then_the_daemon_stops(short_dir: Path) -> None:
    """1. A daemon runs; ``dbsync ctl drain --json``.
    Result: ctl exits 0 with the daemon's answer (draining, the drain's bound); the
    daemon then exits 0 by itself and removes its socket; a ctl after that gets 69."""
    sock = socket_path(short_dir)
    async with running_emulator(fast_tenant()) as emulator:
        config = write_config(short_dir, emulator.url, [EMEA], daemon=admin_keys(short_dir))
        daemon = Daemon(config)
        running = asyncio.create_task(daemon.run(), name="daemon")
        await wait_until(lambda: daemon.ready.is_set() or running.done(), TIMEOUT)
        assert daemon.ready.is_set(), running

        drained = await ctl(sock, "drain", "--json")
        assert drained.code == ExitCode.OK, drained
        assert drained.json() == {"reply": "drain", "draining": True, "drain_seconds": 5.0}
        assert await asyncio.wait_for(running, TIMEOUT) == ExitCode.OK
    assert not sock.exists()
    after = await ctl(sock, "status")
    assert after.code == ExitCode.UNAVAILABLE


# --- the verbs ---------------------------------------------------------------------------------


async def test_status_as_json_and_as_a_table(short_dir: Path) -> None:
    """1. EMEA gets 20 accounts and settles; APAC gets none.
    2. ``status --json``, ``status emea --json`` (the option after the verb), ``status``.
    Result: the JSON decodes into the daemon, both audiences (state, backlog, ledger:
    20 received and acknowledged, balanced; pace) and the destination (token auth, ok;
    the quota of job creations used as many times as the emulator saw jobs, and left =
    allowed - used); one audience narrows both lists and adds its open batches; the
    table's columns are aligned under their headers."""
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA, APAC]) as engine:
        accounts = await engine.tenant_accounts(20)
        await engine.cdp.changes([(EMEA.id, a, True) for a in accounts])
        await engine.wait_settled()

        whole = await ctl(sock, "--json", "status")
        assert whole.code == ExitCode.OK, whole
        doc = whole.json()
        assert doc["reply"] == "status"
        assert doc["daemon"]["pid"] == os.getpid()
        assert doc["daemon"]["draining"] is False
        audiences = {a["audience"]: a for a in doc["audiences"]}
        assert set(audiences) == {"emea", "apac"}
        emea = audiences["emea"]
        assert (emea["state"], emea["paused"], emea["list_name"]) == ("active", False, EMEA.list)
        assert (emea["pending_inserts"], emea["pending_deletes"], emea["in_flight"]) == (0, 0, 0)
        assert emea["oldest_pending_age_seconds"] is None
        assert emea["ledger"]["received"] == emea["ledger"]["acknowledged"] == 20
        assert emea["ledger_balanced"] is True
        assert emea["pace_per_minute"] == HIGH
        assert audiences["apac"]["ledger"]["received"] == 0
        [destination] = doc["destinations"]
        assert (destination["auth_mode"], destination["auth_state"]) == ("token", "ok")
        quota = {q["endpoint"]: q for q in destination["quota"]}
        jobs = sum(engine.emulator.emulator.stats()["jobs"]["import"].values())
        assert quota["import.create_job"]["used"] == jobs >= 1
        for line in quota.values():
            assert line["left"] == line["allowed"] - line["used"]

        one = await ctl(sock, "status", "emea", "--json")
        assert one.code == ExitCode.OK, one
        narrowed = one.json()
        assert [a["audience"] for a in narrowed["audiences"]] == ["emea"]
        assert narrowed["audiences"][0]["open_batches"] == []
        assert [d["destination"] for d in narrowed["destinations"]] == ["emulator"]

        table = await ctl(sock, "status")
        assert table.code == ExitCode.OK, table
        lines = table.out.splitlines()
        header = next(line for line in lines if line.startswith("AUDIENCE"))
        rows = [line for line in lines if line.startswith(("emea ", "apac "))][:2]
        assert len(rows) == 2
        for row in rows:
            assert row.index("active") == header.index("STATE")
            assert row[: header.index("PENDING") + len("PENDING")].endswith("0")  # right-aligned


async def test_pause_and_resume_return_once_the_actor_has_changed(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1. ``pause emea``; 10 accounts are sent to EMEA.
    2. Once the oldest change is older than max_age twice over, ``status emea``.
    3. ``resume emea``.
    Result: the pause answers with the actor already ``paused``; the changes stay
    pending (status shows 10 and their age) and the list empty; the resume answers
    with the actor active again and the list then fills. Each is logged as
    ``admin_command`` with verb, uid, audience and outcome."""
    caplog.set_level(logging.INFO)
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA]) as engine:
        actor = engine.supervisor.actor(EMEA.id)
        assert actor is not None

        paused = await ask(sock, Pause(audience=EMEA.id))
        assert isinstance(paused, PauseReply), paused
        assert paused.state == "paused"
        assert actor.state is AudienceState.PAUSED  # when the answer came, not later

        accounts = await engine.tenant_accounts(10)
        await engine.cdp.changes([(EMEA.id, a, True) for a in accounts])

        async def overdue() -> bool:
            reply = await ask(sock, Status(audience=EMEA.id))
            assert isinstance(reply, StatusReply)
            age = reply.audiences[0].oldest_pending_age_seconds
            return age is not None and age > 2 * EMEA.max_age_seconds

        await wait_until(overdue, TIMEOUT, what="the changes to be overdue")
        status = await ask(sock, Status(audience=EMEA.id))
        assert isinstance(status, StatusReply)
        [view] = status.audiences
        assert (view.state, view.paused, view.pending_inserts) == ("paused", True, 10)
        assert (await engine.lists()).get(EMEA.list, set()) == set()

        resumed = await ask(sock, Resume(audience=EMEA.id))
        assert isinstance(resumed, ResumeReply), resumed
        assert resumed.state == "active"
        assert not actor.is_paused
        await engine.wait_settled()
        assert (await engine.lists())[EMEA.list] == ids(accounts)

    logged = [
        (r.verb, r.uid, r.audience, r.outcome)  # type: ignore[attr-defined]
        for r in events(caplog, "admin_command")
    ]
    assert logged == [("pause", 0, "emea", "ok"), ("resume", 0, "emea", "ok")]


async def test_a_pause_outlives_a_reload_that_restarts_the_actor_and_a_restart(
    short_dir: Path,
) -> None:
    """1. ``ctl pause emea``; 10 accounts are sent to EMEA.
    2. The destination's pace changes in the config; ``ctl reload`` (EMEA gets a new actor).
    3. The daemon stops and starts again on the same state.
    4. ``ctl resume emea``; then the daemon stops and starts once more.
    Result: after the reload and after the restart EMEA's actor is paused, its 10
    changes pending and its list empty; after the resume the list fills, and the next
    start leaves EMEA active."""
    sock = socket_path(short_dir)
    keys = admin_keys(short_dir)
    async with running_emulator(fast_tenant()) as emulator:
        config = write_config(short_dir, emulator.url, [EMEA], daemon=keys)

        async def paused_with_backlog(engine: Engine) -> None:
            actor = engine.supervisor.actor(EMEA.id)
            assert actor is not None
            await wait_until(
                lambda: actor.state is AudienceState.PAUSED, TIMEOUT, what="EMEA paused"
            )
            backlog = await engine.store.backlog(EMEA.id)
            assert (backlog.pending, backlog.in_flight) == (10, 0)
            assert (await engine.lists()).get(EMEA.list, set()) == set()

        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, [EMEA])
            assert (await ctl(sock, "pause", EMEA.id)).code == ExitCode.OK
            accounts = await engine.tenant_accounts(10)
            await engine.cdp.changes([(EMEA.id, a, True) for a in accounts])
            before = engine.supervisor.actor(EMEA.id)
            write_config(
                short_dir, emulator.url, [EMEA], daemon=keys, limits={"requests_per_minute": 5000}
            )
            assert (await ctl(sock, "reload")).code == ExitCode.OK
            assert engine.supervisor.actor(EMEA.id) is not before
            await paused_with_backlog(engine)

        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, [EMEA])
            await paused_with_backlog(engine)
            assert (await ctl(sock, "resume", EMEA.id)).code == ExitCode.OK
            await engine.wait_settled()
            assert (await engine.lists())[EMEA.list] == ids(accounts)

        async with running_daemon(config) as daemon:
            actor = Engine(emulator, daemon, [EMEA]).supervisor.actor(EMEA.id)
            assert actor is not None
            assert not actor.is_paused


async def test_flush_sends_a_backlog_before_it_is_due(short_dir: Path) -> None:
    """1. LAZY (max age an hour) gets 15 accounts; they are folded and wait.
    2. ``dbsync ctl flush lazy --json``.
    Result: exit 0 once a batch is planned: 15 pending before, fewer after; the list
    then holds the 15 accounts, an hour early. A flush of a paused audience is
    refused (``audience_paused``, exit 1)."""
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [LAZY]) as engine:
        accounts = await engine.tenant_accounts(15)
        await engine.cdp.changes([(LAZY.id, a, True) for a in accounts])
        await engine.wait_folded()
        assert (await engine.store.backlog(LAZY.id)).pending == 15

        flushed = await ctl(sock, "flush", LAZY.id, "--json")
        assert flushed.code == ExitCode.OK, flushed
        reply = flushed.json()
        assert (reply["reply"], reply["pending_before"]) == ("flush", 15)
        assert reply["pending"] < 15
        await engine.wait_settled()

        assert (await ctl(sock, "pause", LAZY.id)).code == ExitCode.OK
        refused = await ctl(sock, "--json", "flush", LAZY.id)
        assert refused.code == ExitCode.FAULT, refused
        assert refused.json()["code"] == "audience_paused"


async def test_rejected_requeue_and_resync(short_dir: Path) -> None:
    """1. Demandbase refuses one of EMEA's 20 accounts (400): it is set aside.
    2. ``rejected --json`` and ``rejected emea``; Demandbase is fixed; ``requeue emea``.
    3. ``resync emea``.
    Result: ``rejected`` lists that one account with Demandbase's reason (JSON and
    table); ``requeue`` puts 1 back and the list then holds all 20, nothing rejected
    left; ``resync`` marks the 20 to be sent again and the ledger then counts 20 more
    exported and acknowledged, the list unchanged."""
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA]) as engine:
        accounts = await engine.tenant_accounts(20)
        bad = accounts[7]
        engine.emulator.emulator.set_faults(
            Faults(reject_external_ids=frozenset({bad.external_id}))
        )
        await engine.cdp.changes([(EMEA.id, a, True) for a in accounts])

        async def one_rejected() -> bool:
            return await engine.idle() and (await engine.store.backlog(EMEA.id)).rejected == 1

        await wait_until(one_rejected, TIMEOUT)

        listed = await ctl(sock, "--json", "rejected")
        assert listed.code == ExitCode.OK, listed
        doc = listed.json()
        assert doc["total"] == 1
        [row] = doc["accounts"]
        assert (row["audience"], row["external_id"], row["member"]) == (
            "emea",
            bad.external_id,
            True,
        )
        assert bad.external_id in row["reason"]
        table = await ctl(sock, "rejected", "emea")
        assert table.code == ExitCode.OK, table
        assert bad.external_id in table.out
        assert "insert" in table.out

        engine.emulator.emulator.set_faults(Faults())
        requeued = await ctl(sock, "requeue", "emea", "--json")
        assert requeued.code == ExitCode.OK, requeued
        assert requeued.json() == {"reply": "requeue", "audience": "emea", "accounts": 1}
        await engine.wait_settled()
        assert (await engine.lists())[EMEA.list] == ids(accounts)
        assert (await ctl(sock, "rejected")).out.strip() == "no rejected accounts"

        before = await engine.store.ledger(EMEA.id)
        resynced = await ctl(sock, "resync", "emea", "--json")
        assert resynced.code == ExitCode.OK, resynced
        assert resynced.json()["accounts"] == 20
        await engine.wait_settled()
        after = await engine.store.ledger(EMEA.id)
        assert after.exported - before.exported == 20
        assert after.acknowledged - before.acknowledged == 20
        assert (await engine.lists())[EMEA.list] == ids(accounts)


async def test_quota_shows_what_each_limit_has_left(short_dir: Path) -> None:
    """1. Job creations are limited to 50 a day (49 allowed after the 2% margin); EMEA
    delivers 10 accounts in one job.
    2. ``quota --json`` and ``quota``.
    Result: per endpoint, used, left, allowed and the configured limit: job creations
    used as often as the emulator saw jobs, 49 allowed, the rest left; the table says
    the same."""
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA], limits={"import_jobs_per_day": 50}) as engine:
        accounts = await engine.tenant_accounts(10)
        await engine.cdp.changes([(EMEA.id, a, True) for a in accounts])
        await engine.wait_settled()
        jobs = sum(engine.emulator.emulator.stats()["jobs"]["import"].values())

        quota = await ctl(sock, "quota", "--json")
        assert quota.code == ExitCode.OK, quota
        [destination] = quota.json()["destinations"]
        lines = {q["endpoint"]: q for q in destination["quota"]}
        assert lines["import.create_job"] == {
            "endpoint": "import.create_job",
            "limit": 50,
            "allowed": 49,
            "used": jobs,
            "left": 49 - jobs,
        }
        table = await ctl(sock, "quota")
        row = next(line for line in table.out.splitlines() if "import.create_job" in line)
        assert row.split()[1:] == ["import.create_job", str(jobs), str(49 - jobs), "49", "50"]


async def test_reload_applies_a_good_config_and_rejects_a_bad_one_with_78(
    short_dir: Path,
) -> None:
    """1. The daemon runs EMEA; the config is rewritten with EMEA and APAC; ``reload``.
    2. The config is broken (an unknown key); ``reload``, then ``reload --json``.
    Result: exit 0 and APAC active; then exit 78, the reason naming the key, a fault
    ``rejected_config``, and both audiences still active."""
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA]) as engine:
        write_config(short_dir, engine.emulator.url, [EMEA, APAC], daemon=admin_keys(short_dir))
        applied = await ctl(sock, "reload", "--json")
        assert applied.code == ExitCode.OK, applied
        assert applied.json() == {
            "reply": "reload",
            "accepted": True,
            "audiences": ["apac", "emea"],
        }
        assert engine.supervisor.actor(APAC.id) is not None

        config = short_dir / "config.toml"
        config.write_text(config.read_text().replace("[daemon]\n", "[daemon]\nbogus = 1\n"))
        rejected = await ctl(sock, "reload")
        assert rejected.code == ExitCode.CONFIG, rejected
        assert "daemon.bogus" in rejected.err
        as_json = await ctl(sock, "--json", "reload")
        assert as_json.code == ExitCode.CONFIG
        assert as_json.json()["code"] == "rejected_config"
        assert engine.supervisor.audience_ids() == ["apac", "emea"]


async def test_a_flush_that_cannot_happen_in_time_exits_75(short_dir: Path) -> None:
    """1. Demandbase takes 30 s per job and EMEA may have one job in flight: its first
    5 accounts go out and stay in flight; 5 more wait behind them.
    2. ``flush emea --timeout 0.3``.
    Result: exit 75 after the timeout, saying the flush stays asked for."""
    sock = socket_path(short_dir)
    async with admin_engine(
        short_dir,
        [EMEA],
        tenant=fast_tenant(job_delay_seconds=30.0),
        delivery={"max_jobs_in_flight_per_audience": 1},
        daemon={"drain_seconds": 0.5},
    ) as engine:
        accounts = await engine.tenant_accounts(10)
        await engine.cdp.changes([(EMEA.id, a, True) for a in accounts[:5]])

        async def in_flight() -> bool:
            return (await engine.store.backlog(EMEA.id)).in_flight == 5

        await wait_until(in_flight, TIMEOUT)
        await engine.cdp.changes([(EMEA.id, a, True) for a in accounts[5:]])
        await engine.wait_folded()

        late = await ctl(sock, "flush", "emea", "--timeout", "0.3")
        assert late.code == ExitCode.TEMPFAIL, late
        assert "stays asked for" in late.err
        assert "[timeout]" in late.err


async def test_bad_requests_and_unknown_audiences_are_faults(short_dir: Path) -> None:
    """1. Raw lines on the socket: an unknown field, an unknown verb, not JSON.
    2. ``pause nowhere``.
    Result: each line gets a ``bad_request`` fault naming what is wrong (and ctl maps
    it to 2); the unknown audience exits 1 with ``unknown_audience``; the daemon goes on
    answering."""
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA]):
        for line, named in [
            (b'{"verb": "pause", "audience": "emea", "colour": "red"}\n', "colour"),
            (b'{"verb": "explode"}\n', "verb"),
            (b"pause emea\n", "malformed"),
        ]:
            reader, writer = await asyncio.open_unix_connection(str(sock))
            writer.write(line)
            await writer.drain()
            reply = json.loads(await reader.readline())
            writer.close()
            await writer.wait_closed()
            assert reply["reply"] == "fault"
            assert reply["code"] == "bad_request"
            assert named in reply["message"]
        assert FaultCode.BAD_REQUEST.exit_code == ExitCode.USAGE

        unknown = await ctl(sock, "--json", "pause", "nowhere")
        assert unknown.code == ExitCode.FAULT, unknown
        assert unknown.json()["code"] == "unknown_audience"
        assert isinstance(await ask(sock, Status()), StatusReply)


async def test_the_accept_loop_survives_running_out_of_descriptors(
    short_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1. The admin socket's accept() fails with EMFILE, ENFILE, EMFILE (as when ingest
       clients hold every descriptor), then works again.
    2. Two status requests.
    Result: both are answered; the daemon did not end; one ``admin_accept_failed`` for
    the episode and one ``admin_accept_recovered`` counting its three failures."""
    caplog.set_level(logging.INFO)
    sock = socket_path(short_dir)
    loop = asyncio.get_running_loop()
    real_accept = loop.sock_accept
    failures = iter([errno.EMFILE, errno.ENFILE, errno.EMFILE])

    async def accept(listening: socket.socket) -> tuple[socket.socket, Any]:
        if listening.family == socket.AF_UNIX and (code := next(failures, None)):
            raise OSError(code, os.strerror(code))
        return await real_accept(listening)

    monkeypatch.setattr(loop, "sock_accept", accept)
    async with admin_engine(short_dir, [EMEA]):
        assert isinstance(await ask(sock, Status()), StatusReply)
        assert isinstance(await ask(sock, Status()), StatusReply)

    assert len(events(caplog, "admin_accept_failed")) == 1
    assert [r.__dict__["failures"] for r in events(caplog, "admin_accept_recovered")] == [3]


# --- roles ---------------------------------------------------------------------------------------


async def test_a_viewer_reads_and_is_refused_a_change_with_77(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nobody is in ``admin_viewer_group`` (nogroup) and not in the operator group.
    1. As nobody: ``status --json``; ``pause emea``; ``--json reload``.
    Result: status exits 0; pause and reload exit 77 with ``permission_denied``, the
    actor is not paused, and each refusal is logged as ``admin_command`` with uid
    65534."""
    group_runtime_dir(short_dir)
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA], daemon={"admin_viewer_group": "nogroup"}) as engine:
        status = await ctl(sock, "--json", "status", nobody=True)
        assert status.code == ExitCode.OK, status
        assert status.json()["reply"] == "status"

        pause = await ctl(sock, "pause", "emea", nobody=True)
        assert pause.code == ExitCode.NOPERM, pause
        assert "needs the operator role" in pause.err
        reload = await ctl(sock, "--json", "reload", nobody=True)
        assert reload.code == ExitCode.NOPERM, reload
        assert reload.json()["code"] == "permission_denied"
        actor = engine.supervisor.actor(EMEA.id)
        assert actor is not None
        assert not actor.is_paused

    refused = [
        (r.verb, r.uid, r.outcome)  # type: ignore[attr-defined]
        for r in events(caplog, "admin_command")
    ]
    assert refused == [
        ("pause", NOBODY, "permission_denied"),
        ("reload", NOBODY, "permission_denied"),
    ]


async def test_a_caller_without_a_role_is_refused_even_status(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No admin group is configured, so nobody (who can reach the socket) has no role.
    Result: ``status`` exits 77, the daemon's own refusal (``permission_denied`` in the
    JSON, an ``admin_command`` line for uid 65534)."""
    group_runtime_dir(short_dir)
    sock = socket_path(short_dir)
    async with admin_engine(short_dir, [EMEA]):
        status = await ctl(sock, "--json", "status", nobody=True)
        assert status.code == ExitCode.NOPERM, status
        assert status.json()["code"] == "permission_denied"
    [refused] = events(caplog, "admin_command")
    assert (refused.verb, refused.uid) == ("status", NOBODY)  # type: ignore[attr-defined]


async def test_an_operator_group_member_may_pause(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nobody's primary group is ``admin_operator_group``.
    Result: ``pause emea`` as nobody exits 0, the actor is paused, and the command is
    logged with nobody's uid."""
    caplog.set_level(logging.INFO)
    group_runtime_dir(short_dir)
    sock = socket_path(short_dir)
    async with admin_engine(
        short_dir, [EMEA], daemon={"admin_operator_group": "nogroup"}
    ) as engine:
        paused = await ctl(sock, "pause", "emea", nobody=True)
        assert paused.code == ExitCode.OK, paused
        assert paused.out.startswith("emea: paused")
        actor = engine.supervisor.actor(EMEA.id)
        assert actor is not None
        assert actor.state is AudienceState.PAUSED
    [logged] = events(caplog, "admin_command")
    assert (logged.verb, logged.uid, logged.outcome) == ("pause", NOBODY, "ok")  # type: ignore[attr-defined]


async def test_the_socket_file_keeps_out_callers_outside_its_group(short_dir: Path) -> None:
    """A socket in a root-only 0750 directory (the daemon's default when it creates
    one) is out of nobody's reach. Result: ``dbsync ctl`` as nobody exits 77."""
    sock = socket_path(short_dir)
    sock.parent.mkdir(mode=0o750)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(sock))
        listening.listen()
        refused = await ctl(sock, "status", nobody=True)
    assert refused.code == ExitCode.NOPERM, refused
    assert "permission denied" in refused.err


# --- secrets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token", "api_key_set"])
async def test_no_secret_in_status_quota_or_the_log(
    short_dir: Path, caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    """1. The destination's secrets are random strings (the legacy token, or an API key
    set's client id and secret) the emulator accepts; EMEA delivers 5 accounts.
    2. ``status``, ``status --json``, ``status emea``, ``quota --json``, a pause.
    Result: the outputs say which auth mode is used and that it works, and none of
    them, nor any log line the daemon wrote (as JSON), holds a secret."""
    caplog.set_level(logging.DEBUG)
    sock = socket_path(short_dir)
    secret = f"s3cret-{secrets.token_hex(12)}"
    if mode == "token":
        tenant, api_key_set, hidden = fast_tenant(token=secret), None, [secret]
    else:
        client_id = f"client-{secrets.token_hex(12)}"
        tenant = fast_tenant(client_id=client_id, client_secret=secret)
        api_key_set, hidden = ApiKeySet(client_id, secret), [client_id, secret]
    async with running_emulator(tenant) as emulator:
        config = write_config(
            short_dir,
            emulator.url,
            [EMEA],
            daemon=admin_keys(short_dir),
            api_key_set=api_key_set,
            token=secret,
        )
        async with running_daemon(config) as daemon:
            engine = Engine(emulator, daemon, [EMEA])
            accounts = await engine.tenant_accounts(5)
            await engine.cdp.changes([(EMEA.id, a, True) for a in accounts])
            await engine.wait_settled()

            outputs = [
                await ctl(sock, "status"),
                await ctl(sock, "--json", "status"),
                await ctl(sock, "status", "emea"),
                await ctl(sock, "--json", "quota"),
                await ctl(sock, "pause", "emea"),
            ]
    for run in outputs:
        assert run.code == ExitCode.OK, run
    doc = outputs[1].json()
    assert doc["destinations"][0]["auth_mode"] == mode
    assert doc["destinations"][0]["auth_state"] == "ok"
    formatter = JsonFormatter()
    logged = "\n".join(formatter.format(r) for r in caplog.records)
    assert "admin_command" in logged
    for value in hidden:
        for run in outputs:
            assert value not in run.out + run.err
        assert value not in logged


async def test_status_shows_each_destinations_contract_and_resume_clears_a_breach(
    short_dir: Path,
) -> None:
    """1. Before any probe, status says "not probed"; ``dbsync probe`` runs, then status
    shows the contract it kept ("holds") and when.
    2. The tenant starts creating a list per job: EMEA stops in contract_broken, and
    status says so for the audience and its destination.
    3. The tenant fixed, ``ctl resume emea`` sends again and the list settles."""
    sock = socket_path(short_dir)
    async with admin_engine(
        short_dir, [EMEA], delivery={"max_jobs_in_flight_per_audience": 1}
    ) as engine:
        accounts = await engine.tenant_accounts(20)
        await engine.cdp.changes([(EMEA.id, a, True) for a in accounts[:10]])
        await engine.wait_settled()
        [before] = (await ctl(sock, "--json", "status")).json()["destinations"]
        assert (before["contract"], before["probed_at"]) == ("not probed", None)

        config = load_config(short_dir / "config.toml")
        code = await probe_destination(
            config,
            DESTINATION,
            yes=True,
            as_json=True,
            out=io.StringIO(),
            poll_initial_seconds=0.02,
            poll_max_seconds=0.1,
        )
        assert code == ExitCode.OK
        [probed] = (await ctl(sock, "--json", "status")).json()["destinations"]
        assert probed["contract"] == "holds"
        assert probed["probed_at"] > 0
        table = (await ctl(sock, "status")).out
        assert "CONTRACT" in table
        assert "holds" in table

        engine.emulator.emulator.set_faults(Faults(dialects=frozenset({"list-per-job"})))
        await engine.cdp.changes([(EMEA.id, a, True) for a in accounts[10:]])

        async def broken() -> bool:
            doc = (await ctl(sock, "--json", "status")).json()
            return doc["audiences"][0]["state"] == "contract_broken"

        await wait_until(broken, 20.0, what="EMEA to stop on the broken contract")
        [destination] = (await ctl(sock, "--json", "status")).json()["destinations"]
        assert destination["contract"] == "broken at run time (emea)"

        engine.emulator.emulator.set_faults(Faults())
        resumed = await ctl(sock, "resume", "emea")
        assert resumed.code == ExitCode.OK, resumed
        await engine.wait_settled()
        doc = (await ctl(sock, "--json", "status")).json()
        assert doc["audiences"][0]["state"] == "active"

"""``dbsync ctl`` without a daemon: its imports, its command line, its exit codes, its tables.

What needs a running daemon is in ``tests/integration/test_admin.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest

from dbsync.admin.ctl import render
from dbsync.admin.protocol import (
    REQUESTS,
    AccountView,
    AudienceView,
    DaemonView,
    DestinationView,
    Fault,
    FaultCode,
    Pause,
    QuotaLine,
    ReconcileReply,
    ReconcileView,
    Rejected,
    Status,
    StatusReply,
    decode_request,
    encode,
)
from dbsync.cli import main
from dbsync.exitcodes import ExitCode

REPO = Path(__file__).resolve().parents[2]
# What `dbsync ctl` must not import: the event loop, the HTTP stack, the database, and
# the daemon's own modules.
HEAVY = (
    "asyncio",
    "aiohttp",
    "aiosqlite",
    "uvloop",
    "sqlite3",
    "dbsync.daemon",
    "dbsync.store",
    "dbsync.supervisor",
    "dbsync.actor",
    "dbsync.destination",
    "dbsync.retry",
    "dbsync.budget",
    "dbsync.ingest",
    "dbsync.demandbase.client",
    "dbsync.demandbase.http",
    "dbsync.admin.server",
    "dbsync.admin.verbs",
)

_PROBE = textwrap.dedent(
    """
    import json, sys
    from dbsync.cli import main
    code = main(sys.argv[1:])
    names = tuple(sys.stdin.read().split())
    heavy = sorted(m for m in sys.modules if m.startswith(names))
    print(json.dumps({"code": code, "heavy": heavy}))
    """
)


# A configuration needs a destination; ctl reads only admin_socket, never the secret.
A_DESTINATION = '[[destinations]]\nname = "t"\ncredentials = { token = { file = "token" } }\n'


def probe(*argv: str, env: dict[str, str] | None = None) -> dict[str, object]:
    """Run ``dbsync <argv>`` in a fresh interpreter; its exit code and heavy modules."""
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        input=" ".join(HEAVY),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        timeout=30,
        check=False,
    )
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def test_ctl_imports_neither_the_event_loop_nor_the_daemon(tmp_path: Path) -> None:
    """``dbsync ctl status`` with ``--socket``, then through a config file.
    Result: 69 (nobody listens) and none of asyncio, aiohttp, aiosqlite, uvloop, sqlite3
    or the daemon's modules was imported; reading the config does not change that."""
    by_socket = probe("ctl", "--socket", str(tmp_path / "a.sock"), "status")
    assert by_socket["code"] == ExitCode.UNAVAILABLE, by_socket
    assert by_socket["heavy"] == []

    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nadmin_socket = "{tmp_path / "b.sock"}"\n{A_DESTINATION}')
    by_config = probe("ctl", "--config", str(config), "quota")
    assert by_config["code"] == ExitCode.UNAVAILABLE, by_config
    assert by_config["heavy"] == []


def test_the_real_entry_point_imports_nothing_heavy(tmp_path: Path) -> None:
    """``python -X importtime -m dbsync ctl ...``: what the console script runs.
    Result: no heavy module in the import trace."""
    command = [sys.executable, "-X", "importtime", "-m", "dbsync", "ctl"]
    done = subprocess.run(
        [*command, "--socket", str(tmp_path / "a.sock"), "status"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    )
    assert done.returncode == ExitCode.UNAVAILABLE, done.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "dbsync.admin.client" in imported
    assert not [m for m in imported if m.startswith(HEAVY)]


def test_the_socket_comes_from_the_default_config_chain(tmp_path: Path) -> None:
    """$DBSYNC_CONFIG names a config whose admin_socket is A; ``--config`` one with B;
    a third config is invalid.
    Result: ctl tries A, then B when --config is given (69 both, naming the path), and
    exits 78 naming the bad key for the invalid one."""
    first, second, broken = (tmp_path / name for name in ("a.toml", "b.toml", "c.toml"))
    first.write_text(f'[daemon]\nadmin_socket = "{tmp_path / "a.sock"}"\n{A_DESTINATION}')
    second.write_text(f'[daemon]\nadmin_socket = "{tmp_path / "b.sock"}"\n{A_DESTINATION}')
    broken.write_text("[daemon]\nadmin_sockett = 1\n")

    from_env = probe("ctl", "status", env={"DBSYNC_CONFIG": str(first)})
    assert from_env["code"] == ExitCode.UNAVAILABLE
    assert str(tmp_path / "a.sock") in str(from_env["stderr"])

    from_flag = probe("ctl", "--config", str(second), "status", env={"DBSYNC_CONFIG": str(first)})
    assert str(tmp_path / "b.sock") in str(from_flag["stderr"])

    invalid = probe("ctl", "--json", "status", env={"DBSYNC_CONFIG": str(broken)})
    assert invalid["code"] == ExitCode.CONFIG
    assert "daemon.admin_sockett" in str(invalid["stderr"])
    assert "config_invalid" in str(invalid["stderr"])


@pytest.mark.parametrize(
    "argv",
    [
        ["ctl"],  # no verb
        ["ctl", "pause"],  # no audience
        ["ctl", "explode"],  # no such verb
        ["ctl", "status", "a", "b"],  # one audience at most
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == ExitCode.USAGE


def test_values_the_daemon_would_refuse_are_refused_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--timeout 0`` and ``--limit 0`` break the protocol's constraints.
    Result: exit 2 at once, with a ``bad_request`` document under --json; no socket
    was needed (there is none)."""
    sock = str(tmp_path / "none.sock")
    assert main(["ctl", "--socket", sock, "--json", "--timeout", "0", "status"]) == 2
    fault = json.loads(capsys.readouterr().out)
    assert (fault["reply"], fault["code"]) == ("fault", "bad_request")
    assert "timeout_seconds" in fault["message"]
    assert main(["ctl", "--socket", sock, "rejected", "--limit", "0"]) == 2


def test_every_verb_of_interfaces_is_a_subcommand() -> None:
    """INTERFACES.md's verbs each have a request Struct, with AUDIENCE required or
    optional as the document says."""
    verbs = {str(r.__struct_config__.tag): r for r in REQUESTS}
    assert set(verbs) == {
        "status",
        "pause",
        "resume",
        "flush",
        "resync",
        "rejected",
        "requeue",
        "reconcile",
        "adopt",
        "plan",
        "quota",
        "files",
        "approve",
        "discard",
        "reload",
        "drain",
    }
    for verb in (
        "pause",
        "resume",
        "flush",
        "resync",
        "requeue",
        "reconcile",
        "approve",
        "discard",
        "adopt",
        "plan",
    ):
        with pytest.raises(msgspec.ValidationError, match="audience"):
            decode_request(msgspec.json.encode({"verb": verb}))
    for verb in ("status", "rejected"):
        request = decode_request(msgspec.json.encode({"verb": verb}))
        assert isinstance(request, Status | Rejected)
        assert request.audience is None
    read = {v for v, r in verbs.items() if r.role.name == "VIEWER"}
    assert read == {"status", "rejected", "quota", "files", "plan"}


def test_requests_are_one_line_and_strict() -> None:
    line = encode(Pause(audience="emea", timeout_seconds=2.5))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode_request(line.rstrip()) == Pause(audience="emea", timeout_seconds=2.5)
    with pytest.raises(msgspec.ValidationError, match="unknown field `force`"):
        decode_request(b'{"verb": "pause", "audience": "emea", "force": true}')


def test_each_fault_has_its_fixed_exit_code() -> None:
    assert {code.value: int(code.exit_code) for code in FaultCode} == {
        "bad_request": 2,
        "unknown_audience": 1,
        "nothing_held": 1,
        "permission_denied": 77,
        "timeout": 75,
        "rejected_config": 78,
        "audience_paused": 1,
        "destination_stopped": 1,
        "draining": 1,
        "reconcile_deferred": 75,
        "internal": 1,
        "unreachable": 69,
        "config_invalid": 78,
    }


def _audience(name: str, **fields: object) -> AudienceView:
    values: dict[str, object] = {
        "audience": name,
        "name": name.upper(),
        "destination": "prod",
        "list_name": f"List {name}",
        "list_id": 7,
        "state": "active",
        "reason": "",
        "paused": False,
        "pending_inserts": 0,
        "pending_deletes": 0,
        "oldest_pending_age_seconds": None,
        "in_flight": 0,
        "rejected": 0,
        "jobs_in_flight": 0,
        "jobs_completed": 0,
        "checkpoint_seq": 0,
        "requests_per_minute": 60.0,
        "pace_per_minute": 60.0,
        "ledger": {"received": 0},
        "ledger_balanced": True,
    }
    return msgspec.convert(values | fields, AudienceView)


def test_status_renders_aligned_tables() -> None:
    """A status of two audiences, one failed with a backlog, and a destination.
    Result: columns line up under their headers, numbers right-aligned; ages read as
    durations; the failure's reason and a ledger breakdown follow the tables."""
    reply = StatusReply(
        daemon=DaemonView(
            version="1.0",
            pid=42,
            config="/etc/dbsync/config.toml",
            started_at=0.0,
            uptime_seconds=7500.0,
            draining=False,
        ),
        audiences=[
            _audience("emea", pending_inserts=1200, pending_deletes=3, in_flight=10_000),
            _audience(
                "high-intent-apac",
                state="failed",
                reason="Demandbase answered 503 eight times",
                oldest_pending_age_seconds=192.0,
                pending_inserts=5,
                ledger={"received": 12345, "lost_by_cause": {"dropped": 3}},
            ),
        ],
        destinations=[
            DestinationView(
                destination="prod",
                auth_mode="token",
                auth_state="ok",
                running=True,
                pace_per_minute=30.0,
                jobs_in_flight=1,
                job_slots=4,
                throttled=2,
                window_ends_at=86_400.0,
                quota=[
                    QuotaLine(
                        endpoint="import.create_job", limit=1200, allowed=1176, used=17, left=1159
                    )
                ],
            )
        ],
    )
    text = render(reply)
    lines = text.splitlines()
    assert lines[0] == "dbsync 1.0  pid 42  up 2h05m  config /etc/dbsync/config.toml"
    header = next(line for line in lines if line.startswith("AUDIENCE"))
    emea = next(line for line in lines if line.startswith("emea "))
    apac = next(line for line in lines if line.startswith("high-intent-apac "))
    end = header.index("PENDING") + len("PENDING")
    assert emea[:end].endswith("1203")
    assert apac[:end].endswith("5")
    assert apac.index("failed") == emea.index("active") == header.index("STATE")
    assert "3m12s" in apac
    assert "high-intent-apac: failed: Demandbase answered 503 eight times" in lines
    assert "high-intent-apac lost_by_cause: dropped 3" in lines
    quota = next(line for line in lines if "import.create_job" in line)
    assert quota.split() == ["prod", "import.create_job", "17", "1159", "1176", "1200"]
    assert "1970-01-02 00:00:00Z" in text


def test_a_fault_renders_its_code() -> None:
    fault = Fault(code=FaultCode.UNKNOWN_AUDIENCE, message="no active audience 'x'")
    assert render(fault) == "unknown_audience: no active audience 'x'"


def test_a_reconcile_report_names_what_was_set_aside_and_what_was_left() -> None:
    """A read-back: 98 of 100 verified, 2 dropped and sent again, 1 unmatched, 3 extra
    being removed, and 2 listed accounts without an External Account ID left alone.
    Result: each number has its line, and the unmatched account is named."""
    report = ReconcileView(
        audience_id="emea",
        destination="prod",
        list_id=7,
        export_job_id="x-1",
        started_at=0.0,
        finished_at=60.0,
        judged_before=0.0,
        listed=104,
        expected=100,
        verified=98,
        lost={"dropped": 2},
        lost_total=2,
        repaired=1,
        extra_removed=3,
        extra_kept=2,
        unmatched=[AccountView(external_id="A-9", name="Nobody Inc.", domain="nobody.example")],
        not_removable=[],
        too_young=0,
        unsettled=0,
        ledger_balanced=True,
        imbalances={},
    )
    lines = render(ReconcileReply(report=report)).splitlines()
    judged = "judged 100 members acknowledged before 1970-01-01 00:00:00Z:"
    assert f"{judged} 98 verified, 2 lost, 1 sent again" in lines
    assert "listed but not desired: 3, being removed" in lines
    kept = next(line for line in lines if "no External Account ID" in line)
    assert kept.startswith("listed but not desired, with no External Account ID: 2, left")
    assert any("A-9" in line and "nobody.example" in line for line in lines), lines
